"""calculators.tape: the autocast rules it assumes on CPU are torch's, and its bookkeeping counts each
storage once (the grids in test_calc_stack_hf.py / test_calc_activations.py check whole models)."""
import torch
import torch.nn.functional as F

from calculators.tape import Sym, Tape, promote


def test_cpu_autocast_lowers_matmuls_and_keeps_only_the_losses_in_fp32():
    """tape.Tape: under autocast, linear / bmm / SDPA run in the autocast dtype on every device; on
    CPU autocast's fp32 list holds the losses only (layer_norm, softmax, pow and rsqrt keep their
    input's dtype), which is why the tape's fp32 casts apply on CUDA alone."""
    x32, x16 = torch.randn(2, 4, 8), torch.randn(2, 4, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lowered = [F.linear(x32, torch.randn(8, 8)), torch.bmm(x32, x32.transpose(1, 2)), x32 @ x32.transpose(1, 2),
                   F.scaled_dot_product_attention(x32[None], x32[None], x32[None], is_causal=True)]
        kept = [F.layer_norm(x16, (8,)), F.softmax(x16, -1), torch.pow(x16, 3.0), torch.rsqrt(x16.abs() + 1),
                torch.tanh(x16), F.silu(x16)]
        loss = F.cross_entropy(x16.reshape(8, 8), torch.zeros(8, dtype=torch.long), reduction="none")
    assert all(t.dtype == torch.bfloat16 for t in lowered + kept)
    assert loss.dtype == torch.float32


def test_views_share_one_storage_and_parameters_are_never_counted():
    t = Tape(device="cpu")
    qkv = t.tensor(3 * 64, "bf16", grad=True)
    t.save(qkv.view(64), qkv.view(64), qkv.view(64))
    assert t.total() == 3 * 64 * 2
    w = t.param(64, "bf16", trainable=True)
    t.mul(w, t.tensor(64, "bf16", grad=True))      # keeps the activation for w's gradient, w itself is state
    assert t.total() == 3 * 64 * 2 + 64 * 2


def test_linear_under_autocast_keeps_the_16_bit_copies_it_needs():
    t = Tape(device="cuda", autocast="bf16")
    x = t.tensor(10 * 8, "fp32", grad=True)
    out = t.linear(x, 8, 4, trainable=False, weight_dtype="fp32")
    # frozen fp32 weight: the bf16 copy of it is kept for x's gradient, x's copy is not needed
    assert out.dtype == "bf16" and t.total() == 8 * 4 * 2
    t.linear(t.tensor(10 * 8, "fp32", grad=False), 8, 4, trainable=True, weight_dtype="bf16")
    # a trained bf16 weight: the input's bf16 copy is kept for the weight's gradient, no weight copy
    assert t.total() == 8 * 4 * 2 + 10 * 8 * 2


def test_promotion_and_dropout_masks_per_device():
    assert promote("bf16", "fp32") == "fp32" and promote("bf16", "bf16") == "bf16" and promote("bf16", "fp16") == "fp32"
    for device, mask in (("cpu", 2), ("cuda", 1)):
        t = Tape(device=device)
        t.dropout(t.tensor(100, "bf16", grad=True), 0.1)
        assert t.total() == 100 * mask
    t = Tape(device="cpu")
    t.dropout(t.tensor(100, "bf16", grad=False), 0.1)   # nothing needs a gradient: nothing kept
    assert t.total() == 0 and isinstance(t.tensor(1, "fp32"), Sym)
