"""bitsandbytes' CUDA kernel rounding (minilora/quant/bnb_cuda.py): properties on the CPU, and byte
parity with the real kernel where a GPU exists (skipped without CUDA: CI has none; the H100 run is
in bench/results/nf4_cuda_parity-*.json)."""
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minilora.quant import bnb_cuda as _bnb_cuda
from minilora.quant.nf4 import dynamic_map, nf4_codebook, quantize_4bit, quantize_blockwise_8bit

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and bitsandbytes' CUDA kernels")

fp32s = st.floats(min_value=-2.0**100, max_value=2.0**100, allow_nan=False, width=32, allow_subnormal=False)


@given(fp32s)
def test_fp32_literal_round_trips_every_float32(x):
    assert _bnb_cuda._fp32(repr(x)) == x


@given(fp32s.filter(lambda v: v != 0))
def test_fp32_literal_rounds_near_ties_by_the_exact_decimal_not_via_double(x):
    # a decimal a hair below / above the midpoint of x and its upper neighbour rounds to x / to it
    up = torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(float("inf"))).item()
    mid = (Fraction(x) + Fraction(up)) / 2
    hair = (Fraction(up) - Fraction(x)) / 10**12
    below, above = mid - hair, mid + hair
    as_text = lambda f: f"{f.numerator}/{f.denominator}"  # noqa: E731  Fraction parses it exactly
    assert _bnb_cuda._fp32(as_text(below)) == x
    assert _bnb_cuda._fp32(as_text(above)) == up


def test_nf4_thresholds_are_the_fp32_midpoints_of_the_codebook():
    # csrc's decision tree and the codebook agree: each threshold is the midpoint of two codes,
    # rounded to fp32 (four literals sit on a tie, which is why they are parsed exactly)
    code = nf4_codebook().double()
    mids = ((code[:-1] + code[1:]) / 2).tolist()
    got = _bnb_cuda._table(_bnb_cuda._NF4_THRESHOLDS, torch.float32, torch.device("cpu")).double()
    ulp = torch.nextafter(got.float(), torch.tensor(2.0)).double() - got
    assert torch.all((got - torch.tensor(mids)).abs() <= ulp)


@given(st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=300))
def test_8bit_binary_search_is_nearest_except_on_exact_midpoints(values):
    code = dynamic_map(True)
    mid = (code[:-1] + code[1:]) / 2
    x = torch.cat([torch.tensor(values, dtype=torch.float32), mid])  # every midpoint, too
    out = _bnb_cuda.codes_8bit(x, code).long()
    nearest = torch.bucketize(x, mid)  # ties to the lower entry
    off = out != nearest
    assert torch.isin(x[off], mid).all()  # only ties differ...
    assert ((out[off] - nearest[off]) == 1).all()  # ...and then it takes the upper neighbour


def test_all_zero_block_gets_code_zero_as_the_cuda_kernel_does():
    w = torch.zeros(2, 64)
    w[1] = torch.randn(64)
    cuda_codes = quantize_4bit(w, "nf4", 64, False, kernel="cuda").packed.view(-1)
    cpu_codes = quantize_4bit(w, "nf4", 64, False, kernel="cpu").packed.view(-1)
    assert (cuda_codes[:32] == 0).all()  # 0 * (1/0) = NaN, which the tree sends to code 0
    assert (cpu_codes[:32] == 0x77).all()  # the CPU path picks the code of 0.0
    assert torch.equal(cuda_codes[32:], cpu_codes[32:])


def test_kernel_option_errors_name_the_value():
    w = torch.randn(64)
    with pytest.raises(ValueError, match="kernel must be one of .*'gpu'"):
        quantize_4bit(w, kernel="gpu")
    with pytest.raises(ValueError, match="no int4 quantizer"):
        quantize_4bit(w, "int4", kernel="cuda")
    with pytest.raises(ValueError, match="reciprocal mode must be"):
        _bnb_cuda.reciprocal(torch.ones(2), "fast")


@cuda
@given(rows=st.integers(1, 200), cols=st.integers(1, 300), dtype=st.sampled_from([torch.float32, torch.bfloat16,
       torch.float16]), quant_type=st.sampled_from(["nf4", "fp4"]), block_size=st.sampled_from([64, 128, 256, 4096]),
       double_quant=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 50.0]), seed=st.integers(0, 2**16))
def test_quantize_on_cuda_bit_identical_to_bitsandbytes_cuda_kernel(rows, cols, dtype, quant_type, block_size,
                                                                    double_quant, scale, seed):
    import bitsandbytes.functional as F

    g = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(rows, cols, device="cuda", generator=g) * scale).to(dtype)
    packed, qs = F.quantize_4bit(w, blocksize=block_size, quant_type=quant_type, compress_statistics=double_quant)
    ours = quantize_4bit(w, quant_type, block_size, double_quant)
    assert torch.equal(ours.packed, packed)
    if double_quant:
        assert torch.equal(ours.absmax, qs.absmax)
        assert torch.equal(ours.absmax2, qs.state2.absmax)
        assert torch.equal(ours.offset.reshape(-1), qs.offset.reshape(-1))
    else:
        assert torch.equal(ours.absmax, qs.absmax)


