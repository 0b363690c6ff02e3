"""reference_models/tiled_mlp.py: the MLP over tiles of tokens against the MLP run whole.

The equality we state and check (README, "Long context"). Measured on this CPU (MKL's fp32 GEMM,
oneDNN's bf16 one, 1 and 2 threads): a matmul over a tile's rows gives the same bits as over all
rows whenever every tile, the last included, has a multiple of 16 rows; MKL's fp32 GEMM takes
another kernel for some other row counts (1, 2, 3, 5 and odd remainders), bf16 never did. So:
  - tile and B x T multiples of 16: the loss, the MLP's outputs and every gradient outside the MLP
    are bit-identical; the MLP's own weight gradients are sums over tiles, in another order: within
    2^-19 of the tensor's largest element in fp32 (measured 2^-20.5) and 2^-6 in bf16 (measured
    2^-7: each tile's bf16 gradient is rounded before the fp32 sum);
  - any tile: every gradient within 2^-18 (fp32) and 2^-5 (bf16) of its largest element, as the
    chunked loss's bound (tests/test_loss.py).
The MLP's (tokens, intermediate) tensors exist for one tile only (an op-by-op allocation tracker);
backward replays the forward's dropout (finite differences in float64).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from allocations import AllocationTracker
from hypothesis import given
from hypothesis import strategies as st

from minilora.lora.layer import LoRAConfig
from minilora.lora.model import inject
from minilora.quant.qlora import prepare_for_kbit_training, quantize_model
from minilora.train import ActivationOffload
from reference_models import GPT, GPTConfig, GPTNeoX, GPTNeoXConfig, Llama, LlamaConfig
from reference_models.tiled_mlp import check_mlp_tile

VOCAB, HIDDEN, INTER = 101, 64, 176  # INTER: no other tensor is as wide
MLP_RTOL = {torch.float32: 2.0 ** -19, torch.bfloat16: 2.0 ** -6}
ANY_TILE_RTOL = {torch.float32: 2.0 ** -18, torch.bfloat16: 2.0 ** -5}


def build(family, dtype=torch.float32, method="full", dropout=0.0, seed=0):
    torch.manual_seed(seed)
    if family == "gpt2":
        model = GPT(GPTConfig(vocab_size=VOCAB, n_positions=128, n_embd=HIDDEN, n_inner=INTER, n_layer=2, n_head=4,
                              embd_pdrop=dropout, resid_pdrop=dropout, attn_pdrop=dropout))
    elif family == "gpt_neox":
        model = GPTNeoX(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                                      num_hidden_layers=2, num_attention_heads=4, hidden_dropout=dropout))
    else:
        model = Llama(LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, model_type=family))
    model = model.to(dtype).train()
    if method != "full":
        model.requires_grad_(False)
        if method == "qlora":
            quantize_model(model)
            prepare_for_kbit_training(model, use_gradient_checkpointing=False)
        inject(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear", dropout=dropout))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; a nonzero B gives A a gradient to compare
                torch.nn.init.normal_(p, std=0.02)
    return model


def ids(batch, seq, seed):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, x, y, tile, seed=0):
    model.set_mlp_tiling(tile)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the same dropout draws for both runs
    loss = model(x, y)[1]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def scaled_error(got, want):
    return (got.float() - want.float()).abs().max().item() / max(want.float().abs().max().item(), 1e-30)


# families x methods x precisions x (checkpointing, offload): each family and method at least twice
GRID = [("llama", "full", torch.float32, "none"), ("llama", "lora", torch.bfloat16, "checkpointing"),
        ("llama", "qlora", torch.float32, "offload"), ("llama", "qlora", torch.bfloat16, "none"),
        ("gpt2", "full", torch.bfloat16, "offload"), ("gpt2", "lora", torch.float32, "checkpointing"),
        ("gpt2", "qlora", torch.bfloat16, "none"), ("gpt_neox", "lora", torch.float32, "offload"),
        ("gpt_neox", "full", torch.bfloat16, "checkpointing"), ("phi3", "lora", torch.float32, "none"),
        ("gemma2", "qlora", torch.float32, "checkpointing")]


@pytest.mark.parametrize("family,method,dtype,memory", GRID)
def test_tiles_of_16_rows_are_bit_identical_outside_the_mlp_and_within_rounding_inside(family, method, dtype, memory):
    model = build(family, dtype, method)
    offload = ActivationOffload("cpu") if memory == "offload" else None
    model.set_gradient_checkpointing(memory != "none", offload=offload)
    x, y = ids(2, 40, 0), ids(2, 40, 1)  # 80 tokens: tiles of 16 and 32 rows, the last 16
    want_loss, want = loss_and_grads(model, x, y, None)
    for tile in (16, 32):
        loss, got = loss_and_grads(model, x, y, tile)
        assert torch.equal(loss, want_loss) and got.keys() == want.keys()
        for name in want:
            if ".mlp." in name:
                assert scaled_error(got[name], want[name]) <= MLP_RTOL[dtype], (tile, name)
            else:
                assert torch.equal(got[name], want[name]), (tile, name)


@given(family=st.sampled_from(["llama", "gpt2", "gpt_neox"]), method=st.sampled_from(["full", "lora"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), batch=st.integers(1, 3), seq=st.integers(2, 30),
       tile=st.integers(1, 30), checkpointing=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_any_tile_trains_as_the_whole_mlp_within_the_bound(family, method, dtype, batch, seq, tile, checkpointing,
                                                           seed):
    model = build(family, dtype, method, seed=seed)
    model.set_gradient_checkpointing(checkpointing)
    x, y = ids(batch, seq, seed), ids(batch, seq, seed + 1)
    want_loss, want = loss_and_grads(model, x, y, None)
    loss, got = loss_and_grads(model, x, y, min(tile, seq))
    assert abs(loss.item() - want_loss.item()) <= 2.0 ** -20 * abs(want_loss.item())
    for name in want:
        assert scaled_error(got[name], want[name]) <= ANY_TILE_RTOL[dtype], name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_mlps_token_by_intermediate_tensors_exist_for_one_tile_only(family):
    model = build(family, torch.float32, "lora")
    x, y = ids(2, 48, 0), ids(2, 48, 1)

    def widest(tile):
        """The most rows of any tensor as wide as the MLP's intermediate, in forward and backward."""
        model.set_mlp_tiling(tile)
        with AllocationTracker() as tracker:
            model(x, y)[1].backward()
        return max(math.prod(s[:-1]) for s in tracker.shapes if s and s[-1] in (INTER, 2 * INTER))

    assert widest(None) == 2 * 48
    assert widest(16) == 16 and widest(24) == 24


