"""Model-level LoRA: put LoRALinear layers into any nn.Module, switch, merge and remove adapters.

The model stays the user's own module (no wrapper class): `inject` replaces the targeted linear
layers (and, in a mixture-of-experts model, the experts modules whose tensors it adapts: LoRAExperts,
lora/experts.py) in place and freezes everything else, so `model(x)` and the state-dict layout keep
working. Adapter configs live in `model.lora_configs` (a plain dict, not part of the state dict).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from .base import base_weight, check_rank_fits, restore_base, snapshot_base
from .experts import LoRAExperts
from .layer import LoRAConfig, LoRALinear, suffix_match
from .targets import candidate_modules, expert_targets, in_modules_to_save, name_summary, pattern_name, target_names

__all__ = [
    "inject", "set_adapter", "disable_adapters", "delete_adapter", "merge", "unmerge", "unload",
    "trainable_parameters", "adapter_names_per_sample", "lora_layers", "target_names", "inject_with_undo",
    "suffix_match", "in_modules_to_save", "adapter_layers",
]

def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_layers(model: nn.Module) -> dict[str, LoRALinear | LoRAExperts]:
    """Every layer that holds adapters: LoRALinear and LoRAExperts (the same switching and merging)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))}


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def inject(model: nn.Module, config: LoRAConfig, adapter_name: str = "default") -> dict[str, nn.Module]:
    """Add adapter `adapter_name` to every module `config` targets, in place, and make it the active,
    trainable adapter; everything else is frozen. Returns {name: original module} for the layers
    that were wrapped now (layers already wrapped just gain another adapter). If anything fails, the
    model is left exactly as it was (modules, weights, active adapters, requires_grad)."""
    replaced, _ = inject_with_undo(model, config, adapter_name)
    return replaced


def inject_with_undo(model: nn.Module, config: LoRAConfig, adapter_name: str = "default"):
    """inject, returning ({name: original module}, undo): undo() takes the adapter out again completely
    (load_adapter calls it when the weights it then copies in are refused)."""
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name or adapter_name == "__base__":
        raise ValueError(f"adapter_name must be a non-empty string without '.', not '__base__', got {adapter_name!r}")
    configs = getattr(model, "lora_configs", {})
    if adapter_name in configs:
        raise ValueError(f"adapter {adapter_name!r} already exists; existing adapters: {sorted(configs)}")
    names, experts = target_names(model, config), expert_targets(model, config)
    for name in names:  # everything that can be refused, before anything is modified
        module, rank = model.get_submodule(name), config.rank_for(pattern_name(config, name))
        if isinstance(module, LoRALinear):
            module.check_adapter(adapter_name, rank, config.init)
        else:
            check_rank_fits(rank, module.in_features, module.out_features, name)
    for name, tensors in experts.items():
        module = model.get_submodule(name)
        layer = module if isinstance(module, LoRAExperts) else LoRAExperts(module, name)
        layer.check_adapter(adapter_name, {t: r for t, (r, _) in tensors.items()}, config.dropout, config.init,
                            config.use_dora)
    replaced = {}
    undo = _undo_inject(model, names, config, adapter_name, replaced)
    try:
        for name in names:
            module = model.get_submodule(name)
            if not isinstance(module, LoRALinear):
                replaced[name] = module
                module = LoRALinear(module, name=name)
                _set_submodule(model, name, module)
            key = pattern_name(config, name)
            module.add_adapter(adapter_name, config.rank_for(key), config.alpha_for(key), config.dropout,
                               config.init, config.use_rslora, config.use_dora)
        for name, tensors in experts.items():
            module = model.get_submodule(name)
            if not isinstance(module, LoRAExperts):
                replaced[name] = module
                module = LoRAExperts(module, name=name)
                _set_submodule(model, name, module)
            module.add_adapter(adapter_name, {t: r for t, (r, _) in tensors.items()},
                               {t: a for t, (_, a) in tensors.items()}, config.init, config.use_rslora)
        model.lora_configs = {**configs, adapter_name: replace(config)}
        set_adapter(model, adapter_name)
    except Exception:
        undo()
        raise
    return replaced, undo


def _undo_inject(model: nn.Module, names: list[str], config: LoRAConfig, adapter_name: str,
                 replaced: dict[str, nn.Module]):
    """Snapshot what inject(model, config, adapter_name) changes; the returned function puts it all back
    (`replaced` is filled in by inject as it wraps layers): the adapter goes, wrapped layers get their
    original modules back, base weights rewritten by pissa/olora are restored bit for bit, and the
    previously active adapters, requires_grad flags and lora_configs are as before."""
    had_configs = hasattr(model, "lora_configs")
    configs = dict(getattr(model, "lora_configs", {}))
    grads = [(p, p.requires_grad) for p in model.parameters()]
    active = {id(layer): (layer, list(layer.active_adapters)) for layer in adapter_layers(model).values()}
    bases = []
    if config.init in ("pissa", "olora"):
        for name in names:
            module = model.get_submodule(name)
            base = module.base_layer if isinstance(module, LoRALinear) else module
            bases.append((base, snapshot_base(base)))

    def undo() -> None:
        for layer in adapter_layers(model).values():
            if adapter_name in layer.lora_A:
                layer.delete_adapter(adapter_name)
        for name, original in replaced.items():
            _set_submodule(model, name, original)
        for base, snapshot in bases:
            restore_base(base, snapshot)
        for layer, adapters in active.values():
            layer.active_adapters = adapters
        for p, flag in grads:
            p.requires_grad_(flag)
        if had_configs:
            model.lora_configs = configs
        elif hasattr(model, "lora_configs"):
            del model.lora_configs

    return undo


def _check_names(model: nn.Module, names: list[str]) -> None:
    known = getattr(model, "lora_configs", {})
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; this model has {sorted(known) or 'no adapters'}")


