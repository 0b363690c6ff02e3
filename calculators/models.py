"""Reading a model: a preset name, a config.json or a config dict -> ModelSpec.

`model_spec` reads a Hugging Face config the way transformers' configuration class for its
model_type does (families.py holds each class's defaults and rules): the older keys the hub's
config.json files carry (rope_theta, rope_scaling, rotary_pct, rope_local_base_freq,
sliding_window_pattern) and the ones transformers 5 writes (rope_parameters, per layer-type
rope_parameters, layer_types). What the calculator would otherwise have to ignore is refused
with one line naming the field and its value: an unknown rope_type, a sliding window on a family
whose attention has none, layer_types a family does not read, bidirectional attention.

The parameter layout lives in parameters.py and the KV cache in kv_cache.py; the names are
re-exported here because this is where callers have always found them.
"""
from __future__ import annotations

import json
import os

from .families import FAMILIES, Family
from .mla import mla_sizes
from .moe import moe_sizes
from .parameters import Linear, Tensor, count_parameters, linear_layers, parameter_tensors
from .presets import PRESETS
from .spec import FULL, SLIDING, ModelSpec

__all__ = ["ModelSpec", "Tensor", "Linear", "FAMILIES", "PRESETS", "load_config", "model_spec",
           "parameter_tensors", "linear_layers", "count_parameters", "ConfigError"]

_MISSING = object()
_REQUIRED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


class ConfigError(ValueError):
    """A model name, config file or config dict that cannot describe a supported model."""


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


def model_spec(config: dict | str, name: str | None = None) -> ModelSpec:
    """Config dict (or anything `load_config` accepts) -> ModelSpec, with transformers' defaults."""
    if isinstance(config, str):
        name = name or config
        config = load_config(config)
    model_type = config.get("model_type")
    name = name or config.get("_name_or_path") or str(model_type)
    family = FAMILIES.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        inner = config.get("text_config")
        hint = (f"; its text_config (model_type {inner.get('model_type')!r}) describes the language model"
                if isinstance(inner, dict) else "")
        raise ConfigError(f"{name}: model_type must be one of {', '.join(FAMILIES)}, got {model_type!r}{hint}")
    required = ("vocab_size", "n_embd", "n_layer", "n_head") if family.layout == "gpt2" else _REQUIRED
    missing = [k for k in required if config.get(k) is None]
    if missing:
        raise ConfigError(f"{name}: config is missing {', '.join(missing)} (model_type {model_type})")
    reader = _Reader(config, family, name)
    sizes = _sizes(reader)
    layer_types, window = _attention(reader, sizes["num_layers"])
    return ModelSpec(name=name, family=model_type, layer_types=layer_types, sliding_window=window,
                     **sizes, **_features(reader), **_rope(reader, sizes["head_dim"]), **_dropouts(reader))


class _Reader:
    """A config seen through its family: older key names mapped, the class's defaults filled in."""

    def __init__(self, config: dict, family: Family, name: str):
        self.family, self.name, self.model_type = family, name, config.get("model_type")
        self.config = dict(config)
        for old, new in family.renames.items():
            if old in config and new not in config:
                self.config[new] = config[old]

    def get(self, key: str, default=None):
        """The config's value; the family's default when the key is absent (a null stays null)."""
        value = self.config.get(key, _MISSING)
        if value is _MISSING:
            return self.family.defaults.get(key, default)
        return value

    def key(self, key: str) -> str:
        """The name the config itself uses for `key` (gpt2's n_embd for hidden_size)."""
        return next((old for old, new in self.family.renames.items() if new == key and old in self.config), key)

    def positive_int(self, key: str, value=_MISSING, minimum: int = 1) -> int:
        value = self.get(key) if value is _MISSING else value
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise ConfigError(f"{self.name}: {self.key(key)} must be {allowed}, got {value!r}")
        return value

    def refuse(self, what: str):
        raise ConfigError(f"{self.name}: {what} (model_type {self.model_type})")


