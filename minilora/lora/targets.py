"""Which modules and parameters a LoRAConfig adapts in a model: peft's matching rules, in one place.

- target_modules: a list entry matches a full module name or a `.`-suffix of it; a string is a regex
  that must match the full name; "all-linear" is every linear layer but the output head and, in a
  mixture-of-experts model, the routers (reference_models.moe.Gate: peft's all-linear adapts them,
  which users report as a mistake; name them to adapt them); None is peft's default for the model.
- target_parameters (peft >= 0.18): a parameter's full name or a `.`-suffix of it: 3-D expert tensors
  (LoRAExperts) or a linear layer's 2-D weight (the same LoRA as on the module; e.g. "gate.weight").
- expert tensors are also reached through target_modules, by the per-expert names checkpoints use or
  through "all-linear", as peft converts transformers 4 targets (see lora/experts.py).
A list entry or target_parameters entry that matches nothing is an error (peft ignores or warns).
"""
from __future__ import annotations

import re

from torch import nn

from reference_models.checkpoint_keys import expert_keys
from reference_models.moe import Gate

from .base import is_linear_like
from .experts import LoRAExperts, is_experts
from .layer import LoRAConfig, LoRALinear, pattern_matches, suffix_match

__all__ = ["DEFAULT_TARGETS", "target_names", "expert_targets", "expert_modules", "candidate_modules",
           "in_modules_to_save", "name_summary", "pattern_name"]

# peft's defaults when target_modules is None (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING).
DEFAULT_TARGETS = (("q_proj", "v_proj"), ("c_attn",), ("query_key_value",))


def _output_head(model: nn.Module) -> str | None:
    """The output projection that "all-linear" leaves out: transformers' get_output_embeddings,
    else a top-level `lm_head` (the reference models' name)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else getattr(model, "lm_head", None)
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def candidate_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every named module that is not inside a LoRALinear or LoRAExperts (its base_layer, lora_A, ...) or an
    experts module (ExpertsNF4's per-expert 4-bit layers: its tensors are targeted as expert tensors, and
    Qwen's per-expert names, e.g. down_proj, would otherwise match their ModuleList)."""
    inner = {f"{p}.{s}" for p, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts)) or is_experts(m)
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
    modules = candidate_modules(model)
    linear = [n for n, m in modules.items() if _linear_like(m)]
    experts = expert_targets(model, config)
    spec = config.target_modules
    if spec is None:
        spec = next((list(d) for d in DEFAULT_TARGETS if any(_matches(d, n) for n in linear)), None)
        if spec is None:
            raise ValueError(f"target_modules=None and no default target ({DEFAULT_TARGETS}) exists; "
                             f"linear modules here: {name_summary(linear)}")
    if isinstance(spec, str) and spec.lower() == "all-linear":
        head = _output_head(model)
        chosen = [n for n in linear if n != head and not _is_router(modules[n])]
    else:
        chosen = [n for n in modules if _matches(spec, n)]
        if not isinstance(spec, str):  # a typo in one list entry is an error, not a silent no-op (stricter than peft)
            missing = [t for t in spec if not any(suffix_match(n, t) for n in modules)
                       and t.rsplit(".", 1)[-1] not in _expert_target_names(model)]
            if missing and (chosen or experts):
                raise ValueError(f"target_modules entries {missing} match no module; linear modules here: "
                                 f"{name_summary(linear)}")
    chosen += _parameter_targets(config, linear, chosen, experts)
    excl = config.exclude_modules
    if excl:
        chosen = [n for n in chosen if not _matches(excl, n)]
    keep = config.modules_to_save
    chosen = [n for n in chosen if not in_modules_to_save(n, keep)]
    if not chosen and not experts:
        raise ValueError(f"target_modules={config.target_modules!r} (exclude_modules={config.exclude_modules!r}) "
                         f"matches no module; linear modules here: {name_summary(linear)}")
    bad = [f"{n} ({type(modules[n]).__name__})" for n in chosen if not _linear_like(modules[n])]
    if bad:
        raise TypeError(f"LoRA targets must be linear layers (nn.Linear or lora_compatible; expert tensors go in "
                        f"target_parameters), got {', '.join(bad)}")
    adapted = [pattern_name(config, n) for n in chosen]
    adapted += [f"{n}.{t}" for n, tensors in experts.items() for t in tensors]
    for pattern, kind in ((config.rank_pattern, "rank_pattern"), (config.alpha_pattern, "alpha_pattern")):
        for key in pattern:
            if not any(pattern_matches(key, n) for n in adapted):
                raise ValueError(f"{kind} key {key!r} matches none of the targeted modules {name_summary(adapted)}")
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
                         f"linear modules here: {name_summary(linear)}")
    return more


