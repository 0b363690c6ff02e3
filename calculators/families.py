"""What each supported model_type builds, in one table: read this file to see how families differ.

Each `Family` row is transformers' modeling_<model_type>.py and configuration_<model_type>.py
(version 5.24) reduced to what parameter counts, memory and the KV cache depend on: which norms a
decoder layer has and where, q/k norms, fused projections, which projections carry a bias, how the
configuration class decides which layers use sliding-window attention, and the defaults it fills in
for keys a config.json leaves out. A row lists only what differs from Llama (the `Family()` defaults).

Families that share another's parameter layout are rows of their own, because their configuration
classes have their own defaults: ministral is mistral with per-layer `layer_types`, granite is llama
(its multipliers scale activations, not shapes), olmo3 is olmo2 with sliding layers (every 4th layer
full). smollm2 checkpoints are model_type llama. The mixture-of-experts rows (mixtral, qwen2_moe,
qwen3_moe, deepseek_v3) name how their configs size the experts (moe.py); deepseek_v3 also has
multi-head latent attention (mla.py). tests/test_calc_models.py checks every row against
transformers on the meta device.
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Family", "FAMILIES", "ROPE_TYPES"]

# transformers' ROPE_INIT_FUNCTIONS (modeling_rope_utils.py) used by these families, and "default"
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


@dataclass(frozen=True)
class Family:
    layout: str = "decoder"      # parameter names: "decoder" (model.layers.i.self_attn / .mlp),
                                 # "gpt2" (transformer.h.i.attn / .mlp, Conv1D), "gpt_neox" (gpt_neox.layers.i)
    norm: str = "rmsnorm"        # see spec.ModelSpec.norm: "rmsnorm" | "rmsnorm_olmo" | "rmsnorm_gemma" (weight)
                                 # | "layernorm" (weight and bias)
    norm_layout: str = "pre"     # see spec.ModelSpec.norm_layout
    qk_norm: str = "none"        # see spec.ModelSpec.qk_norm
    fused_qkv: bool = False
    fused_gate_up: bool = False
    gated_mlp: bool = True
    scaled_embeddings: bool = False
    softcapping: str = "none"    # which soft-capping the model applies: "none" | "final" (final_logit_softcapping)
                                 # | "both" (also attn_logit_softcapping, on the attention scores)
    attention_bias: str = "config"  # "config": the config's attention_bias, on q, k, v and o |
                                    # "qkv": always on q, k, v (qwen2) | "qkv_bias": on q, k, v when the
                                    # config's qkv_bias says so (qwen2_moe) | "none" | "always" (gpt2)
    mlp_bias: str = "none"       # "none" | "config" (the config's mlp_bias) | "always"
    sliding: str = "none"        # which layers slide when layer_types is absent:
                                 # "none" (no sliding-window attention) | "all" (every layer when
                                 # sliding_window is set) | "qwen" (use_sliding_window, layers from
                                 # max_window_layers on) | "pattern" (all but every pattern-th layer) |
                                 # "qwen-all" (qwen3_moe: every layer, with use_sliding_window) |
                                 # "qwen-alternate" (qwen2_moe: even layers below max_window_layers, with it)
    pattern: int = 0             # "pattern": every pattern-th layer is full (gemma2 2, olmo3 4) ...
    reads_pattern: bool = False  # ... or the config's sliding_window_pattern (gemma3, default 6)
    reads_layer_types: bool = False  # honours a config's explicit layer_types
    local_rope: bool = False     # sliding layers have their own rope parameters (theta)
    rope_in_fp32: bool = False   # cos/sin kept in fp32, q and k rotated in fp32 (olmo2, olmo3)
    rope_types: tuple = ROPE_TYPES
    moe: str = ""                # "" (dense MLP) | "mixtral" | "qwen" | "deepseek": a router and 3-D expert
                                 # parameters instead of the MLP; the config keys that size them (moe.py)
    attention: str = "mha"       # "mha" (q, k, v, o projections; GQA) | "mla" (deepseek_v3, mla.py)
    activation_key: str = "hidden_act"
    # the config keys of the dropouts transformers applies in training: "attention" (on the attention
    # probabilities), "residual" (on each sublayer's output), "embedding" (on the embedding output)
    dropout_keys: dict = field(default_factory=lambda: {"attention": "attention_dropout"})
    renames: dict = field(default_factory=dict)     # older config keys -> the names models.py reads
    defaults: dict = field(default_factory=dict)    # the configuration class's defaults


_NO_BIAS_SLIDING = dict(attention_bias="none", sliding="all")
_GEMMA = dict(norm="rmsnorm_gemma", scaled_embeddings=True, activation_key="hidden_activation")
_GEMMA_DEFAULTS = dict(head_dim=256, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh")
_OLMO2 = dict(norm="rmsnorm_olmo", norm_layout="post", qk_norm="projection", rope_in_fp32=True)
_QWEN_MOE = dict(vocab_size=151936, hidden_size=2048, num_hidden_layers=24, max_position_embeddings=32768,
                 sliding_window=4096, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False)

FAMILIES = {
    # learned positions, LayerNorm with bias, fused c_attn, 4h GELU MLP, every projection biased
    "gpt2": Family(layout="gpt2", norm="layernorm", fused_qkv=True, gated_mlp=False, attention_bias="always",
                   mlp_bias="always", activation_key="activation_function",
                   dropout_keys=dict(attention="attn_pdrop", residual="resid_pdrop", embedding="embd_pdrop"),
                   renames=dict(n_embd="hidden_size", n_layer="num_hidden_layers", n_head="num_attention_heads",
                                n_inner="intermediate_size", n_positions="max_position_embeddings"),
                   defaults=dict(tie_word_embeddings=True, max_position_embeddings=1024, hidden_act="gelu_new",
                                 attn_pdrop=0.1, resid_pdrop=0.1, embd_pdrop=0.1)),
    # parallel residual, rotary on the first quarter of each head, fused query_key_value, biased LayerNorms
    "gpt_neox": Family(layout="gpt_neox", norm="layernorm", fused_qkv=True, gated_mlp=False, mlp_bias="always",
                       dropout_keys=dict(attention="attention_dropout", residual="hidden_dropout",
                                         embedding="hidden_dropout"),
                       renames=dict(rotary_pct="partial_rotary_factor", rotary_emb_base="rope_theta"),
                       defaults=dict(attention_bias=True, use_parallel_residual=True, partial_rotary_factor=0.25,
                                     max_position_embeddings=2048, hidden_act="gelu")),
    "llama": Family(mlp_bias="config", defaults=dict(max_position_embeddings=2048)),
    "granite": Family(mlp_bias="config", defaults=dict(max_position_embeddings=2048)),
    # no biases; every layer slides when sliding_window is set (4096 unless the config says null)
    "mistral": Family(**_NO_BIAS_SLIDING, defaults=dict(num_key_value_heads=8, max_position_embeddings=131072,
                                                        sliding_window=4096)),
    "ministral": Family(**_NO_BIAS_SLIDING, reads_layer_types=True,
                        defaults=dict(num_key_value_heads=8, max_position_embeddings=131072, sliding_window=4096)),
    "mixtral": Family(**_NO_BIAS_SLIDING, moe="mixtral",
                      defaults=dict(num_key_value_heads=8, max_position_embeddings=131072, rope_theta=1e6,
                                    num_local_experts=8, num_experts_per_tok=2)),
    # qwen2 with experts (every layer unless mlp_only_layers / decoder_sparse_step) and a gated shared expert
    "qwen2_moe": Family(attention_bias="qkv_bias", sliding="qwen-alternate", reads_layer_types=True, moe="qwen",
                        defaults=dict(**_QWEN_MOE, intermediate_size=5632, num_attention_heads=16,
                                      num_key_value_heads=16, max_window_layers=28, moe_intermediate_size=1408,
                                      shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4)),
    # qwen3 with experts, no shared one; use_sliding_window slides every layer
    "qwen3_moe": Family(qk_norm="head", sliding="qwen-all", moe="qwen",
                        defaults=dict(**_QWEN_MOE, intermediate_size=6144, num_attention_heads=32,
                                      num_key_value_heads=4, moe_intermediate_size=768, num_experts=128,
                                      num_experts_per_tok=8)),
    # multi-head latent attention; the first first_k_dense_replace layers dense, then routed + shared experts
    "deepseek_v3": Family(attention="mla", moe="deepseek", defaults=dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, num_hidden_layers=61, num_attention_heads=128,
        max_position_embeddings=4096, moe_intermediate_size=2048, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, first_k_dense_replace=3, kv_lora_rank=512, q_lora_rank=1536,
        qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, bos_token_id=0, eos_token_id=1)),
    # bias on q, k, v only; layers from max_window_layers on slide when use_sliding_window is set
    "qwen2": Family(attention_bias="qkv", sliding="qwen", reads_layer_types=True,
                    defaults=dict(num_key_value_heads=32, max_position_embeddings=32768, sliding_window=4096,
                                  max_window_layers=28)),
    "qwen3": Family(qk_norm="head", sliding="qwen", reads_layer_types=True,
                    defaults=dict(num_key_value_heads=32, head_dim=128, max_position_embeddings=32768,
                                  sliding_window=4096, max_window_layers=28)),
    # embeddings scaled by sqrt(hidden); head_dim 256 and tied embeddings unless the config says otherwise
    "gemma": Family(norm="rmsnorm_gemma", scaled_embeddings=True,
                    defaults=dict(num_key_value_heads=16, max_position_embeddings=8192, **_GEMMA_DEFAULTS)),
    "gemma2": Family(**_GEMMA, norm_layout="sandwich", softcapping="both", sliding="pattern", pattern=2,
                     reads_layer_types=True,
                     defaults=dict(num_key_value_heads=4, max_position_embeddings=8192, sliding_window=4096,
                                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **_GEMMA_DEFAULTS)),
    "gemma3_text": Family(**_GEMMA, norm_layout="sandwich", qk_norm="head", softcapping="final", sliding="pattern",
                          pattern=6, reads_pattern=True, reads_layer_types=True, local_rope=True,
                          renames=dict(rope_local_base_freq="local_rope_theta"),
                          defaults=dict(num_key_value_heads=4, max_position_embeddings=131072, sliding_window=4096,
                                        rope_theta=1e6, local_rope_theta=1e4, **_GEMMA_DEFAULTS)),
    # fused qkv_proj and gate_up_proj; Phi3Config accepts no rope scaling but longrope; its model never
    # applies embd_pdrop
    "phi3": Family(fused_qkv=True, fused_gate_up=True, **_NO_BIAS_SLIDING, rope_types=("default", "longrope"),
                   dropout_keys=dict(attention="attention_dropout", residual="resid_pdrop"),
                   defaults=dict(max_position_embeddings=4096, partial_rotary_factor=1.0)),
    # norms after attention and MLP only, q/k norms over the whole projection
    "olmo2": Family(**_OLMO2, defaults=dict(max_position_embeddings=2048)),
    "olmo3": Family(**_OLMO2, sliding="pattern", pattern=4, reads_layer_types=True, local_rope=True,
                    defaults=dict(max_position_embeddings=2048, sliding_window=4096, rope_theta=500000.0,
                                  local_rope_theta=500000.0)),
}
