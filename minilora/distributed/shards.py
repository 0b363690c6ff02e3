"""What each rank holds: FSDP2's parameter shards gathered into full tensors and cut back into
shards, full tensors swapped in for a moment so single-process code can read a sharded model, and
the bytes a rank really holds for parameters, gradients and optimizer states."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .process_group import rank
from .wrapping import unwrap

__all__ = ["gather_full_state", "full_tensor", "full_parameters", "shard_like", "copy_full_into", "reshard_all",
           "model_state_bytes"]


def reshard_all(model: nn.Module) -> None:
    """Put every FSDP2 unit back in its sharded state (shard_grad_op leaves them gathered after forward)."""
    from torch.distributed.fsdp import FSDPModule

    for m in unwrap(model).modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a DTensor shard (a collective: every rank must call it); `t` otherwise."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def gather_full_state(model: nn.Module, keep=lambda name, tensor: True, copy: bool = True) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors of the parameters `keep(name, param)` selects, on rank 0 only.

    Every rank must call it (each DTensor is all-gathered in turn); other ranks get {}. Only the
    selected tensors are gathered, so saving an adapter never materialises the full base model.
    Gathered shards land on the CPU one by one. A parameter that is not sharded (one process, DDP)
    is copied to the CPU too, unless copy=False: then it is the parameter itself, detached, to be
    read before the next optimizer step (what a writer needs, without a second copy of the model).
    """
    from torch.distributed.tensor import DTensor

    reshard_all(model)
    main = rank() == 0
    out = {}
    for name, p in unwrap(model).named_parameters():
        if not keep(name, p):
            continue
        sharded = isinstance(p, DTensor)
        full = full_tensor(p)
        if main:
            out[name] = full.detach().to("cpu", copy=True) if sharded or copy else full.detach()
    return out


@contextmanager
def full_parameters(model: nn.Module, tensors: dict[str, torch.Tensor]):
    """Temporarily register plain tensors in place of (sharded) parameters, then put the originals back.

    This lets single-process code (peft_io, save_pretrained) read or fill an FSDP2 model as if it
    were unsharded. A tied parameter is replaced under every module that holds it.
    """
    inner = unwrap(model)
    swap = {}
    for name, t in tensors.items():
        original = inner.get_parameter(name)
        swap[id(original)] = nn.Parameter(t, requires_grad=original.requires_grad)
    saved = []
    try:
        for module in inner.modules():
            for attr, p in list(module._parameters.items()):
                if p is not None and id(p) in swap:
                    saved.append((module, attr, p))
                    module._parameters[attr] = swap[id(p)]
        yield
    finally:
        for module, attr, original in saved:
            module._parameters[attr] = original


def shard_like(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full` laid out like `p` (a DTensor shard, or the whole tensor on p's device).

    Every rank holds `full`, so no data moves (src_data_rank=None)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        return distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements,
                                 src_data_rank=None)
    return full.to(p.device)


@torch.no_grad()
def copy_full_into(p: torch.Tensor, full: torch.Tensor) -> None:
    """Copy the full tensor `full` into parameter `p`, or into this rank's shard of it."""
    from torch.distributed.tensor import DTensor

    shard = shard_like(p, full.to(p.dtype))
    if isinstance(p, DTensor):
        p, shard = p.to_local(), shard.to_local()
    p.copy_(shard)


def model_state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict[str, int]:
    """Bytes this rank really holds for parameters, gradients and optimizer states.

    Counted per distinct storage, so FSDP2's padded shards and its flat reduce-scatter buffer
    (the gradients of one unit are views into it) are counted as allocated, and shared storage once.
    """
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    def total(tensors):
        seen = {}
        for t in tensors:
            s = local(t).untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        return sum(seen.values())

    inner = unwrap(model)
    params = list(inner.parameters())
    out = {
        "params": total(params),
        "trainable_params": total(p for p in params if p.requires_grad),
        "grads": total(p.grad for p in params if p.grad is not None),
        "buffers": total(inner.buffers()),
    }
    if optimizer is not None:
        states = [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
        out["optimizer"] = total(states)
        # AdamW's per-tensor `step` counters: plain scalars, whole on every rank (not sharded)
        out["optimizer_scalars"] = total(v for v in states if v.dim() == 0)
    return out
