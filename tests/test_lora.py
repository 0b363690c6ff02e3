"""Properties of LoRALinear and LoRAConfig (minilora/lora/layer.py), checked over shapes, ranks, alphas and dtypes."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from minilora.lora.layer import LoRAConfig, LoRALinear

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@st.composite
def layers(draw, dtypes=(torch.float32,)):
    fan_in = draw(st.integers(1, 48))
    fan_out = draw(st.integers(1, 48))
    r = draw(st.integers(1, min(fan_in, fan_out)))
    alpha = draw(st.sampled_from([0.5, 1.0, 8.0, 16.0, 32.0]))
    dtype = draw(st.sampled_from(dtypes))
    bias = draw(st.booleans())
    rslora = draw(st.booleans())
    dora = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    base = nn.Linear(fan_in, fan_out, bias=bias).to(dtype)
    layer = LoRALinear(base, name="proj")
    layer.add_adapter("a", r, alpha, use_rslora=rslora, use_dora=dora)
    layer.active_adapters = ["a"]
    return layer


def randomize_(layer, adapter="a", std=0.3):
    with torch.no_grad():
        layer.lora_B[adapter].weight.normal_(0, std)
        if adapter in layer.lora_magnitude_vector:
            layer.lora_magnitude_vector[adapter].mul_(1.25)


def tol(dtype):
    return {torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 3e-3}[dtype]


@given(layers(dtypes=DTYPES), st.integers(1, 4))
def test_fresh_adapter_is_a_noop_bit_identical(layer, batch):
    x = torch.randn(batch, 3, layer.in_features).to(layer.base_layer.weight.dtype)
    with torch.no_grad():
        if not layer.lora_magnitude_vector:
            assert torch.equal(layer(x), layer.base_layer(x))  # B = 0 exactly
        else:  # DoRA at init rescales rows by m / ||W|| = 1 up to rounding
            torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=tol(x.dtype), atol=tol(x.dtype))


@given(layers(dtypes=DTYPES))
def test_merge_then_forward_equals_unmerged_forward(layer):
    randomize_(layer)
    dtype = layer.base_layer.weight.dtype
    x = torch.randn(2, 5, layer.in_features).to(dtype)
    with torch.no_grad():
        before = layer(x).float()
        layer.merge(["a"])
        after = layer(x).float()
    scale = before.abs().max().item() + 1
    assert (before - after).abs().max().item() <= tol(dtype) * scale * 4


@given(layers(dtypes=DTYPES))
def test_merge_then_unmerge_restores_w_within_rounding(layer):
    """fp32: exact up to a few ulps; bf16/fp16: each of the two roundings (merge, unmerge) moves an
    entry by at most half an ulp of |W + dW|, so |W' - W| <= eps * (|W| + |dW|) (DoRA: rescaled rows)."""
    randomize_(layer)
    W = layer.base_layer.weight.detach().clone()
    delta = layer.delta_weight("a")
    layer.merge(["a"])
    assert not torch.equal(layer.base_layer.weight, W)
    layer.unmerge()
    err = (layer.base_layer.weight.float() - W.float()).abs()
    eps = torch.finfo(W.dtype).eps
    bound = eps * (W.float().abs() + 2 * delta.abs()) * (4 if layer.lora_magnitude_vector else 1) + 1e-30
    if W.dtype == torch.float32:
        bound = bound * 8 + 1e-6 * (W.float().abs().max() + delta.abs().max())
    assert (err <= bound).all(), f"max err {err.max().item()} over bound"


def test_bf16_merge_rounds_once_from_fp32():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(64, 64).to(torch.bfloat16))
    layer.add_adapter("a", 8, 16)
    randomize_(layer, std=0.05)
    expected = (layer.base_layer.weight.float() + layer.delta_weight("a")).to(torch.bfloat16)
    layer.merge(["a"])
    assert torch.equal(layer.base_layer.weight, expected)


@given(layers(dtypes=DTYPES))
@settings(max_examples=10)
def test_gradients_reach_only_adapter_parameters(layer):
    layer.base_layer.requires_grad_(False)
    randomize_(layer)
    x = torch.randn(2, 4, layer.in_features, dtype=layer.base_layer.weight.dtype, requires_grad=True)
    layer(x).float().square().sum().backward()
    grads = {n for n, p in layer.named_parameters() if p.grad is not None}
    expected = {"lora_A.a.weight", "lora_B.a.weight"} | (
        {"lora_magnitude_vector.a"} if layer.lora_magnitude_vector else set())
    assert grads == expected
    assert x.grad is not None


def test_scaling_is_alpha_over_r_or_sqrt_r():
    layer = LoRALinear(nn.Linear(32, 32))
    layer.add_adapter("plain", 4, 8)
    layer.add_adapter("rs", 4, 8, use_rslora=True)
    assert layer.scaling == {"plain": 2.0, "rs": 4.0}


