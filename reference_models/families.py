"""The decoder families that are Llama with changes, in one place: what each changes, and how its
config.json reads and writes.

  model_type   norm    q/k norm   residual   fused          other
  llama        rms     -          pre        -              every rope_type; optional biases
  mistral      rms     -          pre        -              sliding window on every layer
  qwen2        rms     -          pre        -              q/k/v biases; sliding window on some layers
  qwen3        rms     per head   pre        -              sliding window on some layers
  gemma2       gemma   -          sandwich   -              embeddings x sqrt(hidden); query_pre_attn_scalar;
                                                            attention and final logit soft-capping;
                                                            sliding window on alternate layers
  gemma3_text  gemma   per head   sandwich   -              as gemma2 (no attention soft-capping); sliding
                                                            layers have their own RoPE base
  phi3         rms     -          pre        qkv, gate_up   partial rotary; longrope (generation recomputes
                                                            the cache when it switches); sliding window on every layer
  olmo2        olmo    whole proj post       -              rotates q and k in fp32
  mixtral      rms     -          pre        -              experts on every layer, top-k renormalised,
                                                            fp32 routing weights; sliding window on every layer
  qwen2_moe    rms     -          pre        -              as qwen2 (q/k/v bias: qkv_bias) with experts and a
                                                            gated shared expert; routing weights in the compute dtype
  qwen3_moe    rms     per head   pre        -              as qwen3 with experts (no shared one); sliding window
                                                            on every layer when use_sliding_window

norm (reference_models/norms.py): rms = Llama's, gemma = (1 + w) in fp32, olmo = weight before the
cast. Residual: pre = x + f(norm(x)) (Llama); sandwich = x + norm(f(norm(x))) (Gemma); post =
x + norm(f(x)) (OLMo 2). q/k norm: an RMSNorm on queries and keys after the projection, over each
head's D (Qwen3, Gemma 3) or over the whole projection before the split into heads (OLMo 2).
Experts (moe.py): `moe` = "mixtral" (every layer sparse, experts sized intermediate_size, the k
routing weights always renormalised and kept in fp32, optional router jitter) or "qwen" (experts
sized moe_intermediate_size, norm_topk_prob, dense layers by decoder_sparse_step / mlp_only_layers).

Reading a config.json: a key it leaves out takes the value transformers' config class assumes
(`defaults` below); a feature we do not implement is refused with one line naming the key and
the value. Writing: the transformers 5 layout (rope_parameters, layer_types), which its config
classes read back to the same model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .rope import check_rope_parameters

__all__ = ["Family", "FAMILIES", "llama_kwargs_from_hf", "llama_hf_dict", "check_moe"]


@dataclass(frozen=True)
class Family:
    architecture: str               # the transformers class save_pretrained names in config.json
    norm: str = "rms"               # key of norms.NORMS
    qk_norm: str | None = None      # None | "head" | "proj" (see the module docstring)
    residual: str = "pre"           # "pre" | "sandwich" | "post"
    fused: bool = False             # one qkv_proj and one gate_up_proj (Phi-3)
    scaled_embedding: bool = False  # embeddings times sqrt(hidden_size), rounded to the compute dtype (Gemma)
    biases: str = "none"            # "config": attention_bias on q, k, v, o (Llama: also mlp_bias);
    #                                 "qkv": on q, k, v always (Qwen2); "qkv_bias": on q, k, v when the
    #                                 config's qkv_bias says so (Qwen2-MoE); "none"
    sliding: str = "none"           # "none" | "all" (sliding_window on every layer) | "layers" (layer_types)
    partial_rotary: bool = False    # partial_rotary_factor < 1 allowed: transformers' attention rotates a prefix
    #                                 (and concatenates the rest back, also when it is empty)
    rope_in_fp32: bool = False      # q and k rotated with fp32 cos/sin, then cast back (OLMo 2)
    longrope_refresh: bool = False  # generate recomputes the KV cache when longrope turns to its long factors (Phi-3)
    moe: str | None = None          # None (dense MLP) | "mixtral" | "qwen": see the module docstring
    act_key: str = "hidden_act"     # the config key of the MLP activation
    defaults: dict = field(default_factory=dict)  # transformers' config defaults where they differ from Llama's


_QWEN = {"vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32, "max_position_embeddings": 32768,
         "bos_token_id": None, "eos_token_id": None, "sliding_window": 4096, "max_window_layers": 28}
_GEMMA = {"vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
          "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh",
          "max_position_embeddings": 8192, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
          "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096}

FAMILIES = {
    "llama": Family("LlamaForCausalLM", biases="config"),
    "mistral": Family("MistralForCausalLM", sliding="all", defaults={
        "intermediate_size": 14336, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
        "sliding_window": 4096}),
    "qwen2": Family("Qwen2ForCausalLM", biases="qkv", sliding="layers", defaults=_QWEN),
    "qwen3": Family("Qwen3ForCausalLM", qk_norm="head", biases="config", sliding="layers",
                    defaults={**_QWEN, "head_dim": 128}),
    "gemma2": Family("Gemma2ForCausalLM", norm="gemma", residual="sandwich", scaled_embedding=True, biases="config",
                     sliding="layers", act_key="hidden_activation", defaults={
                         **_GEMMA, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
                         "sliding_window_pattern": 2}),
    "gemma3_text": Family("Gemma3ForCausalLM", norm="gemma", qk_norm="head", residual="sandwich",
                          scaled_embedding=True, biases="config", sliding="layers", act_key="hidden_activation",
                          defaults={**_GEMMA, "vocab_size": 262208, "max_position_embeddings": 131072,
                                    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
                                    "sliding_window_pattern": 6}),
    "phi3": Family("Phi3ForCausalLM", fused=True, sliding="all", partial_rotary=True, longrope_refresh=True, defaults={
        "vocab_size": 32064, "hidden_size": 3072, "intermediate_size": 8192, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "eos_token_id": 32000, "pad_token_id": 32000, "sliding_window": None}),
    "olmo2": Family("Olmo2ForCausalLM", norm="olmo", qk_norm="proj", residual="post", biases="config",
                    rope_in_fp32=True, defaults={
        "vocab_size": 50304, "rms_norm_eps": 1e-5, "pad_token_id": 1, "bos_token_id": None, "eos_token_id": 50279}),
    "mixtral": Family("MixtralForCausalLM", sliding="all", moe="mixtral", defaults={
        "intermediate_size": 14336, "num_key_value_heads": 8, "max_position_embeddings": 4096 * 32,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None, "num_local_experts": 8,
        "num_experts_per_tok": 2}),
    "qwen2_moe": Family("Qwen2MoeForCausalLM", biases="qkv_bias", sliding="layers", moe="qwen", defaults={
        **_QWEN, "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
        "num_key_value_heads": 16, "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632,
        "num_experts": 60, "num_experts_per_tok": 4, "norm_topk_prob": False}),
    "qwen3_moe": Family("Qwen3MoeForCausalLM", qk_norm="head", biases="config", sliding="all", moe="qwen", defaults={
        **_QWEN, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 24, "num_key_value_heads": 4,
        "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": False}),
}

_USE_SLIDING_WINDOW = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")  # their window applies only with use_sliding_window

_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps", "attention_dropout",
          "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id")


def _refuse(key: str, value, why: str):
    raise ValueError(f"unsupported config: {key}={value!r} ({why})")


def _rope_params(d: dict, family: Family) -> dict:
    """transformers 5's rope_parameters or 4.x's rope_theta + rope_scaling -> {rope_type, rope_theta, ...}."""
    params = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if "full_attention" in params:  # Gemma 3 writes one set per layer type
        params = params["full_attention"] or {}
    params = dict(params)
    params["rope_type"] = params.pop("type", params.get("rope_type", "default"))
    if d["model_type"] == "phi3" and params["rope_type"] in ("su", "yarn"):
        params["rope_type"] = "longrope"  # Phi-3's old names for it (its config class renames them too)
    params.setdefault("rope_theta", d.get("rope_theta", 10000.0))
    params.setdefault("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        params.setdefault("original_max_position_embeddings", d["max_position_embeddings"])
        if d.get("original_max_position_embeddings") is not None:  # a top-level value wins, as in transformers
            params["original_max_position_embeddings"] = d["original_max_position_embeddings"]
    head_dim = d.get("head_dim") or d["hidden_size"] // d["num_attention_heads"]
    check_rope_parameters(params, head_dim, where=f"{d['model_type']} rope_parameters")
    if params["partial_rotary_factor"] != 1.0 and not family.partial_rotary:
        _refuse("partial_rotary_factor", params["partial_rotary_factor"],
                f"{family.architecture} rotates whole heads; only phi3 and gpt_neox rotate a part")
    return params


def _local_rope_theta(d: dict):
    """Gemma 3: the RoPE base of its sliding layers (plain RoPE, no scaling)."""
    params = d.get("rope_parameters") or {}
    if "sliding_attention" not in params:
        return d["rope_local_base_freq"]
    local = dict(params["sliding_attention"] or {})
    if local.get("rope_type", "default") != "default":
        _refuse("rope_parameters.sliding_attention.rope_type", local["rope_type"],
                "Gemma 3's sliding layers use plain RoPE; only their rope_theta may differ")
    return local.get("rope_theta", d["rope_local_base_freq"])


def _layer_types(d: dict, family: Family):
    """(layer_types, sliding_window) as transformers' config class derives them."""
    n, window = d["num_hidden_layers"], d.get("sliding_window")
    if family.sliding == "none" or not window or (d["model_type"] in _USE_SLIDING_WINDOW
                                                  and not d.get("use_sliding_window")):
        return None, None
    if family.sliding == "all":
        return ["sliding_attention"] * n, window
    types = d.get("layer_types")
    if types is None:
        if d["model_type"] in ("qwen2", "qwen3"):  # the layers from max_window_layers on slide
            types = ["sliding_attention" if i >= d["max_window_layers"] else "full_attention" for i in range(n)]
        elif d["model_type"] == "qwen2_moe":  # every other layer below max_window_layers
            types = ["sliding_attention" if (i + 1) % 2 and i < d["max_window_layers"] else "full_attention"
                     for i in range(n)]
        else:  # Gemma: every pattern-th layer is global, the others slide (5.x writes _sliding_window_pattern)
            pattern = d.get("_sliding_window_pattern") or d["sliding_window_pattern"]
            types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    if "sliding_attention" not in types:
        return None, None
    return list(types), window


