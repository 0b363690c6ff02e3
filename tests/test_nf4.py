"""minilora.quant.nf4 (with codebooks.py and blockwise.py) against bitsandbytes on CPU: codebooks,
packed bytes, scales, dequantization.

bitsandbytes has two CPU code paths for the 8-bit step of double quantization: its pure-PyTorch
kernel (backends/default/ops.py, exact nearest rounding) which we match byte for byte, and its
native CPU kernel (what `bitsandbytes.functional.quantize_blockwise` runs), whose approximate
search picks a neighbouring code for ~0.2% of scales; there we check the agreement rate.
"""
import copy

import bitsandbytes.functional as bnbF
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minilora.quant import blockwise
from minilora.quant.blockwise import log_grid, nearest_codes_8bit
from minilora.quant.codebooks import GRID_CELLS, codebook_tables, nearest_codes
from minilora.quant.nf4 import (
    QuantState4bit, dequantize_4bit, dequantize_blockwise_8bit, dynamic_map, fp4_codebook, int4_codebook,
    nf4_codebook, quantization_error, quantize_4bit, quantize_blockwise_8bit,
)


@pytest.fixture(autouse=True, scope="module")
def _no_torch_compile():
    # bitsandbytes torch.compiles its pure-PyTorch dequantize (used for odd last dims) and would
    # recompile for every Hypothesis shape; eager gives the same bits in milliseconds.
    with torch._dynamo.config.patch(disable=True):
        yield


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BLOCKS = [32, 64, 128, 256, 512, 1024, 2048, 4096]


def bnb_default_quantize_blockwise(x, code, block_size):
    """bitsandbytes' pure-PyTorch kernel, reached by skipping its native CPU kernel."""
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    return torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(keys, x, code, block_size)


def bnb_state_as_ours(packed, qs) -> QuantState4bit:
    nested = qs.state2 is not None
    return QuantState4bit(packed, qs.absmax, qs.shape, qs.dtype, qs.blocksize, qs.quant_type,
                          qs.state2.absmax if nested else None, qs.offset if nested else None)


# ------------------------------------------------------------------------------------ codebooks

def test_nf4_codebook_from_quantiles_bit_identical_to_bitsandbytes():
    ours = nf4_codebook()
    assert ours.dtype == torch.float32 and ours.shape == (16,)
    assert torch.equal(ours, bnbF.get_4bit_type("nf4", device="cpu"))
    normal_map = bnbF.create_normal_map()  # bitsandbytes' own scipy construction, 256 padded with 0
    assert torch.equal(ours, torch.cat([normal_map[:7], normal_map[-9:]]))


def test_fp4_int4_and_dynamic_maps_bit_identical_to_bitsandbytes():
    bits = lambda t: t.view(torch.int32)  # noqa: E731  (bit patterns: +0.0 and -0.0 differ)
    assert torch.equal(bits(nf4_codebook()), bits(bnbF.get_4bit_type("nf4", device="cpu")))
    assert torch.equal(bits(fp4_codebook()), bits(bnbF.get_4bit_type("fp4", device="cpu")))
    # bitsandbytes' "int4" table cannot be built in 0.50.2 (an integer tensor divided in place),
    # so INT4 is checked by its definition: k/7 for k = -7..7, zero (+0.0) at codes 7 and 8.
    int4 = int4_codebook()
    assert torch.equal(torch.sort(int4).values.unique(), torch.arange(-7, 8) / 7)
    assert torch.equal(int4[:8].flip(0), -int4[8:]) and int4[7] == 0 and not torch.signbit(int4[7:9]).any()
    assert torch.equal(dynamic_map(signed=True), bnbF.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_map(signed=False), bnbF.create_dynamic_map(signed=False))
    signed = dynamic_map()
    assert signed[127] == 0 and signed[255] == 1.0 and torch.all(signed[1:] > signed[:-1])


# ------------------------------------------------------------------ 4-bit bytes vs bitsandbytes

