"""y = x @ W.T + bias with a 4-bit W, forward and backward, without keeping a dense W around: what
LinearNF4 runs (`linear_4bit`).

    tokens <= FUSED_MAX_TOKENS and backend "triton":  the fused kernels (minilora/quant/triton_matmul.py),
        W decoded tile by tile in registers; equal to the path below within the rounding of two fp32
        sums of the same products (accumulation order)
    otherwise:  W dequantized into a reused buffer (WeightBuffers), then one F.linear / matmul;
        bit-identical to dequantize_4bit(state) + F.linear, since the values and the op are the same

Backward computes only the input gradient (the 4-bit weight is frozen) and saves only the 4-bit
state: W is decoded again, the same way. Under autocast W is decoded straight to the autocast dtype
(no fp32 temporary for autocast to cast) and x, bias are cast to it, as autocast casts linear's
inputs; backward, which runs outside autocast, computes in that dtype and returns gradients in x's
and bias's dtypes.

Why a buffer: a fresh dense W per call is a fresh allocation each time; on a CPU, a tensor that size
comes from new pages, and faulting them in costs more than the dequantize itself (4096 x 4096 fp32,
1 thread, CPU time: 40 ms into a new tensor, 12 ms into a reused one; bench/results/nf4-cpu1t.json).
One buffer per (device, dtype, CUDA stream), or per thread off CUDA, holds the largest W seen;
`WEIGHT_BUFFERS.release()` frees them.
"""
from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

from minilora.lora.layer import autocast_dtype
from minilora.quant.backends import require_triton, resolve_backend
from minilora.quant.nf4 import QuantState4bit, dequantize_4bit, packed_weight

__all__ = ["FUSED_MAX_TOKENS", "WeightBuffers", "WEIGHT_BUFFERS", "uses_fused_kernel", "matmul_dequantized",
           "Linear4bitFunction", "linear_4bit"]

# The fused kernels serve calls of at most this many tokens: bitsandbytes 0.50 fuses for 2-64. A
# first choice: bench/nf4.py on CUDA times both paths at 1, 16, 64 and 256 tokens to set it.
FUSED_MAX_TOKENS = 64


class WeightBuffers:
    """Reused dense-weight buffers. A buffer is written (dequantize) and read (matmul) by launches
    on one CUDA stream, so the next write waits for the last read; `lease` also keeps two Python
    threads from interleaving their launches on one stream. Off CUDA each thread has its own."""

    def __init__(self):
        self.lock = threading.Lock()
        self.entries: dict[tuple, list] = {}  # key -> [lock, flat buffer or None]

    @contextlib.contextmanager
    def lease(self, numel: int, dtype: torch.dtype, device: torch.device):
        """A flat (numel,) tensor of `dtype` on `device`, to use until the block ends."""
        if device.type == "cuda":
            key = (device, dtype, torch.cuda.current_stream(device).stream_id)
        else:
            key = (device, dtype, threading.get_ident())
        with self.lock:
            entry = self.entries.setdefault(key, [threading.Lock(), None])
        with entry[0]:
            if entry[1] is None or entry[1].numel() < numel:
                entry[1] = None  # free the smaller one before allocating the larger
                entry[1] = torch.empty(numel, dtype=dtype, device=device)
            yield entry[1][:numel]

    def release(self) -> None:
        """Free every buffer (the next call allocates again)."""
        with self.lock:
            self.entries.clear()


WEIGHT_BUFFERS = WeightBuffers()


def uses_fused_kernel(tokens: int, state: QuantState4bit, backend: str) -> bool:
    """Whether linear_4bit runs the fused kernels for `tokens` rows of x (backend already resolved)."""
    return backend == "triton" and 0 < tokens <= FUSED_MAX_TOKENS and state.shape[-1] % 2 == 0


def matmul_dequantized(a: torch.Tensor, state: QuantState4bit, dtype: torch.dtype, backend: str, transposed: bool,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(a, W, bias) (transposed) or a @ W, with W dequantized into a reused buffer."""
    with WEIGHT_BUFFERS.lease(state.numel, dtype, state.packed.device) as buffer:
        weight = dequantize_4bit(state, dtype, backend, out=buffer)  # (out, in)
        return nn.functional.linear(a, weight, bias) if transposed else a @ weight


class Linear4bitFunction(torch.autograd.Function):
    """y = x @ W.T + bias, saving only the 4-bit state for backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, state: QuantState4bit, bias, backend: str):
        dtype = autocast_dtype(x) or x.dtype
        backend = resolve_backend(backend, state.packed.device)
        ctx.state, ctx.dtype, ctx.x_dtype, ctx.backend = state, dtype, x.dtype, backend
        ctx.bias_dtype = None if bias is None else bias.dtype
        x, bias = x.to(dtype), None if bias is None else bias.to(dtype)
        tokens = x.numel() // max(x.shape[-1], 1)
        if not uses_fused_kernel(tokens, state, backend):
            return matmul_dequantized(x, state, dtype, backend, True, bias)
        require_triton(x.device)
        from minilora.quant.triton_matmul import fused_matmul

        y = fused_matmul(x.reshape(tokens, -1).contiguous(), packed_weight(state), bias, transposed=True)
        return y.view(*x.shape[:-1], state.shape[0])  # (tokens, out) -> (..., out)

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_bias = None
        grad_out = grad_out.to(ctx.dtype)
        if ctx.needs_input_grad[0]:
            tokens = grad_out.numel() // max(grad_out.shape[-1], 1)
            if uses_fused_kernel(tokens, ctx.state, ctx.backend):
                from minilora.quant.triton_matmul import fused_matmul

                grad_x = fused_matmul(grad_out.reshape(tokens, -1).contiguous(), packed_weight(ctx.state),
                                      transposed=False)
                grad_x = grad_x.view(*grad_out.shape[:-1], ctx.state.shape[1])   # (tokens, in) -> (..., in)
            else:
                grad_x = matmul_dequantized(grad_out, ctx.state, ctx.dtype, ctx.backend, False)  # (..., out) @ (out, in)
            grad_x = grad_x.to(ctx.x_dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, None, grad_bias, None


def linear_4bit(x: torch.Tensor, state: QuantState4bit, bias: torch.Tensor | None = None,
                backend: str = "auto") -> torch.Tensor:
    """x (..., in) -> (..., out) = x @ W.T + bias for the 4-bit W of `state` (out, in), computing in
    x's dtype (or autocast's), differentiable in x and bias. `backend` (minilora/quant/backends.py)
    dequantizes W; with "triton", calls of at most FUSED_MAX_TOKENS tokens run the fused kernels."""
    if len(state.shape) != 2 or x.shape[-1] != state.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features (shape {tuple(x.shape)}), the 4-bit weight has shape "
                         f"{tuple(state.shape)}: x's last dimension must equal the weight's second")
    return Linear4bitFunction.apply(x, state, bias, backend)