@pytest.mark.parametrize("family,method", [("gpt2", "full"), ("gpt2", "lora"), ("gpt_neox", "lora")])
def test_backward_replays_the_forwards_dropout(family, method):
    # the gradient is the derivative of the loss the forward computed: a central difference along the
    # gradient, each evaluation drawing the same masks (the same seed), all in float64 (lm_loss is
    # fp32: the loss here is float64 cross-entropy of the logits; Llama is left out, its RMSNorm computes
    # in fp32). GPT-2's MLP ends in a dropout; LoRA's adapters drop their input. Measured: within 3e-9;
    # without the replay the slope is off by 12% to 36%.
    model = build(family, torch.float64, method, dropout=0.3)
    model.set_mlp_tiling(8)
    x, y = ids(2, 24, 0), ids(2, 24, 1)

    def loss():
        torch.manual_seed(7)
        return F.cross_entropy(model(x).flatten(0, 1), y.flatten())

    loss().backward()
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad.clone() for p in params]
    norm2 = sum(float((g * g).sum()) for g in grads)
    eps = 1e-6 / math.sqrt(norm2)

    @torch.no_grad()
    def loss_at(step):
        for p, g in zip(params, grads):
            p.add_(g, alpha=step)
        value = loss().item()
        for p, g in zip(params, grads):
            p.sub_(g, alpha=step)
        return value

    slope = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert abs(slope - norm2) <= 1e-7 * norm2, (slope, norm2)


def test_eval_and_no_grad_run_tiles_without_a_graph_and_give_the_same_logits():
    model = build("llama")
    x = ids(2, 32, 0)
    with torch.no_grad():
        want = model(x)
        model.set_mlp_tiling(16)
        got = model(x)
    assert torch.equal(got, want)


def test_the_model_reports_and_clears_its_tile():
    model = build("llama")
    model.set_mlp_tiling(16)
    assert model.mlp_tile == 16 and all(block.mlp.tile == 16 for block in model.model.layers)
    model.set_mlp_tiling(None)
    assert model.mlp_tile is None and all(block.mlp.tile is None for block in model.model.layers)


@pytest.mark.parametrize("tile,message", [(0, "tile must be an integer >= 1 (tokens per tile), got 0"),
                                          (-3, "got -3"), (2.5, "got 2.5"), (True, "got True")])
def test_a_bad_tile_is_refused_in_one_line_and_changes_nothing(tile, message):
    model = build("llama")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        model.set_mlp_tiling(tile)
    assert "\n" not in str(err.value) and model.mlp_tile is None


def test_a_tile_longer_than_the_sequence_is_refused_where_the_sequence_is_known():
    check_mlp_tile(512, seq=512)
    with pytest.raises(ValueError, match="mlp_tile must be at most the sequence length 512 .*got 513"):
        check_mlp_tile(513, seq=512)


def test_mixture_of_experts_layers_are_refused_and_nothing_changes():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, model_type="mixtral",
                              moe=dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64)))
    with pytest.raises(ValueError, match="layer 0's mlp is a SparseMoE, whose router and experts are not tiled"):
        model.set_mlp_tiling(16)
    assert model.mlp_tile is None
