"""Which linear layers a LoRA config adapts, and how many parameters it trains (peft's rules).

peft's target_modules semantics (peft/tuners/tuners_utils.py, check_target_module_exists):
  - a list (or tuple/set) of names: a module matches when its full name equals an entry or ends
    with "." + entry ("q_proj" matches "model.layers.0.self_attn.q_proj");
  - a string: a regular expression that must match the FULL module name (re.fullmatch);
  - "all-linear" (any case): every nn.Linear / Conv1D except the output head (lm_head).
Only linear layers can carry LoRA here; a target that matches none of them is an error, as in peft.

Each adapted layer (in -> out) trains A (rank, in) and B (out, rank): rank * (in + out) parameters,
plus out for DoRA's magnitude vector. Bias stays frozen (peft's bias="none").

Mixture-of-experts models in transformers 5 store their experts as 3-D parameters, not nn.Linear.
peft keeps the transformers-4 names working (peft/utils/transformers_weight_conversion.py) for
mixtral, qwen3_moe and deepseek_v3: targets name the router "gate" and the per-expert gate and up
projections (Mixtral's "w1", "w3"; "gate_proj", "up_proj"), fused into gate_up_proj, and the down
projection ("w2"; "down_proj"); "all-linear" includes all four. Those names then mean the experts
only: a dense layer's or shared expert's gate_proj / up_proj / down_proj is no longer adapted.
peft wraps each 3-D parameter with one LoRA of rank rank * experts (A: (rank*E, in), B: (out,
rank*E)), and gate_up_proj with doubled rank because it fuses two projections: so the count is NOT
the per-expert transformers-4 count. peft converts nothing for qwen2_moe (transformers' conversion
table has no row naming it): its names mean the shared expert's linear layers and no expert is
adapted. We count what peft builds. (minilora differs on purpose: see minilora/lora/targets.py.)
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .parameters import Linear, linear_layers
from .spec import ModelSpec

__all__ = ["LoRASpec", "DEFAULT_TARGETS", "parse_targets", "lora_layers", "lora_trainable_parameters",
           "lora_tensors"]

# peft's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING (peft/utils/constants.py). peft has
# no entry for phi3, olmo2, olmo3, granite or ministral (it asks for target_modules): we pick the
# analogue of q_proj + v_proj, phi3's fused qkv_proj.
_QV = ["q_proj", "v_proj"]
DEFAULT_TARGETS = {"gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "phi3": ["qkv_proj"],
                   "deepseek_v3": ["q_proj", "q_b_proj", "kv_b_proj"],
                   **{family: list(_QV) for family in ("llama", "granite", "mistral", "ministral", "mixtral", "qwen2",
                                                 "qwen3", "gemma", "gemma2", "gemma3_text", "olmo2", "olmo3",
                                                 "qwen2_moe", "qwen3_moe")}}
# peft's _MOE_TARGET_MODULE_MAPPING: the router, then the per-expert gate, up and down names it converts
_EXPERT_NAMES = {"mixtral": ("gate", "w1", "w3", "w2"), "qwen3_moe": ("gate", "gate_proj", "up_proj", "down_proj"),
                 "deepseek_v3": ("gate", "gate_proj", "up_proj", "down_proj")}

_REGEX_CHARS = set("*+?()[]{}|^$\\")


@dataclass(frozen=True)
class LoRASpec:
    rank: int = 8
    alpha: float = 16.0
    targets: object = None          # list of names | regex string | "all-linear" | None (peft default)
    dropout: float = 0.0
    use_dora: bool = False


def parse_targets(text: str | None):
    """CLI text -> peft's target_modules: "all-linear", a regex (if it has regex syntax), or a list."""
    if text is None or text == "":
        return None
    if text.lower() == "all-linear":
        return "all-linear"
    if any(c in _REGEX_CHARS for c in text):
        try:
            re.compile(text)
        except re.error as exc:
            raise ValueError(f"targets {text!r} is not a valid regular expression: {exc}") from None
        return text
    return [t.strip() for t in text.split(",") if t.strip()]


def _matches(name: str, targets) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _candidates(spec: ModelSpec) -> list[Linear]:
    """Linear layers, with the transformers-4 expert names peft maps onto the MoE parameters in place of
    the linear layers those names can no longer reach (see the module docstring)."""
    linears = linear_layers(spec)
    names = _EXPERT_NAMES.get(spec.family)
    if names is None:
        return linears
    router, gate, up, down = names
    linears = [lin for lin in linears if lin.name.rsplit(".", 1)[-1] not in (gate, up, down)]
    h, inter, moe = spec.hidden_size, spec.moe_intermediate_size, []
    for i in range(spec.num_layers):
        if spec.is_sparse(i):
            p = f"model.layers.{i}.mlp"
            moe += [Linear(f"{p}.{router}", h, spec.num_experts, False), Linear(f"{p}.experts.{gate}", h, inter, False),
                    Linear(f"{p}.experts.{up}", h, inter, False), Linear(f"{p}.experts.{down}", inter, h, False)]
    return linears[:-1] + moe + linears[-1:]


