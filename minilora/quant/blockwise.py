"""Blockwise absmax quantization: the scaling the 4-bit and 8-bit quantizers share, their input
checks, and the 8-bit quantizer (double quantization of the 4-bit scales, 8-bit optimizer states).

    x (any shape) -> flatten, fp32, blocks of `block_size` (the last block may be partial)
      -> absmax per block; scaled = x * (1/absmax)   (the partial last block: x / absmax)
      -> code = index of the nearest map value (ties -> the lower value), uint8

That is bitsandbytes' pure-PyTorch kernel (`backends/default/ops.py`); `kernel="cuda"` gives the
codes of its CUDA kernel instead (minilora/quant/bnb_cuda.py). Work goes in chunks of about
CHUNK_ELEMENTS, so temporaries stay bounded and in cache.

The 8-bit maps are dense near zero (the dynamic map spans 1e-7..1 in decades), so the nearest code
is looked up on a logarithmic grid (`LogGrid`): the cell of a value is its fp32 bit pattern, made
order-preserving, with the low mantissa bits dropped; the few midpoints inside a cell are compared
exactly, so the codes equal `torch.bucketize` bit for bit. `encode_blocks_8bit` is both the eager
encoder of whole blocks and what backend="compiled" hands to torch.compile (one loop instead of
about fourteen passes over memory): one function, so the two cannot drift apart.
"""
from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch

from minilora.quant import bnb_cuda
from minilora.quant.backends import resolve_backend, run_compiled
from minilora.quant.codebooks import dynamic_map, shared_dynamic_map

__all__ = [
    "FLOAT_DTYPES", "CHUNK_ELEMENTS", "chunk_elements", "check_block_size", "check_input", "check_finite",
    "scale_whole_blocks", "scale_blocks", "LogGrid", "log_grid", "nearest_codes_8bit", "encode_blocks_8bit",
    "quantize_blockwise_8bit", "dequantize_blockwise_8bit",
]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements per chunk: quantize/dequantize touch at most a few chunk-sized fp32 temporaries, so
# memory stays bounded for a 128256 x 4096 embedding, and each chunk stays in cache.
CHUNK_ELEMENTS = 1 << 20
# cells 2**-10 wide relative to the value: sign, exponent and 10 mantissa bits, 2**19 cells
KEY_SHIFT = 13


