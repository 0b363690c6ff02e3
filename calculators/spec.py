"""ModelSpec: one model's sizes and the features of its family that parameter counts, memory
terms and the KV cache depend on.

A ModelSpec is what `models.model_spec` reads out of a config.json (families.py says how each
model_type fills in what a config leaves out). Everything downstream reads these fields, never the
config dict, so each term can say which feature it depends on:

  sizes        vocab_size, hidden_size, num_layers, num_heads, num_kv_heads (GQA), head_dim (explicit
               where the config gives one: Mistral Nemo, Gemma, Qwen3), intermediate_size
  attention    layer_types (per layer "full_attention" | "sliding_attention", transformers' names)
               and sliding_window (how many keys a sliding layer sees, the query's own included);
               qk_norm; fused_qkv; attention soft-capping
  blocks       norm (Llama's, OLMo's or Gemma's RMSNorm, or LayerNorm with a bias), norm_layout, parallel_residual,
               gated_mlp / fused_gate_up, activation, biases
  positions    rotary_dim (partial rotary), rope_type, rope_theta, local_rope_theta, rope_in_fp32
  experts      num_experts routed experts of moe_intermediate_size, experts_per_token per token, on
               every layer but dense_layers; a shared expert (Qwen2-MoE, with its gate; DeepSeek-V3)
               every token also passes (moe.py)
  MLA          DeepSeek-V3's multi-head latent attention: q_lora_rank, kv_lora_rank, qk_nope_head_dim,
               qk_rope_head_dim, v_head_dim (mla.py)
  training     attention_dropout, residual_dropout, embedding_dropout (config.json's, 0 where the
               family has no such dropout); use_cache (transformers keeps a DynamicCache in training too)
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ModelSpec", "FULL", "SLIDING"]

FULL, SLIDING = "full_attention", "sliding_attention"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str                 # transformers' model_type (a row of families.FAMILIES)
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
    num_experts: int = 0        # routed experts per sparse layer (0 = dense MLP everywhere)
    experts_per_token: int = 0
    moe_intermediate_size: int = 0  # each routed expert's I (Mixtral: intermediate_size)
    shared_expert_size: int = 0     # I of the shared MLP every token also passes (0: none)
    shared_expert_gate: bool = False  # qwen2_moe: sigmoid(Linear(h -> 1)) scales the shared expert
    dense_layers: tuple = ()        # layers that keep a dense MLP of intermediate_size
    norm_topk_prob: bool = False    # the k routing weights renormalised to sum to 1 (Mixtral: always)
    # Multi-head latent attention (deepseek_v3): queries through a rank-q_lora_rank bottleneck (None:
    # one q_proj), keys and values from a kv_lora_rank latent plus a shared qk_rope_head_dim key part
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Attention. A sliding layer attends to the last `sliding_window` positions (itself included);
    # transformers' DynamicCache keeps at most that many of its keys and values (kv_cache.py).
    layer_types: tuple = ()     # one of FULL / SLIDING per layer
    sliding_window: int | None = None
    qk_norm: str = "none"       # "none" | "head": RMSNorm(head_dim) shared by the heads (qwen3, gemma3)
                                # | "projection": RMSNorm over all heads at once (olmo2: q_size, kv_size)
    fused_qkv: bool = False     # one projection for q, k, v (phi3 qkv_proj, gpt_neox query_key_value)
    attn_softcap: float | None = None   # gemma2: tanh soft-capping of the attention logits
    final_softcap: float | None = None  # gemma2: tanh soft-capping of the output logits
    # Blocks.
    norm: str = "rmsnorm"       # "rmsnorm": Llama's, weight * normed.to(dtype) | "rmsnorm_olmo": (weight * normed)
                                # .to(dtype) | "rmsnorm_gemma": (normed * (1 + weight)).to(dtype), in fp32 |
                                # "layernorm" (weight and bias); the three RMSNorms have the same parameters
    norm_layout: str = "pre"    # "pre": norm before attention and MLP | "sandwich": also after each
                                # (gemma2/3, four norms) | "post": after each only (olmo2)
    parallel_residual: bool = False  # gpt_neox: x + attn(ln1(x)) + mlp(ln2(x)) in one step
    gated_mlp: bool = True      # SwiGLU / GeGLU: three projections (two fused in phi3); else up/down
    fused_gate_up: bool = False  # phi3 gate_up_proj (h -> 2I)
    activation: str = "silu"    # the config's hidden_act, as transformers names it
    scaled_embeddings: bool = False  # gemma: embeddings times sqrt(hidden_size)
    # Positions: rotary embeddings on the first rotary_dim dims of each head (0: learned, gpt2).
    rotary_dim: int = 0
    rope_type: str | None = None        # full-attention layers' rope_type (default, linear, dynamic, ...)
    rope_theta: float | None = None
    local_rope_theta: float | None = None  # gemma3 / olmo3: sliding layers' own cos/sin base
    rope_in_fp32: bool = False  # olmo2 / olmo3: cos/sin stay fp32, q and k are rotated in fp32 and cast back
    # Training: dropout probabilities (families.Family.dropout_keys says which config key is which).
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    embedding_dropout: float = 0.0
    use_cache: bool = True      # config.use_cache: transformers' forward fills a DynamicCache unless it is off

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_sparse(self, layer: int) -> bool:
        """Does decoder layer `layer` route to experts (else it has a dense MLP)?"""
        return self.num_experts > 0 and layer not in self.dense_layers

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def sliding_layers(self) -> int:
        return sum(t == SLIDING for t in self.layer_types)
