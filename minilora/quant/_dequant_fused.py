"""Dequantize in one CUDA kernel: each output element reads its packed byte, the codebook entry
of its nibble and its block's fp32 scale, and is written once. torch.compile (Triton) generates
the kernel from the plain formulation below; the eager path in nf4.dequantize_4bit stays the
reference, and this one gives the same bits: one fp32 multiply (nothing for the compiler to fuse
into an FMA) rounded once to the output dtype. The block scales are decoded before, eagerly: their
multiply-add would be contracted into an FMA by Triton and round differently from PyTorch's."""
from __future__ import annotations

import torch


def dequantize_reference(packed: torch.Tensor, scales: torch.Tensor, codebook: torch.Tensor, block_size: int,
                         dtype: torch.dtype) -> torch.Tensor:
    """packed uint8 (n/2,), scales fp32 (n/block_size,), codebook fp32 (16,) -> (n,) in `dtype`;
    n a whole number of blocks."""
    codes = torch.stack([packed >> 4, packed & 15], dim=1).view(-1).long()  # first element: high nibble
    values = codebook[codes].view(-1, block_size) * scales.unsqueeze(1)
    return values.view(-1).to(dtype)


_compiled = None


def dequantize_fused(packed, scales, codebook, block_size: int, dtype: torch.dtype) -> torch.Tensor:
    """dequantize_reference through torch.compile, compiled once for every shape (dynamic=True)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(dequantize_reference, dynamic=True, fullgraph=True)
    return _compiled(packed, scales, codebook, block_size, dtype)
