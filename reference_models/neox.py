"""GPT-NeoX (Pythia) in one file: LayerNorms with biases, one fused query_key_value projection laid
out head by head, rotary positions on only part of each head, and a parallel residual where
attention and the MLP both read the block's input: x + attn(ln1(x)) + mlp(ln2(x)).

Module names are transformers 5's (`gpt_neox.layers.0.attention.query_key_value`, `lm_head`), so
state-dict keys and LoRA target_modules mean the same thing here and in peft. Checkpoints name
the head `embed_out` (transformers renames it on load and back on save; hub.py does the same).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._common import ACTIVATIONS, ATTN_IMPLS, CausalLM, KVCache, causal_attention, check_choice
from .tiled_mlp import TileableMLP
from .rope import Rope, apply_rotary, check_rope_parameters

__all__ = ["GPTNeoXConfig", "GPTNeoX"]


@dataclass
class GPTNeoXConfig:
    # Defaults are transformers' GPTNeoXConfig defaults (GPT-NeoX-20B sizes), field names too.
    vocab_size: int = 50432
    hidden_size: int = 6144
    num_hidden_layers: int = 44
    num_attention_heads: int = 64
    intermediate_size: int = 24576
    hidden_act: str = "gelu"
    rope_theta: float = 10000.0  # 4.x configs: rotary_emb_base
    partial_rotary_factor: float = 0.25  # 4.x configs: rotary_pct; the rotated share of each head
    rope_scaling: dict | None = None  # {"rope_type": "linear", "factor": 2.0, ...} (rope.py); None: plain RoPE
    attention_dropout: float = 0.0
    hidden_dropout: float = 0.0
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    attn_impl: str = "sdpa"  # "sdpa" | "eager" (eager materialises the (B, H, T, T) matrix)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        check_choice("hidden_act", self.hidden_act, ACTIVATIONS)
        check_choice("attn_impl", self.attn_impl, ATTN_IMPLS)
        check_rope_parameters(self.rope_parameters, self.head_dim, "rope_scaling")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rope_parameters(self) -> dict:
        return {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta,
                "partial_rotary_factor": self.partial_rotary_factor}

    @classmethod
    def from_hf_dict(cls, d: dict) -> GPTNeoXConfig:
        """A transformers config dict (5.x rope_parameters or 4.x rotary_pct / rotary_emb_base)."""
        params = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        params["rope_type"] = params.pop("type", params.get("rope_type", "default"))
        theta = params.pop("rope_theta", d.get("rotary_emb_base", 10000.0))
        partial = params.pop("partial_rotary_factor", d.get("rotary_pct", 0.25))
        if params["rope_type"] in ("llama3", "yarn", "longrope"):
            params.setdefault("original_max_position_embeddings", d.get("max_position_embeddings", 2048))
        keys = [k for k in cls.__dataclass_fields__ if k not in ("rope_theta", "partial_rotary_factor",
                                                                 "rope_scaling", "attn_impl")]
        return cls(**{k: d[k] for k in keys if k in d}, rope_theta=theta, partial_rotary_factor=partial,
                   rope_scaling=params if params["rope_type"] != "default" else None)

    def to_hf_dict(self) -> dict:
        """A transformers GPTNeoXConfig dict (config.json content)."""
        d = {k: getattr(self, k) for k in self.__dataclass_fields__
             if k not in ("rope_theta", "partial_rotary_factor", "rope_scaling", "attn_impl")}
        d.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"], rope_parameters=self.rope_parameters,
                 rotary_emb_base=self.rope_theta, rotary_pct=self.partial_rotary_factor)  # 4.x spellings too
        return d


class Attention(nn.Module):
    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.n_head, self.head_dim = config.num_attention_heads, config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        self.attention_dropout = config.attention_dropout
        self.attn_impl = config.attn_impl

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None):
        B, T, C = x.shape
        # the fused output is laid out per head as [q | k | v], not as [all q | all k | all v]
        qkv = self.query_key_value(x).view(B, T, self.n_head, 3 * self.head_dim).transpose(1, 2)  # (B, H, T, 3D)
        q, k, v = qkv.chunk(3, dim=-1)  # 3 x (B, H, T, D)
        q, k = apply_rotary(q, cos, sin, split=True), apply_rotary(k, cos, sin, split=True)  # the first dims turn
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, S, D), S = past + T
        y = causal_attention(q, k, v, scale=self.head_dim ** -0.5, impl=self.attn_impl,
                             dropout_p=self.attention_dropout if self.training else 0.0)
        return self.dense(y.transpose(1, 2).reshape(B, T, C))


class MLP(TileableMLP):
    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def per_token(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class Block(nn.Module):
    def __init__(self, config: GPTNeoXConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_dropout = nn.Dropout(config.hidden_dropout)
        self.post_mlp_dropout = nn.Dropout(config.hidden_dropout)
        self.attention = Attention(config)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None):
        attn = self.post_attention_dropout(self.attention(self.input_layernorm(x), cos, sin, self.layer, cache))
        if self.use_parallel_residual:  # both branches read x; summed in transformers' order
            return self.post_mlp_dropout(self.mlp(self.post_attention_layernorm(x))) + attn + x
        x = attn + x
        return self.post_mlp_dropout(self.mlp(self.post_attention_layernorm(x))) + x


class GPTNeoX(CausalLM):
    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.config = config
        self.gpt_neox = nn.Module()
        self.gpt_neox.embed_in = nn.Embedding(config.vocab_size, config.hidden_size)
        self.gpt_neox.emb_dropout = nn.Dropout(config.hidden_dropout)
        self.gpt_neox.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.gpt_neox.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rope = Rope(config.rope_parameters, config.head_dim, config.max_position_embeddings)
        self.init_weights()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.gpt_neox.embed_in

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` positions (generate, chunked prefill)."""
        c = self.config
        return KVCache(c.num_hidden_layers, batch, c.num_attention_heads, max_len, c.head_dim,
                       self.gpt_neox.embed_in.weight.device)

    def _hidden(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        x = self.gpt_neox.emb_dropout(self.gpt_neox.embed_in(idx))  # (B, T, C)
        cos, sin = self.rope.cos_sin(torch.arange(past, past + T, device=idx.device), x.dtype)  # (T, rotated D)
        for block in self.gpt_neox.layers:
            x = self._run_block(block, x, cos, sin, cache)
        if cache is not None:
            cache.length += T
        return self.gpt_neox.final_layer_norm(x)  # (B, T, C)
