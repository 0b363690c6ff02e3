"""Wrapping a model for a strategy: DDP, or FSDP2 (`torch.distributed.fsdp.fully_shard`) block by block.

What each strategy keeps on every GPU, for P parameters of which T are trainable, N GPUs
(b = bytes per element; torch's AdamW keeps two moments in the parameter's dtype, plus a 4-byte
`step` per tensor that every rank keeps whole):

    strategy        parameters      gradients       AdamW moments    communication per step
    ddp             P*b             T*b (+ buckets) 2*T*b            all-reduce of the T gradients
    full_shard      P*b / N         T*b / N         2*T*b / N        all-gather params in forward AND
                                                                     again in backward, reduce-scatter grads
    shard_grad_op   P*b / N         T*b / N         2*T*b / N        all-gather once per step: params stay
                                                                     unsharded from forward to backward

(ZeRO-3 and ZeRO-2-like; FSDP2 names them reshard_after_forward=True / False.) Between forward and
backward, shard_grad_op also holds every unit's full parameters, which is the price of skipping the
second all-gather. FSDP2 shards each parameter on dim 0 with torch.chunk semantics: when dim 0 does
not divide by N, every rank's storage is padded to ceil(dim0 / N) rows.

What FSDP2 supports for LoRA and QLoRA (torch 2.13; tests/test_distributed.py):
- Frozen and trainable parameters may share one FSDP unit: only trainable ones get gradients and
  reduce-scatters, so LoRA needs no special wrapping (FSDP1 needed use_orig_params=True for that).
- All TRAINABLE parameters of one unit must share one dtype (FSDP2 reduce-scatters one flat buffer;
  it raises "FSDP expects uniform original parameter dtype" otherwise). wrap_model checks this first
  and names the offending parameters (e.g. bf16 modules_to_save beside QLoRA's fp32 adapters).
- Buffers are never sharded. minilora's LinearNF4 keeps its packed codes and scales as buffers, so
  under FSDP2 every rank holds the WHOLE 4-bit base (about 0.52 byte per base parameter) while the
  embeddings, norms, lm_head and adapters are sharded. QLoRA trains correctly (tested equal to one
  process). Sharding the 4-bit base would need the codes as frozen uint8 parameters: FSDP2 accepts
  those beside fp32 trainables in one unit and never casts non-float parameters (tried, not in the
  tests), or a tensor subclass with fsdp_pre_all_gather hooks as torchao's NF4Tensor has.
- Mixed precision: minilora.train uses bf16 autocast on CUDA under every strategy, so distributed
  steps equal single-process ones; wrap_model(param_dtype=torch.bfloat16) instead gives FSDP2's
  MixedPrecisionPolicy (bf16 all-gathers, fp32 sharded master).
- The offload optimizer (CPUOffloadAdamW) is not wired to DDP/FSDP2; FSDP2's own CPUOffloadPolicy is.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn

from .process_group import DistEnv

__all__ = ["STRATEGIES", "check_strategy", "transformer_blocks", "wrap_model", "unwrap", "no_sync"]

# FSDP1's ShardingStrategy names; the calculators' names (--zero fsdp-full / fsdp-grad-op) map to them.
STRATEGIES = ("none", "ddp", "full_shard", "shard_grad_op")
_ALIASES = {"fsdp-full": "full_shard", "full-shard": "full_shard", "fsdp": "full_shard",
            "fsdp-grad-op": "shard_grad_op", "grad-op": "shard_grad_op", "grad_op_shard": "shard_grad_op"}


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 wraps one by one: each is all-gathered just before it runs.

    Llama: model.layers; GPT-2: transformer.h; otherwise the children of the largest nn.ModuleList.
    """
    inner = unwrap(model)
    for path in ("model.layers", "transformer.h"):
        module = inner
        for part in path.split("."):
            module = getattr(module, part, None)
        if isinstance(module, nn.ModuleList):
            return list(module)
    lists = [m for m in inner.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def _check_trainable_dtypes(unit: nn.Module, name: str, exclude: set[int]) -> None:
    """FSDP2 reduce-scatters one flat buffer per unit: its trainable parameters need one dtype."""
    dtypes: dict[torch.dtype, str] = {}
    for pname, p in unit.named_parameters():
        if p.requires_grad and id(p) not in exclude:
            dtypes.setdefault(p.dtype, pname)
    if len(dtypes) > 1:
        found = ", ".join(f"{pname} ({dt})" for dt, pname in dtypes.items())
        raise ValueError(f"FSDP2 needs one dtype for the trainable parameters of a unit, but {name!r} "
                         f"mixes {found}; cast the trainable parameters to one dtype first")


def check_strategy(strategy: str, world_size: int) -> str:
    """The canonical strategy name; ValueError for an unknown one, or for "none" on several ranks
    (nothing would average the gradients: each rank would train its own, diverging model)."""
    strategy = _ALIASES.get(strategy, strategy)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "none" and world_size > 1:
        raise ValueError(f"strategy 'none' on {world_size} ranks would train {world_size} unsynchronised models; "
                         "use ddp, full_shard or shard_grad_op (or run one process)")
    return strategy


def wrap_model(model: nn.Module, strategy: str, env: DistEnv | None = None, *,
               param_dtype: torch.dtype | None = None, reduce_dtype: torch.dtype | None = None) -> nn.Module:
    """Move `model` to this rank's device and wrap it for `strategy` (one of STRATEGIES).

    ddp returns a DistributedDataParallel; the FSDP2 strategies shard `model` in place (each
    transformer block, then the root for the remaining embeddings / norm / head) and return it.
    param_dtype / reduce_dtype: FSDP2 mixed precision (ignored by ddp and none).
    """
    world = env.world_size if env is not None else 1
    if env is None and _ALIASES.get(strategy, strategy) == "none" and dist.is_initialized():
        world = dist.get_world_size()
    strategy = check_strategy(strategy, world)
    device = env.device if env is not None else torch.device("cpu")
    if strategy != "none" and not dist.is_initialized():
        raise ValueError(f"strategy {strategy!r} needs a process group: call init_distributed() first")
    if strategy in ("full_shard", "shard_grad_op"):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        blocks = transformer_blocks(model)
        in_blocks = {id(p) for b in blocks for p in b.parameters()}
        for i, block in enumerate(blocks):
            _check_trainable_dtypes(block, f"block {i}", set())
        _check_trainable_dtypes(model, "root (parameters outside the blocks)", in_blocks)
        model.to(device)
        from torch.distributed.device_mesh import init_device_mesh

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
        reshard = strategy == "full_shard"
        # An explicit mesh on this rank's device type: FSDP2's default mesh takes CUDA whenever it
        # exists, which breaks gloo ranks on the CPU of a GPU machine.
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
        # The root's own parameters (embeddings, final norm, head) are used first in backward, so
        # FSDP2 keeps them unsharded after forward whatever the strategy (its default for the root).
        fully_shard(model, mesh=mesh, mp_policy=mp)
        return model
    model.to(device)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # No buffer broadcast before each forward: the buffers here (rotary tables, and QLoRA's
        # LinearNF4 codes and scales, i.e. the whole 4-bit base) are frozen and built identically on
        # every rank (same seed, same weights), so re-sending them every step would only cost bandwidth.
        # forward_sync_buffers=False is torch 2.13's name for that (broadcast_buffers=False is
        # deprecated); unlike the old flag it still broadcasts the buffers once, at construction,
        # which leaves them as they were (equal on every rank) and costs one copy of the 4-bit base.
        return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under a DDP wrapper (FSDP2 wraps in place, so it is the module itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@contextmanager
def no_sync(model: nn.Module, enabled: bool = True):
    """Skip gradient communication inside (micro-batches before the last of an accumulation step)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if not enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield
