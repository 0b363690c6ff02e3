"""Adapter and model files from a wrapped model: gathered on rank 0 and written in the formats one
process writes (peft's adapter folder, a transformers model folder), and read back into shards on
any strategy and world size."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .process_group import barrier, rank
from .shards import copy_full_into, full_parameters, full_tensor, gather_full_state, reshard_all
from .wrapping import unwrap

__all__ = ["save_adapter_sharded", "read_adapter_sharded", "load_adapter_sharded", "save_pretrained_sharded"]


def is_adapter_param(name: str, p: torch.Tensor) -> bool:
    """What save_adapter may write: LoRA factors, DoRA magnitudes, trained modules, biases (bias="all")."""
    return p.requires_grad or ".lora_" in name or "modules_to_save" in name or name.endswith("bias")


def save_adapter_sharded(model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default") -> None:
    """Gather the adapter on rank 0 and write it in peft's format (atomically, by peft_io).

    Call on every rank; returns once the files exist.
    """
    from minilora.lora.peft_io import save_adapter

    full = gather_full_state(model, is_adapter_param, copy=False)
    if rank() == 0:
        with full_parameters(model, full):
            save_adapter(unwrap(model), folder, adapter_name=adapter_name)
    barrier()


def save_pretrained_sharded(model: nn.Module, folder: str | os.PathLike) -> None:
    """Gather every parameter on rank 0 and write a transformers folder (reference_models.save_pretrained).

    Call on every rank; returns once the files exist."""
    from reference_models import save_pretrained

    full = gather_full_state(model, copy=False)
    if rank() == 0:
        with full_parameters(model, full):
            save_pretrained(unwrap(model), folder)
    barrier()


def read_adapter_sharded(model: nn.Module, folder: str | os.PathLike,
                         adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter saved in `folder` (peft format) as full CPU tensors keyed by this model's parameter
    names, on every rank; `model` (wrapped or not) must already have `adapter_name` injected.

    Every rank reads the file into full-size stand-ins that start as the model's current values
    (so a parameter the file does not hold, e.g. a frozen bias, comes back unchanged), through
    peft_io's own key mapping and shape checks.
    """
    from minilora.lora.peft_io import load_adapter_weights

    if adapter_name not in getattr(unwrap(model), "lora_configs", {}):
        raise ValueError(f"the model has no adapter {adapter_name!r} to load into; inject it first "
                         f"or call peft_io.load_adapter before wrap_model")
    reshard_all(model)
    params = {n: p for n, p in unwrap(model).named_parameters() if is_adapter_param(n, p)}
    stand_ins = {n: full_tensor(p).detach().to("cpu", copy=True) for n, p in params.items()}
    with full_parameters(model, stand_ins):
        load_adapter_weights(unwrap(model), Path(folder), adapter_name)  # copies into the stand-ins
    return stand_ins


def load_adapter_sharded(model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default") -> None:
    """Copy a saved adapter (full tensors, peft format) into a wrapped model that already has
    `adapter_name` injected with the same config, on any strategy and world size.

    Each rank keeps its own shard of what read_adapter_sharded reads: this is what makes
    adapter files loadable on any number of GPUs. (For a model without the adapter yet, call
    peft_io.load_adapter on every rank BEFORE wrap_model instead.)
    """
    full = read_adapter_sharded(model, folder, adapter_name)
    for name, p in unwrap(model).named_parameters():
        if name in full:
            copy_full_into(p, full[name])
