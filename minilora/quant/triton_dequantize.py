"""The NF4 / FP4 dequantize kernel in Triton: one pass reads the packed codes and the (double-
quantized) scales and writes the weight, bit for bit what `dequantize_4bit(backend="eager")` and
bitsandbytes' CUDA kernel write (backend="triton", minilora/quant/backends.py).

    byte j of packed -> elements 2j (high nibble) and 2j + 1 (low nibble), one block: block_size is even
    scale  = absmax[b]                                      (b = 2j // block_size)
           = dynamic_map[absmax[b]] * absmax2[b // 256]; then + offset, a separate fp32 add (double quant)
    values = codebook[nibble] * scale, in fp32, rounded once to the output dtype

The helpers here (`block_scales`, `decode_pairs`, `round_fp32_to`, `as_stored`) are the format, written
once: the fused matmul (minilora/quant/triton_matmul.py) decodes its weight tiles with them.

Exactness, on a GPU and in Triton's interpreter (TRITON_INTERPRET=1, how CI runs these kernels on a
CPU) alike:
  * kernels launch with enable_fp_fusion=False: contracting `dynamic_map[q] * absmax2 + offset` into
    an FMA would round once where PyTorch and bitsandbytes round twice;
  * bfloat16 travels as its bits (int16) and is rounded from fp32 by integer arithmetic (round to
    nearest, ties to even, as PyTorch's cast): the interpreter has no bfloat16 arithmetic and its
    float32 -> bfloat16 cast truncates, so the one formula serves both runtimes.

Import this module through `load_triton_kernels` (minilora/quant/backends.py): whether the kernels run
interpreted is fixed when `@triton.jit` decorates them, i.e. on first import.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "BYTES_PER_PROGRAM", "PackedWeight", "launch_options", "device_guard", "stored_view",
           "kernel_dtype_name",
           "block_scales", "decode_pairs", "round_fp32_to", "as_stored", "dequantize_kernel", "dequantize_into"]

BYTES_PER_PROGRAM = 1024  # packed bytes per program: 2048 output elements


class PackedWeight(NamedTuple):
    """A 4-bit weight as the kernels read it (minilora.quant.nf4.packed_weight builds one from a
    QuantState4bit): tensors on one device, contiguous."""

    packed: torch.Tensor        # uint8 ((n + 1) // 2,), first element in the high nibble
    codebook: torch.Tensor      # fp32 (16,)
    absmax: torch.Tensor        # fp32 (blocks,), or uint8 (blocks,) codes with double quantization
    absmax2: torch.Tensor       # fp32 (ceil(blocks / dq_block_size),); any tensor without double quantization
    dynamic_map: torch.Tensor   # fp32 (256,), the map of the absmax codes
    offset: torch.Tensor        # fp32 (1,); any tensor without double quantization
    block_size: int
    double_quant: bool
    dq_block_size: int
    shape: tuple                # the weight's; (rows, columns) for a linear weight

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def columns(self) -> int:
        return self.shape[-1]

    @property
    def pointers(self) -> tuple:
        """The kernel arguments packed_ptr .. offset_ptr, in order."""
        return self.packed, self.codebook, self.absmax, self.absmax2, self.dynamic_map, self.offset

    @property
    def constants(self) -> dict:
        return {"BLOCK_SIZE": self.block_size, "DOUBLE_QUANT": self.double_quant, "DQ_BLOCK_SIZE": self.dq_block_size}


def launch_options(num_warps: int) -> dict:
    """Keyword options of every launch here (see the module docstring for enable_fp_fusion)."""
    return {"num_warps": num_warps, "enable_fp_fusion": False}


def device_guard(device: torch.device):
    """A launch goes to the current CUDA device: make it `device` (nothing to do off CUDA)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def kernel_dtype_name(dtype: torch.dtype) -> str:
    """The constexpr the kernels take for a float dtype: "fp32", "fp16" or "bf16"."""
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def stored_view(t: torch.Tensor) -> torch.Tensor:
    """What a kernel gets for a float tensor: bfloat16 as its int16 bits, others as they are."""
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


