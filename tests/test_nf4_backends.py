"""How a quantization call runs (minilora/quant/backends.py): every backend gives the same bits as the
eager reference, "auto" is deterministic, and a compiled path that cannot be built warns once and
the eager path serves. The compiled paths run here through inductor's C++ backend; the CUDA test
(Triton) runs where a GPU exists."""
import warnings
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from minilora.quant import backends
from minilora.quant.backends import CompiledPaths
from minilora.quant.codebooks import codebook
from minilora.quant.nf4 import (
    dequantize_4bit, dequantize_nibbles, dynamic_map, quantize_4bit, quantize_blockwise_8bit,
)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton) and bitsandbytes' CUDA kernels")


@given(blocks=st.integers(1, 40), block_size=st.sampled_from([32, 64, 256]),
       quant_type=st.sampled_from(["nf4", "fp4", "int4"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), double_quant=st.booleans())
def test_compiled_dequantize_formulation_bit_identical_to_eager(blocks, block_size, quant_type, dtype, double_quant):
    # the per-element formulation torch.compile fuses, run as plain ops: the eager path's bits
    w = torch.randn(blocks, block_size).to(dtype)
    state = quantize_4bit(w, quant_type, block_size, double_quant)
    fused = dequantize_nibbles(state.packed.view(-1), state.scales(), codebook(quant_type), block_size, dtype)
    assert torch.equal(fused.view(state.shape), dequantize_4bit(state, backend="eager"))


@given(rows=st.integers(1, 40), block_size=st.sampled_from([32, 64, 256]), partial=st.sampled_from([0, 0, 0, 1, 33]),
       quant_type=st.sampled_from(["nf4", "fp4", "int4"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), double_quant=st.booleans())
def test_compiled_dequantize_on_cpu_bit_identical_to_eager_and_auto(rows, block_size, partial, quant_type, dtype,
                                                                     double_quant):
    # the same torch.compile'd function CUDA tensors use, here through inductor's C++ backend (compiled
    # once for every shape); a tensor with a partial last block runs eager
    seen = backends.COMPILED.unavailable.copy()
    w = torch.randn(rows * block_size + partial, generator=torch.Generator().manual_seed(rows)).to(dtype)
    state = quantize_4bit(w, quant_type, block_size, double_quant)
    eager = dequantize_4bit(state, backend="eager")
    assert torch.equal(dequantize_4bit(state, backend="compiled"), eager)
    assert torch.equal(state.dequantize(backend="auto"), eager)
    assert backends.COMPILED.unavailable == seen, "the compiled dequantize fell back to eager (see the warning)"


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_compiled_cuda_dequantize_bit_identical_to_eager_and_to_bitsandbytes(dtype):
    import bitsandbytes.functional as F

    for shape in [(4096, 4096), (1000, 64), (7, 4097)]:  # the last: a partial block, eager path
        w = torch.randn(shape, device="cuda").to(dtype)
        packed, qs = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        state = quantize_4bit(w, "nf4", 64, True)
        fused = dequantize_4bit(state, backend="compiled")
        assert "dequantize" not in backends.COMPILED.unavailable, "the fused path fell back to eager (see the warning)"
        eager = dequantize_4bit(state, backend="eager")
        assert torch.equal(fused, eager)
        assert torch.equal(fused, F.dequantize_4bit(packed, qs))


@pytest.mark.parametrize("signed", [True, False])
def test_compiled_cpu_8bit_encoder_bit_identical_to_eager(signed):
    # the torch.compile'd loop (whole 1M-element chunks) and the eager passes: the same codes and scales
    code = dynamic_map(signed)
    mid = (code[:-1] + code[1:]) / 2
    g = torch.Generator().manual_seed(int(signed))
    x = torch.randn(3 * 2**20 + 300, generator=g) * 1e-3
    if not signed:
        x = x.abs() * 1e-3
    x[:255] = mid   # ties, scaled by their block's absmax
    x[2**20:2**20 + 256] = 0.0   # an all-zero block
    eager = quantize_blockwise_8bit(x, code, 256, backend="eager")
    for backend in ("compiled", "auto"):
        got = quantize_blockwise_8bit(x, code, 256, backend=backend)
        assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1]), backend
    assert "8-bit encoder" not in backends.COMPILED.unavailable, "the compiled encoder fell back (see the warning)"


