"""What LoRA needs from the layer it wraps: the linear-like protocol.

A base is nn.Linear, or a module that declares `lora_compatible = True` and has in_features,
out_features, dequantize_weight() and requantize_(weight) (minilora.quant.qlora.LinearNF4 does).
Merging, pissa/olora initialisation and their undo go through these functions, so LoRALinear never
needs to know how a base stores its weight.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_linear_like", "base_weight", "snapshot_base", "restore_base", "write_base_weight", "check_rank_fits"]


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, or a module that declares the linear protocol (in/out_features, dequantize_weight,
    requantize_), such as minilora.quant.qlora.LinearNF4."""
    if isinstance(module, nn.Linear):
        return True
    return bool(getattr(type(module), "lora_compatible", False)) and hasattr(module, "in_features") \
        and hasattr(module, "out_features")


def base_weight(base: nn.Module) -> torch.Tensor:
    """The dense (out, in) weight of a linear-like base; a 4-bit base dequantizes it."""
    return base.weight if isinstance(base, nn.Linear) else base.dequantize_weight()


def snapshot_base(base: nn.Module):
    """The stored weight of a linear-like base, exactly, so restore_base can put it back bit for bit:
    a clone of nn.Linear's weight, the QuantState4bit of a base with quant_state / set_state such as
    LinearNF4 (requantize_ replaces its tensors, it never writes into them). Any other linear-like base
    only offers dequantize_weight / requantize_: its dense weight is kept and requantized on restore
    (exact when requantize_ of a dequantized weight gives the same stored weight back)."""
    if isinstance(base, nn.Linear):
        return base.weight.detach().clone()
    if hasattr(base, "quant_state") and hasattr(base, "set_state"):
        return base.quant_state
    return base.dequantize_weight().detach().clone()


@torch.no_grad()
def restore_base(base: nn.Module, snapshot) -> None:
    if isinstance(base, nn.Linear):
        base.weight.data.copy_(snapshot)
    elif hasattr(base, "quant_state") and hasattr(base, "set_state"):
        base.set_state(snapshot)
    else:
        base.requantize_(snapshot)


def write_base_weight(base: nn.Module, weight: torch.Tensor) -> None:
    if isinstance(base, nn.Linear):
        base.weight.data.copy_(weight)
    else:
        base.requantize_(weight)


def check_rank_fits(r, in_features: int, out_features: int, name: str = "", check_rank: bool = True) -> None:
    limit = min(in_features, out_features) if check_rank else r
    if not (isinstance(r, int) and not isinstance(r, bool) and 1 <= r <= limit):
        raise ValueError(f"rank must be in 1..{limit} for {name} ({in_features} -> {out_features}), got {r}")
