"""What fits on a GPU: the largest batch, sequence length or LoRA rank, or which methods fit.

Every search uses `training_memory(...).total_gpu` (peak allocated + CUDA context) against the
GPU's memory. Memory grows monotonically with batch, seq and rank, so a doubling then bisection
finds the largest value that fits.
"""
from __future__ import annotations

from dataclasses import replace

from .memory import training_memory
from .models import ModelSpec
from .training_setup import METHODS, TrainingSetup

__all__ = ["largest_fitting", "methods_that_fit", "fits", "context_limit"]


def fits(spec: ModelSpec, setup: TrainingSetup, gpu_bytes: int) -> bool:
    return training_memory(spec, setup).total_gpu <= gpu_bytes


def _with(setup: TrainingSetup, what: str, value: int) -> TrainingSetup:
    if what == "rank":
        return replace(setup, lora=replace(setup.lora, rank=value))
    if what == "seq":  # a loss chunk or an MLP tile longer than the sequence is the sequence
        chunk = setup.loss_chunk
        return replace(setup, seq=value, loss_chunk=chunk if chunk is None else min(chunk, value),
                       mlp_tile=min(setup.mlp_tile, value))
    return replace(setup, **{what: value})


def largest_fitting(spec: ModelSpec, setup: TrainingSetup, gpu_bytes: int, what: str = "batch",
                    limit: int | None = None) -> int:
    """Largest value of `what` (batch | seq | rank) that fits, 0 if even 1 does not."""
    if what not in ("batch", "seq", "rank"):
        raise ValueError(f"what must be batch, seq or rank, got {what!r}")
    if limit is None:
        limit = {"batch": 1 << 16, "seq": max(spec.max_positions, 1),
                 "rank": min(spec.hidden_size, spec.intermediate_size)}[what]
    if what == "rank":
        from .lora import lora_layers
        limit = min([limit] + [min(l.in_features, l.out_features) for l in lora_layers(spec, setup.lora.targets)
                                if not l.name.endswith(".gate")])
    if not fits(spec, _with(setup, what, 1), gpu_bytes):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(spec, _with(setup, what, hi), gpu_bytes):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # lo fits, hi does not (or is past the limit)
        mid = (lo + hi) // 2
        if fits(spec, _with(setup, what, mid), gpu_bytes):
            lo = mid
        else:
            hi = mid
    return lo


def methods_that_fit(spec: ModelSpec, setup: TrainingSetup, gpu_bytes: int) -> list[dict]:
    """For each method (and full checkpointing as the fallback): fits or not, and the peak. The
    setup's QLoRA-only and LoRA-only choices (prepare_kbit, autocast_adapter_dtype) carry over to
    the methods they apply to and fall back to their defaults for the others."""
    rows = []
    for method in METHODS:
        for ckpt in dict.fromkeys([setup.grad_ckpt, "full"]):
            s = replace(setup, method=method, grad_ckpt=ckpt,
                        prepare_kbit=setup.prepare_kbit if method == "qlora" else None,
                        autocast_adapter_dtype=None if method == "full" else setup.autocast_adapter_dtype)
            b = training_memory(spec, s)
            rows.append({"method": method, "grad_ckpt": ckpt, "total_gpu": b.total_gpu,
                         "fits": b.total_gpu <= gpu_bytes})
    return rows


def context_limit(spec: ModelSpec, setup: TrainingSetup, gpu_bytes: int, what: str, largest: int) -> dict:
    """When the longest sequence that fits is the model's own limit (max_position_embeddings), how
    long memory alone would allow: {"model_limit": ..., "memory_alone": ...}; otherwise {}."""
    if what != "seq" or largest != spec.max_positions:
        return {}
    return {"model_limit": spec.max_positions,
            "memory_alone": largest_fitting(spec, setup, gpu_bytes, "seq", limit=1 << 24)}
