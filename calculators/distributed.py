"""Per-GPU model states with N GPUs: DDP, ZeRO-1/2/3 (DeepSpeed) and FSDP2 full / grad-op shard.

What each strategy divides by N (ZeRO paper, Rajbhandari et al. 2020; torch FSDP2 fully_shard):

  strategy        weights   gradients   optimizer states + master   extra per-GPU buffers
  ddp             1         1           1                            gradient buckets (one more copy
                                                                     of the gradients: torch's default
                                                                     gradient_as_bucket_view=False)
  zero1           1         1           1/N
  zero2           1         1/N         1/N
  zero3           1/N       1/N         1/N                          2 gathered blocks (current + prefetch)
  fsdp-full       1/N       1/N         1/N                          2 gathered blocks (reshard_after_forward=True)
  fsdp-grad-op    1/N       1/N         1/N                          all gathered weights from forward to
                                                                     backward (reshard_after_forward=False)

"Gathered" means the sharded parameters only: QLoRA's NF4 codes and scales are module buffers,
which FSDP2 does not shard (every rank holds them whole, counted in the weights term), so under
FSDP a QLoRA model gathers only its 16-bit tensors (embeddings, norms, lm_head, adapters).

ZeRO partitions one flat buffer (ceil(total / N) per GPU). FSDP2 shards every tensor on dim 0 with
torch.chunk semantics, so rank 0 holds ceil(rows / N) rows of each tensor: we report rank 0 (the
largest shard).

DeepSpeed's estimators (deepspeed/runtime/zero/stage_1_and_2.py, stage3.py), reproduced below,
differ from our terms in stated ways:
  - estimate_zero2_model_states_mem_needs (no offload): 4P + 16P/N. Ours for ZeRO-2 with bf16
    weights and fp32 master/m/v: 2P + 2P/N + 12P/N. DeepSpeed also counts a full 16-bit gradient
    buffer (+2P: gradients exist at full size before the reduce-scatter) and the fp32 gradient
    partition its optimizer steps on (+4P/N - 2P/N). Adding these two terms to ours gives DeepSpeed's
    number exactly (test_zero_model_states_agree_with_deepspeed_estimates in tests/test_calc_memory.py;
    the calculator itself does not add them).
  - estimate_zero3_model_states_mem_needs (no offload): 4*largest_layer + 18P/N. Ours: 16P/N plus
    two gathered blocks in 16-bit. DeepSpeed adds the fp32 gradient partition (+2P/N) and sizes the
    gathered working set as 4 bytes x the largest single module's parameters (often the
    embedding); adding those two terms (computed in the same test) to ours equals it exactly.
  - with CPU offload of optimizer states DeepSpeed's ZeRO-2 keeps 2P on the GPU (weights only,
    gradients streamed); our offload optimizer (CPUOffloadAdamW) keeps weights plus staging pages.
"""
from __future__ import annotations

import math

__all__ = ["STRATEGIES", "parse_strategy", "is_sharded", "shard", "shard_note", "fsdp_rank0_elements",
           "deepspeed_zero2_estimate", "deepspeed_zero3_estimate"]

STRATEGIES = ("none", "ddp", "zero1", "zero2", "zero3", "fsdp-full", "fsdp-grad-op")
_ALIASES = {"0": "ddp", "1": "zero1", "2": "zero2", "3": "zero3", "full-shard": "fsdp-full",
            "full": "fsdp-full", "fsdp": "fsdp-full", "grad-op": "fsdp-grad-op",
            "shard-grad-op": "fsdp-grad-op", "grad-op-shard": "fsdp-grad-op"}

# which model-state categories a strategy divides by N
_SHARDED = {"none": (), "ddp": (), "zero1": ("optimizer",), "zero2": ("optimizer", "gradients"),
            "zero3": ("optimizer", "gradients", "weights"),
            "fsdp-full": ("optimizer", "gradients", "weights"),
            "fsdp-grad-op": ("optimizer", "gradients", "weights")}


def parse_strategy(text: str, gpus: int) -> str:
    """--zero value (0/1/2/3, ddp, full-shard, grad-op, ...) and --gpus -> a STRATEGIES name."""
    if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 1:
        raise ValueError(f"gpus must be an integer >= 1, got {gpus!r}")
    key = str(text if text is not None else "none").strip().lower()
    key = _ALIASES.get(key, key)
    if key not in STRATEGIES:
        raise ValueError(f"unknown sharding {text!r}: use one of 0, 1, 2, 3, ddp, full-shard, grad-op "
                         f"({', '.join(STRATEGIES)})")
    if gpus == 1 and key != "none":
        return key  # the arithmetic still holds with N = 1 (nothing divided)
    if gpus > 1 and key == "none":
        return "ddp"
    return key


def fsdp_rank0_elements(shapes, gpus: int) -> int:
    """Elements rank 0 holds when each tensor is chunked on dim 0 into `gpus` pieces (torch.chunk)."""
    return sum(-(-(shape[0] if shape else 1) // gpus) * math.prod(shape[1:]) for shape in shapes)


def is_sharded(category: str, strategy: str, gpus: int) -> bool:
    """Whether `strategy` on `gpus` GPUs divides a model-state category (weights | gradients |
    optimizer) among them (the table in the module docstring)."""
    return gpus > 1 and category in _SHARDED[strategy]


def shard(category: str, nbytes: int, strategy: str, gpus: int, shapes=None, bytes_per_el=None) -> int:
    """Per-GPU bytes of one category (weights | gradients | optimizer) under `strategy`: ZeRO's
    flat split ceil(nbytes / N), or under FSDP with the tensors' `shapes` (and `bytes_per_el`: one
    figure, or one per tensor when dtypes differ) rank 0's torch.chunk piece of every tensor."""
    if not is_sharded(category, strategy, gpus):
        return nbytes
    if strategy.startswith("fsdp") and shapes is not None and bytes_per_el:
        if isinstance(bytes_per_el, (tuple, list)):
            return sum(fsdp_rank0_elements([s], gpus) * b for s, b in zip(shapes, bytes_per_el, strict=True))
        return fsdp_rank0_elements(shapes, gpus) * bytes_per_el
    return -(-nbytes // gpus)


def shard_note(category: str, strategy: str, gpus: int) -> str:
    """The clause a memory term's assumption ends with when its category is sharded."""
    return f", sharded over {gpus} GPUs ({strategy})" if is_sharded(category, strategy, gpus) else ""


def deepspeed_zero2_estimate(total_params: int, gpus: int, cpu_offload: bool = False) -> int:
    """GPU bytes from DeepSpeed's estimate_zero2_model_states_mem_needs (one node)."""
    if cpu_offload:
        return 2 * total_params
    return 4 * total_params + int(16 * total_params / gpus)


def deepspeed_zero3_estimate(total_params: int, largest_layer_params: int, gpus: int,
                             cpu_offload: bool = False, cpu_offload_params: bool = False) -> int:
    """GPU bytes from DeepSpeed's estimate_zero3_model_states_mem_needs (one node)."""
    largest = 4 * largest_layer_params
    if cpu_offload and cpu_offload_params:
        return largest
    if cpu_offload:
        return largest + int(2 * total_params / gpus)
    return largest + int(18 * total_params / gpus)