shapes = st.one_of(
    st.tuples(st.integers(1, 700)),
    st.tuples(st.integers(1, 40), st.integers(1, 70)),
    st.tuples(st.integers(1, 5), st.integers(1, 9), st.integers(1, 33)),
)


@given(shape=shapes, dtype=st.sampled_from(DTYPES), quant_type=st.sampled_from(["nf4", "fp4"]),
       block_size=st.sampled_from(BLOCKS), double_quant=st.booleans(), seed=st.integers(0, 2**16))
def test_quantize_4bit_bit_identical_to_bitsandbytes(shape, dtype, quant_type, block_size, double_quant, seed):
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2.5).to(dtype)
    packed, qs = bnbF.quantize_4bit(x, blocksize=block_size, quant_type=quant_type, compress_statistics=double_quant)
    ours = quantize_4bit(x, quant_type, block_size, double_quant)
    assert ours.packed.dtype == torch.uint8 and torch.equal(ours.packed, packed)
    if double_quant:
        assert torch.equal(ours.offset, qs.offset)
        # A 256-block of scales that all equal their mean (e.g. a single block) has nested absmax 0:
        # bitsandbytes' native kernel stores 0, its pure-PyTorch kernel (and we) 1e-38; both decode
        # every scale to the offset.
        assert torch.equal(ours.absmax2, qs.state2.absmax.clamp(min=1e-38))
        # the 8-bit codes of the scales: exact nearest, as bitsandbytes' pure-PyTorch kernel
        raw = bnbF.quantize_4bit(x, blocksize=block_size, quant_type=quant_type)[1].absmax
        codes, absmax2 = bnb_default_quantize_blockwise(raw - qs.offset, dynamic_map(), 256)
        assert torch.equal(ours.absmax, codes) and torch.equal(ours.absmax2, absmax2)
    else:
        assert torch.equal(ours.absmax, qs.absmax)
    # bitsandbytes' CPU kernel returns (n, 1) for a 1-D input of even length: compare values
    expected = bnbF.dequantize_4bit(packed, qs).reshape(x.shape)
    # our dequantization of bitsandbytes' state equals bitsandbytes' own, bit for bit
    assert torch.equal(dequantize_4bit(bnb_state_as_ours(packed, qs)), expected)
    # and of our own state, whenever the scale codes agree (always without double quant)
    if torch.equal(ours.absmax, qs.absmax):
        assert torch.equal(ours.dequantize(), expected)
    out = ours.dequantize()
    assert out.shape == x.shape and out.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_dequantize_bitsandbytes_state_bit_identical(dtype, quant_type):
    # native CPU kernel path (even last dim), odd last dim (its pure-PyTorch fallback), a partial block
    for shape in [(96, 128), (33, 65), (5, 1000)]:
        x = torch.randn(shape).to(dtype)
        packed, qs = bnbF.quantize_4bit(x, blocksize=64, quant_type=quant_type, compress_statistics=True)
        ours = bnb_state_as_ours(packed, qs)
        assert torch.equal(ours.dequantize(), bnbF.dequantize_4bit(packed, qs))
        for out_dtype in DTYPES:
            as_dtype = copy.copy(qs)  # bitsandbytes decodes into its state's dtype
            as_dtype.dtype = out_dtype
            assert torch.equal(ours.dequantize(out_dtype), bnbF.dequantize_4bit(packed, as_dtype))


