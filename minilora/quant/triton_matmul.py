"""Fused 4-bit matmuls in Triton: y = x @ W.T and grad_x = grad_y @ W with W decoded tile by tile in
registers, never written out, for the few-token calls where writing the dense weight costs more
than the matmul (as bitsandbytes 0.50's fused 4-bit GEMM for a few tokens). minilora/quant/matmul_4bit.py
decides when they run.

    forward   y (T, N)      = x (T, K) @ W (N, K).T   a program per (BLOCK_T tokens, BLOCK_N rows of W), looping over K
    backward  grad_x (T, K) = grad_y (T, N) @ W       a program per (BLOCK_T tokens, BLOCK_K columns of W), looping over N

Each weight tile is decoded with the dequantize kernel's helpers (minilora/quant/triton_dequantize.py)
and rounded to the compute dtype: the very values `dequantize_4bit` gives. Products are summed in fp32
and rounded once to the compute dtype; only the summation order differs from the eager dequantize +
matmul (cuBLAS, oneDNN), so the two agree within the rounding bound of two fp32 sums of the same
products (tests/test_triton_kernels.py states it). W's rows must hold whole bytes (in_features even),
so that a row's codes never share a byte with the next row's.

In Triton's interpreter the dot runs in fp32 on the same (exactly representable) values: the
interpreter's dot reads bfloat16 operands as raw integers. On a GPU 16-bit operands go to the tensor
cores as 16-bit values, accumulating in fp32; fp32 operands are multiplied in IEEE fp32 (no TF32).
The tile sizes are a first choice, not yet tuned on a GPU (bench/nf4.py times them).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from minilora.quant.triton_dequantize import (
    INTERPRETED, PackedWeight, as_stored, decode_pairs, device_guard, kernel_dtype_name, launch_options, round_fp32_to,
    stored_view,
)

__all__ = ["weight_tile", "load_operand", "linear_kernel", "grad_input_kernel", "fused_matmul"]


@triton.jit
def weight_tile(rows, pairs, N, K, packed_ptr, codebook_ptr, absmax_ptr, absmax2_ptr, dynamic_map_ptr, offset_ptr,
                BLOCK_SIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, DQ_BLOCK_SIZE: tl.constexpr,
                DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """W[rows, 2 * pairs (+1)] as a (len(rows), 2 * len(pairs)) dot operand, zero outside W."""
    mask = (rows[:, None] < N) & (pairs[None, :] < K // 2)
    byte = rows[:, None].to(tl.int64) * (K // 2) + pairs[None, :]
    first, second = decode_pairs(byte, mask, packed_ptr, codebook_ptr, absmax_ptr, absmax2_ptr, dynamic_map_ptr,
                                 offset_ptr, BLOCK_SIZE, DOUBLE_QUANT, DQ_BLOCK_SIZE)
    tile = round_fp32_to(tl.interleave(tl.where(mask, first, 0.0), tl.where(mask, second, 0.0)), DTYPE)
    if UPCAST or DTYPE == "fp32":
        return tile
    elif DTYPE == "bf16":
        return tile.to(tl.bfloat16)  # exact: already rounded to bfloat16
    else:
        return tile.to(tl.float16)


@triton.jit
def load_operand(ptrs, mask, DTYPE: tl.constexpr, UPCAST: tl.constexpr):
    """A tile of a stored_view'd activation tensor as a dot operand (zero where masked)."""
    raw = tl.load(ptrs, mask=mask, other=0)
    if DTYPE == "bf16":
        if UPCAST:  # the bits of a bfloat16 are the high half of the equal float32
            return (raw.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
        return raw.to(tl.bfloat16, bitcast=True)
    elif DTYPE == "fp16" and UPCAST:
        return raw.to(tl.float32)
    else:
        return raw


@triton.jit
def linear_kernel(x_ptr, packed_ptr, codebook_ptr, absmax_ptr, absmax2_ptr, dynamic_map_ptr, offset_ptr, bias_ptr,
                  y_ptr, T, N, K, BLOCK_SIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, DQ_BLOCK_SIZE: tl.constexpr,
                  HAS_BIAS: tl.constexpr, DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tokens = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = load_operand(x_ptr + tokens[:, None].to(tl.int64) * K + cols[None, :],
                         (tokens[:, None] < T) & (cols[None, :] < K), DTYPE, UPCAST)            # (BLOCK_T, BLOCK_K)
        w = weight_tile(rows, k0 // 2 + tl.arange(0, BLOCK_K // 2), N, K, packed_ptr, codebook_ptr, absmax_ptr,
                        absmax2_ptr, dynamic_map_ptr, offset_ptr, BLOCK_SIZE, DOUBLE_QUANT, DQ_BLOCK_SIZE, DTYPE,
                        UPCAST)                                                                 # (BLOCK_N, BLOCK_K)
        acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")                               # (BLOCK_T, BLOCK_N)
    if HAS_BIAS:
        acc += load_operand(bias_ptr + rows, rows < N, DTYPE, True)[None, :].to(tl.float32)
    out = tokens[:, None].to(tl.int64) * N + rows[None, :]
    tl.store(y_ptr + out, as_stored(round_fp32_to(acc, DTYPE), DTYPE), mask=(tokens[:, None] < T) & (rows[None, :] < N))


@triton.jit
def grad_input_kernel(g_ptr, packed_ptr, codebook_ptr, absmax_ptr, absmax2_ptr, dynamic_map_ptr, offset_ptr,
                      gx_ptr, T, N, K, BLOCK_SIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr,
                      DQ_BLOCK_SIZE: tl.constexpr, DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tokens = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    pairs = tl.program_id(0) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    acc = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        g = load_operand(g_ptr + tokens[:, None].to(tl.int64) * N + rows[None, :],
                         (tokens[:, None] < T) & (rows[None, :] < N), DTYPE, UPCAST)            # (BLOCK_T, BLOCK_N)
        w = weight_tile(rows, pairs, N, K, packed_ptr, codebook_ptr, absmax_ptr, absmax2_ptr, dynamic_map_ptr,
                        offset_ptr, BLOCK_SIZE, DOUBLE_QUANT, DQ_BLOCK_SIZE, DTYPE, UPCAST)      # (BLOCK_N, BLOCK_K)
        acc = tl.dot(g, w, acc, input_precision="ieee")                                         # (BLOCK_T, BLOCK_K)
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    out = tokens[:, None].to(tl.int64) * K + cols[None, :]
    tl.store(gx_ptr + out, as_stored(round_fp32_to(acc, DTYPE), DTYPE), mask=(tokens[:, None] < T) & (cols[None, :] < K))


def _token_tile(tokens: int) -> int:
    # the tensor cores take at least 16 rows; more than 64 tokens go through the dense weight anyway
    return min(max(16, triton.next_power_of_2(tokens)), 64)


def fused_matmul(a: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None = None, *,
                 transposed: bool) -> torch.Tensor:
    """transposed (forward): a = x (T, K) -> x @ W.T + bias (T, N); else (input gradient):
    a = grad_y (T, N) -> grad_y @ W (T, K). `a` contiguous in the compute dtype, which is the result's."""
    tokens, (N, K) = a.shape[0], (weight.rows, weight.columns)
    out = torch.empty(tokens, N if transposed else K, dtype=a.dtype, device=a.device)
    tiles = {"BLOCK_T": _token_tile(tokens), "BLOCK_N": 32, "BLOCK_K": 128 if transposed else 64}
    grid = (triton.cdiv(out.shape[1], tiles["BLOCK_N" if transposed else "BLOCK_K"]), triton.cdiv(tokens, tiles["BLOCK_T"]))
    options = {**weight.constants, "DTYPE": kernel_dtype_name(a.dtype), "UPCAST": INTERPRETED, **tiles,
               **launch_options(4)}
    with device_guard(a.device):
        if transposed:
            linear_kernel[grid](stored_view(a), *weight.pointers, stored_view(bias if bias is not None else a),
                                stored_view(out), tokens, N, K, HAS_BIAS=bias is not None, **options)
        else:
            grad_input_kernel[grid](stored_view(a), *weight.pointers, stored_view(out), tokens, N, K, **options)
    return out
