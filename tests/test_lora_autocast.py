"""minilora's custom autograd Functions under bf16 autocast (LowRankAdd in lora.py, Linear4bitFunction in
matmul_4bit.py), checked on CPU autocast: QLoRA on CUDA runs fp32 adapters on a 4-bit base under bf16 autocast,
and a custom Function's backward runs outside autocast, so mixed dtypes there once raised
"expected mat1 and mat2 to have the same dtype". Gradients must come back in each input's dtype and equal
what the same math in plain ops gives under autocast."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from minilora.lora.layer import LoRALinear, LowRankAdd, autocast_dtype
from minilora.quant.qlora import LinearNF4

BF16 = torch.bfloat16


def autocast():
    return torch.autocast("cpu", dtype=BF16)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def assert_close_in_bf16(got, expected, name):
    # both sides compute in bf16 but round at different points (fused addmm vs linear + add):
    # compare as relative error of the whole tensor, a few bf16 ulps (2**-8 = 0.0039)
    error = (got.float() - expected.float()).norm() / expected.float().norm().clamp_min(1e-12)
    assert error < 2e-2, f"{name}: relative error {error:.3g}"


def test_autocast_dtype_is_the_enabled_autocast_dtype_or_none():
    x = torch.zeros(2)
    assert autocast_dtype(x) is None
    with autocast():
        assert autocast_dtype(x) == BF16
        with torch.autocast("cpu", enabled=False):
            assert autocast_dtype(x) is None
    assert autocast_dtype(torch.zeros(2, device="meta")) is None  # no autocast for this device type


@given(st.integers(1, 4), st.integers(1, 24), st.integers(1, 24), st.integers(1, 4), st.booleans())
@settings(max_examples=10)
def test_low_rank_add_under_autocast_is_bit_identical_to_casting_by_hand(batch, fan_in, fan_out, r, h_needs_grad):
    g = torch.Generator().manual_seed(batch * 1000 + fan_in * 10 + r)
    h = torch.randn(batch, 3, fan_in, generator=g).requires_grad_(h_needs_grad)
    result = torch.randn(batch, 3, fan_out, generator=g, requires_grad=True)
    A = torch.randn(r, fan_in, generator=g, requires_grad=True)
    B = torch.randn(fan_out, r, generator=g, requires_grad=True)
    weight = torch.randn(batch, 3, fan_out, generator=g)
    with autocast():
        out = LowRankAdd.apply(h, result, A, B, 0.7)
    assert out.dtype == BF16  # as autocast's addmm
    (out.float() * weight).sum().backward()
    # the same inputs cast to bf16 by hand, no autocast: the Function must do exactly this
    by_hand = leaves(*(t.to(BF16) for t in (h, result, A, B)))
    expected = LowRankAdd.apply(*by_hand, 0.7)
    (expected.float() * weight).sum().backward()
    assert torch.equal(out, expected)
    for name, mine, theirs in zip(("h", "result", "A", "B"), (h, result, A, B), by_hand):
        if not mine.requires_grad:
            assert mine.grad is None
            continue
        assert mine.grad is not None and mine.grad.dtype == torch.float32, name  # the input's dtype
        assert torch.equal(mine.grad, theirs.grad.float()), name


def test_low_rank_add_under_autocast_matches_plain_ops():
    g = torch.Generator().manual_seed(0)
    h, result = torch.randn(4, 8, 48, generator=g), torch.randn(4, 8, 40, generator=g)
    A, B = torch.randn(6, 48, generator=g) / 7, torch.randn(40, 6, generator=g) / 3
    weight = torch.randn(4, 8, 40, generator=g)
    mine, plain = leaves(h, result, A, B), leaves(h, result, A, B)
    with autocast():
        out = LowRankAdd.apply(*mine, 0.5)
        ph, presult, pA, pB = plain
        expected = presult + F.linear(F.linear(ph, pA), pB) * 0.5
    (out.float() * weight).sum().backward()
    (expected.float() * weight).sum().backward()
    assert_close_in_bf16(out, expected, "output")
    for name, m, p in zip(("h", "result", "A", "B"), mine, plain):
        assert m.grad.dtype == torch.float32, name
        assert_close_in_bf16(m.grad, p.grad, name)


def _qlora_layer(compute_dtype, seed=0):
    torch.manual_seed(seed)
    base = LinearNF4.from_linear(nn.Linear(64, 48), compute_dtype=compute_dtype)
    layer = LoRALinear(base, name="proj")
    layer.add_adapter("a", 4, 8)
    layer.active_adapters = ["a"]
    # adapters in fp32 (QLoRA's trainable precision); a nonzero B so that A gets a gradient too
    layer.lora_A["a"].float()
    layer.lora_B["a"].float()
    with torch.no_grad():
        layer.lora_B["a"].weight.normal_(std=0.1)
    return layer


@pytest.mark.parametrize("compute_dtype", [torch.float32, BF16])
def test_qlora_layer_trains_under_bf16_autocast_with_fp32_adapter_gradients(compute_dtype):
    layer = _qlora_layer(compute_dtype)
    A, B = layer.lora_A["a"].weight, layer.lora_B["a"].weight
    assert A.dtype == B.dtype == torch.float32
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1))
    weight = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(2))
    mine = x.clone().requires_grad_(True)
    with autocast():
        out = layer(mine)
    (out.float() * weight).sum().backward()  # raised "expected m1 and m2 to have the same dtype" before
    # reference: the same layer as plain ops under autocast (the dense dequantized weight, F.linear)
    ref_x, ref_A, ref_B = leaves(x, A, B)
    W = layer.base_layer.dequantize_weight().float()
    bias = layer.base_layer.bias.float()
    with autocast():
        base_out = F.linear(ref_x.to(compute_dtype), W, bias).to(x.dtype)
        expected = base_out + F.linear(F.linear(ref_x, ref_A), ref_B) * layer.scaling["a"]
    (expected.float() * weight).sum().backward()
    assert_close_in_bf16(out, expected, "output")
    for name, got, ref in (("x", mine, ref_x), ("lora_A", A, ref_A), ("lora_B", B, ref_B)):
        assert got.grad is not None and got.grad.dtype == torch.float32, name
        assert_close_in_bf16(got.grad, ref.grad, name)


def test_linear_nf4_under_autocast_is_bit_identical_to_autocast_linear_on_the_dequantized_weight():
    torch.manual_seed(0)
    layer = LinearNF4.from_linear(nn.Linear(64, 48))
    layer.bias.requires_grad_(True)  # frozen in QLoRA; trainable here to check its gradient's dtype
    x = torch.randn(6, 64, requires_grad=True)
    weight = torch.randn(6, 48)
    with autocast():
        out = layer(x)
    assert out.dtype == torch.float32  # LinearNF4 casts back to the input's dtype
    (out * weight).sum().backward()
    ref_x, ref_bias = leaves(x, layer.bias)
    W = layer.dequantize_weight().float()  # rounds to bf16 once under autocast, as a bf16 dequantize does
    with autocast():
        expected = F.linear(ref_x, W, ref_bias).float()
    (expected * weight).sum().backward()
    assert torch.equal(out, expected)
    assert x.grad.dtype == layer.bias.grad.dtype == torch.float32
    assert torch.equal(x.grad, ref_x.grad)
    assert torch.equal(layer.bias.grad, ref_bias.grad)
