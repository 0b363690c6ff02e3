"""Model shapes from a Hugging Face config: every parameter tensor, every linear layer, exact counts.

A `ModelSpec` is read from a transformers-style config dict (a built-in preset, a config.json file,
or a folder holding one). `parameter_tensors(spec)` lists every parameter tensor the transformers
model of that family creates, with the module names transformers uses (so LoRA target matching
sees the names peft sees), and `count_parameters(spec)` is their sum, equal digit for digit to
`sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())` (tied weights once).

Families and what is special about each (transformers 5 layouts):
  gpt2     learned positions, LayerNorm with bias, fused c_attn (h -> 3h), 4h GELU MLP, all biases,
           Conv1D layers (peft treats them as linear), lm_head tied to wte by default.
  llama    RMSNorm (weight only), q/k/v/o with optional attention_bias (all four), SwiGLU MLP
           (gate/up/down) with optional mlp_bias, GQA (num_key_value_heads), optional head_dim.
  mistral  llama without biases.       qwen2   llama with bias on q/k/v only (not o).
  mixtral  mistral attention; per layer a router (E, h) and experts stored as 3-D parameters
           gate_up_proj (E, 2I, h) and down_proj (E, h, I): not nn.Linear, so LoRA cannot target them.
  gemma    llama with an explicit head_dim and tied embeddings by default.
  gemma2   gemma plus pre/post feed-forward norms: four RMSNorms per layer.
  phi3     fused qkv_proj (h -> (n_heads + 2 n_kv) * head_dim) and gate_up_proj (h -> 2I).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from .presets import PRESETS

__all__ = ["ModelSpec", "Tensor", "Linear", "FAMILIES", "PRESETS", "load_config", "model_spec",
           "parameter_tensors", "linear_layers", "count_parameters", "ConfigError"]

FAMILIES = ("gpt2", "llama", "mistral", "mixtral", "qwen2", "gemma", "gemma2", "phi3")


class ConfigError(ValueError):
    """A model name, config file or config dict that cannot describe a supported model."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str                 # transformers' model_type
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_positions: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    num_experts: int = 0        # mixtral: experts per layer (0 = dense MLP)
    experts_per_token: int = 0

    @property
    def gated_mlp(self) -> bool:  # SwiGLU / GeGLU: three projections, two saved (B, T, I) inputs
        return self.family != "gpt2"

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class Tensor:
    name: str            # full parameter name, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple
    kind: str            # embedding | linear | bias | norm | router | experts | head

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Linear:
    name: str            # module name, e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int
    bias: bool


# Keys a config.json must hold to size the model (no silent defaults for the sizes that matter).
_REQUIRED = {
    "gpt2": ("vocab_size", "n_embd", "n_layer", "n_head"),
    "default": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "intermediate_size"),
}
# transformers' own defaults for the optional keys, per family (configuration_<family>.py).
_TIE_DEFAULT = {"gpt2": True, "gemma": True, "gemma2": True}
_KV_DEFAULT = {"mistral": 8, "mixtral": 8, "qwen2": 32, "gemma": 16, "gemma2": 4}
_POS_DEFAULT = {"gpt2": 1024, "llama": 2048, "mistral": 131072, "mixtral": 131072, "qwen2": 32768,
                "gemma": 8192, "gemma2": 8192, "phi3": 4096}


def load_config(model: str) -> dict:
    """A preset name, a config.json path or a folder holding config.json -> config dict."""
    if model in PRESETS:
        return dict(PRESETS[model])
    looks_like_path = os.sep in model or model.endswith(".json") or os.path.exists(model)
    if not looks_like_path:
        raise ConfigError(f"unknown model {model!r}: use a config.json path, a folder holding one, "
                          f"or a preset: {', '.join(PRESETS)}")
    path = os.path.join(model, "config.json") if os.path.isdir(model) else model
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ConfigError(f"cannot read {path} as JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(config).__name__}")
    config.setdefault("_name_or_path", os.path.dirname(os.path.abspath(path)))
    return config


def _positive_int(config: dict, key: str, where: str) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def model_spec(config: dict | str, name: str | None = None) -> ModelSpec:
    """Config dict (or anything `load_config` accepts) -> ModelSpec, with transformers' defaults."""
    if isinstance(config, str):
        name = name or config
        config = load_config(config)
    family = config.get("model_type")
    name = name or config.get("_name_or_path") or str(family)
    if family not in FAMILIES:
        raise ConfigError(f"{name}: model_type must be one of {', '.join(FAMILIES)}, got {family!r}")
    missing = [k for k in _REQUIRED.get(family, _REQUIRED["default"]) if config.get(k) is None]
    if missing:
        raise ConfigError(f"{name}: config is missing {', '.join(missing)} (model_type {family})")

    def get(key, default):
        value = config.get(key)
        return default if value is None else value

    if family == "gpt2":
        hidden = _positive_int(config, "n_embd", name)
        heads = _positive_int(config, "n_head", name)
        inner = get("n_inner", 4 * hidden)
        sizes = dict(vocab_size=_positive_int(config, "vocab_size", name), hidden_size=hidden,
                     num_layers=_positive_int(config, "n_layer", name), num_heads=heads,
                     num_kv_heads=heads, head_dim=hidden // heads, intermediate_size=inner,
                     max_positions=get("n_positions", 1024), qkv_bias=True, o_bias=True, mlp_bias=True)
    else:
        hidden = _positive_int(config, "hidden_size", name)
        heads = _positive_int(config, "num_attention_heads", name)
        kv = get("num_key_value_heads", _KV_DEFAULT.get(family, heads))
        head_dim = get("head_dim", 256 if family in ("gemma", "gemma2") else hidden // heads)
        attention_bias = bool(get("attention_bias", False))
        sizes = dict(vocab_size=_positive_int(config, "vocab_size", name), hidden_size=hidden,
                     num_layers=_positive_int(config, "num_hidden_layers", name), num_heads=heads,
                     num_kv_heads=kv, head_dim=head_dim,
                     intermediate_size=_positive_int(config, "intermediate_size", name),
                     max_positions=get("max_position_embeddings", _POS_DEFAULT[family]),
                     qkv_bias=family == "qwen2" or (family in ("llama", "gemma", "gemma2") and attention_bias),
                     o_bias=family in ("llama", "gemma", "gemma2") and attention_bias,
                     mlp_bias=family == "llama" and bool(get("mlp_bias", False)))
        if family == "mixtral":
            experts = {"num_local_experts": 8, "num_experts_per_tok": 2}
            for key, default in experts.items():
                experts[key] = _positive_int({key: get(key, default)}, key, name)
            if experts["num_experts_per_tok"] > experts["num_local_experts"]:
                raise ConfigError(f"{name}: num_experts_per_tok ({experts['num_experts_per_tok']}) must be at most "
                                  f"num_local_experts ({experts['num_local_experts']})")
            sizes.update(num_experts=experts["num_local_experts"], experts_per_token=experts["num_experts_per_tok"])
    for key in ("num_kv_heads", "head_dim", "intermediate_size", "max_positions"):
        if isinstance(sizes[key], bool) or not isinstance(sizes[key], int) or sizes[key] <= 0:
            raise ConfigError(f"{name}: {key} must be a positive integer, got {sizes[key]!r}")
    if sizes["num_heads"] % sizes["num_kv_heads"]:
        raise ConfigError(f"{name}: num_attention_heads ({sizes['num_heads']}) must be a multiple of "
                          f"num_key_value_heads ({sizes['num_kv_heads']})")
    if family == "gpt2" and hidden % heads:
        raise ConfigError(f"{name}: n_embd ({hidden}) must be a multiple of n_head ({heads})")
    tie = bool(get("tie_word_embeddings", _TIE_DEFAULT.get(family, False)))
    return ModelSpec(name=name, family=family, tie_word_embeddings=tie, **sizes)


def linear_layers(spec: ModelSpec) -> list[Linear]:
    """Every module peft can wrap with LoRA (nn.Linear / Conv1D), in model order, lm_head last."""
    h, inter = spec.hidden_size, spec.intermediate_size
    out = []
    for i in range(spec.num_layers):
        if spec.family == "gpt2":
            p = f"transformer.h.{i}"
            out += [Linear(f"{p}.attn.c_attn", h, 3 * h, True), Linear(f"{p}.attn.c_proj", h, h, True),
                    Linear(f"{p}.mlp.c_fc", h, inter, True), Linear(f"{p}.mlp.c_proj", inter, h, True)]
            continue
        p = f"model.layers.{i}"
        if spec.family == "phi3":
            out.append(Linear(f"{p}.self_attn.qkv_proj", h, spec.q_size + 2 * spec.kv_size, False))
        else:
            out += [Linear(f"{p}.self_attn.q_proj", h, spec.q_size, spec.qkv_bias),
                    Linear(f"{p}.self_attn.k_proj", h, spec.kv_size, spec.qkv_bias),
                    Linear(f"{p}.self_attn.v_proj", h, spec.kv_size, spec.qkv_bias)]
        out.append(Linear(f"{p}.self_attn.o_proj", spec.q_size, h, spec.o_bias))
        if spec.family == "phi3":
            out += [Linear(f"{p}.mlp.gate_up_proj", h, 2 * inter, False),
                    Linear(f"{p}.mlp.down_proj", inter, h, False)]
        elif spec.num_experts == 0:
            out += [Linear(f"{p}.mlp.gate_proj", h, inter, spec.mlp_bias),
                    Linear(f"{p}.mlp.up_proj", h, inter, spec.mlp_bias),
                    Linear(f"{p}.mlp.down_proj", inter, h, spec.mlp_bias)]
    out.append(Linear("lm_head", h, spec.vocab_size, False))
    return out


def parameter_tensors(spec: ModelSpec) -> list[Tensor]:
    """Every parameter tensor (tied lm_head listed once, as the embedding)."""
    h = spec.hidden_size
    gpt2 = spec.family == "gpt2"
    emb = "transformer.wte.weight" if gpt2 else "model.embed_tokens.weight"
    tensors = [Tensor(emb, (spec.vocab_size, h), "embedding")]
    if gpt2:
        tensors.append(Tensor("transformer.wpe.weight", (spec.max_positions, h), "embedding"))

    def norm(name):  # LayerNorm has weight and bias; RMSNorm a weight only
        tensors.append(Tensor(f"{name}.weight", (h,), "norm"))
        if gpt2:
            tensors.append(Tensor(f"{name}.bias", (h,), "norm"))

    by_layer = {}
    for lin in linear_layers(spec)[:-1]:
        by_layer.setdefault(lin.name.split(".")[2], []).append(lin)
    for i in range(spec.num_layers):
        p = f"transformer.h.{i}" if gpt2 else f"model.layers.{i}"
        norm(f"{p}.ln_1" if gpt2 else f"{p}.input_layernorm")
        linears = by_layer.get(str(i), [])
        n_attn = 2 if gpt2 else (2 if spec.family == "phi3" else 4)
        for lin in linears[:n_attn]:
            _add_linear(tensors, lin)
        norm(f"{p}.ln_2" if gpt2 else f"{p}.post_attention_layernorm")
        if spec.family == "gemma2":
            norm(f"{p}.pre_feedforward_layernorm")
            norm(f"{p}.post_feedforward_layernorm")
        for lin in linears[n_attn:]:
            _add_linear(tensors, lin)
        if spec.num_experts:
            e, inter = spec.num_experts, spec.intermediate_size
            tensors += [Tensor(f"{p}.mlp.gate.weight", (e, h), "router"),
                        Tensor(f"{p}.mlp.experts.gate_up_proj", (e, 2 * inter, h), "experts"),
                        Tensor(f"{p}.mlp.experts.down_proj", (e, h, inter), "experts")]
    norm("transformer.ln_f" if gpt2 else "model.norm")
    if not spec.tie_word_embeddings:
        tensors.append(Tensor("lm_head.weight", (spec.vocab_size, h), "head"))
    return tensors


def _add_linear(tensors: list, lin: Linear) -> None:
    tensors.append(Tensor(f"{lin.name}.weight", (lin.out_features, lin.in_features), "linear"))
    if lin.bias:
        tensors.append(Tensor(f"{lin.name}.bias", (lin.out_features,), "bias"))


def count_parameters(spec: ModelSpec) -> int:
    return sum(t.numel for t in parameter_tensors(spec))
