"""Adapter arithmetic: build a new adapter from weighted existing ones (task arithmetic, TIES, DARE).

Each source adapter i contributes dW_i = s_i * B_i @ A_i (s_i its scaling) with weight w_i.
The new adapter always has scaling 1 (r = alpha = its rank, no rsLoRA): the sources' scalings are
folded into its factors. Methods, per wrapped layer:

- "cat": A = [w_i s_i A_i] stacked, B = [B_i] side by side, rank sum(r_i). Exact: sum_i w_i dW_i.
- "linear": peft's factor mix, A = sum_i sign_i sqrt|w_i s_i| A_i, B = sum_i sqrt|w_i s_i| B_i,
  same rank. Cheap but NOT the weighted sum of deltas: B @ A has cross terms B_i A_j (peft #1155);
  exact for one adapter. Kept because it is what peft users know as "linear".
- "svd": sum_i w_i dW_i truncated to rank `svd_rank` (default max r_i) by an SVD. Exact when the
  rank covers it.
- "ties" (Yadav et al. 2023): keep the top `density` fraction of each dW_i by magnitude, elect a
  sign per entry (sign of the sum of the trimmed dW_i), average the weighted entries that agree; SVD.
- "dare_linear" / "dare_ties" (Yu et al. 2023): drop entries of dW_i at random with keep
  probability `density`, rescale by 1/density, then sum (linear) or elect signs as TIES; SVD.

Where this differs from peft 0.21 (LoraModel.add_weighted_adapter):
- peft's "ties" / "dare_*" prune the A and B factors separately, which is not pruning dW; ours prune
  dW as the papers do, and equal peft's "ties_svd" / "dare_*_svd".
- peft copies use_rslora from the first source into the new config while setting r = alpha = new rank,
  so with rsLoRA sources its result is sqrt(new rank) times too large (peft #3449, fixed upstream
  after 0.21); ours sets use_rslora=False, so the scaling is 1 as intended.
- DoRA sources are refused (the magnitude vector does not combine linearly; peft silently builds a
  wrong adapter, peft #3761).
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from .experts import LoRAExperts
from .model import adapter_layers, lora_layers

__all__ = ["combine_adapters", "METHODS"]

METHODS = ("linear", "cat", "svd", "ties", "dare_linear", "dare_ties")


def _prune_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * delta.numel())
    mask = torch.zeros(delta.numel(), dtype=delta.dtype, device=delta.device)
    mask[delta.abs().flatten().topk(k).indices] = 1
    return delta * mask.view_as(delta)


def _prune_random(delta: torch.Tensor, density: float, generator) -> torch.Tensor:
    keep = torch.bernoulli(torch.full_like(delta, density), generator=generator)
    return delta * keep / density


def _merge_deltas(deltas: list[torch.Tensor], weights: list[float], method: str, density, generator):
    """The combined (out, in) delta for the SVD-based methods, in fp32."""
    if method in ("ties", "dare_linear", "dare_ties") and density < 1:
        if method == "ties":
            deltas = [_prune_magnitude(d, density) for d in deltas]
        else:
            deltas = [_prune_random(d, density, generator) for d in deltas]
    deltas = torch.stack(deltas)  # (n, out, in)
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device).view(-1, 1, 1)
    if method in ("svd", "dare_linear"):
        return (w * deltas).sum(0)
    # TIES sign election, as peft's calculate_majority_sign_mask("total") + disjoint_merge: the sign of the
    # summed (unweighted, trimmed) task vectors, 0 counting as +; then the mean of the weighted entries
    # whose task vector agrees with it. Weights scale after the election, so a negative weight subtracts.
    elected = torch.where(deltas.sum(0) >= 0, 1.0, -1.0)
    agree = deltas.sign() == elected
    return (w * deltas * agree).sum(0) / agree.sum(0).clamp(min=1)


def _check_request(configs: dict, names: list[str], weights: list[float], method: str, new_name: str,
                   density: float | None, svd_rank: int | None) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not names or len(names) != len(weights):
        raise ValueError(f"need one weight per adapter, got {len(names)} names and {len(weights)} weights")
    unknown = [n for n in names if n not in configs]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(configs) or 'no adapters'}")
    if new_name in configs:
        raise ValueError(f"adapter {new_name!r} already exists")
    if not isinstance(new_name, str) or not new_name or "." in new_name or new_name == "__base__":
        raise ValueError(f"new_name must be a non-empty string without '.', not '__base__', got {new_name!r}")
    needs_density = method in ("ties", "dare_linear", "dare_ties")
    if needs_density and (density is None or not 0 < density <= 1):
        raise ValueError(f"method {method!r} needs density in (0, 1], got {density!r}")
    if svd_rank is not None and svd_rank <= 0:
        raise ValueError(f"svd_rank must be a positive integer, got {svd_rank!r}")


def combine_adapters(model: nn.Module, names: list[str], weights: list[float], method: str, new_name: str,
                     density: float | None = None, svd_rank: int | None = None,
                     generator: torch.Generator | None = None) -> None:
    """Add adapter `new_name` = the weighted combination of adapters `names` (see the module docstring).
    The active adapters do not change: call set_adapter(model, new_name) to use it."""
    configs = getattr(model, "lora_configs", {})
    names, weights = list(names), [float(w) for w in weights]
    _check_request(configs, names, weights, method, new_name, density, svd_rank)
    experts = [n for n, m in adapter_layers(model).items() if isinstance(m, LoRAExperts)
               and any(a in m.lora_A for a in names)]
    if experts:  # peft's add_weighted_adapter refuses target_parameters adapters too
        raise ValueError(f"adapters on expert tensors ({experts[0]} ...) cannot be combined; combine adapters "
                         "on linear layers only")
    layers = {n: m for n, m in lora_layers(model).items() if any(a in m.lora_A for a in names)}
    for lname, layer in layers.items():
        dora = [a for a in names if a in layer.lora_magnitude_vector]
        if dora:
            raise ValueError(f"DoRA adapters {dora} cannot be combined (at {lname}): their magnitude vectors "
                             "do not add up linearly")
        if any(a in layer.merged_adapters for a in names):
            raise ValueError(f"adapters are merged into {lname}; unmerge(model) before combining them")
        present = [a for a in names if a in layer.lora_A]
        if method == "linear" and len({layer.r[a] for a in present}) > 1:
            raise ValueError(f"method 'linear' needs equal ranks, got {{{', '.join(f'{a}: {layer.r[a]}' for a in present)}}} "
                             f"at {lname}; use 'cat' or 'svd'")

    for lname, layer in layers.items():
        present = [(a, w) for a, w in zip(names, weights) if a in layer.lora_A]
        with torch.no_grad():
            if method == "cat":
                A = torch.cat([w * layer.scaling[a] * layer.lora_A[a].weight.float() for a, w in present])
                B = torch.cat([layer.lora_B[a].weight.float() for a, _ in present], dim=1)
            elif method == "linear":
                A = sum(math.copysign(math.sqrt(abs(w * layer.scaling[a])), w * layer.scaling[a])
                        * layer.lora_A[a].weight.float() for a, w in present)
                B = sum(math.sqrt(abs(w * layer.scaling[a])) * layer.lora_B[a].weight.float() for a, w in present)
            else:
                delta = _merge_deltas([layer.delta_weight(a) for a, _ in present], [w for _, w in present],
                                      method, density, generator)
                rank = min(svd_rank or max(layer.r[a] for a, _ in present), min(delta.shape))
                U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
                A, B = Vh[:rank], U[:, :rank] * S[:rank]
            rank = A.shape[0]
            # a "cat" rank may exceed min(in, out): it is exact, not minimal
            layer.add_adapter(new_name, rank, float(rank), dropout=layer.dropout[present[0][0]], check_rank=False)
            layer.lora_A[new_name].weight.copy_(A)
            layer.lora_B[new_name].weight.copy_(B)
            layer.lora_A[new_name].weight.requires_grad_(False)
            layer.lora_B[new_name].weight.requires_grad_(False)
    first = configs[names[0]]
    targets = sorted(layers)
    model.lora_configs = {**configs, new_name: replace(
        first, r=max(l.r[new_name] for l in layers.values()), alpha=float(max(l.r[new_name] for l in layers.values())),
        target_modules=targets, use_rslora=False, use_dora=False, init="kaiming",
        rank_pattern={}, alpha_pattern={})}