def test_forward_is_base_plus_scaled_b_a_x():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 10))
    layer.add_adapter("a", 3, 6)
    layer.active_adapters = ["a"]
    randomize_(layer)
    x = torch.randn(4, 12)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 2.0 * x @ A.T @ B.T)


def test_two_active_adapters_add_up():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 10))
    for name in ("a", "b"):
        layer.add_adapter(name, 3, 6)
        randomize_(layer, name)
    x = torch.randn(4, 12)
    outs = {}
    for active in (["a"], ["b"], ["a", "b"], []):
        layer.active_adapters = active
        outs[tuple(active)] = layer(x)
    torch.testing.assert_close(outs[("a", "b")] - outs[()], (outs[("a",)] - outs[()]) + (outs[("b",)] - outs[()]))


def test_dropout_zero_does_not_copy_the_input(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda *a, **k: calls.append(1) or a[0])
    layer = LoRALinear(nn.Linear(8, 8))
    layer.add_adapter("a", 2, 4, dropout=0.0)
    layer.active_adapters = ["a"]
    layer.train()
    layer(torch.randn(2, 8))
    assert calls == []
    layer.add_adapter("d", 2, 4, dropout=0.5)
    layer.active_adapters = ["d"]
    layer(torch.randn(2, 8))
    assert calls == [1]


def test_dropout_is_applied_in_training_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16))
    layer.add_adapter("a", 4, 8, dropout=0.5)
    layer.active_adapters = ["a"]
    randomize_(layer)
    x = torch.randn(8, 16)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_and_olora_keep_the_output_at_step_zero(init):
    torch.manual_seed(0)
    base = nn.Linear(24, 20)
    x = torch.randn(3, 24)
    y = base(x).detach()
    layer = LoRALinear(base)
    layer.add_adapter("a", 4, 8, init=init)
    layer.active_adapters = ["a"]
    assert layer.lora_B["a"].weight.abs().sum() > 0  # starts from W's principal directions, not 0
    torch.testing.assert_close(layer(x), y, rtol=1e-5, atol=1e-5)


def test_gaussian_init_has_std_one_over_r():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(512, 512))
    layer.add_adapter("a", 4, 8, init="gaussian")
    assert abs(layer.lora_A["a"].weight.std().item() - 0.25) < 0.01
    assert layer.lora_B["a"].weight.abs().sum() == 0


def test_safe_merge_refuses_non_finite_weights_and_leaves_w_alone():
    layer = LoRALinear(nn.Linear(8, 8).half(), name="blocks.0.fc")
    layer.add_adapter("big", 2, 4)
    with torch.no_grad():
        layer.lora_A["big"].weight.fill_(300.0)
        layer.lora_B["big"].weight.fill_(300.0)
    W = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match=r"merging adapter 'big' into blocks.0.fc gives non-finite"):
        layer.merge(["big"], safe=True)
    assert torch.equal(layer.base_layer.weight, W) and layer.merged_adapters == []


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), r"r must be a positive integer, got 0"),
    (dict(r=-3), r"r must be a positive integer, got -3"),
    (dict(r=2.5), r"r must be a positive integer, got 2.5"),
    (dict(alpha=0), r"alpha must be > 0, got 0"),
    (dict(alpha=-1.0), r"alpha must be > 0, got -1.0"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (dict(dropout=-0.1), r"dropout must be in \[0, 1\), got -0.1"),
    (dict(bias="some"), r"bias must be one of \('none', 'all', 'lora_only'\), got 'some'"),
    (dict(init="xavier"), r"init must be one of .*got 'xavier'"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive integer, got 0"),
    (dict(alpha_pattern={"q_proj": -2}), r"alpha_pattern\['q_proj'\] must be > 0, got -2"),
    (dict(target_modules=[]), r"target_modules must be a non-empty list"),
])
def test_bad_config_values_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig(**kwargs)


def test_rank_larger_than_the_layer_is_refused_with_the_shape():
    layer = LoRALinear(nn.Linear(768, 2304), name="transformer.h.0.attn.c_attn")
    with pytest.raises(ValueError, match=r"rank must be in 1..768 for transformer.h.0.attn.c_attn \(768 -> 2304\), got 769"):
        layer.add_adapter("a", 769, 16)
    with pytest.raises(ValueError, match=r"got 0"):
        layer.add_adapter("a", 0, 16)


def test_non_linear_base_is_refused():
    with pytest.raises(TypeError, match=r"LoRA needs a linear layer at emb, got Embedding"):
        LoRALinear(nn.Embedding(10, 4), name="emb")


