"""What the training loop does differently on one process, under DDP and under FSDP2.

The loop (loop.py) is one piece of code; it asks a Strategy for the few things that depend on how
the run is spread over processes:

    wrap(model)              none: as is; ddp: DistributedDataParallel; full_shard / shard_grad_op: FSDP2
    no_sync(model, skip)     skip the gradient reduction on micro-batches before the last
    world_size               DDP and FSDP2 AVERAGE gradients over ranks; the loop scales by it
    sum_over_ranks(values)   token counts and the step's loss, summed over ranks
    clip_grad_norm_(...)     the global norm, also over FSDP2's sharded (DTensor) gradients
    is_main                  which rank prints (every rank writes its part of a checkpoint)

Every rank draws the same global batch (batch_size x world_size sequences) and takes its own slice,
so N ranks with batch_size b take the steps one process takes with batch_size N*b.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from minilora import distributed as D

from .build import resolve_device
from .config import TrainConfig

__all__ = ["Strategy"]


@dataclass(frozen=True)
class Strategy:
    name: str                  # none, ddp, full_shard or shard_grad_op
    device: torch.device       # this rank's device
    env: D.DistEnv | None = None   # None: one process, no process group

    @classmethod
    def start(cls, cfg: TrainConfig, env: D.DistEnv | None = None) -> "Strategy":
        """The strategy cfg.strategy names, on `env` or, for ddp / FSDP2, on the process group
        torchrun describes (joined here: gloo for --device cpu, else NCCL where CUDA exists)."""
        world = env.world_size if env is not None else int(os.environ.get("WORLD_SIZE", "1"))
        name = D.check_strategy(cfg.strategy, world)
        if env is None and name == "none":
            return cls(name, resolve_device(cfg))
        if env is None:
            if cfg.device not in ("auto", "cpu", "cuda"):
                raise ValueError(f"device must be auto, cpu or cuda under strategy {name!r} (each rank takes "
                                 f"cuda:LOCAL_RANK), got {cfg.device!r}")
            env = D.init_distributed("gloo" if resolve_device(cfg).type == "cpu" else "nccl")
        if cfg.device != "auto" and resolve_device(cfg).type != env.device.type:
            raise ValueError(f"device {cfg.device!r} asked for, but this rank's process group runs on "
                             f"{env.device} ({env.backend})")
        return cls(name, env.device, env)

    @property
    def world_size(self) -> int:
        return self.env.world_size if self.env is not None else 1

    @property
    def rank(self) -> int:
        return self.env.rank if self.env is not None else 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model if self.name == "none" else D.wrap_model(model, self.name, self.env)

    def no_sync(self, model: torch.nn.Module, skip: bool):
        return D.no_sync(model, enabled=skip)

    def sum_over_ranks(self, values: list[float]) -> list[float]:
        return D.sum_over_ranks(values) if self.world_size > 1 else list(values)

    def clip_grad_norm_(self, optimizer, params: list, max_norm: float) -> float:
        """Clip the global gradient norm to max_norm; returns the norm before clipping.

        CPUOffloadAdamW holds the gradients on the host by now, so it clips them itself
        (its clip_grad_norm_); torch's clip_grad_norm_ works on FSDP2's DTensor gradients and
        returns the norm as a DTensor, whose full value is the norm over every rank's shard."""
        own = getattr(optimizer, "clip_grad_norm_", None)
        norm = own(max_norm) if own is not None else torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(D.full_tensor(norm))

    def barrier(self) -> None:
        if self.world_size > 1:
            D.barrier()
