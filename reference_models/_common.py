"""Pieces both model families share: causal attention (SDPA or eager), the KV cache, the loss
switch (loss.py computes it), checkpointing, the MLP tiling switch (tiled_mlp.py), activations and
sampling. Kept in one small file so that gpt.py and llama.py each read as
"the model", with the plumbing written once.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .loss import DEFAULT_LOSS_CHUNK, LOSSES, check_loss_chunk, chunked_cross_entropy, lm_loss
from .tiled_mlp import TileableMLP, check_mlp_tile

ATTN_IMPLS = ("sdpa", "eager")

# Hugging Face activation names -> functions. "gelu_new" is the tanh approximation GPT-2 was
# trained with; transformers writes it out as separate ops, F.gelu(approximate="tanh") fuses them
# (same formula, last-bit differences only).
ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {sorted(allowed)}, got {value!r}")


class KVCache:
    """Keys and values of every layer, kept as transformers' DynamicCache keeps them.

    A full-attention layer keeps every position, in a buffer preallocated for `max_len` positions.
    A sliding-window layer (window w) keeps only its last w - 1 positions, the most that a later
    query can see besides its own (transformers' DynamicSlidingWindowLayer): its memory stops
    growing at the window. `length` is how many positions have gone through the model; a forward
    pass with the cache adds its T new positions to every layer and then advances `length`.
    nbytes() is what the tensors' storage holds (calculators.kv_cache_bytes counts the same).
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int, device,
                 sliding_windows: list[int | None] | None = None):
        self.shape = (batch, n_kv_head, max_len, head_dim)
        self.device = device
        self.k: list[torch.Tensor | None] = [None] * n_layer
        self.v: list[torch.Tensor | None] = [None] * n_layer
        self.windows = list(sliding_windows) if sliding_windows is not None else [None] * n_layer
        if len(self.windows) != n_layer:
            raise ValueError(f"sliding_windows needs one entry per layer ({n_layer}), got {len(self.windows)}")
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """k, v (B, H_kv, T, D) of the new positions -> the keys and values attention sees now:
        every position so far (full layer) or the kept w - 1 and the new T (sliding layer)."""
        if self.windows[layer] is not None:
            return self._update_sliding(layer, k, v, self.windows[layer] - 1)
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, asked to write up to {end}")
        if self.k[layer] is None:  # allocated on first use, in the dtype attention runs in (autocast)
            self.k[layer] = torch.zeros(self.shape, dtype=k.dtype, device=self.device)
            self.v[layer] = torch.zeros(self.shape, dtype=v.dtype, device=self.device)
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def _update_sliding(self, layer: int, k, v, keep: int):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        else:  # a copy, as transformers' concatenation with its empty cache (k, v may view a fused projection)
            k, v = k.clone(), v.clone()
        first = max(k.shape[2] - keep, 0)
        # views, as transformers keeps them: their storage is this call's concatenation, so a sliding
        # layer holds w positions after a decode step (and a whole long prompt until the next step)
        self.k[layer], self.v[layer] = k[:, :, first:], v[:, :, first:]
        return k, v

    def nbytes(self) -> int:
        """Bytes the cache holds now (a full layer's preallocated buffer counts whole)."""
        return sum(t.untyped_storage().nbytes() for t in self.k + self.v if t is not None)


def causal_mask(t_q: int, t_kv: int, device, sliding_window: int | None = None) -> torch.Tensor:
    """(t_q, t_kv) bool, True where query i (at absolute position t_kv - t_q + i) may attend key j.

    Sliding window as transformers/Mistral define it: key j is visible when j > i - window.
    """
    q_pos = torch.arange(t_kv - t_q, t_kv, device=device)[:, None]
    k_pos = torch.arange(t_kv, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask = mask & (k_pos > q_pos - sliding_window)
    return mask


def causal_attention(q, k, v, *, scale: float, impl: str, dropout_p: float = 0.0,
                     sliding_window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Causal self-attention with grouped-query support.

    q: (B, H, T, D); k, v: (B, H_kv, S, D) with S >= T (S > T when a KV cache holds the past; the
    last query is always at the last key's position); returns (B, H, T, D). "eager" materialises
    the (B, H, T, S) attention matrix, softmax in fp32 like transformers' eager path; "sdpa" lets
    F.scaled_dot_product_attention pick a kernel. `softcap` (Gemma 2) squashes the scores to
    softcap * tanh(scores / softcap) before the mask; SDPA has no such step, so soft-capped
    attention always takes the eager path (as transformers runs Gemma 2).
    """
    t, s = q.shape[2], k.shape[2]
    n_rep = q.shape[1] // k.shape[1]
    windowed = sliding_window is not None and s > sliding_window
    # Square and unwindowed: SDPA's own causal flag (fastest kernels). One query against the
    # cache: it sees every key, no mask. Otherwise an explicit boolean mask.
    mask = None
    if windowed or (t > 1 and s != t):
        mask = causal_mask(t, s, q.device, sliding_window if windowed else None)
    if impl == "sdpa" and softcap is None:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=t > 1,
                                                  scale=scale, enable_gqa=n_rep > 1)
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    att = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if softcap is not None:
        att = torch.tanh(att / softcap) * softcap
    if mask is None and t > 1:
        mask = causal_mask(t, s, q.device)
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = F.softmax(att, dim=-1, dtype=torch.float32).to(q.dtype)
    att = F.dropout(att, p=dropout_p, training=dropout_p > 0)
    return att @ v  # (B, H, T, D)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # (B, H_kv, S, D) -> (B, H_kv * n_rep, S, D): each kv head serves n_rep consecutive q heads
    if n_rep == 1:
        return x
    b, h_kv, s, d = x.shape
    return x[:, :, None].expand(b, h_kv, n_rep, s, d).reshape(b, h_kv * n_rep, s, d)


def sample_next(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    # logits: (B, V) of the last position -> (B, 1) next token ids
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)


def check_generate_args(idx, max_new_tokens, temperature, top_k) -> None:
    if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must be a (batch, seq) tensor of token ids with seq >= 1, got "
                         f"{tuple(idx.shape) if isinstance(idx, torch.Tensor) else type(idx).__name__}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 means greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")


class CausalLM(nn.Module):
    """What every model shares around its blocks: weight init and tying, the checkpointing and loss
    switches, generation.

    A subclass defines `_hidden(idx, cache) -> (B, T, C)` (the final norm's output),
    `new_cache(batch, max_len)`, `get_input_embeddings()`, an `lm_head` and a `config` with
    tie_word_embeddings; `logit_softcap` when it squashes its logits (Gemma).
    """

    gradient_checkpointing = False
    activation_offload = None  # checkpointing's offload (set_gradient_checkpointing); None: inputs stay
    loss = "full"  # "full" | "chunked" (set_loss)
    loss_chunk = DEFAULT_LOSS_CHUNK
    mlp_tile: int | None = None  # tokens per tile of every block's MLP (set_mlp_tiling); None: whole
    logit_softcap: float | None = None  # logits -> cap * tanh(logits / cap) when set
    max_len: int | None = None  # the longest sequence it can position (None: RoPE has no hard limit)
    cache_refresh_length: int | None = None  # generate() rebuilds the KV cache when it holds this many positions

    def get_input_embeddings(self) -> nn.Embedding:
        raise NotImplementedError

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def init_weights(self) -> None:
        """Linear and embedding weights ~ N(0, 0.02), biases 0 (transformers' initializer_range), then tie."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
        self.tie_weights()

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.get_input_embeddings().weight  # (V, C), one tensor

    def set_gradient_checkpointing(self, enabled: bool = True, offload=None) -> None:
        """Recompute each block in backward instead of keeping its activations (per block,
        torch.utils.checkpoint with use_reentrant=False).

        `offload`: where each block's checkpointed input waits for backward, e.g.
        minilora.train.ActivationOffload (pinned host memory): any object whose `saving(layer, x)`
        is the context (saved_tensors_hooks) in force while block `layer` checkpoints its input x."""
        if offload is not None and not enabled:
            raise ValueError("activation offload needs gradient checkpointing: without it every block keeps all "
                             "its activations, not just its input; call set_gradient_checkpointing(True, offload)")
        if offload is not None and not callable(getattr(offload, "saving", None)):
            raise ValueError(f"offload must have a saving(layer, x) method, got {type(offload).__name__}")
        self.gradient_checkpointing = bool(enabled)
        self.activation_offload = offload

    def set_loss(self, loss: str = "full", chunk_size: int | None = None) -> None:
        """How forward(idx, targets) computes the loss: "full" (the (B, T, V) logits, then the loss) or
        "chunked" (loss.chunked_cross_entropy over `chunk_size` tokens at a time, default
        DEFAULT_LOSS_CHUNK; forward then returns (None, loss): the logits never exist)."""
        check_choice("loss", loss, LOSSES)
        chunk_size = DEFAULT_LOSS_CHUNK if chunk_size is None else chunk_size
        check_loss_chunk(chunk_size, name="chunk_size")
        self.loss, self.loss_chunk = loss, chunk_size

    def set_mlp_tiling(self, tile: int | None) -> None:
        """Run every block's MLP over tiles of `tile` tokens (tiled_mlp.py): in training it keeps only
        its input and backward recomputes one tile at a time; the same values (to the rounding its
        docstring states), less memory. None: the whole sequence at once. Works with or without
        checkpointing; a mixture-of-experts layer is refused (its router sees every token at once)."""
        if tile is not None:
            check_mlp_tile(tile, name="tile")
        blocks = [m for m in self.modules() if isinstance(getattr(m, "mlp", None), nn.Module)]
        for i, block in enumerate(blocks):
            if not isinstance(block.mlp, TileableMLP):
                raise ValueError(f"MLP tiling runs dense MLPs; layer {i}'s mlp is a {type(block.mlp).__name__}, "
                                 "whose router and experts are not tiled: leave tile None for this model")
        for block in blocks:
            block.mlp.tile = tile
        self.mlp_tile = tile

    def _run_block(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled() and args[-1] is None:
            offload = self.activation_offload
            with offload.saving(block.layer, args[0]) if offload is not None else contextlib.nullcontext():
                return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)  # (B, T, V)
        cap = self.logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def _forward(self, idx: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        return self._logits(self._hidden(idx, cache))  # (B, T, V)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None):
        """idx: (B, T) token ids -> logits (B, T, V); with targets (B, T): (logits, loss), or
        (None, loss) with the chunked loss (set_loss)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, seq) token ids, got shape {tuple(idx.shape)}")
        if targets is None or self.loss == "full":
            logits = self._forward(idx, kv_cache)
            return logits if targets is None else (logits, lm_loss(logits, targets))
        head = self.lm_head
        if not isinstance(head, nn.Linear) or head.bias is not None:
            raise ValueError(f"the chunked loss multiplies by lm_head.weight itself, so lm_head must be a bias-free "
                             f"nn.Linear, got {type(head).__name__}; use set_loss('full') with this head")
        hidden = self._hidden(idx, kv_cache)  # (B, T, C)
        return None, chunked_cross_entropy(hidden, head.weight, targets, self.loss_chunk, self.logit_softcap)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True) -> torch.Tensor:
        """Append max_new_tokens sampled tokens to idx (B, T) -> (B, T + max_new_tokens).

        temperature=0 is greedy (argmax). The KV cache keeps every layer's keys and values so
        each new token costs one position of compute; use_cache=False re-runs the whole
        sequence each step (same tokens, for checking). Call model.eval() first: dropout stays
        active in train mode, as in any nn.Module.
        """
        check_generate_args(idx, max_new_tokens, temperature, top_k)
        total = idx.shape[1] + max_new_tokens
        if self.max_len is not None and total > self.max_len:
            raise ValueError(f"prompt ({idx.shape[1]}) + max_new_tokens ({max_new_tokens}) = {total} "
                             f"exceeds the {self.max_len} positions this model has")
        # the last sampled token is never fed back: the cache needs total - 1 positions
        cache = self.new_cache(idx.shape[0], total - 1) if use_cache else None
        step_input = idx
        for _ in range(max_new_tokens):
            if cache is not None and cache.length == self.cache_refresh_length:
                # Phi-3's longrope turns to its long factors past this length: the keys cached with
                # the short ones are recomputed, as transformers' Phi-3 generate does
                cache, step_input = self.new_cache(idx.shape[0], total - 1), idx
            logits = self._forward(step_input if use_cache else idx, cache)
            nxt = sample_next(logits[:, -1, :], temperature, top_k)  # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
            step_input = nxt
        return idx