def test_double_quant_native_kernel_agreement_rate():
    torch.manual_seed(0)
    x = torch.randn(2048, 2048)
    packed, qs = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    ours = quantize_4bit(x, "nf4", 64, True)
    assert torch.equal(ours.packed, packed) and torch.equal(ours.offset, qs.offset)
    assert torch.equal(ours.absmax2, qs.state2.absmax)
    differ = ours.absmax != qs.absmax
    rate = 1 - differ.float().mean().item()
    assert rate >= 0.99, rate
    code = dynamic_map()
    ours_value, native_value = code[ours.absmax[differ].long()], code[qs.absmax[differ].long()]
    steps = (ours.absmax[differ].int() - qs.absmax[differ].int()).abs()
    # one code step, or (near zero, where the map is denser than the native search) a value within
    # 2.2e-5 of ours in units of absmax2
    assert torch.all((steps == 1) | ((ours_value - native_value).abs() <= 2.2e-5))
    # and ours is the nearest code: its error is never larger than the native kernel's
    raw = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4")[1].absmax - qs.offset
    scaled = (raw.view(-1, 256) * (1 / qs.state2.absmax).unsqueeze(1)).view(-1)[differ]
    assert torch.all((scaled - ours_value).abs() <= (scaled - native_value).abs())


@pytest.mark.parametrize("make", [
    lambda x: x.t(), lambda x: x[:, ::2], lambda x: x[::3], lambda x: x.t()[1:, 3:],
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_contiguous_inputs_quantize_as_their_contiguous_copy(make, dtype):
    x = make(torch.randn(90, 130).to(dtype))
    assert not x.is_contiguous()
    ours = quantize_4bit(x, "nf4", 64, True)
    ref = quantize_4bit(x.contiguous(), "nf4", 64, True)
    packed, _ = bnbF.quantize_4bit(x.contiguous(), blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(ours.packed, packed) and torch.equal(ours.packed, ref.packed)
    assert torch.equal(ours.dequantize(), ref.dequantize())


@pytest.mark.parametrize("block_size", [32, 64, 4096])
def test_chunked_quantization_equals_one_pass(monkeypatch, block_size):
    x = torch.randn(37, 1000)  # 37000 elements: several chunks and a partial last block
    whole = quantize_4bit(x, "nf4", block_size, True)
    monkeypatch.setattr(blockwise, "CHUNK_ELEMENTS", 4096)
    chunked = quantize_4bit(x, "nf4", block_size, True)
    for name in ("packed", "absmax", "absmax2", "offset"):
        assert torch.equal(getattr(chunked, name), getattr(whole, name)), name
    assert torch.equal(chunked.dequantize(), whole.dequantize())
    assert torch.equal(chunked.dequantize(torch.bfloat16), whole.dequantize(torch.bfloat16))


# ----------------------------------------------------------------------------- 8-bit blockwise

@given(n=st.integers(1, 3000), block_size=st.sampled_from([32, 64, 256, 4096]), signed=st.booleans(),
       seed=st.integers(0, 2**16))
def test_quantize_blockwise_8bit_bit_identical_to_bitsandbytes_pure_pytorch(n, block_size, signed, seed):
    x = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    x = x if signed else x.abs()
    code = dynamic_map(signed)
    codes, absmax = quantize_blockwise_8bit(x, code, block_size)
    ref_codes, ref_absmax = bnb_default_quantize_blockwise(x, code, block_size)
    assert torch.equal(codes, ref_codes) and torch.equal(absmax, ref_absmax)
    # dequantization equals bitsandbytes' native CPU kernel bit for bit
    expected = bnbF.dequantize_blockwise(codes, absmax=absmax, code=code, blocksize=block_size)
    assert torch.equal(dequantize_blockwise_8bit(codes, absmax, code, block_size), expected)


def test_quantize_blockwise_8bit_native_agreement():
    torch.manual_seed(1)
    x = torch.randn(200_000)
    codes, absmax = quantize_blockwise_8bit(x)
    native_codes, native_state = bnbF.quantize_blockwise(x, blocksize=256)
    assert torch.equal(absmax, native_state.absmax)
    assert (codes == native_codes).float().mean().item() >= 0.99
    y = dequantize_blockwise_8bit(codes, absmax, shape=(400, 500), dtype=torch.bfloat16)
    assert y.shape == (400, 500) and y.dtype == torch.bfloat16


# ------------------------------------------------------------------------ properties and sizes

@given(shape=shapes, quant_type=st.sampled_from(["nf4", "fp4", "int4"]), block_size=st.sampled_from(BLOCKS),
       seed=st.integers(0, 2**16))
def test_roundtrip_error_within_absmax_times_largest_half_gap(shape, quant_type, block_size, seed):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3
    state = quantize_4bit(x, quant_type, block_size, double_quant=False)
    values = torch.sort(state.codebook).values
    half_gap = ((values[1:] - values[:-1]) / 2).max()
    n = x.numel()
    per_element_absmax = state.absmax.repeat_interleave(block_size)[:n].view(shape)
    err = (state.dequantize() - x).abs()
    assert torch.all(err <= per_element_absmax * half_gap * (1 + 1e-5) + 1e-30)


@pytest.mark.parametrize("block_size", [32, 64, 128])
def test_nbytes_is_exactly_4_5_and_4_127_bits_per_param(block_size):
    x = torch.randn(block_size * 256 * 4)
    plain = quantize_4bit(x, "nf4", block_size, double_quant=False)
    assert plain.nbytes * 8 / x.numel() == 4 + 32 / block_size
    nested = quantize_4bit(x, "nf4", block_size, double_quant=True)
    offset_bytes = 4  # the one fp32 mean of the scales, a fixed constant per tensor
    assert (nested.nbytes - offset_bytes) * 8 / x.numel() == 4 + 8 / block_size + 32 / (block_size * 256)
    if block_size == 64:
        assert round((nested.nbytes - offset_bytes) * 8 / x.numel(), 3) == 4.127


@pytest.mark.parametrize("quant_type,block_size", [("nf4", 32), ("nf4", 64), ("nf4", 128), ("fp4", 64)])
def test_mean_abs_error_equals_bitsandbytes_figure(quant_type, block_size):
    torch.manual_seed(0)
    x = torch.randn(1024, 1024)
    packed, qs = bnbF.quantize_4bit(x, blocksize=block_size, quant_type=quant_type)
    bnb_error = (bnbF.dequantize_4bit(packed, qs) - x).abs().mean().item()
    ours = (quantize_4bit(x, quant_type, block_size, False).dequantize() - x).abs().mean().item()
    assert ours == bnb_error
    if (quant_type, block_size) == ("nf4", 64):
        assert abs(ours - 0.0728) < 1e-3  # bitsandbytes' own test states 0.072798


def test_quantization_error_rows():
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    rows = quantization_error(w, ("nf4", "fp4", "int4"), (32, 64, 256))
    assert [(r["quant_type"], r["block_size"]) for r in rows] == [
        (q, b) for q in ("nf4", "fp4", "int4") for b in (32, 64, 256)]
    by = {(r["quant_type"], r["block_size"]): r for r in rows}
    for r in rows:
        assert 0 < r["mse"] and r["mean_abs"] <= r["max_abs"] and 0.9 < r["correlation"] < 1
        assert abs(r["mse"] - r["mean_abs"] ** 2) < r["mse"]  # a sanity link between the two
    assert by[("nf4", 64)]["mean_abs"] < by[("fp4", 64)]["mean_abs"]  # NF4 fits Gaussians better
    assert by[("nf4", 32)]["mse"] < by[("nf4", 256)]["mse"]  # smaller blocks, smaller error
    nf4_64 = (quantize_4bit(w, "nf4", 64, False).dequantize() - w)
    assert by[("nf4", 64)]["mse"] == pytest.approx(nf4_64.double().square().mean().item())


# ----------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("block_size", [0, 16, 48, 100, 8192, 64.0, True, "64"])
def test_bad_block_sizes(block_size):
    with pytest.raises(ValueError, match=r"block_size must be a power of two in 32\.\.4096, got"):
        quantize_4bit(torch.randn(128), block_size=block_size)
    with pytest.raises(ValueError, match=r"block_size must be a power of two in 32\.\.4096"):
        quantize_blockwise_8bit(torch.randn(128), block_size=block_size)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_rejected(bad):
    x = torch.randn(300)
    x[123] = bad
    word = "NaN" if bad != bad else "Inf"
    with pytest.raises(ValueError, match=f"contains {word}"):
        quantize_4bit(x)
    with pytest.raises(ValueError, match=f"contains {word}"):
        quantize_blockwise_8bit(x)


def test_empty_wrong_dtype_and_quant_type():
    with pytest.raises(ValueError, match=r"empty tensor .*shape \(0, 4\)"):
        quantize_4bit(torch.empty(0, 4))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16, got torch.int64"):
        quantize_4bit(torch.arange(64))
    with pytest.raises(ValueError, match="quant_type must be one of .*got 'nf3'"):
        quantize_4bit(torch.randn(64), quant_type="nf3")
    with pytest.raises(TypeError, match="must be a QuantState4bit"):
        dequantize_4bit(torch.zeros(3))


def test_all_zero_blocks_dequantize_to_zero():
    x = torch.zeros(3, 64)
    x[1] = torch.randn(64)
    state = quantize_4bit(x, "nf4", 64, double_quant=False)
    out = state.dequantize()
    assert torch.equal(out[0], torch.zeros(64)) and torch.equal(out[2], torch.zeros(64))
    packed, qs = bnbF.quantize_4bit(x, blocksize=64, quant_type="nf4")
    assert torch.equal(state.packed, packed) and torch.equal(state.absmax, qs.absmax)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
def test_grid_code_lookup_equals_bucketize_at_and_around_every_midpoint(quant_type):
    # quantize_4bit finds codes with a lookup grid instead of bucketize; ties must still go to
    # the lower value, and values just past +-1 (fp32 rounding of x * (1/absmax)) to the end codes.
    tables = codebook_tables(quant_type, torch.device("cpu"))
    midpoints, order = tables.midpoints, tables.order
    up, down = torch.full_like(midpoints, 2.0), torch.full_like(midpoints, -2.0)
    near = [midpoints, torch.nextafter(midpoints, up), torch.nextafter(midpoints, down)]
    edges = torch.linspace(-1, 1, GRID_CELLS + 1)  # grid cell borders and their neighbours
    near += [edges, torch.nextafter(edges, torch.full_like(edges, 2.0)), torch.nextafter(edges, -torch.ones_like(edges) * 2)]
    x = torch.cat(near + [torch.rand(200_000, generator=torch.Generator().manual_seed(0)) * 2.2 - 1.1,
                          torch.tensor([1.0000001, -1.0000001, 0.0, -0.0])])
    expected = torch.bucketize(x, midpoints, out_int32=True)
    if order is not None:
        expected = order[expected.long()].int()
    assert torch.equal(nearest_codes(x, tables.grid).int(), expected)


@pytest.mark.parametrize("signed", [True, False])
def test_8bit_log_grid_codes_equal_bucketize_at_every_midpoint_and_its_neighbours(signed):
    # The 8-bit quantizer looks codes up on a logarithmic grid; at each midpoint (a tie goes to
    # the lower code), one ulp either side of it, the map's own values, signed zeros, the ends and
    # random values across six decades, it must pick exactly what bucketize picks.
    code = dynamic_map(signed)
    mids = (code[:-1] + code[1:]) / 2
    g = torch.Generator().manual_seed(0)
    probe = torch.cat([
        mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)), code,
        torch.tensor([0.0, -0.0, 1.0, -1.0, 1.0000001, -1.0000001, 1e-30, -1e-30]),
        (torch.rand(1 << 16, generator=g) * 2 - 1) * torch.logspace(-6, 0, 1 << 16),
    ])
    grid = log_grid(tuple(code.tolist()), torch.device("cpu"))
    assert torch.equal(nearest_codes_8bit(probe, grid), torch.bucketize(probe, mids).to(torch.uint8))


def test_8bit_quantizer_rejects_an_unsorted_map():
    with pytest.raises(ValueError, match="code must be sorted in increasing order"):
        quantize_blockwise_8bit(torch.randn(512), code=dynamic_map(True).flip(0))
