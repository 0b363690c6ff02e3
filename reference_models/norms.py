"""The RMSNorms of the decoder families: the same normalisation, three roundings.

All three normalise in fp32, x * rsqrt(mean(x^2) + eps); they differ in where the weight is applied
and when the result goes back to the input's dtype, which is what makes bf16 logits agree with
transformers bit for bit:

  RMSNorm       Llama, Mistral, Qwen, Phi-3:  weight * normed.to(dtype)
  OlmoRMSNorm   OLMo 2:                       (weight * normed).to(dtype)
  GemmaRMSNorm  Gemma 2 / 3:                  (normed * (1 + weight)).to(dtype), the weight in fp32
                (Gemma stores weight - 1: a fresh norm has weight 0)
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["RMSNorm", "OlmoRMSNorm", "GemmaRMSNorm", "NORMS", "normalized"]


def normalized(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dimension, in fp32."""
    x32 = x.float()
    return x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * normalized(x, self.eps).to(x.dtype)


class OlmoRMSNorm(RMSNorm):
    def forward(self, x):
        return (self.weight * normalized(x, self.eps)).to(x.dtype)


class GemmaRMSNorm(RMSNorm):
    def __init__(self, dim: int, eps: float):
        super().__init__(dim, eps)
        nn.init.zeros_(self.weight)

    def forward(self, x):
        return (normalized(x, self.eps) * (1.0 + self.weight.float())).type_as(x)


NORMS = {"rms": RMSNorm, "olmo": OlmoRMSNorm, "gemma": GemmaRMSNorm}
