"""CPUOffloadAdamW's state dict, in torch.optim.AdamW's layout both ways.

    {"state": {index: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [...],
     "cpu_offload": {index: {"step", "master", "exp_avg_code", "exp_avg_absmax", ...}}}

States are fp32 CPU tensors shaped like their parameter (8-bit states dequantized); each
per-parameter entry holds exactly torch's three keys. The top-level "cpu_offload", which
torch.optim.AdamW ignores (and does not return), maps a parameter index to what makes our own
resume exact: "step" (the step it belongs to), "master" (fp32 master weights) and, for 8-bit
states, the raw flat codes and absmax of m and v. A load uses them only while their "step" equals
the entry's; otherwise (a checkpoint that torch AdamW loaded, stepped and saved) m and v come from
"exp_avg"/"exp_avg_sq" (quantized again when 8-bit) and the master copy from the parameter.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from minilora.optim.pages import BLOCK_SIZE, STATES, ParamPages

__all__ = ["pack", "check", "unpack", "check_hyperparameters", "TORCH_FLAGS"]

RAW = tuple(f"{name}_{kind}" for name in STATES for kind in ("code", "absmax"))
# torch AdamW's group flags, written as those of the torch optimizer our kernel equals, so that
# AdamW.load_state_dict picks that one (it takes a saved group's flags over its own)
TORCH_FLAGS = ("amsgrad", "maximize", "foreach", "capturable", "differentiable", "fused", "decoupled_weight_decay")


def torch_flags(fused: bool) -> dict:
    return dict(amsgrad=False, maximize=False, foreach=None if fused else False, capturable=False,
                differentiable=False, fused=True if fused else None, decoupled_weight_decay=True)


def check_hyperparameters(lr, betas, eps, weight_decay, where: str = "") -> None:
    lr = float(lr)
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0{where}, got {lr}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2){where}, got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1){where}, got {float(beta)}")
    if not float(eps) >= 0.0:
        raise ValueError(f"eps must be >= 0{where}, got {eps}")
    if not float(weight_decay) >= 0.0:
        raise ValueError(f"weight_decay must be >= 0{where}, got {weight_decay}")


def pack(param_groups: list[dict], params: list[ParamPages], states, fused: bool) -> dict:
    """The state dict of the parameters `params` (their host pages must be settled)."""
    groups, start = [], 0
    for group in param_groups:
        packed = {k: v for k, v in group.items() if k != "params"} | torch_flags(fused)
        packed["params"] = list(range(start, start + len(group["params"])))
        start += len(group["params"])
        groups.append(packed)
    state, extras = {}, {}
    for info in params:
        if info.step is None:
            continue
        state[info.index] = {"step": info.step.clone(), **{
            name: joined([states.read(seg, name) for seg in info.segments]).view(info.tensor.shape)
            for name in STATES}}
        if info.master or info.quantized:
            extra = extras[info.index] = {"step": info.step.clone()}
            if info.master:
                extra["master"] = info.gather("master").clone()
            for key in RAW if info.quantized else ():
                extra[key] = joined([seg.view(key) for seg in info.segments])
    return {"state": state, "param_groups": groups, "cpu_offload": extras}


def joined(pieces: list[Tensor]) -> Tensor:
    """A new tensor holding the pieces end to end."""
    return torch.cat(pieces) if pieces else torch.zeros(0)


class Entry(NamedTuple):
    """One parameter's checked state: what `unpack` writes."""
    info: ParamPages
    step: float
    states: dict[str, Tensor]    # exp_avg, exp_avg_sq as saved
    extra: dict | None           # the matching "cpu_offload" entry, None when absent or stale


