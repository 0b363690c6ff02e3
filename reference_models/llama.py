"""LLaMA in one file, and the families that are LLaMA with changes (Mistral, Qwen2, Qwen3, Gemma 2,
Gemma 3, Phi-3, OLMo 2, and the mixture-of-experts Mixtral, Qwen2-MoE, Qwen3-MoE: what each one
changes is the table in families.py).

The model: token embeddings, then blocks of grouped-query attention with rotary positions (RoPE,
rope.py) and a gated MLP, each wrapped in RMSNorms and a residual add, then a final norm and the
lm_head. A family picks its norm, where the norms sit around each sublayer, q/k norms, fused
projections and a scaled embedding from its table row; sizes, RoPE scaling, sliding windows,
soft-capping and biases come from its config. A mixture-of-experts family puts a SparseMoE
(moe.py) in the MLP slot of its sparse layers; `forward(..., aux_loss=True)` also returns the
router's load-balancing loss.

Module names are transformers' (`model.layers.0.self_attn.q_proj`, Phi-3's `qkv_proj` ...), so
state-dict keys and LoRA target_modules mean the same thing here and in peft.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._common import ACTIVATIONS, ATTN_IMPLS, CausalLM, KVCache, causal_attention, check_choice
from .tiled_mlp import TileableMLP
from .families import FAMILIES, Family, check_moe, llama_hf_dict
from .moe import MoEConfig, SparseMoE, load_balancing_loss
from .norms import NORMS
from .rope import Rope, apply_rotary, check_rope_parameters

__all__ = ["LlamaConfig", "Llama"]

LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class LlamaConfig:
    # Defaults are transformers' LlamaConfig defaults (Llama-2-7B sizes), field names too.
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None means num_attention_heads (no GQA)
    head_dim: int | None = None  # None means hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor": 8.0, ...} (rope.py); None: plain RoPE
    partial_rotary_factor: float = 1.0  # Phi-3: rotate only this fraction of each head
    rope_local_base_freq: float | None = None  # Gemma 3: rope_theta of the sliding layers (plain RoPE)
    hidden_act: str = "silu"
    attention_bias: bool = False  # bias on q, k, v (and on o unless o_proj_bias says otherwise)
    o_proj_bias: bool | None = None  # None means attention_bias (Llama); Qwen2: q/k/v bias, no o bias
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    sliding_window: int | None = None  # a sliding layer's query sees only the last `sliding_window` keys
    layer_types: list[str] | None = None  # per layer "full_attention" | "sliding_attention";
    #   None: every layer slides when sliding_window is set (Mistral), else none does
    query_pre_attn_scalar: float | None = None  # Gemma: scores scaled by its -1/2 power, not head_dim's
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2/3: logits -> cap * tanh(logits / cap)
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    moe: MoEConfig | dict | None = None  # the experts of a mixture-of-experts family (moe.py); None: dense
    model_type: str = "llama"  # the family (families.py): its structure and the transformers class to_hf_dict targets
    attn_impl: str = "sdpa"  # "sdpa" | "eager" (eager materialises the (B, H, T, T) matrix)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                                 f"({self.num_attention_heads}) unless head_dim is given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.o_proj_bias is None:
            self.o_proj_bias = self.attention_bias
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be None or >= 1, got {self.sliding_window}")
        check_choice("hidden_act", self.hidden_act, ACTIVATIONS)
        check_choice("model_type", self.model_type, FAMILIES)
        check_choice("attn_impl", self.attn_impl, ATTN_IMPLS)
        self._check_layer_types()
        if self.partial_rotary_factor != 1.0 and not self.family.partial_rotary:
            raise ValueError(f"partial_rotary_factor {self.partial_rotary_factor}: model_type {self.model_type!r} "
                             "rotates whole heads (partial rotary: phi3)")
        check_rope_parameters(self.rope_parameters("full_attention"), self.head_dim, "rope_scaling")
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        check_moe(self)

    def _check_layer_types(self) -> None:
        if self.layer_types is None:
            kind = "sliding_attention" if self.sliding_window is not None else "full_attention"
            self.layer_types = [kind] * self.num_hidden_layers
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types needs one entry per layer ({self.num_hidden_layers}), "
                             f"got {len(self.layer_types)}")
        for kind in self.layer_types:
            check_choice("layer_types entry", kind, LAYER_TYPES)
        if "sliding_attention" in self.layer_types and self.sliding_window is None:
            raise ValueError("layer_types has sliding_attention layers but sliding_window is None")

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    def rope_parameters(self, layer_type: str) -> dict:
        """The RoPE of a layer type, as rope.Rope takes it."""
        if layer_type == "sliding_attention" and self.rope_local_base_freq is not None:
            return {"rope_type": "default", "rope_theta": self.rope_local_base_freq,
                    "partial_rotary_factor": self.partial_rotary_factor}
        return {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor}

    def to_hf_dict(self) -> dict:
        """A transformers config dict for model_type's class (families.py).

        Raises ValueError when the settings cannot be expressed by that transformers class
        (e.g. q/k/v bias without o bias is Qwen2's layout, not Llama's)."""
        return llama_hf_dict(self)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        c, family = config, config.family
        self.n_head, self.n_kv_head, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.fused = family.fused
        if self.fused:  # Phi-3: one projection, split into q, k, v
            self.qkv_proj = nn.Linear(c.hidden_size, q_out + 2 * kv_out, bias=False)
        else:
            self.q_proj = nn.Linear(c.hidden_size, q_out, bias=c.attention_bias)
            self.k_proj = nn.Linear(c.hidden_size, kv_out, bias=c.attention_bias)
            self.v_proj = nn.Linear(c.hidden_size, kv_out, bias=c.attention_bias)
        self.o_proj = nn.Linear(q_out, c.hidden_size, bias=c.o_proj_bias)
        self.split_rotary = family.partial_rotary
        self.qk_norm = family.qk_norm
        if self.qk_norm is not None:
            norm = NORMS[family.norm]
            self.q_norm = norm(c.head_dim if self.qk_norm == "head" else q_out, c.rms_norm_eps)
            self.k_norm = norm(c.head_dim if self.qk_norm == "head" else kv_out, c.rms_norm_eps)
        self.scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
        self.softcap = c.attn_logit_softcapping
        self.attention_dropout = c.attention_dropout
        self.sliding_window = c.sliding_window if c.layer_types[layer] == "sliding_attention" else None
        self.attn_impl = c.attn_impl

    def project(self, x):
        # x (B, T, C) -> q (B, T, H*D), k and v (B, T, H_kv*D)
        if self.fused:
            kv = self.n_kv_head * self.head_dim
            return self.qkv_proj(x).split([self.n_head * self.head_dim, kv, kv], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None):
        B, T, _ = x.shape
        q, k, v = self.project(x)
        if self.qk_norm == "proj":  # OLMo 2: over all heads at once, before the split
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_head, self.head_dim)
        k = k.view(B, T, self.n_kv_head, self.head_dim)
        if self.qk_norm == "head":  # Qwen3, Gemma 3: each head on its own
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D), (B, H_kv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        q, k = apply_rotary(q, cos, sin, self.split_rotary), apply_rotary(k, cos, sin, self.split_rotary)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H_kv, S, D), S = visible past + T
        y = causal_attention(q, k, v, scale=self.scale, impl=self.attn_impl,
                             dropout_p=self.attention_dropout if self.training else 0.0,
                             sliding_window=self.sliding_window, softcap=self.softcap)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(TileableMLP):
    def __init__(self, config: LlamaConfig, intermediate_size: int | None = None):
        super().__init__()
        c, inter = config, intermediate_size or config.intermediate_size  # Qwen2-MoE's shared expert has its own
        self.fused = c.family.fused
        if self.fused:  # Phi-3: gate and up in one projection
            self.gate_up_proj = nn.Linear(c.hidden_size, 2 * inter, bias=False)
        else:
            self.gate_proj = nn.Linear(c.hidden_size, inter, bias=c.mlp_bias)
            self.up_proj = nn.Linear(c.hidden_size, inter, bias=c.mlp_bias)
        self.down_proj = nn.Linear(inter, c.hidden_size, bias=c.mlp_bias)
        self.act = ACTIVATIONS[c.hidden_act]

    def per_token(self, x):
        # a gated MLP (SwiGLU, Shazeer 2020): act(gate) * up, then project down
        if self.fused:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # 2 x (B, T, I)
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm (Llama): x + attn(norm(x)), then x + mlp(norm(x))."""

    norms = ("input_layernorm", "post_attention_layernorm")

    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.layer_type = config.layer_types[layer]
        self.self_attn = Attention(config, layer)
        self.mlp = sparse_moe(config) if config.moe and config.moe.is_sparse(layer) else MLP(config)
        for name in self.norms:
            setattr(self, name, NORMS[config.family.norm](config.hidden_size, config.rms_norm_eps))

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, self.layer, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class SandwichBlock(Block):
    """Gemma: each sublayer between two norms, x + norm(f(norm(x)))."""

    norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")

    def forward(self, x, cos, sin, cache=None):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, self.layer, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class PostNormBlock(Block):
    """OLMo 2: no norm on the way in; each sublayer's output is normed, x + norm(f(x))."""

    norms = ("post_attention_layernorm", "post_feedforward_layernorm")

    def forward(self, x, cos, sin, cache=None):
        x = x + self.post_attention_layernorm(self.self_attn(x, cos, sin, self.layer, cache))
        return x + self.post_feedforward_layernorm(self.mlp(x))


def sparse_moe(config: LlamaConfig) -> SparseMoE:
    moe = config.moe
    shared = MLP(config, moe.shared_expert_intermediate_size) if moe.shared_expert_intermediate_size else None
    return SparseMoE(config.hidden_size, moe, ACTIVATIONS[config.hidden_act],
                     weights_fp32=config.family.moe == "mixtral", shared_expert=shared)


BLOCKS = {"pre": Block, "sandwich": SandwichBlock, "post": PostNormBlock}


class Llama(CausalLM):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        family = config.family
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(BLOCKS[family.residual](config, i) for i in range(config.num_hidden_layers))
        self.model.norm = NORMS[family.norm](config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.embed_scale = config.hidden_size ** 0.5 if family.scaled_embedding else None
        # one RoPE per layer type (Gemma 3's sliding layers have their own base)
        self.rope = {kind: Rope(config.rope_parameters(kind), config.head_dim, config.max_position_embeddings)
                     for kind in sorted(set(config.layer_types))}
        self.init_weights()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    @property
    def cache_refresh_length(self) -> int | None:
        scaling = self.config.rope_scaling or {}
        if self.config.family.longrope_refresh and scaling.get("rope_type") == "longrope":
            return scaling["original_max_position_embeddings"]
        return None

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` positions (generate, chunked prefill)."""
        c = self.config
        windows = [block.self_attn.sliding_window for block in self.model.layers]
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim,
                       self.model.embed_tokens.weight.device, sliding_windows=windows)

    @property
    def logit_softcap(self) -> float | None:  # Gemma 2/3's final_logit_softcapping
        return self.config.final_logit_softcapping

    def _hidden(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        x = self.model.embed_tokens(idx)  # (B, T, C)
        if self.embed_scale is not None:  # Gemma: sqrt(C) rounded to fp32, then to the compute dtype (transformers')
            x = x * torch.tensor(self.embed_scale).to(x.dtype)
        positions = torch.arange(past, past + T, device=idx.device)
        rope_dtype = torch.float32 if self.config.family.rope_in_fp32 else x.dtype
        rope = {kind: r.cos_sin(positions, rope_dtype) for kind, r in self.rope.items()}  # each (T, rotated D) x 2
        for block in self.model.layers:
            x = self._run_block(block, x, *rope[block.layer_type], cache)
        if cache is not None:
            cache.length += T
        return self.model.norm(x)  # (B, T, C)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                aux_loss: bool = False):
        """idx (B, T) -> logits (B, T, V); with targets: (logits, loss), or (None, loss) with the chunked
        loss (set_loss). aux_loss=True (mixture-of-experts families) also returns the router's
        load-balancing loss over this forward's sparse layers, and adds router_aux_loss_coef times it
        to the loss, as transformers does with output_router_logits: (logits, aux) or (logits, loss, aux)."""
        out = super().forward(idx, targets, kv_cache)
        if not aux_loss:
            return out
        moe = self.config.moe
        if moe is None:
            raise ValueError(f"aux_loss=True needs a mixture-of-experts model; model_type {self.config.model_type!r} "
                             "has no router (mixtral, qwen2_moe, qwen3_moe have)")
        logits = [block.mlp.router_logits for block in self.model.layers if isinstance(block.mlp, SparseMoE)]
        aux = load_balancing_loss(logits, moe.num_experts, moe.num_experts_per_tok)
        if targets is None:
            return out, aux
        return out[0], out[1] + moe.router_aux_loss_coef * aux, aux