@cuda
def test_blockwise_8bit_on_cuda_bit_identical_to_bitsandbytes_cuda_kernel():
    import bitsandbytes.functional as F

    x = torch.cat([torch.randn(100_003, device="cuda"), (dynamic_map(True)[:-1].cuda() + dynamic_map(True)[1:].cuda()) / 2])
    codes, state = F.quantize_blockwise(x, blocksize=256)
    ours, absmax = quantize_blockwise_8bit(x, block_size=256)
    assert torch.equal(ours, codes)
    assert torch.equal(absmax, state.absmax)


@given(blocks=st.integers(1, 40), block_size=st.sampled_from([32, 64, 256]),
       quant_type=st.sampled_from(["nf4", "fp4", "int4"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), double_quant=st.booleans())
def test_fused_dequantize_formulation_bit_identical_to_eager(blocks, block_size, quant_type, dtype, double_quant):
    from minilora.quant._dequant_fused import dequantize_reference
    from minilora.quant.nf4 import _tables, dequantize_4bit

    w = torch.randn(blocks, block_size).to(dtype)
    state = quantize_4bit(w, quant_type, block_size, double_quant)
    fused = dequantize_reference(state.packed.view(-1), state.scales(), _tables(quant_type, w.device)[0],
                                 block_size, dtype)
    assert torch.equal(fused.view(state.shape), dequantize_4bit(state))


def test_fused_dequantize_compiled_on_cpu_bit_identical_to_eager():
    # the same torch.compile'd function CUDA tensors use, here through inductor's C++ backend
    from minilora.quant._dequant_fused import dequantize_fused
    from minilora.quant.nf4 import _tables, dequantize_4bit

    w = torch.randn(96, 128, dtype=torch.bfloat16)
    state = quantize_4bit(w, "nf4", 64, True)
    got = dequantize_fused(state.packed.view(-1), state.scales(), _tables("nf4", w.device)[0], 64, torch.bfloat16)
    assert torch.equal(got.view(state.shape), dequantize_4bit(state))


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_cuda_dequantize_bit_identical_to_eager_and_to_bitsandbytes(dtype):
    import bitsandbytes.functional as F

    from minilora.quant import nf4

    for shape in [(4096, 4096), (1000, 64), (7, 4097)]:  # the last: a partial block, eager path
        w = torch.randn(shape, device="cuda").to(dtype)
        packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        state = nf4.quantize_4bit(w, "nf4", 64, True)
        default = nf4.FUSED_CUDA_DEQUANTIZE
        try:
            nf4.FUSED_CUDA_DEQUANTIZE = True
            fused = nf4.dequantize_4bit(state)
            assert "CUDA dequantize" not in nf4._FUSED_BROKEN, "the fused path fell back to eager (see the warning)"
            nf4.FUSED_CUDA_DEQUANTIZE = False
            eager = nf4.dequantize_4bit(state)
        finally:
            nf4.FUSED_CUDA_DEQUANTIZE = default
        assert torch.equal(fused, eager)
        assert torch.equal(fused, F.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("signed", [True, False])
def test_fused_cpu_8bit_encoder_bit_identical_to_eager(signed):
    # the torch.compile'd loop (whole 1M-element chunks) and the eager passes: the same codes and scales
    code = dynamic_map(signed)
    mid = (code[:-1] + code[1:]) / 2
    g = torch.Generator().manual_seed(int(signed))
    x = torch.randn(3 * 2**20 + 300, generator=g) * 1e-3
    if not signed:
        x = x.abs() * 1e-3
    x[:255] = mid   # ties, scaled by their block's absmax
    x[2**20:2**20 + 256] = 0.0   # an all-zero block
    eager = quantize_blockwise_8bit(x, code, 256, fused=False)
    fused = quantize_blockwise_8bit(x, code, 256, fused=True)
    assert torch.equal(fused[0], eager[0]) and torch.equal(fused[1], eager[1])


def test_a_fused_path_that_cannot_be_built_warns_once_and_the_eager_path_serves(monkeypatch):
    import minilora.quant._encode8_fused as encoder
    from minilora.quant import nf4

    def broken(*args):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(encoder, "encode_fused", broken)
    monkeypatch.setattr(nf4, "_FUSED_BROKEN", set())
    x = torch.randn(2**20)
    eager = quantize_blockwise_8bit(x, fused=False)
    with pytest.warns(RuntimeWarning, match="fused 8-bit encoder unavailable .*no C\\+\\+ compiler"):
        first = quantize_blockwise_8bit(x, fused=True)
    assert nf4._FUSED_BROKEN == {"8-bit encoder"}
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")   # once: no second warning
        second = quantize_blockwise_8bit(x, fused=True)
    for got in (first, second):
        assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])