def test_linear_like_protocol_base_is_accepted():
    class FakeQuant(nn.Module):
        lora_compatible = True

        def __init__(self):
            super().__init__()
            self.in_features, self.out_features = 6, 5
            self.register_buffer("w", torch.randn(5, 6))
            self.bias = None
            self.requantized = 0

        def forward(self, x):
            return x @ self.w.T

        def dequantize_weight(self):
            return self.w.clone()

        def requantize_(self, weight):
            self.requantized += 1
            self.w.copy_(weight)

    base = FakeQuant()
    layer = LoRALinear(base)
    layer.add_adapter("a", 2, 4)
    layer.active_adapters = ["a"]
    randomize_(layer)
    x = torch.randn(3, 6)
    y = layer(x).detach()
    layer.merge(["a"])
    assert base.requantized == 1
    torch.testing.assert_close(layer(x), y)
    layer.unmerge()
    assert base.requantized == 2
    assert math.isclose(layer.scaling["a"], 2.0)


@given(st.integers(1, 6), st.integers(1, 9), st.integers(1, 9), st.integers(1, 4), st.booleans())
@settings(max_examples=10)
def test_low_rank_add_backward_passes_gradcheck(batch, fan_in, fan_out, r, h_needs_grad):
    from minilora.lora.layer import LowRankAdd

    g = torch.Generator().manual_seed(batch * 100 + fan_in)
    h = torch.randn(batch, 2, fan_in, dtype=torch.float64, generator=g).requires_grad_(h_needs_grad)
    result = torch.randn(batch, 2, fan_out, dtype=torch.float64, generator=g, requires_grad=True)
    A = torch.randn(r, fan_in, dtype=torch.float64, generator=g, requires_grad=True)
    B = torch.randn(fan_out, r, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: LowRankAdd.apply(*t, 0.7), (h, result, A, B))
    torch.testing.assert_close(LowRankAdd.apply(h, result, A, B, 0.7), result + 0.7 * h @ A.T @ B.T)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dora", [False, True])
def test_merge_unmerge_drift_over_100_cycles_stays_within_a_few_ulps(dtype, dora):
    """Plain LoRA: one merge/unmerge cycle reaches a fixed point (round(round(W + d) - d) maps to
    itself), so 100 cycles drift no more than one. DoRA's multiply and divide by m/||W + dW|| add a
    slow random walk: a few ulps in 16-bit (computed in fp32 and rounded), tens of ulps in fp32."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 256).to(dtype), "fc")
    layer.add_adapter("a", 8, 16, use_dora=dora)
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_(0, 0.02)
    W0 = layer.base_layer.weight.detach().float().clone()
    ulp = torch.finfo(dtype).eps * (W0.abs() + layer.delta_weight("a").abs())  # spacing near |W| + |dW|
    drift = []
    for _ in range(100):
        layer.merge(["a"])
        layer.unmerge()
        drift.append(((layer.base_layer.weight.float() - W0).abs() / ulp).max().item())
    print(f"{dtype} dora={dora}: drift in ulps after 1, 10, 100 cycles: {drift[0]:.2f} {drift[9]:.2f} {drift[-1]:.2f}")
    if not dora:
        assert drift[-1] == drift[0] <= 1
    elif dtype == torch.float32:  # computed in the storage precision: the walk is not snapped back
        assert drift[-1] <= 100
    else:  # computed in fp32, rounded to 16 bits: rounding mostly snaps the walk back
        assert drift[-1] <= 4


def _nf4_layer(seed=0, size=256):
    from minilora.quant.qlora import LinearNF4

    torch.manual_seed(seed)
    dense = nn.Linear(size, size)
    return LoRALinear(LinearNF4.from_linear(dense), name="q")


@pytest.mark.parametrize("dora", [False, True])
def test_merge_unmerge_on_a_4bit_base_restores_the_stored_weight_bit_for_bit(dora):
    layer = _nf4_layer()
    layer.add_adapter("a", 8, 16, use_dora=dora)
    layer.add_adapter("b", 4, 8)
    layer.active_adapters = ["a"]
    randomize_(layer, "a", std=0.3)
    randomize_(layer, "b", std=0.3)
    w0 = layer.base_layer.dequantize_weight().clone()
    state0 = {k: v.clone() for k, v in layer.base_layer.state_dict().items()}
    for adapters in (["a"], ["b"]) if dora else (["a"], ["a", "b"], ["b"]):
        layer.merge(adapters)
        assert not torch.equal(layer.base_layer.dequantize_weight(), w0)
        layer.unmerge()
        assert torch.equal(layer.base_layer.dequantize_weight(), w0)
        assert layer.merged_adapters == [] and layer._dora_norm == {}
    state1 = layer.base_layer.state_dict()
    assert state1.keys() == state0.keys() and all(torch.equal(state1[k], state0[k]) for k in state0)


def test_refused_merge_leaves_no_dora_norm_behind():
    layer = LoRALinear(nn.Linear(6, 5), name="q")
    layer.add_adapter("a", 2, 4, use_dora=True)
    with torch.no_grad():
        layer.lora_B["a"].weight.fill_(float("inf"))
    w = layer.base_layer.weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(["a"])
    assert layer._dora_norm == {} and layer.merged_adapters == []
    assert torch.equal(layer.base_layer.weight, w)