def lora_layers(spec: ModelSpec, targets=None) -> list[Linear]:
    """The layers `targets` selects, with peft's matching rules (experts by their transformers-4 names)."""
    if targets is None:
        targets = DEFAULT_TARGETS[spec.family]
    linears = _candidates(spec)
    if isinstance(targets, str) and targets.lower() == "all-linear":
        return [lin for lin in linears if lin.name != "lm_head"]
    if not isinstance(targets, str):
        targets = list(targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ValueError(f"targets must be non-empty module names, got {targets!r}")
    chosen = [lin for lin in linears if _matches(lin.name, targets)]
    if not chosen:
        names = sorted({lin.name.rsplit(".", 1)[-1] for lin in linears})
        raise ValueError(f"targets {targets!r} match no linear layer of {spec.name}; "
                         f"its linear layers are {', '.join(names)}")
    return chosen


def _check_rank(lin: Linear, rank: int) -> None:
    limit = min(lin.in_features, lin.out_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= limit:
        short = lin.name.rsplit(".", 1)[-1]
        raise ValueError(f"rank must be in 1..{limit} for {short} "
                         f"({lin.in_features} -> {lin.out_features}), got {rank!r}")


def lora_tensors(spec: ModelSpec, lora: LoRASpec) -> list[tuple[str, tuple]]:
    """(name, shape) of every trainable LoRA tensor, in peft's naming (adapter "default")."""
    out = []
    chosen = lora_layers(spec, lora.targets)
    names = {lin.name for lin in chosen}
    for lin in chosen:
        leaf = lin.name.rsplit(".", 1)[-1]
        if leaf in _EXPERT_NAMES.get(spec.family, ()) and ".mlp." in lin.name:
            out += _moe_tensors(spec, lin, lora, names)
            continue
        _check_rank(lin, lora.rank)
        out.append((f"{lin.name}.lora_A.default.weight", (lora.rank, lin.in_features)))
        out.append((f"{lin.name}.lora_B.default.weight", (lin.out_features, lora.rank)))
        if lora.use_dora:
            out.append((f"{lin.name}.lora_magnitude_vector.default.weight", (lin.out_features,)))
    return out


def _moe_tensors(spec: ModelSpec, lin: Linear, lora: LoRASpec, names: set) -> list:
    """peft's ParamWrapper tensors for a router / expert target (see the module docstring)."""
    prefix, leaf = lin.name.rsplit(".", 1)
    e, (router, gate, up, down) = spec.num_experts, _EXPERT_NAMES[spec.family]
    if lora.use_dora:
        raise ValueError("DoRA cannot adapt a router or experts (peft's ParamWrapper has no DoRA)")
    if leaf == router:  # the router: a 2-D parameter (E, h), one plain LoRA
        return [(f"{lin.name}.lora_A.default.weight", (lora.rank, lin.in_features)),
                (f"{lin.name}.lora_B.default.weight", (e, lora.rank))]
    _check_rank(lin, lora.rank)
    if leaf == down:
        r = lora.rank * e
        return [(f"{prefix}.down_proj.lora_A.default.weight", (r, lin.in_features)),
                (f"{prefix}.down_proj.lora_B.default.weight", (lin.out_features, r))]
    other = f"{prefix}.{up if leaf == gate else gate}"
    if other not in names:
        raise ValueError(f"targets must name both {gate} and {up} of the experts (fused into gate_up_proj), "
                         f"got only {leaf}")
    if leaf == up:  # counted once, with the gate projection
        return []
    r = 2 * lora.rank * e
    return [(f"{prefix}.gate_up_proj.lora_A.default.weight", (r, lin.in_features)),
            (f"{prefix}.gate_up_proj.lora_B.default.weight", (2 * lin.out_features, r))]


def lora_trainable_parameters(spec: ModelSpec, rank: int = 8, targets=None, use_dora: bool = False) -> int:
    """peft's trainable count (get_nb_trainable_parameters()[0]) for LoRA on `spec`."""
    lora = LoRASpec(rank=rank, targets=targets, use_dora=use_dora)
    return sum(math.prod(shape) for _, shape in lora_tensors(spec, lora))