def check(state_dict: dict, param_groups: list[dict], params: list[ParamPages]) -> list[Entry]:
    """Check everything a load will use; raise a ValueError naming the first problem."""
    saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
    if len(saved_groups) != len(param_groups):
        raise ValueError(f"state dict has {len(saved_groups)} param groups, this optimizer has {len(param_groups)}")
    for i, (group, saved) in enumerate(zip(param_groups, saved_groups)):
        if len(saved["params"]) != len(group["params"]):
            raise ValueError(f"param group {i} has {len(group['params'])} parameters, "
                             f"the state dict's has {len(saved['params'])}")
        check_hyperparameters(saved["lr"], saved["betas"], saved["eps"], saved["weight_decay"],
                              f" in the state dict's param group {i}")
        if saved.get("amsgrad") or saved.get("maximize"):
            raise ValueError(f"the state dict's param group {i} uses amsgrad/maximize, "
                             "which CPUOffloadAdamW does not support")
    by_index = {info.index: info for info in params}
    count = sum(len(g["params"]) for g in param_groups)
    extras = {int(i): e for i, e in (state_dict.get("cpu_offload") or {}).items()}
    entries = []
    for index, saved in saved_state.items():
        index = int(index)
        if not 0 <= index < count:
            raise ValueError(f"state dict has state for parameter {index}, but there are {count}")
        if index not in by_index:
            raise ValueError(f"state dict has state for parameter {index}, which does not require grad")
        entries.append(check_entry(index, saved, by_index[index], extras.get(index)))
    return entries


def check_entry(index: int, saved: dict, info: ParamPages, extra: dict | None) -> Entry:
    if "step" not in saved:
        raise ValueError(f"state for parameter {index} has no 'step'")
    try:
        step = float(saved["step"])
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"state for parameter {index}: 'step' must be a number, got {saved['step']!r}") from None
    if not (math.isfinite(step) and step >= 0):
        raise ValueError(f"state for parameter {index}: 'step' must be finite and >= 0, got {step}")
    shape = tuple(info.tensor.shape)
    for name in STATES:
        got = tuple(saved[name].shape) if name in saved else None
        if got != shape:
            raise ValueError(f"state for parameter {index}: {name} has shape {got}, but the parameter has shape {shape}")
    if extra is not None and ("step" not in extra or float(extra["step"]) != step):
        extra = None   # stale (e.g. stepped by torch AdamW since): rebuild from the entry
    n = info.tensor.numel()
    if extra is not None and info.quantized and all(key in extra for key in RAW):
        for key in RAW:
            want = -(-n // BLOCK_SIZE) if key.endswith("absmax") else n
            if extra[key].numel() != want:
                raise ValueError(f"state for parameter {index}: 8-bit {key} has {extra[key].numel()} elements, "
                                 f"expected {want}")
    if extra is not None and info.master and extra.get("master") is not None and extra["master"].numel() != n:
        raise ValueError(f"state for parameter {index}: master has {extra['master'].numel()} elements, expected {n}")
    return Entry(info, step, {name: saved[name] for name in STATES}, extra)


def unpack(entry: Entry, states) -> None:
    """Write one checked entry into the pages (its state freshly initialised: step 0, m = v = 0,
    master = the parameter)."""
    info, extra = entry.info, entry.extra or {}
    info.step.fill_(entry.step)
    raw = info.quantized and all(key in extra for key in RAW)   # exact resume: the stored codes
    flat = {key: value.detach().to("cpu").reshape(-1) for key, value in {**entry.states, **extra}.items()
            if isinstance(value, Tensor)}
    for seg in info.segments:
        blocks = slice(seg.lo // BLOCK_SIZE, -(-seg.hi // BLOCK_SIZE))
        for name in STATES:
            if raw:
                seg.view(name + "_code").copy_(flat[name + "_code"][seg.lo:seg.hi])
                seg.view(name + "_absmax").copy_(flat[name + "_absmax"][blocks])
            else:
                states.write(seg, name, flat[name][seg.lo:seg.hi].float())
        if info.master and "master" in flat:
            seg.view("master").copy_(flat["master"][seg.lo:seg.hi])
