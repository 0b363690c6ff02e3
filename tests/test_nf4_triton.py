"""The Triton kernels (minilora/quant/triton_dequantize.py, triton_matmul.py) against the eager path,
which models bitsandbytes' CUDA dequantize bit for bit (tests/test_nf4_backends.py checks that on a
GPU): the dequantize bit for bit, the fused matmuls within the rounding bound of a different
accumulation order.

Without a GPU they run in Triton's interpreter, on CPU tensors: TRITON_INTERPRET=1 is set here,
before minilora's kernels are first imported (nothing imports them before a test asks for
backend="triton"). With a GPU the same tests run the compiled kernels on it. The interpreter is
slow, so sizes stay small but cover partial blocks, odd lengths, all-zero blocks and several
double-quantization blocks. CI installs Triton (the test extra) and sets CI=true: there a missing
Triton fails the run instead of skipping these tests.
"""
import os

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
try:
    import triton  # noqa: F401
except ImportError:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise  # CI installs triton with the test extra: its absence is a failure, not a skip
    pytest.skip("triton is not installed (pip install triton; CI requires it)", allow_module_level=True)

import bitsandbytes.functional as bnbF  # noqa: E402

from minilora.quant.backends import load_triton_kernels  # noqa: E402
from minilora.quant.matmul_4bit import FUSED_MAX_TOKENS, linear_4bit, uses_fused_kernel  # noqa: E402
from minilora.quant.nf4 import QuantState4bit, dequantize_4bit, quantize_4bit  # noqa: E402
from minilora.quant.qlora import LinearNF4  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
POWERS_OF_TWO = st.sampled_from([32, 64, 128, 256, 512, 1024, 2048, 4096])


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor: bit-identity, with -0.0 != 0.0 and NaN == NaN."""
    return t.contiguous().view({4: torch.int32, 2: torch.int16}[t.element_size()])


def weight(rows, cols, dtype, seed, zero_block=None, scale=1.0):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    if zero_block is not None:  # (start, length) in the flattened weight
        w.view(-1)[zero_block[0]:zero_block[0] + zero_block[1]] = 0.0
    return w.to(dtype).to(DEVICE)


def test_the_kernels_run_where_this_machine_can_run_them():
    # on a CPU they must be interpreted; were they imported before TRITON_INTERPRET was set, they could not run here
    assert DEVICE.type == "cuda" or load_triton_kernels().INTERPRETED


# ------------------------------------------------------------------------------------ dequantize

@given(rows=st.integers(1, 40), cols=st.integers(1, 90), dtype=st.sampled_from(DTYPES),
       quant_type=st.sampled_from(["nf4", "fp4", "int4"]), block_size=POWERS_OF_TWO, double_quant=st.booleans(),
       dq_block_size=POWERS_OF_TWO, zero=st.none() | st.tuples(st.integers(0, 3000), st.integers(1, 300)),
       scale=st.sampled_from([1e-3, 1.0, 300.0]), seed=st.integers(0, 2**16))
# several double-quantization blocks, with whole zero blocks among them; a partial last block
@example(rows=40, cols=90, dtype=torch.bfloat16, quant_type="nf4", block_size=32, double_quant=True, dq_block_size=32,
         zero=(64, 300), scale=1.0, seed=0)
@example(rows=37, cols=89, dtype=torch.float16, quant_type="fp4", block_size=64, double_quant=True, dq_block_size=32,
         zero=(1000, 200), scale=300.0, seed=1)
def test_triton_dequantize_bit_identical_to_the_eager_cuda_kernel_model(rows, cols, dtype, quant_type, block_size,
                                                                        double_quant, dq_block_size, zero, scale,
                                                                        seed):
    # kernel="cuda": the bytes bitsandbytes' CUDA kernel writes (all-zero blocks get code 0); int4 has no CUDA quantizer
    kernel = "cpu" if quant_type == "int4" else "cuda"
    w = weight(rows, cols, dtype, seed, zero, scale)
    state = quantize_4bit(w, quant_type, block_size, double_quant, dq_block_size, kernel=kernel)
    eager = dequantize_4bit(state, backend="eager")
    assert torch.equal(bits(dequantize_4bit(state, backend="triton")), bits(eager))
    out = torch.full((rows * cols,), float("nan"), dtype=torch.float32, device=DEVICE)
    into = dequantize_4bit(state, torch.float32, backend="triton", out=out)
    assert into.data_ptr() == out.data_ptr() and into.shape == (rows, cols)
    assert torch.equal(bits(into), bits(dequantize_4bit(state, torch.float32, backend="eager")))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_dequantize_of_a_bitsandbytes_state_bit_identical_to_bitsandbytes(quant_type, dtype):
    # an outside oracle: bitsandbytes quantizes and dequantizes (its CPU path on a CPU, its CUDA kernel on a GPU)
    w = weight(33, 127, dtype, seed=1)  # 4191 elements: odd, a partial last block
    w[3] = 0.0
    for double_quant in (False, True):
        packed, qs = bnbF.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant)
        state = QuantState4bit(packed, qs.absmax, w.shape, dtype, 64, quant_type,
                               qs.state2.absmax if double_quant else None, qs.offset if double_quant else None)
        assert torch.equal(bits(dequantize_4bit(state, backend="triton")), bits(bnbF.dequantize_4bit(packed, qs)))


def test_triton_dequantize_rounds_bfloat16_ties_to_even_as_torch():
    # code 15 of NF4 is 1.0, so each value is its block's absmax: put exact bf16 ties there
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-100 * (1 + 2**-8), 65504 + 16, 3.3895e38],
                        dtype=torch.float32)
    absmax = torch.cat([ties, torch.rand(10) + 0.5]).to(DEVICE)
    n = 32 * absmax.numel()
    state = QuantState4bit(torch.full((n // 2, 1), 0xFF, dtype=torch.uint8, device=DEVICE), absmax,
                           torch.Size((n,)), torch.float32, 32, "nf4")
    expected = absmax.repeat_interleave(32).bfloat16()
    assert torch.equal(bits(dequantize_4bit(state, torch.bfloat16, backend="triton")), bits(expected))
    assert torch.equal(bits(dequantize_4bit(state, torch.float16, backend="triton")),
                       bits(absmax.repeat_interleave(32).half()))


# ----------------------------------------------------------------------------------- fused matmul

def accumulation_bound(a: torch.Tensor, w: torch.Tensor, bias, dtype) -> torch.Tensor:
    """How far two results of a @ w (+ bias), each summed in fp32 in its own order and rounded once
    to `dtype`, can lie apart: each fp32 sum of the K + 1 terms is within gamma_(K+1) * sum|terms| of
    the exact one (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 3.5; with
    u = 2**-24, fp32 products of 16-bit values exact, of fp32 values one rounding more), and
    rounding to `dtype` moves each by at most half an ulp (bounded by eps * |value|, or the
    subnormal spacing)."""
    terms = a.double().abs() @ w.double().abs()
    if bias is not None:
        terms = terms + bias.double().abs()
    k = a.shape[-1] + 2
    return 2 * k * 2.0**-24 * terms


def assert_within_bound(got, ref, bound, dtype):
    finfo = torch.finfo(dtype)
    slack = finfo.eps * torch.maximum(got.double().abs(), ref.double().abs()) + finfo.smallest_normal * finfo.eps
    excess = (got.double() - ref.double()).abs() - (bound + slack)
    assert excess.max() <= 0, f"fused and eager differ beyond the accumulation bound by {excess.max().item():.3g}"


@settings(max_examples=12)
@given(tokens=st.integers(1, 20), out_features=st.integers(1, 48), half_in=st.integers(1, 80),
       dtype=st.sampled_from(DTYPES), quant_type=st.sampled_from(["nf4", "fp4"]),
       block_size=st.sampled_from([32, 64, 256]), double_quant=st.booleans(), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_fused_linear_forward_and_input_grad_equal_eager_within_the_accumulation_bound(
        tokens, out_features, half_in, dtype, quant_type, block_size, double_quant, bias, seed):
    in_features = 2 * half_in  # the fused kernels need whole bytes per row
    state = quantize_4bit(weight(out_features, in_features, dtype, seed), quant_type, block_size, double_quant,
                          kernel="cuda")
    assert uses_fused_kernel(tokens, state, "triton") and not uses_fused_kernel(tokens, state, "eager")
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, in_features, generator=g).to(dtype).to(DEVICE)
    b = torch.randn(out_features, generator=g).to(dtype).to(DEVICE) if bias else None
    runs = {}
    for backend in ("triton", "eager"):
        xg = x.clone().requires_grad_(True)
        bg = None if b is None else b.clone().requires_grad_(True)
        y = linear_4bit(xg, state, bg, backend)
        y.backward(torch.linspace(-1, 1, y.numel()).view_as(y).to(dtype))
        runs[backend] = (y.detach(), xg.grad, None if bg is None else bg.grad)
    w = dequantize_4bit(state, dtype)  # (out, in): the values both paths multiply by
    grad_y = torch.linspace(-1, 1, tokens * out_features).view(tokens, out_features).to(dtype)
    (y, gx, gb), (y_ref, gx_ref, gb_ref) = runs["triton"], runs["eager"]
    assert y.dtype == dtype and gx.dtype == dtype
    assert_within_bound(y, y_ref, accumulation_bound(x, w.T, b, dtype), dtype)
    assert_within_bound(gx, gx_ref, accumulation_bound(grad_y.to(DEVICE), w, None, dtype), dtype)
    if bias:
        assert torch.equal(gb, gb_ref)  # the same sum, outside the kernels


def test_the_bound_holds_against_the_exact_product_too():
    # the fused result itself is near the exact (fp64) product of the dequantized values: a kernel
    # that decoded a wrong code or scale would be off by far more than the bound
    state = quantize_4bit(weight(40, 256, torch.bfloat16, seed=3), "nf4", 64, True, kernel="cuda")
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(4)).bfloat16().to(DEVICE)
    w = dequantize_4bit(state, torch.bfloat16)
    y = linear_4bit(x, state, None, "triton")
    exact = x.double() @ w.double().T
    assert_within_bound(y, exact, accumulation_bound(x, w.T, None, torch.bfloat16) / 2, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_nf4_triton_backend_beyond_the_fused_range_is_bit_identical_to_eager(dtype):
    # more tokens than FUSED_MAX_TOKENS, or an odd in_features: the Triton dequantize into the reused
    # buffer, then the same matmul as eager
    for tokens, in_features in ((FUSED_MAX_TOKENS + 3, 96), (4, 95)):
        linear = torch.nn.Linear(in_features, 24, dtype=dtype)
        layers = {b: LinearNF4.from_linear(linear, "nf4", 64, True).to(DEVICE) for b in ("triton", "eager")}
        for backend, layer in layers.items():
            layer.backend = backend
        assert not uses_fused_kernel(tokens, layers["triton"].quant_state, "triton")
        x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(tokens)).to(dtype).to(DEVICE)
        outs = {}
        for backend, layer in layers.items():
            xg = x.clone().requires_grad_(True)
            y = layer(xg)
            y.backward(torch.ones_like(y))
            outs[backend] = (y, xg.grad)
        assert torch.equal(bits(outs["triton"][0]), bits(outs["eager"][0]))
        assert torch.equal(bits(outs["triton"][1]), bits(outs["eager"][1]))


def test_linear_nf4_fused_path_under_autocast_with_batched_input_matches_eager_within_the_bound():
    # (batch, seq, in) fp32 activations, bf16 autocast: the fused kernels compute in bf16 and hand
    # back fp32 output and input gradient, as the eager path does
    linear = torch.nn.Linear(128, 40)
    layers = {b: LinearNF4.from_linear(linear, "nf4", 64, True).to(DEVICE) for b in ("triton", "eager")}
    x = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    runs = {}
    for backend, layer in layers.items():
        layer.backend = backend
        xg = x.clone().requires_grad_(True)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            y = layer(xg)
        y.backward(torch.ones_like(y))
        runs[backend] = (y.detach(), xg.grad)
    assert uses_fused_kernel(6, layers["triton"].quant_state, "triton")
    (y, gx), (y_ref, gx_ref) = runs["triton"], runs["eager"]
    assert y.shape == (2, 3, 40) and y.dtype == torch.float32 and gx.dtype == torch.float32
    w = dequantize_4bit(layers["eager"].quant_state, torch.bfloat16)
    xb = x.bfloat16().reshape(6, 128)
    bias = layers["eager"].bias.bfloat16()
    assert_within_bound(y.view(6, 40), y_ref.view(6, 40), accumulation_bound(xb, w.T, bias, torch.bfloat16),
                        torch.bfloat16)
    ones = torch.ones(6, 40, dtype=torch.bfloat16, device=DEVICE)
    assert_within_bound(gx.view(6, 128), gx_ref.view(6, 128), accumulation_bound(ones, w, None, torch.bfloat16),
                        torch.bfloat16)
