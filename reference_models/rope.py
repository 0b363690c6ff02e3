"""Rotary position embeddings (RoPE, Su et al. 2021): the frequencies of every `rope_type` that
transformers' decoder families accept, cos/sin for a run of positions, and the rotation itself.

A head's dimensions are rotated in pairs (x[i], x[i + d/2]) by the angle position * inv_freq[i];
the rope types differ only in inv_freq (and, for two of them, a factor on cos/sin):

  default   inv_freq[i] = theta^(-2i/d)
  linear    default / factor: positions are squeezed by `factor` (position interpolation)
  dynamic   NTK-aware: once a sequence is longer than max_position_embeddings, theta grows with it
  yarn      per frequency, a blend of interpolation (/ factor) and the original, by wavelength;
            cos/sin scaled by attention_factor (Peng et al. 2023)
  llama3    long wavelengths / factor, short ones kept, a smooth ramp between (Llama 3.1)
  longrope  per-frequency divisors: short_factor up to original_max_position_embeddings, long_factor
            past it; cos/sin scaled by attention_factor (Phi-3)

Each formula is written as transformers writes it (modeling_rope_utils.py, same ops, same dtypes),
so the angles agree bit for bit. `partial_rotary_factor` < 1 rotates only the first
int(head_dim * factor) dimensions of each head and passes the rest through (GPT-NeoX, Phi-3).
"""
from __future__ import annotations

import math

import torch

__all__ = ["ROPE_TYPES", "Rope", "rope_frequencies", "apply_rotary", "rotate_half", "check_rope_parameters"]

# rope_type -> the keys it needs besides rope_type and rope_theta (transformers' validators)
ROPE_TYPES = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}


def check_rope_parameters(params: dict, head_dim: int, where: str = "rope_parameters") -> None:
    """Raise one clear line if `params` names a rope_type we do not implement or lacks a key it needs."""
    rope_type = params.get("rope_type")
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"{where}.rope_type {rope_type!r} is not supported; supported: {list(ROPE_TYPES)}")
    missing = [k for k in ROPE_TYPES[rope_type] if params.get(k) is None]
    if missing:
        raise ValueError(f"{where} with rope_type {rope_type!r} needs {missing}, got {params}")
    factor = params.get("partial_rotary_factor", 1.0)
    dim = int(head_dim * factor)
    if not 0 < factor <= 1 or dim < 2 or dim % 2:
        raise ValueError(f"{where}.partial_rotary_factor {factor} rotates {dim} of head_dim {head_dim} "
                         "dimensions; it must rotate an even number >= 2 (0 < factor <= 1)")
    if rope_type == "longrope":
        for key in ("short_factor", "long_factor"):
            if len(params[key]) != dim // 2:
                raise ValueError(f"{where}.{key} has {len(params[key])} entries, the rotated dimensions "
                                 f"need {dim // 2} (one per frequency)")


def _powers(base, dim: int) -> torch.Tensor:
    # theta^(-2i/d), (dim/2,) fp32: transformers' expression, so every type starts from the same bits.
    # Frequencies live on the CPU (also when a model is built on the meta device) and move per call.
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(dtype=torch.float) / dim))


def _linear(p, dim, max_pos, seq_len):
    return _powers(p["rope_theta"], dim) / p["factor"], 1.0


def _dynamic(p, dim, max_pos, seq_len):
    # seq_len is None when the model is built (Python arithmetic) and a 0-d tensor when a longer
    # sequence arrives (transformers then computes the new base in fp32 tensors; we do the same)
    if seq_len is None:
        seq_len = max_pos
    else:
        seq_len = torch.maximum(seq_len, torch.tensor(max_pos, dtype=seq_len.dtype, device=seq_len.device))
    factor = p["factor"]
    base = p["rope_theta"] * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _powers(base, dim), 1.0


def _yarn_mscale(scale, mscale=1):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(p, dim, max_pos, seq_len):
    base, factor, original = p["rope_theta"], p["factor"], p["original_max_position_embeddings"]
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
        attention_factor = (float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
                            if mscale and mscale_all_dim else _yarn_mscale(factor))

    def correction_dim(rotations):  # the dimension whose wavelength fits `rotations` times in `original`
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(dtype=torch.float) / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1: high frequency, kept as trained; 0: low frequency, interpolated
    return interpolation * (1 - keep) + extrapolation * keep, attention_factor


