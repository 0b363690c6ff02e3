"""The process group torchrun describes: joining it, leaving it, and the two collectives training
needs besides the ones DDP and FSDP2 run themselves (a barrier and a sum of a few numbers)."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["DistEnv", "free_port", "init_distributed", "shutdown", "barrier", "rank", "world_size",
           "sum_over_ranks"]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that was free a moment ago (for single-process groups and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(backend: str | None = None) -> DistEnv:
    """Join the process group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR/PORT.

    Without those variables (plain `python`), a group of one is made, so that the same code runs
    FSDP2 and the checkpoint functions on one process. Default backend: gloo on CPU, NCCL when CUDA
    is present (one GPU per process: LOCAL_RANK must be below the device count). Pass backend="gloo"
    for CPU processes on a machine that has a GPU.
    """
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")
    if backend == "nccl" and not cuda:
        raise ValueError("backend 'nccl' needs CUDA; use 'gloo' on CPU")
    rank_ = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank_)))
    if backend == "nccl" and local_rank >= torch.cuda.device_count():
        # NCCL needs one GPU per process on a node; set_device would fail with "invalid device ordinal"
        count = torch.cuda.device_count()
        raise ValueError(f"LOCAL_RANK={local_rank} but this machine has {count} CUDA device(s): backend 'nccl' "
                         f"needs one GPU per process; use backend='gloo' or at most {count} process(es) per node")
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and "MASTER_ADDR" not in os.environ and not dist.is_initialized():
        raise ValueError(f"WORLD_SIZE={world_size} but MASTER_ADDR is not set: launch with torchrun")
    if not dist.is_initialized():
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank_, world_size=world_size)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                    rank=rank_, world_size=world_size)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (nothing to wait for without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def rank() -> int:
    """This process's rank; 0 without a process group."""
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks in the process group; 1 without one."""
    return dist.get_world_size() if dist.is_initialized() else 1


def sum_over_ranks(values: list[float]) -> list[float]:
    """Each value summed over the ranks, in one all-reduce (float64: counts stay exact below 2**53).

    Without a process group, or on one rank, the values come back untouched (ints stay ints)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()
