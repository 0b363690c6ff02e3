"""The two checkpoint layouts minilora wrote before format 2 (checkpoint.py), read into the same
in-memory Checkpoint so that their runs still resume with --resume, on one process or several:

    format 1, by `python -m minilora.train`:
        trainable.safetensors    the trainable parameters by name (as in format 2)
        state.safetensors        the tensors of {"optimizer": state_dict(), "rng": RNG states}
        state.json               {"format": "minilora-train-checkpoint-1", "skeleton": the rest of
                                 that dict, "config", "sampler", "step", "history", "tokens_seen", "elapsed"}
    format 0, by `torchrun -m minilora.distributed`:
        adapter/                 the adapter in peft's format (lora, qlora), or
        model.safetensors        every parameter by name (full)
        optimizer.safetensors    AdamW's states keyed "<param name>.<state>"; metadata "param_names"
        trainer_state.json       {"step", "world_size", "history", "sampler", "strategy", "config",
                                 "global_batch"}: no "format" key, no RNG states

Format 1 was written by one process and holds its RNG states, so its resume is bit-exact as before.
Format 0 holds none: the RNG streams restart from the seed, as they did when it was resumed then.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from minilora import distributed as D

from .state import Checkpoint, unflatten

__all__ = ["read_format_1", "read_format_0"]


def read_format_1(folder: Path) -> Checkpoint:
    from safetensors.torch import load_file

    saved = json.loads((folder / "state.json").read_text())
    if saved.get("format") != "minilora-train-checkpoint-1":
        raise ValueError(f"{folder} is not a minilora checkpoint: state.json has format {saved.get('format')!r}")
    restored = unflatten(saved.pop("skeleton"), load_file(str(folder / "state.safetensors")))
    state = {**saved, "world_size": 1, "global_batch": saved["config"]["batch_size"]}
    return Checkpoint(state, load_file(str(folder / "trainable.safetensors")), restored["optimizer"], None,
                      restored["rng"] if D.world_size() == 1 else None)


def read_format_0(folder: Path, state: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> Checkpoint:
    """`model` (with its adapter injected) and `optimizer` give what the files do not hold: the
    parameter names of the peft adapter file, and the optimizer's param_groups (this run's own
    hyperparameters, which check_resume_settings requires to be the checkpoint's)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    if (folder / "adapter").is_dir():
        full = D.read_adapter_sharded(model, folder / "adapter")
    else:
        full = load_file(str(folder / "model.safetensors"))
    trainable = {n: full[n] for n, p in D.unwrap(model).named_parameters() if p.requires_grad and n in full}
    with safe_open(str(folder / "optimizer.safetensors"), "pt") as f:
        names = json.loads(f.metadata()["param_names"])
    moments = load_file(str(folder / "optimizer.safetensors"))
    entries, index = {}, 0
    for group in names:
        for name in group:
            entry = {key[len(name) + 1:]: t for key, t in moments.items() if key.startswith(name + ".")}
            if entry:
                entries[index] = entry
            index += 1
    groups = optimizer.state_dict()["param_groups"]
    return Checkpoint(state, trainable, {"state": entries, "param_groups": groups}, names, None)
