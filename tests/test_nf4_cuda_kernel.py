"""bitsandbytes' CUDA kernel rounding (minilora/quant/bnb_cuda.py): properties on the CPU, and byte
parity with the real kernel where a GPU exists (skipped without CUDA: CI has none; the H100 run is
in bench/results/nf4_cuda_parity-*.json)."""
from fractions import Fraction

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minilora.quant import bnb_cuda
from minilora.quant.nf4 import dynamic_map, nf4_codebook, quantize_4bit, quantize_blockwise_8bit

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA and bitsandbytes' CUDA kernels")

fp32s = st.floats(min_value=-2.0**100, max_value=2.0**100, allow_nan=False, width=32, allow_subnormal=False)


@given(fp32s)
def test_fp32_literal_round_trips_every_float32(x):
    assert bnb_cuda.fp32_from_decimal(repr(x)) == x


@given(fp32s.filter(lambda v: v != 0))
def test_fp32_literal_rounds_near_ties_by_the_exact_decimal_not_via_double(x):
    # a decimal a hair below / above the midpoint of x and its upper neighbour rounds to x / to it
    up = torch.nextafter(torch.tensor(x, dtype=torch.float32), torch.tensor(float("inf"))).item()
    mid = (Fraction(x) + Fraction(up)) / 2
    hair = (Fraction(up) - Fraction(x)) / 10**12
    below, above = mid - hair, mid + hair
    as_text = lambda f: f"{f.numerator}/{f.denominator}"  # noqa: E731  Fraction parses it exactly
    assert bnb_cuda.fp32_from_decimal(as_text(below)) == x
    assert bnb_cuda.fp32_from_decimal(as_text(above)) == up


def test_nf4_thresholds_are_the_fp32_midpoints_of_the_codebook():
    # csrc's decision tree and the codebook agree: each threshold is the midpoint of two codes,
    # rounded to fp32 (four literals sit on a tie, which is why they are parsed exactly)
    code = nf4_codebook().double()
    mids = ((code[:-1] + code[1:]) / 2).tolist()
    got = bnb_cuda.thresholds("nf4").double()
    ulp = torch.nextafter(got.float(), torch.tensor(2.0)).double() - got
    assert torch.all((got - torch.tensor(mids)).abs() <= ulp)


@given(st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=300))
def test_8bit_binary_search_is_nearest_except_on_exact_midpoints(values):
    code = dynamic_map(True)
    mid = (code[:-1] + code[1:]) / 2
    x = torch.cat([torch.tensor(values, dtype=torch.float32), mid])  # every midpoint, too
    out = bnb_cuda.codes_8bit(x, code).long()
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
        bnb_cuda.reciprocal(torch.ones(2), "fast")
    with pytest.raises(ValueError, match="kernel must be one of .*'cuda-ieee'.*got 'ieee'"):
        quantize_blockwise_8bit(w, kernel="ieee")


@pytest.mark.parametrize("double_quant", [False, True])
def test_kernel_cuda_on_a_cpu_tensor_is_the_cuda_ieee_rounding(double_quant):
    # the GPU's approximate reciprocal does not exist on a CPU: "cuda" stands in with the correctly
    # rounded one, which is the "cuda-ieee" rounding, and "auto" on a CPU tensor is bitsandbytes' CPU path
    w = torch.randn(37, 1000, generator=torch.Generator().manual_seed(0)) * 3
    w[5] = 0.0   # zero blocks: where the two roundings differ
    cuda, ieee = (quantize_4bit(w, "nf4", 64, double_quant, kernel=k) for k in ("cuda", "cuda-ieee"))
    auto, cpu = (quantize_4bit(w, "nf4", 64, double_quant, kernel=k) for k in ("auto", "cpu"))
    for name in ("packed", "absmax") + (("absmax2", "offset") if double_quant else ()):
        assert torch.equal(getattr(cuda, name), getattr(ieee, name)), name
        assert torch.equal(getattr(auto, name), getattr(cpu, name)), name
    assert not torch.equal(cuda.packed, cpu.packed)
    assert [bnb_cuda.resolve_kernel(k, torch.device(d)) for d in ("cpu", "cuda") for k in bnb_cuda.KERNELS] == [
        "cpu", "cpu", "cuda-ieee", "cuda-ieee", "cuda", "cpu", "cuda", "cuda-ieee"]


@cuda
def test_cuda_ieee_rounding_gives_the_same_bytes_on_a_gpu_as_on_the_cpu():
    # every step is exact or correctly rounded elementwise (no fast-math reciprocal), so the device
    # does not matter; without double quantization, whose offset is a mean (summation order differs)
    w = torch.randn(1001, 4097, generator=torch.Generator().manual_seed(0))
    w[3] = 0.0
    for quant_type in ("nf4", "fp4"):
        on_gpu = quantize_4bit(w.cuda(), quant_type, 64, False, kernel="cuda-ieee")
        on_cpu = quantize_4bit(w, quant_type, 64, False, kernel="cuda-ieee")
        assert torch.equal(on_gpu.packed.cpu(), on_cpu.packed) and torch.equal(on_gpu.absmax.cpu(), on_cpu.absmax)
    codes_gpu, absmax_gpu = quantize_blockwise_8bit(w.cuda(), kernel="cuda-ieee")
    codes_cpu, absmax_cpu = quantize_blockwise_8bit(w, kernel="cuda-ieee")
    assert torch.equal(codes_gpu.cpu(), codes_cpu) and torch.equal(absmax_gpu.cpu(), absmax_cpu)


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