@triton.jit
def block_scales(block, mask, absmax_ptr, absmax2_ptr, dynamic_map_ptr, offset_ptr,
                 DOUBLE_QUANT: tl.constexpr, DQ_BLOCK_SIZE: tl.constexpr):
    """fp32 absmax of each 4-bit block index in `block` (any shape), as QuantState4bit.scales()."""
    if DOUBLE_QUANT:
        code = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(dynamic_map_ptr + code) * tl.load(absmax2_ptr + block // DQ_BLOCK_SIZE, mask=mask, other=0.0)
        return scale + tl.load(offset_ptr)
    return tl.load(absmax_ptr + block, mask=mask, other=0.0)


@triton.jit
def decode_pairs(byte, mask, packed_ptr, codebook_ptr, absmax_ptr, absmax2_ptr, dynamic_map_ptr, offset_ptr,
                 BLOCK_SIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, DQ_BLOCK_SIZE: tl.constexpr):
    """fp32 (first, second) values of the two elements each packed byte index in `byte` holds."""
    packed = tl.load(packed_ptr + byte, mask=mask, other=0)
    scale = block_scales(byte * 2 // BLOCK_SIZE, mask, absmax_ptr, absmax2_ptr, dynamic_map_ptr, offset_ptr,
                         DOUBLE_QUANT, DQ_BLOCK_SIZE)
    first = tl.load(codebook_ptr + (packed >> 4).to(tl.int32)) * scale
    second = tl.load(codebook_ptr + (packed & 15).to(tl.int32)) * scale
    return first, second


@triton.jit
def round_fp32_to(values, DTYPE: tl.constexpr):
    """fp32 values rounded (to nearest, ties to even) to DTYPE's precision, still held in fp32."""
    if DTYPE == "bf16":
        bits = values.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == "fp16":
        return values.to(tl.float16).to(tl.float32)
    else:
        return values


@triton.jit
def as_stored(rounded, DTYPE: tl.constexpr):
    """fp32 values already rounded to DTYPE (round_fp32_to), as the kernel stores them: exact."""
    if DTYPE == "bf16":
        return (rounded.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.int16, bitcast=True)
    elif DTYPE == "fp16":
        return rounded.to(tl.float16)
    else:
        return rounded


@triton.jit
def dequantize_kernel(packed_ptr, codebook_ptr, absmax_ptr, absmax2_ptr, dynamic_map_ptr, offset_ptr, out_ptr,
                      n, BLOCK_SIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, DQ_BLOCK_SIZE: tl.constexpr,
                      DTYPE: tl.constexpr, BYTES: tl.constexpr):
    start = tl.program_id(0).to(tl.int64) * BYTES
    byte = start + tl.arange(0, BYTES)
    first, second = decode_pairs(byte, byte < (n + 1) // 2, packed_ptr, codebook_ptr, absmax_ptr, absmax2_ptr,
                                 dynamic_map_ptr, offset_ptr, BLOCK_SIZE, DOUBLE_QUANT, DQ_BLOCK_SIZE)
    values = tl.interleave(first, second)  # (2 * BYTES,): element 2j, then 2j + 1
    element = 2 * start + tl.arange(0, 2 * BYTES)
    tl.store(out_ptr + element, as_stored(round_fp32_to(values, DTYPE), DTYPE), mask=element < n)


# whether this module's kernels run in Triton's interpreter (decided when they were decorated)
INTERPRETED = type(dequantize_kernel).__name__ == "InterpretedFunction"


def dequantize_into(out: torch.Tensor, weight: PackedWeight) -> torch.Tensor:
    """Write the n = out.numel() dequantized values of `weight` into the contiguous `out` (fp32,
    bf16 or fp16, on the weight's device). minilora.quant.nf4.dequantize_4bit checks and calls this."""
    n = out.numel()
    grid = (triton.cdiv((n + 1) // 2, BYTES_PER_PROGRAM),)
    with device_guard(out.device):
        dequantize_kernel[grid](*weight.pointers, stored_view(out), n, **weight.constants,
                                DTYPE=kernel_dtype_name(out.dtype), BYTES=BYTES_PER_PROGRAM, **launch_options(4))
    return out
