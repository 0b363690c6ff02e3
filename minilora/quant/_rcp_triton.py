"""The GPU's approximate reciprocal (PTX rcp.approx.ftz.f32), which nvcc --use_fast_math emits
for 1.0f / x. PyTorch's own division is correctly rounded, so reproducing a fast-math kernel's
scale factors bit for bit needs the instruction itself; Triton ships with CUDA builds of PyTorch."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rcp_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=1.0)
    y = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                  is_pure=True, pack=1)
    tl.store(out_ptr + offsets, y, mask=mask)


def rcp_approx(x: torch.Tensor) -> torch.Tensor:
    """rcp.approx.ftz.f32 of each element of a contiguous fp32 CUDA tensor."""
    if x.dtype != torch.float32 or x.device.type != "cuda":
        raise ValueError(f"rcp_approx needs a float32 CUDA tensor, got {x.dtype} on {x.device}")
    out = torch.empty_like(x)
    n = x.numel()
    if n:
        _rcp_kernel[(triton.cdiv(n, 1024),)](x, out, n, BLOCK=1024)
    return out
