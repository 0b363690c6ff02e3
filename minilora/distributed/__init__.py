"""Scale-out on PyTorch's own engine: DDP and FSDP2 (`torch.distributed.fsdp.fully_shard`) under torchrun.

    torchrun --nproc_per_node 2 -m minilora.distributed --strategy full_shard <minilora.train flags>

That command is `python -m minilora.train` with another default strategy: the training loop, its
flags and its checkpoints are minilora.train's (the loop asks a small Strategy object,
minilora/train/strategy.py, for what differs across processes). This package holds the pieces:

    process_group.py   joining the group torchrun describes; barrier; a sum over ranks
    wrapping.py        wrap_model for a strategy (DDP, FSDP2 block by block), no_sync; what each
                       strategy keeps per GPU and what FSDP2 supports for LoRA and QLoRA
    shards.py          full tensors from shards and back; the bytes a rank holds
    sharded_io.py      adapter and model files written from, and read into, a wrapped model
"""
from .process_group import (DistEnv, barrier, free_port, init_distributed, rank, shutdown, sum_over_ranks,
                            world_size)
from .shards import (copy_full_into, full_parameters, full_tensor, gather_full_state, model_state_bytes,
                     reshard_all, shard_like)
from .sharded_io import load_adapter_sharded, read_adapter_sharded, save_adapter_sharded, save_pretrained_sharded
from .wrapping import STRATEGIES, check_strategy, no_sync, transformer_blocks, unwrap, wrap_model

__all__ = [
    "STRATEGIES", "DistEnv", "check_strategy", "init_distributed", "shutdown", "barrier", "rank", "world_size",
    "free_port",
    "sum_over_ranks", "transformer_blocks", "wrap_model", "unwrap", "no_sync", "gather_full_state", "full_tensor",
    "full_parameters", "shard_like", "copy_full_into", "reshard_all", "model_state_bytes", "save_adapter_sharded",
    "save_pretrained_sharded", "read_adapter_sharded", "load_adapter_sharded",
]