def _llama3(p, dim, max_pos, seq_len):
    inv_freq = _powers(p["rope_theta"], dim)
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_len = p["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled), 1.0


def _longrope(p, dim, max_pos, seq_len):
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / original
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    long = seq_len is not None and seq_len > original
    ext_factors = torch.tensor(p["long_factor"] if long else p["short_factor"], dtype=torch.float32, device="cpu")
    shape = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    return 1.0 / (ext_factors * p["rope_theta"] ** shape), attention_factor


_FREQUENCIES = {"default": lambda p, dim, max_pos, seq_len: (_powers(p["rope_theta"], dim), 1.0),
                "linear": _linear, "dynamic": _dynamic, "yarn": _yarn, "llama3": _llama3, "longrope": _longrope}


def rope_frequencies(params: dict, dim: int, max_position_embeddings: int, seq_len=None):
    """(inv_freq (dim/2,) fp32, attention_scaling) for a rotated width `dim` (head_dim x partial_rotary_factor)."""
    return _FREQUENCIES[params["rope_type"]](params, dim, max_position_embeddings, seq_len)


class Rope:
    """cos/sin of one rope configuration for any run of positions.

    Two types depend on the sequence length, as in transformers (its dynamic_rope_update), with the
    length taken as the last position + 1 of each forward call:
    - dynamic: when a longer sequence than any seen (and than max_position_embeddings) arrives,
      the frequencies are recomputed for it and kept; a sequence shorter than
      max_position_embeddings puts the original ones back;
    - longrope: the long factors when the sequence is longer than original_max_position_embeddings,
      else the short ones.
    A plain object, not a module: model.to(bfloat16) must not round the frequencies.
    """

    def __init__(self, params: dict, head_dim: int, max_position_embeddings: int):
        check_rope_parameters(params, head_dim)
        self.params = dict(params)
        self.rope_type = params["rope_type"]
        self.dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
        self.max_position_embeddings = max_position_embeddings
        self.inv_freq, self.attention_scaling = rope_frequencies(self.params, self.dim, max_position_embeddings)
        self.original_inv_freq = self.inv_freq
        self.max_seq_len_cached = max_position_embeddings
        if self.rope_type == "longrope":
            self.long_inv_freq = rope_frequencies(self.params, self.dim, max_position_embeddings,
                                                  seq_len=self.params["original_max_position_embeddings"] + 1)[0]

    def _follow_length(self, seq_len: torch.Tensor) -> None:
        if self.rope_type == "dynamic":
            if seq_len > self.max_seq_len_cached:  # grow
                self.inv_freq, self.attention_scaling = rope_frequencies(
                    self.params, self.dim, self.max_position_embeddings, seq_len=seq_len)
                self.max_seq_len_cached = seq_len
            if seq_len < self.max_position_embeddings < self.max_seq_len_cached:  # back to the trained range
                self.inv_freq, self.max_seq_len_cached = self.original_inv_freq, self.max_position_embeddings
        elif self.rope_type == "longrope":
            long = seq_len > self.params["original_max_position_embeddings"]
            self.inv_freq = self.long_inv_freq if long else self.original_inv_freq

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions (T,) -> cos, sin (T, dim): angles in fp32, scaled, then cast to the compute dtype."""
        if self.rope_type in ("dynamic", "longrope"):
            self._follow_length(positions.max().cpu() + 1)
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]  # (T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, dim): transformers' "half split" layout
        return (emb.cos() * self.attention_scaling).to(dtype), (emb.sin() * self.attention_scaling).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    # RoPE rotates pairs (x[i], x[i + D/2]) (transformers' convention, not interleaved pairs)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, split: bool = False) -> torch.Tensor:
    """x (B, H, T, D) rotated by cos/sin (T, R); with R < D only the first R dimensions turn.

    cos/sin in fp32 with a 16-bit x (OLMo 2) rotate in fp32 and cast back to x's dtype. split=True
    cuts the rotated part off and concatenates it back even when R == D, as transformers' Phi-3 and
    GPT-NeoX do: the same values, and the contiguous layout their attention then receives."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1] and not split:
        return (x * cos + rotate_half(x) * sin).to(x.dtype)
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)