def _gemma_checks(d: dict) -> None:
    if d.get("use_bidirectional_attention"):
        _refuse("use_bidirectional_attention", d["use_bidirectional_attention"], "only causal attention is implemented")
    if d["model_type"] == "gemma3_text" and d.get("attn_logit_softcapping") is not None:
        _refuse("attn_logit_softcapping", d["attn_logit_softcapping"],
                "transformers' Gemma 3 does not apply it; gemma2 does")


# transformers' LlamaConfig defaults (LlamaConfig's too) that the readers below need
_LLAMA_DEFAULTS = {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "max_position_embeddings": 2048}


def llama_kwargs_from_hf(d: dict) -> dict:
    """A transformers config dict of a family in FAMILIES -> keyword arguments of LlamaConfig."""
    family = FAMILIES[d["model_type"]]
    d = {**_LLAMA_DEFAULTS, **family.defaults, **d}
    kw = {k: d[k] for k in _SIZES if k in d}
    kw.update(model_type=d["model_type"], hidden_act=d.get(family.act_key, "silu"))
    rope = _rope_params(d, family)
    kw.update(rope_theta=rope.pop("rope_theta"), partial_rotary_factor=rope.pop("partial_rotary_factor"),
              rope_scaling=rope if rope["rope_type"] != "default" else None)
    kw["layer_types"], kw["sliding_window"] = _layer_types(d, family)
    if family.biases == "config":
        kw["attention_bias"] = d.get("attention_bias", False)
        kw["mlp_bias"] = d.get("mlp_bias", False) if d["model_type"] == "llama" else False
    elif family.biases == "qkv":
        kw.update(attention_bias=True, o_proj_bias=False)
    elif family.biases == "qkv_bias":
        kw.update(attention_bias=bool(d.get("qkv_bias", True)), o_proj_bias=False)
    if family.moe:
        kw["moe"] = _moe_kwargs(d, family)
    if family.norm == "gemma":
        _gemma_checks(d)
        kw.update(query_pre_attn_scalar=d["query_pre_attn_scalar"],
                  attn_logit_softcapping=d.get("attn_logit_softcapping"),
                  final_logit_softcapping=d.get("final_logit_softcapping"))
    if d["model_type"] == "gemma3_text":
        kw["rope_local_base_freq"] = _local_rope_theta(d)
    if d["model_type"] == "phi3":
        for key in ("resid_pdrop", "embd_pdrop"):
            if d.get(key):
                _refuse(key, d[key], "residual and embedding dropout are not implemented")
    return kw


_BIAS_LAYOUTS = {"config": [(b, b, False) for b in (False, True)], "qkv": [(True, False, False)],
                 "qkv_bias": [(b, False, False) for b in (False, True)], "none": [(False, False, False)]}


def _moe_kwargs(d: dict, family: Family) -> dict:
    """The experts' keys of a config.json -> MoEConfig's keyword arguments (transformers' attribute_map
    reads num_experts as num_local_experts, which is what 5.x writes for Mixtral and Qwen3-MoE)."""
    experts = d.get("num_local_experts", d.get("num_experts"))
    kw = dict(num_experts=experts, num_experts_per_tok=d["num_experts_per_tok"],
              router_aux_loss_coef=d.get("router_aux_loss_coef", 0.001))
    if family.moe == "mixtral":
        return dict(kw, moe_intermediate_size=d["intermediate_size"], norm_topk_prob=True,
                    router_jitter_noise=d.get("router_jitter_noise", 0.0))
    return dict(kw, moe_intermediate_size=d["moe_intermediate_size"], norm_topk_prob=bool(d["norm_topk_prob"]),
                decoder_sparse_step=d.get("decoder_sparse_step", 1), mlp_only_layers=d.get("mlp_only_layers") or (),
                shared_expert_intermediate_size=d["shared_expert_intermediate_size"]
                if d["model_type"] == "qwen2_moe" else 0)


def check_moe(c) -> None:
    """Refuse, in one line, experts a LlamaConfig's family cannot express (or experts on a dense family)."""
    family, moe = FAMILIES[c.model_type], c.moe
    if (family.moe is None) != (moe is None):
        raise ValueError(f"model_type {c.model_type!r} " + ("has no experts; mixtral, qwen2_moe and qwen3_moe have"
                                                             if moe is not None else "needs moe (a MoEConfig)"))
    if moe is None:
        return
    if family.moe == "mixtral":
        allowed = dict(moe_intermediate_size=c.intermediate_size, norm_topk_prob=True, decoder_sparse_step=1,
                       mlp_only_layers=(), shared_expert_intermediate_size=0)
    else:
        allowed = dict(router_jitter_noise=0.0)
        if c.model_type != "qwen2_moe":
            allowed["shared_expert_intermediate_size"] = 0
        elif not moe.shared_expert_intermediate_size:  # Qwen2MoeSparseMoeBlock always builds one
            raise ValueError("model_type 'qwen2_moe' needs moe.shared_expert_intermediate_size >= 1, got 0")
    for key, value in allowed.items():
        if getattr(moe, key) != value:
            raise ValueError(f"model_type {c.model_type!r} cannot express moe.{key}={getattr(moe, key)!r}; "
                             f"its experts have {key}={value!r}")
    bad = [i for i in moe.mlp_only_layers if not (isinstance(i, int) and 0 <= i < c.num_hidden_layers)]
    if bad:
        raise ValueError(f"mlp_only_layers must be layer indices in 0..{c.num_hidden_layers - 1}, got {bad}")


def _hf_moe(c) -> dict:
    m = c.moe
    d = {"num_experts_per_tok": m.num_experts_per_tok, "router_aux_loss_coef": m.router_aux_loss_coef,
         "output_router_logits": False}
    if c.family.moe == "mixtral":
        return dict(d, num_local_experts=m.num_experts, router_jitter_noise=m.router_jitter_noise)
    d.update(num_experts=m.num_experts, moe_intermediate_size=m.moe_intermediate_size,
             norm_topk_prob=m.norm_topk_prob, decoder_sparse_step=m.decoder_sparse_step,
             mlp_only_layers=list(m.mlp_only_layers))
    if c.model_type == "qwen2_moe":
        d.update(shared_expert_intermediate_size=m.shared_expert_intermediate_size, qkv_bias=c.attention_bias)
    return d


