"""Time and money for a training run from FLOPs per token, an assumed MFU and a GPU price.

FLOPs per token (Kaplan et al. 2020; the 6N rule): forward 2N, backward 4N for full fine-tuning.
With LoRA the frozen weights need no weight gradient, so backward is about 2N (input gradients
only) plus the small adapters: about 4N in total. Full checkpointing recomputes the forward once
more (+2N). Attention's score FLOPs (12 * layers * seq * hidden per token, forward+backward) are
added explicitly since they grow with sequence length.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CostEstimate", "training_cost"]


@dataclass
class CostEstimate:
    flops_per_token: float
    total_flops: float
    hours: float
    gpu_hours: float
    dollars: float
    assumptions: dict


def training_cost(params: int, trainable: int, tokens: int, epochs: float = 1.0, method: str = "lora",
                  layers: int = 0, seq: int = 0, hidden: int = 0, grad_ckpt: str = "none",
                  gpus: int = 1, tflops: float = 312.0, mfu: float = 0.4, price_per_hour: float = 1.8) -> CostEstimate:
    for name, value in (("tokens", tokens), ("gpus", gpus)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    for name, value in (("epochs", epochs), ("tflops", tflops), ("price_per_hour", price_per_hour)):
        if value <= 0 and not (name == "price_per_hour" and value == 0):
            raise ValueError(f"{name} must be > 0, got {value!r}")
    if not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu!r}")
    forward = 2 * params
    backward = 4 * params if method == "full" else 2 * params + 4 * trainable
    recompute = forward if grad_ckpt == "full" else 0
    attention = 12 * layers * seq * hidden  # QK^T and att @ V, forward + backward
    per_token = forward + backward + recompute + attention
    total = per_token * tokens * epochs
    seconds = total / (gpus * tflops * 1e12 * mfu)
    hours = seconds / 3600
    return CostEstimate(per_token, total, hours, hours * gpus, hours * gpus * price_per_hour,
                        {"flops per token": f"{'6N' if method == 'full' else '~4N'} + recompute + attention",
                         "mfu": mfu, "peak TFLOPS per GPU": tflops, "price per GPU-hour": price_per_hour,
                         "gpus": gpus, "tokens": tokens, "epochs": epochs})
