"""The training checkpoint: one format for one process and for DDP / FSDP2, resumable on any world size.

    checkpoints/
      latest.json                 {"step": N, "path": "step-00000N"}, written last
      step-00000N/
        trainable.safetensors     the trainable parameters as full tensors by parameter name: the
                                  adapter for LoRA/QLoRA (no base weights), every weight for full
        optimizer.safetensors     the tensors of the optimizer's state_dict(), full, by their path in it
                                  ("state.3.exp_avg"); the rest of the state_dict is in trainer_state.json
        rng-rank<R>.safetensors   rank R's RNG states (torch, CUDA; Python's `random` in the metadata)
        trainer_state.json        format, step, world_size, global_batch, config, data position (sampler),
                                  history, tokens_seen, elapsed, the optimizer's parameter names per
                                  group and the JSON skeleton of its state_dict

Sharded tensors (FSDP2's DTensors) are gathered, so nothing in the files depends on the world size
but the RNG states: a run resumes on another number of processes as long as the global batch is
the same (its RNG streams then restart from the seed). Every file is safetensors or JSON (never
pickle), written atomically, rank 0 writing all but its own RNG file; trainer_state.json goes
after the others and latest.json last, so a crash mid-save leaves the previous checkpoint valid.
The layouts minilora wrote before this one are read by legacy.py.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from minilora import distributed as D
from reference_models.files import save_safetensors_atomic, write_json_atomic

from . import legacy
from .state import Checkpoint, flatten, rng_from_tensors, rng_state, rng_tensors, set_rng_state, unflatten

__all__ = ["FORMAT", "save_checkpoint", "read_checkpoint", "restore_checkpoint", "load_checkpoint", "param_names"]

FORMAT = "minilora-train-checkpoint-2"


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The optimizer's parameters by their name in the (unwrapped) model, one list per param group."""
    by_id = {id(p): n for n, p in D.unwrap(model).named_parameters()}
    return [[by_id[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def save_checkpoint(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict) -> Path:
    """Write `folder` (see the module docstring), then point folder/../latest.json at it.

    `state` is the trainer state (it must hold "step"; the loop adds config, sampler, history...).
    Every rank must call it (sharded tensors are gathered); it returns once the files exist."""
    folder = Path(folder)
    main = D.rank() == 0
    if main:
        folder.mkdir(parents=True, exist_ok=True)
    D.barrier()
    trainable = D.gather_full_state(model, lambda name, p: p.requires_grad, copy=False)
    if main:
        save_safetensors_atomic(trainable, folder / "trainable.safetensors")
    tensors: dict = {}
    skeleton = flatten(optimizer.state_dict(), "optimizer", tensors)
    full = {}
    for key, value in tensors.items():
        value = D.full_tensor(value)  # for a DTensor, a collective: every rank, one tensor at a time
        if main:
            full[key] = value.detach().cpu()
    if main:
        save_safetensors_atomic(full, folder / "optimizer.safetensors")
    rng, rng_meta = rng_tensors(rng_state())
    save_safetensors_atomic(rng, folder / f"rng-rank{D.rank()}.safetensors", metadata=rng_meta)
    D.barrier()
    if main:
        write_json_atomic(folder / "trainer_state.json", {
            "format": FORMAT, **state, "world_size": D.world_size(), "param_names": param_names(model, optimizer),
            "optimizer": skeleton})
        # The pointer goes last: until it is replaced, resume uses the previous complete checkpoint.
        write_json_atomic(folder.parent / "latest.json", {"step": state["step"], "path": folder.name})
    D.barrier()
    return folder


def read_checkpoint(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> Checkpoint:
    """Read a checkpoint folder of any format minilora wrote (this one, or legacy.py's) into memory;
    nothing in `model` or `optimizer` changes yet (see restore_checkpoint)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    state_path = folder / "trainer_state.json"
    try:
        if not state_path.is_file() and (folder / "state.json").is_file():
            return legacy.read_format_1(folder)
        if not state_path.is_file():
            raise ValueError(f"{folder} is not a minilora checkpoint: trainer_state.json is missing")
        state = json.loads(state_path.read_text())
        if "format" not in state:
            return legacy.read_format_0(folder, state, model, optimizer)
        if state["format"] != FORMAT:
            raise ValueError(f"{folder} holds checkpoint format {state['format']!r}; this minilora reads "
                             f"{FORMAT!r} and the two layouts before it")
        rng = None
        if state["world_size"] == D.world_size():  # RNG streams are per rank: only the same ranks continue them
            with safe_open(str(folder / f"rng-rank{D.rank()}.safetensors"), "pt") as f:
                rng = rng_from_tensors({k: f.get_tensor(k) for k in f.keys()}, f.metadata())
        optimizer_state = unflatten(state.pop("optimizer"), load_file(str(folder / "optimizer.safetensors")))
        return Checkpoint(state, load_file(str(folder / "trainable.safetensors")), optimizer_state,
                          state.pop("param_names"), rng)
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        raise ValueError(f"checkpoint {folder} is unreadable: {exc}") from exc


def restore_checkpoint(checkpoint: Checkpoint, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Copy a read checkpoint into the (wrapped) model, the optimizer and this process's RNG.

    Checked first, so a mismatch leaves the model and optimizer as they were: the trainable
    parameters must be the checkpoint's, by name, and so must the optimizer's (when recorded)."""
    params = {n: p for n, p in D.unwrap(model).named_parameters() if p.requires_grad}
    if set(checkpoint.trainable) != set(params):
        raise ValueError(f"checkpoint tensors {sorted(set(checkpoint.trainable) ^ set(params))[:4]} do not "
                         "match this model's trainable parameters")
    names = param_names(model, optimizer)
    if checkpoint.param_names is not None and checkpoint.param_names != names:
        saved = [n for g in checkpoint.param_names for n in g]
        mine = [n for g in names for n in g]
        first = next((i for i, (a, b) in enumerate(zip(saved, mine)) if a != b), min(len(saved), len(mine)))
        raise ValueError(f"the checkpoint's optimizer holds {len(saved)} parameters, this one {len(mine)}; "
                         f"they first differ at #{first}: {saved[first:first + 1]} vs {mine[first:first + 1]}")
    for name, p in params.items():
        D.copy_full_into(p, checkpoint.trainable[name])
    optimizer.load_state_dict(shard_optimizer_state(checkpoint.optimizer, optimizer))
    if checkpoint.rng is not None:
        set_rng_state(checkpoint.rng)


def shard_optimizer_state(state_dict: dict, optimizer: torch.optim.Optimizer) -> dict:
    """The full state_dict with each per-parameter tensor shaped like its FSDP2-sharded parameter cut
    into this rank's shard (a DTensor, as the optimizer keeps it); scalars such as AdamW's `step`,
    and the states of unsharded parameters, stay as they are (load_state_dict moves them)."""
    from torch.distributed.tensor import DTensor

    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for index, entry in state_dict["state"].items():
        p = params[int(index)]
        if isinstance(p, DTensor):
            entry = {k: D.shard_like(p, v) if torch.is_tensor(v) and v.shape == p.shape else v
                     for k, v in entry.items()}
        state[index] = entry
    return {**state_dict, "state": state}


def load_checkpoint(folder: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """read_checkpoint, then restore_checkpoint; returns the trainer state (step, world_size, ...).

    Works on any strategy and world size; call on every rank."""
    checkpoint = read_checkpoint(folder, model, optimizer)
    restore_checkpoint(checkpoint, model, optimizer)
    return checkpoint.state
