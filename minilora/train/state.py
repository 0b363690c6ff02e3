"""A run's resumable state in memory (Checkpoint), and the two encodings its files use: nested state
(an optimizer's state_dict) as safetensors + a JSON skeleton, and the RNG states of one process.
Never pickle: tensors go to safetensors, everything else is JSON."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass

import torch

__all__ = ["Checkpoint", "flatten", "unflatten", "rng_state", "set_rng_state", "rng_tensors", "rng_from_tensors"]


@dataclass
class Checkpoint:
    """What a checkpoint folder holds, read into memory, whatever its format on disk.

    Tensors are full (unsharded) CPU tensors; restoring cuts them into this rank's shards."""

    state: dict                 # trainer state: step, world_size, global_batch, config, sampler, history, ...
    trainable: dict             # parameter name -> tensor: the adapter (LoRA/QLoRA) or every weight (full)
    optimizer: dict             # the optimizer's state_dict(), parameters by index as torch numbers them
    param_names: list | None    # the optimizer's parameters by name, per group (None: not recorded)
    rng: dict | None            # this process's RNG states; None: leave them (e.g. another world size)


def flatten(obj, prefix: str, tensors: dict):
    """Tensors go to `tensors` under a path key; the rest becomes JSON that marks where each went.
    Dicts keep non-string keys (optimizer state is keyed by int) and tuples stay tuples.
    `tensors` receives the objects themselves: the caller moves them to the CPU if it needs to."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        kind = "__tuple__" if isinstance(obj, tuple) else "__list__"
        return {kind: [flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix}")


def unflatten(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(unflatten(v, tensors) for v in obj["__tuple__"])
        if "__list__" in obj:
            return [unflatten(v, tensors) for v in obj["__list__"]]
    return obj


def rng_state() -> dict:
    """This process's RNG states: torch's CPU generator, Python's `random`, every CUDA device's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_tensors(state: dict) -> tuple[dict, dict]:
    """rng_state() as safetensors' (tensors, string metadata): Python's state travels as JSON."""
    tensors = {"torch": state["torch"]}
    tensors.update({f"cuda.{i}": s for i, s in enumerate(state.get("cuda", []))})
    return tensors, {"python": json.dumps(state["python"]), "cuda_devices": str(len(state.get("cuda", [])))}


def rng_from_tensors(tensors: dict, metadata: dict) -> dict:
    state = {"torch": tensors["torch"], "python": json.loads(metadata["python"])}
    devices = int(metadata.get("cuda_devices", "0"))
    if devices:
        state["cuda"] = [tensors[f"cuda.{i}"] for i in range(devices)]
    return state