def llama_hf_dict(c) -> dict:
    """A LlamaConfig -> the config.json of its transformers class (model_type's family).

    Raises ValueError for settings that class cannot express (e.g. q/k/v bias without o bias is
    Qwen2's layout, not Llama's)."""
    family = FAMILIES[c.model_type]
    layouts = [(b, b, m) for b in (False, True) for m in (False, True)] if c.model_type == "llama" \
        else _BIAS_LAYOUTS[family.biases]
    bias = (c.attention_bias, c.o_proj_bias, c.mlp_bias)
    if bias not in layouts:
        raise ValueError(
            f"model_type {c.model_type!r} cannot express attention_bias={bias[0]}, o_proj_bias={bias[1]}, "
            f"mlp_bias={bias[2]}; allowed (attention_bias, o_proj_bias, mlp_bias): {layouts}")
    d = {k: getattr(c, k) for k in _SIZES}
    d.update(model_type=c.model_type, architectures=[family.architecture], **{family.act_key: c.hidden_act})
    d.update(_hf_rope(c), **_hf_sliding(c, family))
    if family.biases == "config":
        d["attention_bias"] = c.attention_bias
    if c.model_type == "llama":
        d["mlp_bias"] = c.mlp_bias
    if family.moe:
        d.update(_hf_moe(c))
    if family.norm == "gemma":
        d.update(query_pre_attn_scalar=c.query_pre_attn_scalar or c.head_dim,  # None: we scale by head_dim
                 attn_logit_softcapping=c.attn_logit_softcapping,
                 final_logit_softcapping=c.final_logit_softcapping)
    if c.model_type == "phi3":
        d["original_max_position_embeddings"] = (c.rope_scaling or {}).get("original_max_position_embeddings",
                                                                            c.max_position_embeddings)
    return d


def _hf_rope(c) -> dict:
    params = {"rope_type": "default", **(c.rope_scaling or {}), "rope_theta": c.rope_theta}
    if c.partial_rotary_factor != 1.0 or c.model_type == "phi3":
        params["partial_rotary_factor"] = c.partial_rotary_factor
    if c.model_type == "gemma3_text":
        local = c.rope_local_base_freq if c.rope_local_base_freq is not None else c.rope_theta
        params = {"full_attention": params, "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    # both spellings of the base: transformers >= 5 reads rope_parameters, 4.x read rope_theta
    return {"rope_parameters": params, "rope_theta": c.rope_theta}


def _hf_sliding(c, family: Family) -> dict:
    sliding = [t == "sliding_attention" for t in c.layer_types]
    if family.sliding == "none":
        if any(sliding):
            raise ValueError(f"model_type {c.model_type!r} has no sliding window; use mistral, qwen2, qwen3, gemma2, "
                             f"gemma3_text or phi3, got sliding_window={c.sliding_window}")
        return {}
    if family.sliding == "all":
        if any(sliding) and not all(sliding):
            raise ValueError(f"model_type {c.model_type!r} slides every layer or none; got layer_types={c.layer_types}")
        window = {"sliding_window": c.sliding_window if any(sliding) else None}
        return dict(window, use_sliding_window=any(sliding)) if c.model_type in _USE_SLIDING_WINDOW else window
    d = {"layer_types": list(c.layer_types), "sliding_window": c.sliding_window if any(sliding) else None}
    if c.model_type in ("qwen2", "qwen3"):  # for 4.x's max_window_layers: exact when the last layers slide
        first = sliding.index(True) if any(sliding) else c.num_hidden_layers
        d.update(use_sliding_window=any(sliding), max_window_layers=first)
    elif c.model_type == "qwen2_moe":  # 5.x reads layer_types; the window needs use_sliding_window
        d.update(use_sliding_window=any(sliding), max_window_layers=c.num_hidden_layers)
    if family.norm == "gemma" and not any(sliding):
        d["sliding_window"] = c.sliding_window or 4096  # Gemma's configs need a window; no layer uses it here
    return d