def set_adapter(model: nn.Module, name_or_names: str | list[str]) -> None:
    """Make these adapters the active ones (their outputs add up) and the only trainable ones,
    as peft's set_adapter; everything that is not an active adapter, a modules_to_save module or a
    bias named by `bias` is frozen."""
    names = [name_or_names] if isinstance(name_or_names, str) else list(name_or_names)
    _check_names(model, names)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in adapter_layers(model).values():
        layer.active_adapters = [n for n in names if n in layer.lora_A]
        for n in layer.active_adapters:
            for p in layer.adapter_parameters(n):
                p.requires_grad_(True)
    for n in names:
        config = model.lora_configs[n]
        if config.bias == "all":
            for pname, p in model.named_parameters():
                if pname == "bias" or pname.endswith(".bias"):
                    p.requires_grad_(True)
        elif config.bias == "lora_only":
            for layer in lora_layers(model).values():
                if n in layer.lora_A and getattr(layer.base_layer, "bias", None) is not None:
                    layer.base_layer.bias.requires_grad_(True)
        for mname, module in candidate_modules(model).items():
            if in_modules_to_save(mname, config.modules_to_save):
                module.requires_grad_(True)


@contextmanager
def disable_adapters(model: nn.Module):
    """Run the base model: merged adapters are taken out for the duration and merged back after."""
    layers = list(adapter_layers(model).values())
    merged = {id(layer): list(layer.merged_adapters) for layer in layers}
    for layer in layers:
        layer.unmerge()
        layer.disabled = True
    try:
        yield model
    finally:
        for layer in layers:
            layer.disabled = False
            layer.merge(merged[id(layer)], safe=False)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` from every layer (it must not be merged). Wrapped layers stay wrapped."""
    _check_names(model, [name])
    layers = adapter_layers(model)
    merged = [n for n, layer in layers.items() if name in layer.merged_adapters]
    if merged:
        raise ValueError(f"adapter {name!r} is merged into {name_summary(merged)}; unmerge(model) first")
    for layer in layers.values():
        layer.delete_adapter(name)
    model.lora_configs = {k: v for k, v in model.lora_configs.items() if k != name}


def merge(model: nn.Module, adapter_names: list[str] | None = None, safe: bool = True) -> None:
    """Fold adapters (default: the active ones) into the base weights: delta in fp32, rounded once
    into the base dtype. safe=True checks each merged weight for inf/NaN before writing it."""
    layers = adapter_layers(model)
    if adapter_names is not None:
        adapter_names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        _check_names(model, adapter_names)
    for layer in layers.values():
        layer.merge(layer.active_adapters if adapter_names is None else adapter_names, safe=safe)


def unmerge(model: nn.Module) -> None:
    """Take every merged adapter out of the base weights again (last merged first)."""
    for layer in adapter_layers(model).values():
        layer.unmerge()


def unload(model: nn.Module, requantize: bool = False) -> nn.Module:
    """peft's merge_and_unload: merge the active adapters, then put plain modules back. A 4-bit base
    becomes an nn.Linear holding the dequantized merged weight, unless requantize=True keeps it 4-bit
    (the merged weight is quantized again, which adds quantization error)."""
    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        if not isinstance(base, nn.Linear) and not requantize:
            # dequantize BEFORE merging, so the merge is done in full precision: merging into the
            # 4-bit base first would requantize the merged weight and add a second rounding
            weight = base_weight(base)
            bias = getattr(base, "bias", None)
            dense = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None,
                              device=weight.device, dtype=weight.dtype)
            with torch.no_grad():
                dense.weight.copy_(weight)
                if bias is not None:
                    dense.bias.copy_(bias)
            dense.requires_grad_(False)
            layer.base_layer = base = dense
        layer.merge(layer.active_adapters, safe=True)
        _set_submodule(model, name, base)
    for name, layer in adapter_layers(model).items():  # LoRAExperts: the experts module, merged
        _set_submodule(model, name, layer.unloaded(requantize))
    if hasattr(model, "lora_configs"):
        del model.lora_configs
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int, float]:
    """(trainable, all, percent) as peft's get_nb_trainable_parameters / print_trainable_parameters:
    shared (tied) parameters count once; a 4-bit base counts its logical in*out weights (4-bit experts:
    one LinearNF4 per expert matrix)."""
    trainable = total = 0
    for _, p in model.named_parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in model.modules():
        if getattr(type(m), "is_quantized_4bit", False):
            held = sum(p.numel() for n, p in m.named_parameters(recurse=False) if n == "weight")
            total += m.in_features * m.out_features - held
    return trainable, total, 100 * trainable / total if total else 0.0


@contextmanager
def adapter_names_per_sample(model: nn.Module, names: list[str]):
    """Mixed-adapter batch: inside the block, row i of every batch uses adapter names[i]
    ("__base__" = no adapter), like peft's `model(x, adapter_names=...)`."""
    names = list(names)
    _check_names(model, [n for n in set(names) if n != "__base__"])
    experts = [n for n, layer in adapter_layers(model).items() if isinstance(layer, LoRAExperts)
               and any(a in layer.lora_A for a in names)]
    if experts:
        raise ValueError(f"mixed-adapter batches cannot pass LoRA on expert tensors ({name_summary(experts)}): the MoE "
                         "block mixes every row's tokens before the experts (peft refuses them too)")
    layers = list(lora_layers(model).values())
    merged = [layer.name for layer in layers if layer.merged_adapters]
    if merged:
        raise ValueError(f"adapters are merged into {name_summary(merged)}; unmerge(model) before a mixed batch")
    for layer in layers:
        layer.sample_adapters = names
    try:
        yield model
    finally:
        for layer in layers:
            layer.sample_adapters = None
