"""reference_models/loss.py: the chunked (fused linear) cross-entropy against the full one.

The bound we state and check (README, "Long context"): the loss equals the full loss to fp32
rounding (relative difference <= 2^-20, about 8 ulps: the per-token terms are summed in another
order); every gradient tensor is within 2^-18 of its largest element in fp32 and within 2^-5 in
bf16 (autocast or bf16 weights: the head's bf16 products round apart by an ulp, and backward
carries that through the blocks). The chunked loss never allocates a (B, T, V) tensor. It computes
its gradients in forward and backward scales them by the loss's gradient: exactly (bit for bit) for
a power of two, within the same bounds otherwise, and not at all under torch.no_grad.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from allocations import AllocationTracker
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from reference_models import GPT, GPTConfig, GPTNeoX, GPTNeoXConfig, Llama, LlamaConfig
from reference_models.loss import DEFAULT_LOSS_CHUNK, chunked_cross_entropy, lm_loss

LOSS_RTOL = 2.0 ** -20
GRAD_RTOL = {torch.float32: 2.0 ** -18, torch.bfloat16: 2.0 ** -5}


def full_loss(hidden, weight, targets, softcap=None):
    logits = F.linear(hidden, weight)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return lm_loss(logits, targets)


def loss_and_grads(fn, hidden, weight, targets, autocast=False, **kw):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = fn(hidden, weight, targets, **kw)
    loss.backward()
    return loss.detach(), hidden.grad, weight.grad


def assert_within_bound(got, want, dtype, name=""):
    scale = want.float().abs().max().item()
    worst = (got.float() - want.float()).abs().max().item()
    assert worst <= GRAD_RTOL[dtype] * scale, f"{name}: {worst} > {GRAD_RTOL[dtype]} x {scale}"


@given(batch=st.integers(1, 3), seq=st.integers(1, 40), width=st.sampled_from([8, 24, 64]),
       vocab=st.integers(2, 300), chunk=st.integers(1, 50), ignored=st.floats(0, 0.9),
       softcap=st.sampled_from([None, 0.5, 3.0]), precision=st.sampled_from(["fp32", "bf16", "autocast"]),
       seed=st.integers(0, 2 ** 16))
def test_chunked_loss_equals_the_full_loss_to_fp32_rounding_and_gradients_within_the_bound(
        batch, seq, width, vocab, chunk, ignored, softcap, precision, seed):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    hidden = torch.randn(batch, seq, width, generator=g).to(dtype)
    weight = (torch.randn(vocab, width, generator=g) * width ** -0.5).to(dtype)
    targets = torch.randint(0, vocab, (batch, seq), generator=g)
    targets[torch.rand(batch, seq, generator=g) < ignored] = -100
    targets.view(-1)[0] = 0  # at least one learned token (with none both losses are NaN)
    autocast = precision == "autocast"
    want = loss_and_grads(full_loss, hidden, weight, targets, autocast, softcap=softcap)
    got = loss_and_grads(chunked_cross_entropy, hidden, weight, targets, autocast, chunk_size=chunk, softcap=softcap)
    assert abs(got[0].item() - want[0].item()) <= LOSS_RTOL * abs(want[0].item())
    bound = torch.bfloat16 if precision != "fp32" else torch.float32
    assert_within_bound(got[1], want[1], bound, "hidden")
    assert_within_bound(got[2], want[2], bound, "weight")
    assert got[1].dtype == want[1].dtype and got[2].dtype == want[2].dtype


def test_every_chunk_size_gives_the_same_loss_when_one_chunk_covers_everything():
    # a chunk as long as the batch's tokens is one chunk; longer changes nothing
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(2, 9, 16, generator=g), torch.randn(50, 16, generator=g)
    targets = torch.randint(0, 50, (2, 9), generator=g)
    one = chunked_cross_entropy(hidden, weight, targets, chunk_size=18)
    assert torch.equal(one, chunked_cross_entropy(hidden, weight, targets, chunk_size=1000))


def test_ignored_tokens_get_zero_gradient_and_an_all_ignored_batch_is_nan_like_the_full_loss():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 6, 8, generator=g, requires_grad=True)
    weight = torch.randn(20, 8, generator=g)
    targets = torch.randint(0, 20, (2, 6), generator=g)
    targets[1] = -100
    chunked_cross_entropy(hidden, weight, targets, chunk_size=4).backward()
    assert hidden.grad[1].abs().max() == 0 and hidden.grad[0].abs().min() > 0
    targets[:] = -100
    assert torch.isnan(chunked_cross_entropy(hidden, weight, targets, 4))
    assert torch.isnan(full_loss(hidden, weight, targets))


def tiny_models():
    yield "gpt2", GPT(GPTConfig(vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=4, embd_pdrop=0.0,
                                resid_pdrop=0.0, attn_pdrop=0.0))
    yield "llama", Llama(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2))
    yield "gemma2", Llama(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, model_type="gemma2",
                                      final_logit_softcapping=1.0))
    yield "gpt_neox", GPTNeoX(GPTNeoXConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4))


def model_step(model, x, y, loss, autocast=False):
    model.set_loss(loss, 7)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits, value = model(x, y)
    value.backward()
    return logits, value.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("family,model", list(tiny_models()))
@pytest.mark.parametrize("precision", ["fp32", "bf16", "autocast"])
def test_models_train_the_same_with_the_chunked_loss(family, model, precision):
    # full fine-tuning: every parameter's gradient, the tied or untied head's included
    torch.manual_seed(0)
    model.to(torch.bfloat16 if precision == "bf16" else torch.float32)
    x, y = torch.randint(0, 300, (3, 20)), torch.randint(0, 300, (3, 20))
    y[0, :5], y[2, 12:] = -100, -100  # a prompt and padding
    logits, want, grads = model_step(model, x, y, "full", precision == "autocast")
    none, got, chunked = model_step(model, x, y, "chunked", precision == "autocast")
    assert logits.shape == (3, 20, 300) and none is None
    assert abs(got.item() - want.item()) <= LOSS_RTOL * abs(want.item())
    bound = torch.float32 if precision == "fp32" else torch.bfloat16
    for name, grad in grads.items():
        assert_within_bound(chunked[name], grad, bound, name)


def test_no_batch_by_seq_by_vocab_tensor_is_ever_allocated():
    # the full loss allocates (B, T, V) tensors; the chunked one nothing with more than a chunk of V-rows
    _, model = next(tiny_models())
    x = torch.randint(0, 300, (2, 48))

    def vocab_rows(shape):  # how many rows of V logits (or their gradients) a tensor holds
        return math.prod(shape[:-1]) if shape and shape[-1] == 300 else 0

    for loss, most in (("full", 2 * 48), ("chunked", 16)):
        model.set_loss(loss, 16)
        with AllocationTracker() as tracker:
            model(x, x)[1].backward()
        assert max(vocab_rows(s) for s in tracker.shapes) == most, loss


def test_eval_and_generate_work_with_the_chunked_loss():
    _, model = next(tiny_models())
    x = torch.randint(0, 300, (1, 10))
    model.set_loss("chunked")
    assert model.loss_chunk == DEFAULT_LOSS_CHUNK
    with torch.no_grad():
        none, value = model(x, x)
        assert none is None and torch.isfinite(value)
        assert model(x).shape == (1, 10, 300)  # without targets: logits, as always
    assert model.eval().generate(x, 3, temperature=0).shape == (1, 13)


@pytest.mark.parametrize("chunk,message", [(0, "got 0"), (-3, "got -3"), (2.5, "got 2.5"), (True, "got True")])
def test_a_bad_chunk_size_is_refused_in_one_line(chunk, message):
    _, model = next(tiny_models())
    with pytest.raises(ValueError, match=f"chunk_size must be an integer >= 1 \\(tokens per chunk\\), {message}"):
        model.set_loss("chunked", chunk)
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1"):
        chunked_cross_entropy(torch.zeros(1, 2, 4), torch.zeros(5, 4), torch.zeros(1, 2, dtype=torch.long), chunk)


def test_bad_loss_name_shapes_and_heads_are_refused():
    _, model = next(tiny_models())
    with pytest.raises(ValueError, match=r"loss must be one of \['chunked', 'full'\], got 'fused'"):
        model.set_loss("fused")
    with pytest.raises(ValueError, match=r"targets must have shape \(1, 2\) \(batch, seq\), got \(2,\)"):
        chunked_cross_entropy(torch.zeros(1, 2, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"weight must be \(vocab, 4\), got \(5, 3\)"):
        chunked_cross_entropy(torch.zeros(1, 2, 4), torch.zeros(5, 3), torch.zeros(1, 2, dtype=torch.long))


def test_a_head_that_is_not_a_plain_linear_layer_is_refused_not_bypassed():
    # LoRA on lm_head would be skipped silently if the loss read lm_head.weight: it raises instead
    from minilora.lora.layer import LoRAConfig
    from minilora.lora.model import inject

    _, model = list(tiny_models())[1]
    inject(model, LoRAConfig(r=2, target_modules=["lm_head"]))
    model.set_loss("chunked")
    x = torch.randint(0, 300, (1, 6))
    with pytest.raises(ValueError, match="lm_head must be a bias-free nn.Linear, got LoRALinear"):
        model(x, x)
    model.set_loss("full")
    assert model(x, x)[1].isfinite()


def scaled_grads(fn, hidden, weight, targets, scales, **kw):
    """Gradients after backward of each scales[i] * fn(...) in turn, accumulated (gradient accumulation)."""
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    for scale in scales:
        (fn(hidden, weight, targets, **kw) * scale).backward()
    return hidden.grad, weight.grad


@given(width=st.sampled_from([8, 24]), vocab=st.integers(2, 200), chunk=st.integers(1, 30),
       softcap=st.sampled_from([None, 2.0]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       power=st.integers(-6, 3), seed=st.integers(0, 2 ** 16))
def test_a_loss_scaled_by_a_power_of_two_scales_every_gradient_bit_for_bit(width, vocab, chunk, softcap, dtype, power,
                                                                         seed):
    # backward multiplies the gradients forward kept by the loss's gradient; by 2^k that is exact
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(2, 15, width, generator=g).to(dtype), torch.randn(vocab, width, generator=g).to(dtype)
    targets = torch.randint(0, vocab, (2, 15), generator=g)
    one = scaled_grads(chunked_cross_entropy, hidden, weight, targets, [1.0], chunk_size=chunk, softcap=softcap)
    scaled = scaled_grads(chunked_cross_entropy, hidden, weight, targets, [2.0 ** power], chunk_size=chunk,
                          softcap=softcap)
    for got, want in zip(scaled, one):
        assert torch.equal(got, want * 2.0 ** power)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scales", [[0.25], [0.3], [0.6, 0.4], [1.0, 1.0, 0.5]])
def test_scaled_and_accumulated_gradients_are_the_full_losss_within_the_bound(dtype, scales):
    # a loss times a share, backward per micro-batch, the gradients summed in .grad (minilora.train's step)
    g = torch.Generator().manual_seed(len(scales))
    hidden = torch.randn(2, 21, 24, generator=g).to(dtype)
    weight = (torch.randn(150, 24, generator=g) * 24 ** -0.5).to(dtype)
    targets = torch.randint(0, 150, (2, 21), generator=g)
    targets[1, :6] = -100
    want = scaled_grads(full_loss, hidden, weight, targets, scales)
    got = scaled_grads(chunked_cross_entropy, hidden, weight, targets, scales, chunk_size=8)
    assert_within_bound(got[0], want[0], dtype, "hidden")
    assert_within_bound(got[1], want[1], dtype, "weight")


class MatmulCounter(TorchDispatchMode):
    """Counts the matrix products (mm, addmm, either form) aten runs."""
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("grad_enabled,hidden_grad,head_grad,products", [
    (False, True, True, 1), (True, False, False, 1), (True, True, False, 2), (True, False, True, 2),
    (True, True, True, 3)])
def test_forward_does_gradient_work_only_for_what_needs_a_gradient(grad_enabled, hidden_grad, head_grad, products):
    # per chunk: the logits, then the hidden rows' gradient and the head's, each only when wanted
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(1, 20, 16, generator=g).requires_grad_(hidden_grad)
    weight = torch.randn(90, 16, generator=g).requires_grad_(head_grad)
    targets = torch.randint(0, 90, (1, 20), generator=g)
    with torch.set_grad_enabled(grad_enabled), MatmulCounter() as counter, AllocationTracker() as tracker:
        loss = chunked_cross_entropy(hidden, weight, targets, chunk_size=7)
    assert counter.count == 3 * products  # 3 chunks
    assert loss.requires_grad == (grad_enabled and (hidden_grad or head_grad))
    assert ((20, 16) in tracker.shapes) == (grad_enabled and hidden_grad)  # the hidden rows' gradient
    assert ((90, 16) in tracker.shapes) == (grad_enabled and head_grad)  # the head's fp32 gradient sum
    if products == 1:  # the loss alone: one chunk's fp32 logits, the learned-token mask, a few values per row
        assert tracker.peak <= 7 * 90 * 4 + 20 + 24 * 7 + 8


def test_a_second_backward_through_a_scaled_chunked_loss_is_refused_not_wrong():
    # the kept gradients are scaled in place; with the loss's gradient exactly 1 they are handed on as they are
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(1, 10, 8, generator=g, requires_grad=True)
    weight, targets = torch.randn(30, 8, generator=g), torch.randint(0, 30, (1, 10), generator=g)
    loss = chunked_cross_entropy(hidden, weight, targets, 4)
    loss.backward(retain_graph=True)
    once = hidden.grad.clone()
    loss.backward(retain_graph=True)
    assert torch.equal(hidden.grad, 2 * once)
    scaled = chunked_cross_entropy(hidden, weight, targets, 4) * 0.5
    scaled.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=r"runs once per forward; for a second backward through the same graph "
                                           r"\(retain_graph=True\) use set_loss\('full'\)"):
        scaled.backward()
