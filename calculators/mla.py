"""DeepSeek-V3's multi-head latent attention (MLA): its projections and what its KV cache holds.

  queries   h -> q_a_proj -> q_lora_rank -> RMSNorm -> q_b_proj -> H x (qk_nope + qk_rope)
            (q_lora_rank None: one q_proj, h -> H x (qk_nope + qk_rope))
  latent    h -> kv_a_proj_with_mqa -> kv_lora_rank (the latent) + qk_rope (one key part all heads share)
  keys, values   latent -> RMSNorm -> kv_b_proj -> H x (qk_nope + v_head_dim); each head's key is its
            qk_nope part and the shared rotated qk_rope part
  output    H x v_head_dim -> o_proj -> h
q_a_proj, kv_a_proj_with_mqa and o_proj carry a bias when attention_bias is set.

The cache keeps, per layer and position, the normed latent and the rotated shared key part:
kv_lora_rank + qk_rope_head_dim values (576 for DeepSeek-V3, against H x (qk_nope + qk_rope +
v_head_dim) = 128 x 320 = 40,960 for full keys and values). transformers 5.24's DeepseekV3Attention
caches exactly these two tensors and expands keys and values from them at every step.
"""
from __future__ import annotations

from .spec import ModelSpec

__all__ = ["mla_sizes", "mla_projections", "mla_norms", "mla_cache_elements"]


def mla_sizes(r) -> dict:
    """ModelSpec's MLA fields from a config read through models' reader `r`. transformers' config
    class sets head_dim to qk_rope_head_dim (the rotated part), which is what rotary_dim reads."""
    q_rank = r.get("q_lora_rank")
    rope = r.positive_int("qk_rope_head_dim")
    return dict(q_lora_rank=None if q_rank is None else r.positive_int("q_lora_rank"),
                kv_lora_rank=r.positive_int("kv_lora_rank"), qk_nope_head_dim=r.positive_int("qk_nope_head_dim"),
                qk_rope_head_dim=rope, v_head_dim=r.positive_int("v_head_dim"), head_dim=rope)


def mla_projections(spec: ModelSpec) -> list[tuple[str, int, int, bool]]:
    """(name within self_attn, in, out, bias) of one layer's projections, in the order they run."""
    h, heads, bias = spec.hidden_size, spec.num_heads, spec.o_bias
    q_out = heads * (spec.qk_nope_head_dim + spec.qk_rope_head_dim)
    if spec.q_lora_rank is None:
        queries = [("q_proj", h, q_out, False)]
    else:
        queries = [("q_a_proj", h, spec.q_lora_rank, bias), ("q_b_proj", spec.q_lora_rank, q_out, False)]
    return queries + [("kv_a_proj_with_mqa", h, spec.kv_lora_rank + spec.qk_rope_head_dim, bias),
                      ("kv_b_proj", spec.kv_lora_rank, heads * (spec.qk_nope_head_dim + spec.v_head_dim), False),
                      ("o_proj", heads * spec.v_head_dim, h, bias)]


def mla_norms(spec: ModelSpec) -> list[tuple[str, int]]:
    """(name within self_attn, width) of the RMSNorms on the query and key-value latents."""
    norms = [] if spec.q_lora_rank is None else [("q_a_layernorm", spec.q_lora_rank)]
    return norms + [("kv_a_layernorm", spec.kv_lora_rank)]


def mla_cache_elements(spec: ModelSpec) -> int:
    """Values one layer caches per position and sequence: the latent and the shared rotated key part."""
    return spec.kv_lora_rank + spec.qk_rope_head_dim
