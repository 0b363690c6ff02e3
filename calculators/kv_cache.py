"""Inference KV cache: the keys and values each attention layer keeps, honouring GQA, an explicit
head_dim and sliding windows.

Per layer and cached position the cache holds one key and one value vector per KV head:
2 * num_kv_heads * head_dim elements (GQA caches num_kv_heads, not num_heads; head_dim is the
config's own where it has one, e.g. Gemma's 256 or Mistral Nemo's 128 with hidden 5120 / 32 heads).

What transformers' DynamicCache (cache_utils.py, 5.24) holds, measured in tests/test_calc_kv_cache.py:
  - a full-attention layer (DynamicLayer) keeps every position: `positions`;
  - a sliding-window layer (DynamicSlidingWindowLayer) keeps the last window - 1 positions as a
    view into the concatenation of those and the step's new keys, so during generation, one token
    per step, its storage holds min(positions, window) positions: a sliding layer caches at most its
    window. Right after a prefill longer than the window the view still pins the whole prompt's
    keys (positions, not window) until the first decode step replaces it.
Multi-head latent attention (DeepSeek-V3, mla.py) caches, per layer and position, one compressed
latent of kv_lora_rank values and the rotated key part all heads share, qk_rope_head_dim values, not
per-head keys and values: 576 values instead of 2 x 128 heads x 192, which is what transformers'
DeepseekV3Attention stores in the same DynamicCache.
`positions` counts the tokens the model has run: after generate(prompt, max_new_tokens=n) that
is prompt + n - 1 (the last token is sampled, never fed back).
reference_models' KVCache (model.new_cache(batch, prompt + n - 1), what its generate allocates) keeps
sliding layers as transformers does and preallocates each full-attention layer for all prompt + n - 1
positions at the prefill, where DynamicCache grows to them: after the last step both hold
kv_cache_bytes(spec, batch, prompt + n - 1). That is memory.inference_memory's "KV cache" term; the
prompt a sliding layer pins right after a prefill longer than its window is its prefill term.
"""
from __future__ import annotations

from .mla import mla_cache_elements
from .spec import SLIDING, ModelSpec

__all__ = ["kv_cache_positions", "kv_cache_bytes", "kv_bytes_per_position"]


def _check(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def kv_cache_positions(spec: ModelSpec, positions: int) -> list[int]:
    """Positions each layer keeps after `positions` tokens: all of them, or at most the window."""
    _check("positions", positions, 0)
    types = spec.layer_types or ("full_attention",) * spec.num_layers
    return [min(positions, spec.sliding_window) if t == SLIDING else positions for t in types]


def kv_bytes_per_position(spec: ModelSpec, dtype_bytes: int = 2) -> int:
    """Bytes one layer caches per position and sequence: a key and a value per KV head (MLA: the
    latent and the shared rotated key part)."""
    _check("dtype_bytes", dtype_bytes, 1)
    if spec.mla:
        return mla_cache_elements(spec) * dtype_bytes
    return 2 * spec.num_kv_heads * spec.head_dim * dtype_bytes


def kv_cache_bytes(spec: ModelSpec, batch: int, positions: int, dtype_bytes: int = 2) -> int:
    """Bytes of the KV cache of `batch` sequences after `positions` tokens each, in a
    `dtype_bytes`-byte dtype (2 for bf16/fp16, 4 for fp32), as transformers' DynamicCache holds it."""
    _check("batch", batch, 1)
    return batch * kv_bytes_per_position(spec, dtype_bytes) * sum(kv_cache_positions(spec, positions))
