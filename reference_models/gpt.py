"""GPT-2 in one file, in the spirit of nanoGPT: learned positions, pre-LayerNorm blocks, a fused
qkv projection, a GELU MLP, biases everywhere, and an lm_head tied to the token embedding.

Module names are transformers' (`transformer.h.0.attn.c_attn`, ...) so that state-dict keys and
LoRA target_modules mean the same thing here and in peft. transformers stores GPT-2's
projections as Conv1D with weight (in, out); here they are plain nn.Linear with weight
(out, in), and checkpoint_keys.py transposes on load and save.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from ._common import ACTIVATIONS, ATTN_IMPLS, CausalLM, KVCache, causal_attention, check_choice
from .tiled_mlp import TileableMLP

__all__ = ["GPTConfig", "GPT"]


@dataclass
class GPTConfig:
    # Defaults are transformers' GPT2Config defaults (the 124M "gpt2" model), field names too.
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # MLP width; None means 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    embd_pdrop: float = 0.1
    resid_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 50256
    eos_token_id: int | None = 50256
    attn_impl: str = "sdpa"  # "sdpa" | "eager" (eager materialises the (B, H, T, T) matrix)

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        check_choice("activation_function", self.activation_function, ACTIVATIONS)
        check_choice("attn_impl", self.attn_impl, ATTN_IMPLS)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    def to_hf_dict(self) -> dict:
        """A transformers GPT2Config dict (config.json content)."""
        d = {k: v for k, v in dataclasses.asdict(self).items() if k != "attn_impl"}
        d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
        return d


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.attn_impl = config.attn_impl

    def forward(self, x: torch.Tensor, layer: int, cache: KVCache | None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, H, S, D), S = past + T
        y = causal_attention(q, k, v, scale=self.head_dim ** -0.5, impl=self.attn_impl,
                             dropout_p=self.attn_pdrop if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(TileableMLP):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.inner_dim)
        self.act = ACTIVATIONS[config.activation_function]
        self.c_proj = nn.Linear(config.inner_dim, config.n_embd)
        self.dropout = nn.Dropout(config.resid_pdrop)

    def per_token(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), self.layer, cache)
        return x + self.mlp(self.ln_2(x))


class GPT(CausalLM):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.embd_pdrop),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        # GPT-2's residual projections start smaller, scaled by 1/sqrt(2 * n_layer) (GPT-2 paper)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        self.tie_weights()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def max_len(self) -> int:
        return self.config.n_positions

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty KV cache for `batch` sequences of up to `max_len` positions (generate, chunked prefill)."""
        c = self.config
        w = self.transformer.wte.weight
        return KVCache(c.n_layer, batch, c.n_head, max_len, c.head_dim, w.device)

    def _hidden(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.n_positions:
            raise ValueError(f"sequence length {past + T} exceeds n_positions={self.config.n_positions}")
        pos = torch.arange(past, past + T, device=idx.device)  # (T,)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        for block in self.transformer.h:
            x = self._run_block(block, x, cache)
        if cache is not None:
            cache.length += T
        return self.transformer.ln_f(x)  # (B, T, C)
