"""Model-level LoRA: put LoRALinear layers into any nn.Module, switch, merge and remove adapters.

The model stays the user's own module (no wrapper class): `inject` replaces the targeted linear
layers (and, in a mixture-of-experts model, the experts modules whose tensors it adapts: LoRAExperts,
lora/experts.py) in place and freezes everything else, so `model(x)` and the state-dict layout keep
working. Adapter configs live in `model.lora_configs` (a plain dict, not part of the state dict).
"""
from __future__ import annotations

import math
import re
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from reference_models.moe import Gate

from .base import base_weight, check_rank_fits, is_linear_like, restore_base, snapshot_base
from .experts import LoRAExperts, expert_target_names, expert_targets
from .layer import LoRAConfig, LoRALinear, pattern_matches, suffix_match

__all__ = [
    "inject", "set_adapter", "disable_adapters", "delete_adapter", "merge", "unmerge", "unload",
    "trainable_parameters", "adapter_names_per_sample", "lora_layers", "target_names", "inject_with_undo",
    "suffix_match", "in_modules_to_save", "adapter_layers",
]

# peft's defaults when target_modules is None (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
DEFAULT_TARGETS = (("q_proj", "v_proj"), ("c_attn",), ("query_key_value",))


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_layers(model: nn.Module) -> dict[str, LoRALinear | LoRAExperts]:
    """Every layer that holds adapters: LoRALinear and LoRAExperts (the same switching and merging)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))}


def _output_head(model: nn.Module) -> str | None:
    """The output projection that "all-linear" leaves out: transformers' get_output_embeddings,
    else a top-level `lm_head` (the reference models' name)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else getattr(model, "lm_head", None)
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Every named module that is not inside a LoRALinear or LoRAExperts (its base_layer, lora_A, ...)."""
    inner = {f"{p}.{s}" for p, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))
             for s, _ in m.named_modules() if s}
    return {n: m for n, m in model.named_modules() if n and n not in inner}


def _linear_like(m: nn.Module) -> bool:
    return isinstance(m, LoRALinear) or is_linear_like(m)


def _is_router(m: nn.Module) -> bool:
    """A mixture-of-experts gate (the router, Qwen2-MoE's shared_expert_gate): "all-linear" leaves it out."""
    return isinstance(m.base_layer if isinstance(m, LoRALinear) else m, Gate)


def in_modules_to_save(name: str, modules_to_save) -> bool:
    """Whether module or state-dict key `name` is a modules_to_save module or lies inside one: some
    `.`-prefix of `name` (or `name` itself) suffix-matches an entry, as peft matches modules_to_save."""
    parts = name.split(".")
    return any(suffix_match(".".join(parts[:i]), m) for m in modules_to_save for i in range(len(parts), 0, -1))


def _matches(spec, name: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(suffix_match(name, t) for t in spec)


def target_names(model: nn.Module, config: LoRAConfig) -> list[str]:
    """The linear modules `config` targets in `model` (expert tensors: experts.expert_targets), checked:
    raises if the target matches nothing, if a list entry or target_parameters entry matches nothing, or
    if a match is not a linear layer."""
    modules = _candidates(model)
    linear = [n for n, m in modules.items() if _linear_like(m)]
    experts = expert_targets(model, config)
    spec = config.target_modules
    if spec is None:
        spec = next((list(d) for d in DEFAULT_TARGETS if any(_matches(d, n) for n in linear)), None)
        if spec is None:
            raise ValueError(f"target_modules=None and no default target ({DEFAULT_TARGETS}) exists; "
                             f"linear modules here: {_summary(linear)}")
    if isinstance(spec, str) and spec.lower() == "all-linear":
        head = _output_head(model)
        chosen = [n for n in linear if n != head and not _is_router(modules[n])]
    else:
        chosen = [n for n in modules if _matches(spec, n)]
        if not isinstance(spec, str):  # a typo in one list entry is an error, not a silent no-op (stricter than peft)
            missing = [t for t in spec if not any(suffix_match(n, t) for n in modules)
                       and t.rsplit(".", 1)[-1] not in expert_target_names(model)]
            if missing and (chosen or experts):
                raise ValueError(f"target_modules entries {missing} match no module; linear modules here: "
                                 f"{_summary(linear)}")
    chosen += _parameter_targets(config, linear, chosen, experts)
    excl = config.exclude_modules
    if excl:
        chosen = [n for n in chosen if not _matches(excl, n)]
    keep = config.modules_to_save
    chosen = [n for n in chosen if not in_modules_to_save(n, keep)]
    if not chosen and not experts:
        raise ValueError(f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) "
                         f"matches no module; linear modules here: {_summary(linear)}")
    bad = [f"{n} ({type(modules[n]).__name__})" for n in chosen if not _linear_like(modules[n])]
    if bad:
        raise TypeError(f"LoRA targets must be linear layers (nn.Linear or lora_compatible; expert tensors go in "
                        f"target_parameters), got {', '.join(bad)}")
    adapted = chosen + [f"{n}.{t}" for n, tensors in experts.items() for t in tensors]
    for pattern, kind in ((config.rank_pattern, "rank_pattern"), (config.alpha_pattern, "alpha_pattern")):
        for key in pattern:
            if not any(pattern_matches(key, n) for n in adapted):
                raise ValueError(f"{kind} key {key!r} matches none of the targeted modules {_summary(adapted)}")
    return chosen


def _parameter_targets(config: LoRAConfig, linear: list[str], chosen: list[str], experts: dict) -> list[str]:
    """Linear modules whose weight target_parameters names (peft wraps that one parameter: the same LoRA);
    an entry that names neither such a weight nor an expert tensor is an error."""
    params = config.target_parameters or []
    more = [n for n in linear if n not in chosen and any(suffix_match(f"{n}.weight", p) for p in params)]
    names = [f"{n}.weight" for n in linear] + [f"{n}.{t}" for n, tensors in experts.items() for t in tensors]
    unmatched = [p for p in params if not any(suffix_match(n, p) for n in names)]
    if unmatched:
        raise ValueError(f"target_parameters entries {unmatched} match no expert tensor (3-D) nor linear weight; "
                         f"linear modules here: {_summary(linear)}")
    return more


def _summary(names: list[str], limit: int = 12) -> str:
    """Distinct last names with counts: `c_attn (x4), c_proj (x8), lm_head`."""
    counts: dict[str, int] = {}
    for n in names:
        counts[n.rsplit(".", 1)[-1]] = counts.get(n.rsplit(".", 1)[-1], 0) + 1
    parts = [f"{k} (x{v})" if v > 1 else k for k, v in counts.items()]
    return ", ".join(parts[:limit]) + (", ..." if len(parts) > limit else "") if parts else "(none)"


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
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            module.check_adapter(adapter_name, config.rank_for(name), config.init)
        else:
            check_rank_fits(config.rank_for(name), module.in_features, module.out_features, name)
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
            module.add_adapter(adapter_name, config.rank_for(name), config.alpha_for(name), config.dropout,
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
        for mname, module in _candidates(model).items():
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
        raise ValueError(f"adapter {name!r} is merged into {_summary(merged)}; unmerge(model) first")
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
    shared (tied) parameters count once; a 4-bit base counts its logical weights (in*out, or E*out*in
    per expert tensor)."""
    trainable = total = 0
    for _, p in model.named_parameters():
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in model.modules():
        if getattr(type(m), "is_quantized_4bit", False):
            held = sum(p.numel() for n, p in m.named_parameters(recurse=False) if n == "weight")
            total += m.in_features * m.out_features - held
        elif getattr(type(m), "is_quantized_experts", False):
            total += sum(math.prod(m.tensor_shape(t)) for t in m.TENSORS)
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
        raise ValueError(f"mixed-adapter batches cannot pass LoRA on expert tensors ({_summary(experts)}): the MoE "
                         "block mixes every row's tokens before the experts (peft refuses them too)")
    layers = list(lora_layers(model).values())
    merged = [layer.name for layer in layers if layer.merged_adapters]
    if merged:
        raise ValueError(f"adapters are merged into {_summary(merged)}; unmerge(model) before a mixed batch")
    for layer in layers:
        layer.sample_adapters = names
    try:
        yield model
    finally:
        for layer in layers:
            layer.sample_adapters = None