def _sizes(r: _Reader) -> dict:
    fam = r.family
    hidden, heads = r.positive_int("hidden_size"), r.positive_int("num_attention_heads")
    own_head_dim = fam.layout in ("gpt2", "gpt_neox")  # heads sized hidden // heads, no GQA
    if own_head_dim:
        if hidden % heads:
            r.refuse(f"{r.key('hidden_size')} ({hidden}) must be a multiple of "
                     f"{r.key('num_attention_heads')} ({heads})")
        for key, value in (("head_dim", hidden // heads), ("num_key_value_heads", heads)):
            if r.config.get(key) not in (None, value):
                r.refuse(f"{key}={r.config[key]!r} is not read: this family uses {value}")
        kv, head_dim = heads, hidden // heads
    else:
        kv = r.get("num_key_value_heads")
        kv = heads if kv is None else kv
        head_dim = r.get("head_dim")
        head_dim = hidden // heads if head_dim is None else head_dim
    inter = r.get("intermediate_size")
    sizes = dict(vocab_size=r.positive_int("vocab_size"), hidden_size=hidden,
                 num_layers=r.positive_int("num_hidden_layers"), num_heads=heads,
                 num_kv_heads=r.positive_int("num_key_value_heads", kv), head_dim=r.positive_int("head_dim", head_dim),
                 intermediate_size=r.positive_int("intermediate_size", 4 * hidden if inter is None else inter),
                 max_positions=r.positive_int("max_position_embeddings"),
                 tie_word_embeddings=bool(r.get("tie_word_embeddings", False)))
    if fam.attention == "mla":  # no key/value heads: keys and values come from one latent (mla.py)
        sizes["num_kv_heads"] = heads
    elif heads % sizes["num_kv_heads"]:
        r.refuse(f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({sizes['num_kv_heads']})")
    attention_bias = _bias(r, fam.attention_bias, "attention_bias")
    qkv_bias = attention_bias or fam.attention_bias == "qkv" or (fam.attention_bias == "qkv_bias"
                                                                  and bool(r.get("qkv_bias", True)))
    sizes.update(qkv_bias=qkv_bias, o_bias=attention_bias, mlp_bias=_bias(r, fam.mlp_bias, "mlp_bias"))
    if fam.moe:
        sizes.update(moe_sizes(r, sizes["num_layers"], sizes["intermediate_size"]))
    if fam.attention == "mla":
        sizes.update(mla_sizes(r))
    return sizes


def _bias(r: _Reader, rule: str, key: str) -> bool:
    """A family's bias rule (families.Family.attention_bias / mlp_bias) applied to the config."""
    return rule == "always" or (rule == "config" and bool(r.get(key, False)))


def _attention(r: _Reader, num_layers: int) -> tuple[tuple, int | None]:
    """Which layers use sliding-window attention, and the window, as transformers decides them."""
    fam, window = r.family, r.get("sliding_window")
    given = r.config.get("layer_types")
    if r.get("use_bidirectional_attention"):
        r.refuse(f"use_bidirectional_attention={r.config['use_bidirectional_attention']!r} makes it an encoder, "
                 "not a causal LM")
    if fam.sliding == "none" and window is not None:
        r.refuse(f"sliding_window={window!r} is not read: this family has no sliding-window attention")
    if fam.sliding.startswith("qwen") and not r.get("use_sliding_window", False):
        window = None  # Qwen2Config/Qwen3Config drop the window unless use_sliding_window is set
    derived = [_slides(r, i, window) for i in range(num_layers)]
    if given is not None and not fam.reads_layer_types and list(given) != derived:
        how = "has no sliding-window attention" if fam.sliding == "none" else "slides every layer by sliding_window"
        r.refuse(f"layer_types={given!r} is not read: this family {how}")
    if given is None or not fam.reads_layer_types:
        given = derived
    known = isinstance(given, (list, tuple)) and all(t in (FULL, SLIDING) for t in given)
    if not known or len(given) != num_layers:
        r.refuse(f"layer_types must list {FULL!r} or {SLIDING!r} for each of the {num_layers} layers, got {given!r}")
    if SLIDING not in given:
        return tuple(given), None
    if window is None:
        r.refuse(f"layer_types has sliding layers but sliding_window is {window!r}")
    return tuple(given), r.positive_int("sliding_window", window)


def _slides(r: _Reader, i: int, window) -> str:
    fam = r.family
    if window is None or fam.sliding == "none":
        return FULL
    if fam.sliding == "qwen":
        return SLIDING if i >= r.positive_int("max_window_layers", minimum=0) else FULL
    if fam.sliding == "qwen-alternate":  # Qwen2MoeConfig: even layers below max_window_layers
        return SLIDING if (i + 1) % 2 and i < r.positive_int("max_window_layers", minimum=0) else FULL
    if fam.sliding == "pattern":
        pattern = r.positive_int("sliding_window_pattern", r.get("sliding_window_pattern", fam.pattern)
                                 if fam.reads_pattern else fam.pattern)
        return SLIDING if (i + 1) % pattern else FULL
    return SLIDING


# the MLP activations the activation replay knows op by op (transformers' ACT2FN and reference_models agree)
ACTIVATIONS = ("silu", "swish", "gelu", "gelu_pytorch_tanh", "gelu_new", "relu")
# config switches that change what training saves and that the calculator does not model: refused, never ignored
_UNMODELLED = {"router_jitter_noise": (0, 0.0, None),   # Mixtral: a (B, T, h) noise tensor kept per sparse layer
               "output_router_logits": (False, None),   # MoE: the router's auxiliary loss in the training forward
               "reorder_and_upcast_attn": (False, None),  # GPT-2: eager attention's scores in fp32
               "add_cross_attention": (False, None)}      # GPT-2: a cross-attention layer in every block


def _features(r: _Reader) -> dict:
    fam = r.family
    activation = r.get(fam.activation_key, fam.defaults.get("hidden_act", "silu"))
    if activation not in ACTIVATIONS:
        r.refuse(f"{fam.activation_key}={activation!r} is not modelled; the activation replay knows "
                 f"{', '.join(ACTIVATIONS)}")
    if fam.softcapping == "final" and r.get("attn_logit_softcapping") is not None:
        r.refuse(f"attn_logit_softcapping={r.get('attn_logit_softcapping')!r} is not applied by transformers' "
                 f"{r.model_type} (gemma2 soft-caps attention scores)")
    for key, off in _UNMODELLED.items():
        if r.config.get(key, None) not in off:
            r.refuse(f"{key}={r.config[key]!r} is not modelled by the calculator (use {off[0]!r})")
    return dict(norm=fam.norm, norm_layout=fam.norm_layout, qk_norm=fam.qk_norm, fused_qkv=fam.fused_qkv,
                fused_gate_up=fam.fused_gate_up, gated_mlp=fam.gated_mlp, scaled_embeddings=fam.scaled_embeddings,
                parallel_residual=fam.layout == "gpt_neox" and bool(r.get("use_parallel_residual")),
                activation=activation, rope_in_fp32=fam.rope_in_fp32, use_cache=bool(r.get("use_cache", True)),
                attn_softcap=r.get("attn_logit_softcapping") if fam.softcapping == "both" else None,
                final_softcap=r.get("final_logit_softcapping") if fam.softcapping != "none" else None)


def _dropouts(r: _Reader) -> dict:
    """The family's dropout probabilities from the config (a null is 0, as transformers reads it)."""
    out = {}
    for kind, key in r.family.dropout_keys.items():
        value = r.get(key, 0.0)
        value = 0.0 if value is None else value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
            r.refuse(f"{key} must be a probability in [0, 1), got {value!r}")
        out[f"{kind}_dropout"] = float(value)
    return out


def _rope(r: _Reader, head_dim: int) -> dict:
    """rope_type, theta and rotary dims, with transformers' priority: rope_scaling, rope_parameters
    (flat, or per layer type), then the top-level rope_theta / partial_rotary_factor."""
    fam = r.family
    if fam.layout == "gpt2":
        return dict(rotary_dim=0, rope_type=None, rope_theta=None, local_rope_theta=None)
    key = "rope_scaling" if r.config.get("rope_scaling") else "rope_parameters"
    params = r.config.get(key) or {}
    if not isinstance(params, dict):
        r.refuse(f"{key} must be a JSON object, got {params!r}")
    per_layer_type = any(k in (FULL, SLIDING) for k in params)
    if per_layer_type and not fam.local_rope:
        r.refuse(f"{key} is given per layer type ({', '.join(params)}), which this family does not read")
    full = dict(params.get(FULL) or {}) if per_layer_type else dict(params)
    local = None
    if fam.local_rope:
        sliding = (params.get(SLIDING) or {}) if per_layer_type else {}
        _check_rope_type(r, f"{key}.{SLIDING}", sliding)
        local = _theta(r, f"{key}.{SLIDING}.rope_theta", sliding.get("rope_theta", r.get("local_rope_theta")))
    rope_type = _check_rope_type(r, f"{key}.{FULL}" if per_layer_type else key, full)
    factor = full.get("partial_rotary_factor", r.get("partial_rotary_factor", 1.0))
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        r.refuse(f"{r.key('partial_rotary_factor')} must be in (0, 1], got {factor!r}")
    theta = _theta(r, "rope_theta", full.get("rope_theta", r.get("rope_theta", 10000.0)))
    return dict(rotary_dim=int(head_dim * factor), rope_type=rope_type, rope_theta=theta, local_rope_theta=local)


def _theta(r: _Reader, where: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        r.refuse(f"{where} must be a positive number, got {value!r}")
    return float(value)


def _check_rope_type(r: _Reader, where: str, params: dict) -> str:
    rope_type = params.get("rope_type", params.get("type", "default"))
    if r.model_type == "phi3" and rope_type in ("su", "yarn"):
        rope_type = "longrope"  # Phi3Config renames the types its checkpoints were published with
    allowed = r.family.rope_types
    if rope_type not in allowed:
        r.refuse(f"{where} rope_type must be one of {', '.join(allowed)}, got {rope_type!r}")
    return rope_type
