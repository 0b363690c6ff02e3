"""NF4 / FP4 / INT4 blockwise 4-bit quantization, byte for byte as bitsandbytes.

The byte layout, rounding and codebooks are those of bitsandbytes (`bitsandbytes.functional`
`quantize_4bit` / `dequantize_4bit`, kernels in `backends/default/ops.py`):

    w (any shape, fp32/bf16/fp16)
      -> flatten, fp32, blocks of `block_size` (last block may be partial)
      -> absmax per block; scaled = clamp(x * (1/absmax), -1, 1)   (partial block: x / absmax)
      -> code = index of the nearest codebook value (ties -> lower value)
      -> two codes per byte, FIRST element in the HIGH nibble; odd length padded with 0.0
    double_quant: offset = mean(absmax); (absmax - offset) quantized in blocks of 256 with the
    signed 8-bit dynamic map -> uint8 absmax + fp32 absmax2 per 256 blocks + fp32 offset.

Dequantizing is `codebook[code] * absmax` in fp32, then a cast to the original dtype.

Each call chooses two things (minilora/quant/backends.py): `kernel`, which bitsandbytes rounding
the bytes reproduce ("auto": the one bitsandbytes uses on the tensor's device; "cpu", "cuda",
"cuda-ieee", see minilora/quant/bnb_cuda.py), and, for dequantizing, `backend`, how they are
computed ("auto" | "eager" | "compiled": the same bits, different speed).

Storage per parameter: 4 + 32/64 = 4.5 bits (block 64), with double quantization
4 + 8/64 + 32/(64*256) = 4.127 bits plus a 4-byte offset.

The codebooks (minilora/quant/codebooks.py) and the 8-bit blockwise quantizer
(minilora/quant/blockwise.py) are re-exported here: this module is where users import NF4 from.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minilora.quant import bnb_cuda
from minilora.quant.backends import load_triton_kernels, require_triton, resolve_backend, run_compiled
from minilora.quant.blockwise import (
    FLOAT_DTYPES, check_block_size, check_finite, check_input, chunk_elements, dequantize_blockwise_8bit,
    quantize_blockwise_8bit, scale_blocks,
)
from minilora.quant.codebooks import (
    QUANT_TYPES, codebook, codebook_tables, dynamic_map, fp4_codebook, int4_codebook, nearest_codes, nf4_codebook,
    shared_dynamic_map,
)

__all__ = [
    "nf4_codebook", "fp4_codebook", "int4_codebook", "codebook", "dynamic_map",
    "QuantState4bit", "quantize_4bit", "dequantize_4bit", "dequantize_nibbles", "packed_weight",
    "quantize_blockwise_8bit", "dequantize_blockwise_8bit", "quantization_error",
]



# ---------------------------------------------------------------------------------- 4-bit state

@dataclass
class QuantState4bit:
    """A 4-bit quantized tensor, laid out as bitsandbytes' Params4bit + QuantState.

    packed:   uint8 ((n + 1) // 2, 1), two codes per byte, first element in the high nibble
    absmax:   fp32 (blocks,), or uint8 (blocks,) codes of absmax - offset when double quantized
    absmax2:  fp32 (ceil(blocks / dq_block_size),) scales of the 8-bit absmax codes, or None
    offset:   fp32 scalar tensor, mean of the absmax, or None
    shape, dtype: the original tensor's; block_size, quant_type ("nf4" | "fp4" | "int4").
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    block_size: int = 64
    quant_type: str = "nf4"
    absmax2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    dq_block_size: int = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax2 is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def codebook(self) -> torch.Tensor:
        return codebook_tables(self.quant_type, self.packed.device).codebook.clone()

    @property
    def nbytes(self) -> int:
        """Bytes of this tensor's own data: codes, scales and (double quant) absmax2 + offset.
        The codebooks are shared constants and not counted."""
        total = self.packed.numel() * self.packed.element_size() + self.absmax.numel() * self.absmax.element_size()
        if self.double_quant:
            total += self.absmax2.numel() * 4 + 4
        return total

    def scales(self) -> torch.Tensor:
        """fp32 absmax per block (the double-quantized ones decoded exactly as bitsandbytes does)."""
        if not self.double_quant:
            return self.absmax.float()
        absmax = dequantize_blockwise_8bit(self.absmax, self.absmax2, None, self.dq_block_size)
        return absmax.add_(self.offset)  # a separate fp32 add, as bitsandbytes' `absmax += offset`

    def dequantize(self, dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
        return dequantize_4bit(self, dtype, backend)

    def to(self, device) -> "QuantState4bit":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantState4bit(move(self.packed), move(self.absmax), self.shape, self.dtype, self.block_size,
                              self.quant_type, move(self.absmax2), move(self.offset), self.dq_block_size)


# ------------------------------------------------------------------------------------- quantize

@torch.no_grad()
def quantize_4bit(w: torch.Tensor, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = True,
                  dq_block_size: int = 256, kernel: str = "auto") -> QuantState4bit:
    """Blockwise 4-bit quantization, byte-identical to bitsandbytes.functional.quantize_4bit
    (compress_statistics=double_quant) on the same device. Works on any shape, contiguous or not,
    in chunks. `kernel`: "auto" (the rounding bitsandbytes uses on w's device), "cpu", "cuda" or
    "cuda-ieee" (minilora/quant/bnb_cuda.py)."""
    check_input(w, "w")
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")
    check_block_size(block_size)
    check_block_size(dq_block_size, "dq_block_size")
    kernel = bnb_cuda.resolve_kernel(kernel, w.device)
    if kernel != "cpu" and quant_type == "int4":
        raise ValueError("bitsandbytes' CUDA kernel has no int4 quantizer; use kernel='cpu' for int4")
    grid = codebook_tables(quant_type, w.device).grid
    flat = w.reshape(-1)  # a view when contiguous; one copy in w's dtype when not
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=w.device)
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32, device=w.device)
    step = chunk_elements(w.device, block_size)
    for start in range(0, n, step):
        chunk = flat[start:start + step].float()
        if kernel != "cpu":  # scaled is padded to whole blocks, as the kernel loads them
            scaled, chunk_absmax = bnb_cuda.scale_blocks(chunk, block_size, bnb_cuda.RECIPROCAL[kernel])
            check_finite(chunk_absmax, w, "w")
            codes = bnb_cuda.codes_4bit(scaled[:chunk.numel() + chunk.numel() % 2], quant_type)
        else:
            scaled, chunk_absmax = scale_blocks(chunk, block_size)
            check_finite(chunk_absmax, w, "w")
            if scaled.numel() % 2:
                scaled = torch.nn.functional.pad(scaled, (0, 1))
            codes = nearest_codes(scaled, grid)  # (m,) uint8
        # pairs as little-endian int16: low byte = first element -> high nibble
        pairs = codes.view(torch.int16)
        packed[start // 2:start // 2 + pairs.numel()] = ((pairs & 15) << 4) | (pairs >> 8)
        absmax[start // block_size:start // block_size + chunk_absmax.numel()] = chunk_absmax
    state = QuantState4bit(packed.view(-1, 1), absmax, torch.Size(w.shape), w.dtype, block_size, quant_type,
                           dq_block_size=dq_block_size)
    if double_quant:
        offset = absmax.mean()
        state.absmax, state.absmax2 = quantize_blockwise_8bit(absmax - offset, dynamic_map(True), dq_block_size,
                                                              kernel)
        state.offset = offset
    return state


# ----------------------------------------------------------------------------------- dequantize

@torch.no_grad()
def dequantize_4bit(state: QuantState4bit, dtype: torch.dtype | None = None, backend: str = "auto", *,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """codebook[code] * absmax in fp32, cast to `dtype` (default: the original dtype), original shape.

    backend (minilora/quant/backends.py; "auto" is "eager" today): "eager", a byte -> (high, low)
    table of int64 gathers two fp32 values at once, so each chunk is one gather and one multiply.
    "compiled": `dequantize_nibbles` through torch.compile (one kernel; Triton on CUDA, C++ on CPU)
    for a tensor of whole blocks; one with a partial last block runs eager. "triton": one Triton
    kernel that decodes the double-quantized scales in the same pass (minilora/quant/triton_dequantize.py;
    CUDA, or CPU under TRITON_INTERPRET=1). The same bits every way.

    `out`: a contiguous tensor of `dtype` with the weight's number of elements, on its device, to
    write into instead of a new tensor (LinearNF4 reuses one buffer); returned viewed as the shape."""
    if not isinstance(state, QuantState4bit):
        raise TypeError(f"state must be a QuantState4bit, got {type(state).__name__}")
    dtype = state.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    n, bs = state.numel, state.block_size
    packed = state.packed.reshape(-1)
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"packed has {packed.numel()} bytes, shape {tuple(state.shape)} needs {(n + 1) // 2}")
    backend = resolve_backend(backend, packed.device)
    out = _output(out, n, dtype, packed.device)
    tables = codebook_tables(state.quant_type, packed.device)
    if backend == "triton":
        require_triton(packed.device)
        load_triton_kernels().dequantize_into(out, packed_weight(state))
        return out.view(state.shape)
    absmax = state.scales()
    if backend == "compiled" and n % bs == 0:
        whole = run_compiled("dequantize", dequantize_nibbles, packed, absmax, tables.codebook, bs, dtype, dynamic=True)
        if whole is not None:
            return out.copy_(whole).view(state.shape)
    full = n - n % bs
    step = chunk_elements(packed.device, bs)
    # gather pairs into a cache-sized scratch, then one multiply writes (and first touches) the
    # output, in fp32 and rounded once to a 16-bit dtype: both passes run on all threads
    scratch = torch.empty(min(step, full) // 2, dtype=torch.int64, device=packed.device)
    for start in range(0, full, step):
        stop = min(start + step, full)
        pairs = torch.index_select(tables.pair_table, 0, packed[start // 2:stop // 2].int(),
                                   out=scratch[:(stop - start) // 2])
        torch.mul(pairs.view(torch.float32).view(-1, bs), absmax[start // bs:stop // bs].unsqueeze(1),
                  out=out[start:stop].view(-1, bs))
    if full < n:
        tail = tables.pair_table[packed[full // 2:].long()].view(torch.float32)[:n - full]
        out[full:] = tail * absmax[-1]
    return out.view(state.shape)


def packed_weight(state: QuantState4bit):
    """The state's tensors as the Triton kernels read them (a triton_dequantize.PackedWeight)."""
    kernels = load_triton_kernels()
    packed = state.packed.reshape(-1).view(torch.uint8)
    device = packed.device
    absmax = state.absmax.contiguous() if state.double_quant else state.absmax.float().contiguous()
    absmax2 = state.absmax2.contiguous() if state.double_quant else absmax  # read only with double quantization
    offset = state.offset.reshape(1) if state.double_quant else absmax
    return kernels.PackedWeight(packed, codebook_tables(state.quant_type, device).codebook, absmax, absmax2,
                                shared_dynamic_map(device), offset, state.block_size, state.double_quant,
                                state.dq_block_size, tuple(state.shape))


def _output(out: torch.Tensor | None, n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The flat (n,) tensor dequantize_4bit writes: a new one, or the caller's `out`, checked."""
    if out is None:
        return torch.empty(n, dtype=dtype, device=device)
    if not isinstance(out, torch.Tensor) or out.dtype != dtype or out.numel() != n or out.device != device \
            or not out.is_contiguous():
        got = (f"{type(out).__name__}" if not isinstance(out, torch.Tensor) else
               f"{out.dtype} {tuple(out.shape)} on {out.device}" + ("" if out.is_contiguous() else ", not contiguous"))
        raise ValueError(f"out must be a contiguous {dtype} tensor of {n} elements on {device}, got {got}")
    return out.view(-1)


def dequantize_nibbles(packed: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor, block_size: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """packed uint8 (n/2,), scales fp32 (n/block_size,), codebook fp32 (16,) -> (n,) in `dtype`,
    n a whole number of blocks: what backend="compiled" compiles.

    Written per element (unpack the nibble, look its value up, scale) because that is what a code
    generator fuses into one kernel that writes each output once; the eager path's int64 pair
    table is the fast formulation for eager ops, but its bitcast of int64 to two fp32 values is no
    elementwise op. One fp32 multiply (nothing to contract into an FMA) rounded once to `dtype`:
    the eager bits. The scales are decoded before, eagerly: a compiled multiply-add of the double
    quantization would be contracted into an FMA and round differently from PyTorch's."""
    codes = torch.stack([packed >> 4, packed & 15], dim=1).view(-1).long()  # (n,): first element high nibble
    values = codebook[codes].view(-1, block_size) * scales.unsqueeze(1)  # (n / block_size, block_size)
    return values.view(-1).to(dtype)


# ---------------------------------------------------------------------------------- error table

def quantization_error(w: torch.Tensor, quant_types=("nf4", "fp4", "int4"), block_sizes=(32, 64, 128, 256),
                       double_quant: bool = False) -> list[dict]:
    """One row per (quant_type, block_size): mse, max_abs, mean_abs error and the correlation
    between w and its round trip, plus bits per parameter. All in fp64 over fp32 values."""
    rows = []
    ref = w.detach().float().reshape(-1)
    for quant_type in quant_types:
        for block_size in block_sizes:
            state = quantize_4bit(w.detach(), quant_type, block_size, double_quant)
            err = state.dequantize(torch.float32).reshape(-1).double() - ref.double()
            approx = ref.double() + err
            corr = torch.corrcoef(torch.stack([ref.double(), approx]))[0, 1]
            rows.append({
                "quant_type": quant_type, "block_size": block_size,
                "mse": err.square().mean().item(), "max_abs": err.abs().max().item(),
                "mean_abs": err.abs().mean().item(), "correlation": corr.item(),
                "bits_per_param": 8 * state.nbytes / state.numel,
            })
    return rows