def pattern_name(config: LoRAConfig, name: str) -> str:
    """The name rank_pattern / alpha_pattern keys meet for linear module `name`: its weight's name when
    target_parameters names that weight (peft keys a wrapped parameter so), else the module's."""
    weight = f"{name}.weight"
    return weight if any(suffix_match(weight, p) for p in config.target_parameters or ()) else name


def name_summary(names: list[str], limit: int = 12) -> str:
    """Distinct last names with counts: `c_attn (x4), c_proj (x8), lm_head`."""
    counts: dict[str, int] = {}
    for n in names:
        counts[n.rsplit(".", 1)[-1]] = counts.get(n.rsplit(".", 1)[-1], 0) + 1
    parts = [f"{k} (x{v})" if v > 1 else k for k, v in counts.items()]
    return ", ".join(parts[:limit]) + (", ..." if len(parts) > limit else "") if parts else "(none)"


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every experts module (or LoRAExperts around one) not inside a LoRAExperts, by name."""
    inner = {f"{n}.base_layer" for n, m in model.named_modules() if isinstance(m, LoRAExperts)}
    return {n: m for n, m in model.named_modules() if (isinstance(m, LoRAExperts) or is_experts(m)) and n not in inner}


def _per_expert_names(model: nn.Module) -> dict[str, str]:
    """The checkpoint's per-expert projection names -> the tensor they are fused into."""
    ek = expert_keys(model)
    return {} if ek is None else {ek.gate: "gate_up_proj", ek.up: "gate_up_proj", ek.down: "down_proj"}


def _expert_target_names(model: nn.Module) -> set[str]:
    """target_modules entries that mean experts here (a list entry naming one matches no module)."""
    return set(_per_expert_names(model))


def _excluded(config: LoRAConfig, name: str) -> bool:
    spec = config.exclude_modules
    if not spec:
        return False
    return re.fullmatch(spec, name) is not None if isinstance(spec, str) else any(suffix_match(name, e) for e in spec)


def _named(spec, experts: str, old: str) -> bool:
    """Does target_modules `spec` name the per-expert projection `old` of experts module `experts`?"""
    if spec is None:
        return False
    if isinstance(spec, str):
        return spec.lower() == "all-linear" or re.fullmatch(spec, f"{experts}.{old}") is not None
    # the bare name, or a path through `experts` (peft's conversion takes any entry ending in .<old>, so
    # "shared_expert.gate_proj" would name the experts too)
    return any(t == old or re.search(rf"(^|\.)experts(\.\d+)?\.{re.escape(old)}$", t) for t in spec)


def expert_targets(model: nn.Module, config: LoRAConfig) -> dict[str, dict[str, tuple[int, float]]]:
    """{experts module: {tensor: (rank, alpha)}} that `config` adapts (see the module docstring), checked."""
    old_names = _per_expert_names(model)
    gate, up = [old for old, tensor in old_names.items() if tensor == "gate_up_proj"] or (None, None)
    chosen: dict[str, dict[str, int]] = {}  # experts module -> {tensor: rank factor}
    for name, module in expert_modules(model).items():
        base = module.base_layer if isinstance(module, LoRAExperts) else module
        if _excluded(config, name):
            continue
        for tensor in base.TENSORS:
            if any(suffix_match(f"{name}.{tensor}", p) for p in config.target_parameters or ()):
                chosen.setdefault(name, {})[tensor] = 1
        named = {old for old in old_names if _named(config.target_modules, name, old)}
        if (gate in named) != (up in named):
            raise ValueError(f"target_modules names {gate if gate in named else up} but not "
                             f"{up if gate in named else gate}: an expert's {gate} and {up} are one tensor "
                             f"({name}.gate_up_proj); name both, or use target_parameters")
        for old in named:  # two per-expert adapters side by side: rank and alpha doubled for gate_up_proj
            chosen.setdefault(name, {}).setdefault(old_names[old], 2 if old_names[old] == "gate_up_proj" else 1)
    return {name: {t: (factor * config.rank_for(f"{name}.{t}"), factor * config.alpha_for(f"{name}.{t}"))
                   for t, factor in tensors.items()} for name, tensors in chosen.items()}