def chunk_elements(device: torch.device, block_size: int) -> int:
    """Elements per chunk, a whole number of blocks: big enough that each op's intra-op threads
    have work, small enough that temporaries stay bounded (and in cache on CPU)."""
    target = CHUNK_ELEMENTS if device.type == "cpu" else max(CHUNK_ELEMENTS, 1 << 24)
    return max(target // block_size, 1) * block_size


# -------------------------------------------------------------------------------------- checks

def check_block_size(block_size, name: str = "block_size") -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or not (
        32 <= block_size <= 4096 and block_size & (block_size - 1) == 0
    ):
        raise ValueError(f"{name} must be a power of two in 32..4096, got {block_size!r}")
    return block_size


def check_input(x, what: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {x.dtype}")
    if x.numel() == 0:
        raise ValueError(f"cannot quantize an empty tensor ({what} has shape {tuple(x.shape)})")


def check_finite(absmax: torch.Tensor, x: torch.Tensor, what: str) -> None:
    # max() propagates NaN and keeps Inf, so checking the per-block absmax checks every element.
    if not bool(torch.isfinite(absmax).all()):
        bad = "NaN" if bool(torch.isnan(x).any()) else "Inf"
        raise ValueError(f"{what} contains {bad} (shape {tuple(x.shape)}); only finite values can be quantized")


# ----------------------------------------------------------------------------- scaling (fp32)

def scale_whole_blocks(blocks: torch.Tensor):
    """blocks fp32 (m, block_size) -> (scaled (m * block_size,), absmax (m,)): x * (1/absmax)."""
    absmax = blocks.abs().amax(dim=1)
    # bitsandbytes clamps to [-1, 1]; values beyond +-1 (by rounding) get the end codes either way,
    # since every midpoint lies inside (-1, 1), so the clamp is left out.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).reshape(-1)
    return scaled, absmax


def scale_blocks(flat: torch.Tensor, block_size: int):
    """flat fp32 (n,) -> (scaled (n,), absmax (ceil(n/block_size),)), as bitsandbytes: whole
    blocks multiply by 1/absmax, the partial last block divides by its own absmax."""
    n = flat.numel()
    full = n - n % block_size
    scaled, absmax = scale_whole_blocks(flat[:full].view(-1, block_size))
    if full < n:
        last = flat[full:].abs().max().clamp(min=1e-38)  # stored clamped, as bitsandbytes does
        absmax = torch.cat([absmax, last.view(1)])
        scaled = torch.cat([scaled, flat[full:] / last])
    return scaled, absmax


# ------------------------------------------------------------------------------ 8-bit codes

def ordered_cells(x: torch.Tensor) -> torch.Tensor:
    """int32 cell index of each fp32 value on the logarithmic grid; x <= y implies cell(x) <= cell(y)."""
    bits = x.contiguous().view(torch.int32)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negative floats: flip all but the sign bit
    return (key >> KEY_SHIFT) + (1 << (31 - KEY_SHIFT))


class LogGrid(NamedTuple):
    """The lookup tables of one sorted 8-bit map: below[c] counts the midpoints in cells before c;
    the `depth` midpoints from there on are compared exactly."""

    below: torch.Tensor         # int32 (2**19,)
    midpoints: torch.Tensor     # fp32 (255 + depth,), padded with +inf
    depth: int                  # most midpoints in one cell


@lru_cache(maxsize=16)
def log_grid(values: tuple, device: torch.device) -> LogGrid:
    """The LogGrid of a sorted 256-value map (given as a tuple), built once per device: 2 MiB."""
    code = torch.tensor(values, dtype=torch.float32)
    midpoints = (code[:-1] + code[1:]) / 2
    mid_cells = ordered_cells(midpoints).long()
    cells = torch.arange(1 << (32 - KEY_SHIFT), dtype=torch.int64)
    below = torch.searchsorted(mid_cells, cells).to(torch.int32)
    depth = int(torch.bincount(mid_cells).max())
    padded = torch.cat([midpoints, torch.full((depth,), float("inf"))])
    return LogGrid(below.to(device), padded.to(device), depth)


def nearest_codes_8bit(scaled: torch.Tensor, grid: LogGrid) -> torch.Tensor:
    """uint8 code of each scaled fp32 value: nearest map entry, ties to the lower one (= bucketize)."""
    idx = torch.index_select(grid.below, 0, ordered_cells(scaled).view(-1))
    codes = idx.clone()
    for j in range(grid.depth):
        codes += scaled > torch.index_select(grid.midpoints, 0, idx + j if j else idx)
    return codes.to(torch.uint8)


def encode_blocks_8bit(blocks: torch.Tensor, grid: LogGrid):
    """blocks fp32 (m, block_size) -> (codes uint8 (m * block_size,), absmax fp32 (m,)): the eager
    encoder of whole blocks, and the function backend="compiled" compiles."""
    scaled, absmax = scale_whole_blocks(blocks)
    return nearest_codes_8bit(scaled, grid), absmax


# ------------------------------------------------------------------------------ 8-bit blockwise

@torch.no_grad()
def quantize_blockwise_8bit(x: torch.Tensor, code: torch.Tensor | None = None, block_size: int = 256,
                            kernel: str = "auto", backend: str = "auto"):
    """Blockwise 8-bit quantization with exact nearest-value rounding (ties -> lower value).

    Returns (codes uint8 (n,), absmax fp32 (ceil(n/block_size),)). `code` is a sorted fp32[256]
    map, default `dynamic_map(signed=True)`. This is bitsandbytes' pure-PyTorch kernel; its native
    CPU kernel picks the second-nearest code for ~0.2% of values. `kernel` (minilora/quant/bnb_cuda.py):
    "cuda" (the default on CUDA tensors) gives the codes of bitsandbytes' CUDA kernel, its binary
    search. `backend` (minilora/quant/backends.py): "compiled" encodes whole chunks of
    CHUNK_ELEMENTS (rounded down to whole blocks) in one torch.compile'd loop, static shape; the
    rest of the tensor runs eager; the same codes. It exists for the "cpu" rounding on CPU tensors.
    """
    check_input(x, "x")
    check_block_size(block_size)
    kernel = bnb_cuda.resolve_kernel(kernel, x.device)
    backend = resolve_backend(backend, x.device, allowed=("auto", "eager", "compiled"))
    if backend == "compiled" and (kernel != "cpu" or x.device.type != "cpu"):
        raise ValueError(f"backend='compiled' has a compiled 8-bit encoder for the 'cpu' rounding on CPU tensors "
                         f"only, got kernel {kernel!r} on {x.device}; use backend 'auto' or 'eager'")
    code = dynamic_map(True, x.device) if code is None else code.to(x.device, torch.float32)
    if code.numel() != 256:
        raise ValueError(f"code must have 256 entries, got {code.numel()}")
    if not bool((code[1:] > code[:-1]).all()):
        raise ValueError("code must be sorted in increasing order with distinct values")
    # the CPU rounding's lookup tables (cached per device); the CUDA kernel's search needs none
    grid = log_grid(tuple(code.tolist()), x.device) if kernel == "cpu" else None
    flat = x.reshape(-1)
    n = flat.numel()
    codes = torch.empty(n, dtype=torch.uint8, device=x.device)
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32, device=x.device)
    step = max(CHUNK_ELEMENTS // block_size, 1) * block_size
    for start in range(0, n, step):
        chunk = flat[start:start + step].float()
        compiled = backend == "compiled" and chunk.numel() == step
        chunk_codes, chunk_absmax = _encode_chunk(chunk, block_size, kernel, code, grid, compiled)
        check_finite(chunk_absmax, x, "x")
        codes[start:start + chunk.numel()] = chunk_codes
        absmax[start // block_size:start // block_size + chunk_absmax.numel()] = chunk_absmax
    return codes, absmax


def _encode_chunk(chunk, block_size: int, kernel: str, code, grid: LogGrid | None, compiled: bool):
    if kernel != "cpu":  # scaled is padded to whole blocks, as the CUDA kernel loads them
        scaled, absmax = bnb_cuda.scale_blocks(chunk, block_size, bnb_cuda.RECIPROCAL[kernel])
        return bnb_cuda.codes_8bit(scaled[:chunk.numel()], code), absmax
    if compiled:
        encoded = run_compiled("8-bit encoder", encode_blocks_8bit, chunk.view(-1, block_size), grid, dynamic=False)
        if encoded is not None:
            return encoded
    scaled, absmax = scale_blocks(chunk, block_size)
    return nearest_codes_8bit(scaled, grid), absmax


@torch.no_grad()
def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor | None = None,
                              block_size: int = 256, shape=None, dtype: torch.dtype = torch.float32):
    """Inverse of quantize_blockwise_8bit: code[codes] * absmax per block, fp32, then `dtype`."""
    check_block_size(block_size)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    n = codes.numel()
    if absmax.numel() != -(-n // block_size):
        raise ValueError(f"absmax has {absmax.numel()} entries, expected ceil({n}/{block_size}) = {-(-n // block_size)}")
    code = shared_dynamic_map(codes.device) if code is None else code.to(codes.device, torch.float32)
    out = torch.index_select(code, 0, codes.reshape(-1).int())  # (n,) fp32, scaled in place below
    full = n - n % block_size
    out[:full].view(-1, block_size).mul_(absmax[:full // block_size].unsqueeze(1))
    if full < n:
        out[full:].mul_(absmax[-1])
    return out.to(dtype).view(shape if shape is not None else (n,))
