"""LLaMA in one file: RMSNorm, rotary positions (RoPE) with rope_theta, a SwiGLU MLP,
grouped-query attention (num_key_value_heads), optional q/k/v biases (Qwen2), optional head_dim,
tied or untied embeddings. Mistral and Qwen2 checkpoints are this architecture with other
defaults (see hub.from_hf_config).

Module names are transformers' (`model.layers.0.self_attn.q_proj`, ...), so state-dict keys
and LoRA target_modules mean the same thing here and in peft.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._common import ACTIVATIONS, ATTN_IMPLS, CausalLM, KVCache, causal_attention, check_choice

__all__ = ["LlamaConfig", "Llama"]

MODEL_TYPES = ("llama", "mistral", "qwen2")


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
    hidden_act: str = "silu"
    attention_bias: bool = False  # bias on q, k, v (and on o unless o_proj_bias says otherwise)
    o_proj_bias: bool | None = None  # None means attention_bias (Llama); Qwen2: q/k/v bias, no o bias
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    sliding_window: int | None = None  # Mistral: each query sees only the last `sliding_window` keys
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    pad_token_id: int | None = None
    model_type: str = "llama"  # which transformers class to_hf_dict targets: llama | mistral | qwen2
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
        check_choice("model_type", self.model_type, MODEL_TYPES)
        check_choice("attn_impl", self.attn_impl, ATTN_IMPLS)

    def to_hf_dict(self) -> dict:
        """A transformers config dict for model_type (llama, mistral or qwen2).

        Raises ValueError when the settings cannot be expressed by that transformers class
        (e.g. q/k/v bias without o bias is Qwen2's layout, not Llama's).
        """
        sizes = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings, rms_norm_eps=self.rms_norm_eps,
            hidden_act=self.hidden_act, attention_dropout=self.attention_dropout,
            tie_word_embeddings=self.tie_word_embeddings, bos_token_id=self.bos_token_id,
            eos_token_id=self.eos_token_id, pad_token_id=self.pad_token_id,
            # both spellings: transformers >= 5 reads rope_parameters, 4.x reads rope_theta
            rope_theta=self.rope_theta,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta},
        )
        bias = (self.attention_bias, self.o_proj_bias, self.mlp_bias)
        layouts = {"llama": [(b, b, m) for b in (False, True) for m in (False, True)],
                   "mistral": [(False, False, False)], "qwen2": [(True, False, False)]}
        if bias not in layouts[self.model_type]:
            raise ValueError(
                f"model_type {self.model_type!r} cannot express attention_bias={bias[0]}, o_proj_bias={bias[1]}, "
                f"mlp_bias={bias[2]}; allowed (attention_bias, o_proj_bias, mlp_bias): {layouts[self.model_type]}")
        if self.model_type == "llama":
            if self.sliding_window is not None:
                raise ValueError("model_type 'llama' has no sliding_window; use model_type 'mistral', "
                                 f"got sliding_window={self.sliding_window}")
            sizes.update(attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)
        elif self.model_type == "mistral":
            sizes.update(sliding_window=self.sliding_window)
        else:
            sizes.update(use_sliding_window=self.sliding_window is not None, sliding_window=self.sliding_window,
                         max_window_layers=0 if self.sliding_window is not None else self.num_hidden_layers)
        arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
        return dict(model_type=self.model_type, architectures=[arch[self.model_type]], **sizes)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 then cast back before the weight, exactly as transformers does, so
        # bf16 logits agree too.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    # (head_dim/2,) fp32, the same expression and dtype transformers uses, so angles agree bitwise
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device="cpu") / head_dim))


def rope_cos_sin(inv_freq, positions, dtype):
    # positions (T,) -> cos, sin (T, head_dim), angles in fp32, then cast to the compute dtype
    freqs = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]  # (T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, D): transformers' "half split" layout
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    # RoPE rotates pairs (x[i], x[i + D/2]) (transformers' convention, not interleaved pairs)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        c = config
        self.n_head, self.n_kv_head, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=c.o_proj_bias)
        self.attention_dropout = c.attention_dropout
        self.sliding_window = c.sliding_window
        self.attn_impl = c.attn_impl

    def forward(self, x, cos, sin, layer: int, cache: KVCache | None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H_kv, S, D), S = past + T
        y = causal_attention(q, k, v, scale=self.head_dim ** -0.5, impl=self.attn_impl,
                             dropout_p=self.attention_dropout if self.training else 0.0,
                             sliding_window=self.sliding_window)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        c = config
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)
        self.act = ACTIVATIONS[c.hidden_act]

    def forward(self, x):
        # SwiGLU (Shazeer 2020): act(gate) * up, then project down
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, self.layer, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(CausalLM):
    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.model.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.model.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # A plain attribute, not a buffer: model.to(bfloat16) must not round the frequencies
        # (and it is not part of the checkpoint).
        self.inv_freq = rope_inv_freq(config.head_dim, config.rope_theta)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight  # (V, C), one tensor

    @property
    def max_len(self) -> None:
        return None  # RoPE has no hard limit; max_position_embeddings is what it was trained on

    def _new_cache(self, batch: int, max_len: int) -> KVCache:
        c = self.config
        w = self.model.embed_tokens.weight
        return KVCache(c.num_hidden_layers, batch, c.num_key_value_heads, max_len, c.head_dim, w.device)

    def _forward(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        x = self.model.embed_tokens(idx)  # (B, T, C)
        cos, sin = rope_cos_sin(self.inv_freq, torch.arange(past, past + T, device=idx.device), x.dtype)
        for block in self.model.layers:
            x = self._run_block(block, x, cos, sin, cache)
        if cache is not None:
            cache.length += T
        return self.lm_head(self.model.norm(x))  # (B, T, V)