def broken_compile(fn, **options):
    def run(*args):
        raise RuntimeError("no C++ compiler")
    return run


@pytest.mark.parametrize("spelling", [{"backend": "compiled"}])
def test_a_compiled_8bit_encoder_that_cannot_be_built_warns_once_and_the_eager_path_serves(monkeypatch, spelling):
    monkeypatch.setattr(backends, "COMPILED", CompiledPaths())
    monkeypatch.setattr(torch, "compile", broken_compile)
    x = torch.randn(2**20)
    eager = quantize_blockwise_8bit(x, backend="eager")
    with pytest.warns(RuntimeWarning, match="compiled 8-bit encoder unavailable .*no C\\+\\+ compiler"):
        first = quantize_blockwise_8bit(x, **spelling)
    assert backends.COMPILED.unavailable == {"8-bit encoder"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # once: no second warning
        second = quantize_blockwise_8bit(x, **spelling)
    for got in (first, second):
        assert torch.equal(got[0], eager[0]) and torch.equal(got[1], eager[1])


def test_a_compiled_dequantize_that_cannot_be_built_warns_once_and_the_eager_path_serves(monkeypatch):
    monkeypatch.setattr(backends, "COMPILED", CompiledPaths())
    monkeypatch.setattr(torch, "compile", broken_compile)
    state = quantize_4bit(torch.randn(64, 128, dtype=torch.bfloat16))
    eager = dequantize_4bit(state, backend="eager")
    with pytest.warns(RuntimeWarning, match="compiled dequantize unavailable .*no C\\+\\+ compiler"):
        first = dequantize_4bit(state, backend="compiled")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = state.dequantize(backend="compiled")
    assert backends.COMPILED.unavailable == {"dequantize"}
    assert torch.equal(first, eager) and torch.equal(second, eager)


def test_backend_errors_name_the_value_and_what_is_allowed():
    x = torch.randn(512)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'eager', 'compiled'\), got 'fast'"):
        quantize_blockwise_8bit(x, backend="fast")
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'eager', 'compiled', 'triton'\), got 'fast'"):
        dequantize_4bit(quantize_4bit(x), backend="fast")
    # the Triton kernels dequantize only; the 8-bit quantizer has no Triton backend
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'eager', 'compiled'\), got 'triton'"):
        quantize_blockwise_8bit(x, backend="triton")
    # the compiled encoder reproduces the CPU rounding; asking it for the CUDA kernel's cannot work
    with pytest.raises(ValueError, match="backend='compiled' .* 'cpu' rounding on CPU tensors only, got kernel 'cuda-ieee'"):
        quantize_blockwise_8bit(x, kernel="cuda", backend="compiled")


def test_triton_backend_where_it_cannot_run_raises_why_and_auto_never_picks_it(monkeypatch):
    state = quantize_4bit(torch.randn(64, 64))

    def not_installed():
        raise ImportError("No module named 'triton'")

    monkeypatch.setattr(backends, "load_triton_kernels", not_installed)
    with pytest.raises(ImportError, match="backend='triton' needs Triton: Triton is not installed .*pip install triton"):
        dequantize_4bit(state, backend="triton")
    monkeypatch.setitem(backends.AUTO_BACKEND, "cpu", "triton")  # as if measured to pay: still eager without Triton
    assert backends.resolve_backend("auto", torch.device("cpu")) == "eager"
    assert torch.equal(dequantize_4bit(state), dequantize_4bit(state, backend="eager"))
    # installed, but its kernels were not decorated for the interpreter: a CPU tensor cannot run them
    monkeypatch.setattr(backends, "load_triton_kernels", lambda: SimpleNamespace(INTERPRETED=False))
    with pytest.raises(ValueError, match="cannot run here: Triton kernels run on CUDA tensors, or on CPU tensors "
                                         "in Triton's interpreter .*got a tensor on cpu"):
        dequantize_4bit(state, backend="triton")
    assert backends.resolve_backend("auto", torch.device("cpu")) == "eager"


def test_auto_is_eager_on_every_device_until_the_triton_kernels_are_measured_on_a_gpu():
    # the documented default (minilora/quant/backends.py): bench/nf4.py on CUDA decides when CUDA's entry changes
    assert backends.AUTO_BACKEND == {"cpu": "eager", "cuda": "eager"}
    assert [backends.resolve_backend("auto", torch.device(d)) for d in ("cpu", "cuda", "meta")] == ["eager"] * 3
