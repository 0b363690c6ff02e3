"""Scale-out on PyTorch's own engine: DDP and FSDP2 (`torch.distributed.fsdp.fully_shard`) under torchrun.

    torchrun --nproc_per_node 2 -m minilora.distributed --strategy full_shard ...   (see train_distributed)

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
- Mixed precision: train_distributed uses bf16 autocast on CUDA, as minilora.train does, so its
  steps equal single-process ones; wrap_model(param_dtype=torch.bfloat16) instead gives FSDP2's
  MixedPrecisionPolicy (bf16 all-gathers, fp32 sharded master).
- The offload optimizer (CPUOffloadAdamW) is not wired to DDP/FSDP2; FSDP2's own CPUOffloadPolicy is.
"""
from __future__ import annotations

import json
import os
import socket
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "STRATEGIES", "DistEnv", "check_strategy", "init_distributed", "shutdown", "free_port", "transformer_blocks",
    "wrap_model", "unwrap", "no_sync", "gather_full_state", "save_adapter_sharded",
    "load_adapter_sharded", "save_checkpoint", "load_checkpoint", "model_state_bytes", "train_distributed",
]

# FSDP1's ShardingStrategy names; the calculators' names (--zero fsdp-full / fsdp-grad-op) map to them.
STRATEGIES = ("none", "ddp", "full_shard", "shard_grad_op")
_ALIASES = {"fsdp-full": "full_shard", "full-shard": "full_shard", "fsdp": "full_shard",
            "fsdp-grad-op": "shard_grad_op", "grad-op": "shard_grad_op", "grad_op_shard": "shard_grad_op"}


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
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
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
            dist.init_process_group(backend, rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                    rank=rank, world_size=world_size)
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


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
        return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
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


def _reshard_all(model: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule

    for m in unwrap(model).modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _is_adapter_param(name: str, p: torch.Tensor) -> bool:
    # what save_adapter may write: LoRA factors, DoRA magnitudes, trained modules, biases (bias="all")
    return p.requires_grad or ".lora_" in name or "modules_to_save" in name or name.endswith("bias")


def gather_full_state(model: nn.Module, keep=lambda name, tensor: True) -> dict[str, torch.Tensor]:
    """Full (unsharded) CPU copies of the parameters `keep(name, param)` selects, on rank 0 only.

    Every rank must call it (each DTensor is all-gathered in turn); other ranks get {}. Only the
    selected tensors are gathered, so saving an adapter never materialises the full base model.
    """
    from torch.distributed.tensor import DTensor

    _reshard_all(model)
    rank = dist.get_rank() if dist.is_initialized() else 0
    out = {}
    for name, p in unwrap(model).named_parameters():
        if not keep(name, p):
            continue
        full = p.full_tensor() if isinstance(p, DTensor) else p
        if rank == 0:
            out[name] = full.detach().to("cpu", copy=True)
    return out


@contextmanager
def _plain_parameters(model: nn.Module, tensors: dict[str, torch.Tensor]):
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


def _local_shard(p: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's part of `full` laid out like `p` (a DTensor shard, or the whole tensor).

    Every rank holds `full`, so no data moves (src_data_rank=None)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        return distribute_tensor(full.to(p.device_mesh.device_type), p.device_mesh, p.placements,
                                 src_data_rank=None)
    return full.to(p.device)


@torch.no_grad()
def _copy_full(p: torch.Tensor, full: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor

    shard = _local_shard(p, full.to(p.dtype))
    if isinstance(p, DTensor):
        p, shard = p.to_local(), shard.to_local()
    p.copy_(shard)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def save_adapter_sharded(model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default") -> None:
    """Gather the adapter on rank 0 and write it in peft's format (atomically, by peft_io).

    Call on every rank; returns once the files exist.
    """
    from minilora.lora.peft_io import save_adapter

    full = gather_full_state(model, _is_adapter_param)
    if not dist.is_initialized() or dist.get_rank() == 0:
        with _plain_parameters(model, full):
            save_adapter(unwrap(model), folder, adapter_name=adapter_name)
    _barrier()


def load_adapter_sharded(model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default") -> None:
    """Copy a saved adapter (full tensors, peft format) into a wrapped model that already has
    `adapter_name` injected with the same config, on any strategy and world size.

    Every rank reads the file into full-size stand-ins, then keeps its own shard: this is what
    makes adapter-only checkpoints resumable on a different number of GPUs. (For a model without
    the adapter yet, call peft_io.load_adapter on every rank BEFORE wrap_model instead.)
    """
    from safetensors.torch import load_file

    from minilora.lora import peft_io

    folder = Path(folder)
    if adapter_name not in getattr(unwrap(model), "lora_configs", {}):
        raise ValueError(f"the model has no adapter {adapter_name!r} to load into; inject it first "
                         f"or call peft_io.load_adapter before wrap_model")
    peft_io.config_from_peft(json.loads((folder / peft_io.CONFIG_NAME).read_text()))  # rejects odd options
    _reshard_all(model)
    params = {n: p for n, p in unwrap(model).named_parameters() if _is_adapter_param(n, p)}
    stand_ins = {n: torch.zeros(p.shape, dtype=p.dtype, device="cpu") for n, p in params.items()}
    with _plain_parameters(model, stand_ins):
        # peft_io's own key mapping and shape checks; it copies into the stand-ins in place
        # the model's own adapter config says which non-LoRA tensors (biases, modules_to_save) it owns
        peft_io._copy_tensors(unwrap(model), load_file(str(folder / peft_io.WEIGHTS_NAME)), adapter_name,
                              unwrap(model).lora_configs[adapter_name])
    for name, p in params.items():
        _copy_full(p, stand_ins[name])


def _param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    by_id = {id(p): n for n, p in unwrap(model).named_parameters()}
    return [[by_id[id(p)] for p in g["params"]] for g in optimizer.param_groups]


def save_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str | os.PathLike,
                    step: int, adapter_name: str | None = "default", extra: dict | None = None) -> Path:
    """A world-size-free checkpoint: full (gathered) tensors only, written by rank 0, atomically.

    folder/adapter/ (peft format) when adapter_name is given, else folder/model.safetensors;
    folder/optimizer.safetensors (AdamW moments keyed `<param name>.<state>`); folder/trainer_state.json.
    """
    from reference_models.files import save_safetensors_atomic, write_json_atomic

    folder = Path(folder)
    if adapter_name is not None:
        save_adapter_sharded(model, folder / "adapter", adapter_name)
    else:
        full = gather_full_state(model)
        if not dist.is_initialized() or dist.get_rank() == 0:
            save_safetensors_atomic(full, folder / "model.safetensors")
    moments = _gather_optimizer_state(model, optimizer)
    if not dist.is_initialized() or dist.get_rank() == 0:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        meta = {"param_groups": json.dumps(groups), "param_names": json.dumps(_param_names(model, optimizer))}
        save_safetensors_atomic(moments, folder / "optimizer.safetensors", metadata=meta)
        world = dist.get_world_size() if dist.is_initialized() else 1
        write_json_atomic(folder / "trainer_state.json", {"step": step, "world_size": world, **(extra or {})})
    _barrier()
    return folder


def _gather_optimizer_state(model, optimizer) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    rank = dist.get_rank() if dist.is_initialized() else 0
    out = {}
    for names, group in zip(_param_names(model, optimizer), optimizer.param_groups):
        for name, p in zip(names, group["params"]):
            for key, value in sorted(optimizer.state.get(p, {}).items()):
                full = value.full_tensor() if isinstance(value, DTensor) else value
                if rank == 0:
                    out[f"{name}.{key}"] = full.detach().to("cpu", copy=True)
    return out


def load_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str | os.PathLike,
                    adapter_name: str | None = "default") -> dict:
    """Restore what save_checkpoint wrote, on any strategy and world size; returns trainer_state."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(folder)
    state_path = folder / "trainer_state.json"
    if not state_path.is_file():
        raise ValueError(f"{folder} is not a minilora checkpoint: trainer_state.json is missing")
    if adapter_name is not None:
        load_adapter_sharded(model, folder / "adapter", adapter_name)
    else:
        _copy_full_into(model, load_file(str(folder / "model.safetensors")))
    with safe_open(str(folder / "optimizer.safetensors"), "pt") as f:
        saved_names = json.loads(f.metadata()["param_names"])
    names = _param_names(model, optimizer)
    if saved_names != names:
        raise ValueError(f"optimizer in {folder} was saved for parameters {saved_names}, "
                         f"this optimizer holds {names}")
    moments = load_file(str(folder / "optimizer.safetensors"))
    for group_names, group in zip(names, optimizer.param_groups):
        for name, p in zip(group_names, group["params"]):
            state = {}
            for key in [k[len(name) + 1:] for k in moments if k.startswith(name + ".")]:
                full = moments[f"{name}.{key}"]
                if full.dim() > 0:
                    full = _local_shard(p, full.to(p.dtype))
                elif group.get("fused") or group.get("capturable"):
                    full = full.to(p.device)  # these AdamW variants keep `step` on the device
                state[key] = full  # otherwise AdamW keeps its scalar `step` on the CPU
            if state:
                optimizer.state[p] = state
    return json.loads(state_path.read_text())


def _copy_full_into(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    _reshard_all(model)
    for name, p in unwrap(model).named_parameters():
        if name not in tensors:
            raise ValueError(f"checkpoint has no tensor for parameter {name!r}")
        _copy_full(p, tensors[name])


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


# --- training under torchrun ---------------------------------------------------------------------

def _sum_over_ranks(value: float) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return float(t.item())


def _clip_grad_norm(params: list, max_norm: float) -> float:
    """The global norm over every rank's shard (torch's clip works on FSDP2's DTensor gradients)."""
    from torch.distributed.tensor import DTensor

    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def _check_resume(state: dict, cfg, global_batch: int) -> None:
    """The settings an exact resume needs, as minilora.train checks them; the per-rank batch may
    change with the world size as long as the global batch (batch_size x world_size) does not."""
    from minilora.train import loop as T

    T.check_resume_settings(state.get("config", {}), cfg, skip=("batch_size",))
    if state.get("global_batch") != global_batch:
        raise ValueError(f"--resume: checkpoint was trained with a global batch of {state.get('global_batch')} "
                         f"sequences (batch_size x world_size), this run has {global_batch}; "
                         f"set --batch-size to {state.get('global_batch')} / world_size")


def train_distributed(cfg, strategy: str = "full_shard", model: nn.Module | None = None,
                      env: DistEnv | None = None) -> dict:
    """minilora.train's step (token-weighted loss, warmup + cosine, clipping, eval, checkpoints)
    on every rank of a torchrun job; returns the summary (the same on every rank).

    cfg is a train.TrainConfig; cfg.batch_size is PER RANK: one step sees batch_size * world_size
    * grad_accum sequences. Every rank draws the same global batch of batch_size * world_size and
    takes its own slice, so a run on N ranks with batch_size b sees the data a 1-rank run with
    batch_size N*b sees, and takes the same steps. Checkpoints (out/checkpoints/step-N, adapter-only
    for lora/qlora) hold full tensors and the data position in examples: they resume on any world size.
    """
    from minilora.train import loop as T
    from reference_models.files import write_json_atomic
    from minilora.train.data import BatchSampler, collate, load_dataset

    cfg.validate()
    T.check_fresh_out(cfg)
    if cfg.optimizer != "adamw":
        raise ValueError(f"optimizer must be 'adamw' under train_distributed, got {cfg.optimizer!r} "
                         "(CPUOffloadAdamW copies and frees each gradient in its accumulate hook, which may run "
                         "before DDP/FSDP2 have reduced it; FSDP2's own CPUOffloadPolicy is the sharded alternative)")
    env = env or init_distributed()
    strategy = check_strategy(strategy, env.world_size)  # before the model is built
    say = print if env.is_main and not cfg.quiet else (lambda *a, **k: None)
    # Same seed on every rank: FSDP2 shards each rank's own copy, so all copies must be equal.
    torch.manual_seed(cfg.seed)
    model, tokenizer = T.build_model(cfg, model, env.device)
    data, eval_set = T._split_eval(cfg, load_dataset(cfg.data, tokenizer, cfg.max_seq_len, cfg.tasks), tokenizer)
    if hasattr(model, "set_gradient_checkpointing"):
        model.set_gradient_checkpointing(cfg.grad_checkpointing)
    wrapped = wrap_model(model, strategy, env)
    torch.manual_seed(cfg.seed + env.rank)  # from here on (dropout) each rank draws its own numbers
    params = [p for p in wrapped.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad (check --lora-targets)")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = BatchSampler(len(data), cfg.batch_size * env.world_size, seed=cfg.seed)
    adapter = None if cfg.method == "full" else "default"
    checkpoints, autocast = Path(cfg.out) / "checkpoints", T._autocast(cfg, env.device)
    start, history = 0, []
    if cfg.resume:
        folder = T.latest_checkpoint(checkpoints)
        _check_resume(json.loads((folder / "trainer_state.json").read_text()), cfg, sampler.batch_size)
        state = load_checkpoint(wrapped, optimizer, folder, adapter)
        start, history = state["step"], state["history"]
        # the position is counted in examples, so it holds for any global batch size
        sampler.load_state_dict({**state["sampler"], "batch_size": sampler.batch_size})
        say(f"resumed at step {start} (saved by {state['world_size']} ranks, now {env.world_size})")
    say(f"minilora.distributed: {cfg.method} | {strategy} on {env.world_size} x {env.device.type} "
        f"({env.backend}) | {cfg.batch_size} x {env.world_size} x {cfg.grad_accum} sequences per step")
    wrapped.train()
    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = T.lr_at(step, cfg)
        mine = slice(env.rank * cfg.batch_size, (env.rank + 1) * cfg.batch_size)
        micro = [collate([data.examples[i] for i in sampler.next_indices()[mine]], tokenizer.pad_id)
                 for _ in range(cfg.grad_accum)]
        n_learned = _sum_over_ranks(sum(int((y != -100).sum()) for _, y in micro))
        step_loss = 0.0
        for i, (x, y) in enumerate(micro):
            weight = int((y != -100).sum()) / max(n_learned, 1)
            with no_sync(wrapped, enabled=i < len(micro) - 1):
                with autocast:
                    _, loss = wrapped(x.to(env.device), y.to(env.device))
                # DDP and FSDP2 AVERAGE gradients over ranks; times world_size makes it the sum of
                # token-weighted losses, i.e. the mean over all n_learned tokens of the step.
                (loss * weight * env.world_size).backward()
            step_loss += float(loss.detach()) * weight
        grad_norm = _clip_grad_norm(params, cfg.clip) if cfg.clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        record = {"step": done, "loss": _sum_over_ranks(step_loss), "lr": optimizer.param_groups[0]["lr"],
                  "grad_norm": grad_norm}
        history.append(record)
        if done % cfg.log_every == 0 or done == cfg.steps:
            say(f"step {done}/{cfg.steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e}")
        if eval_set is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            # every rank runs the whole eval set: FSDP2's forward is collective
            ev = T.evaluate(wrapped, eval_set, cfg.batch_size, tokenizer.pad_id, env.device, cfg.eval_batches, autocast)
            record.update(eval_loss=ev["loss"], eval_ppl=ev["ppl"])
            say(f"eval step {done} | loss {ev['loss']:.4f} | ppl {ev['ppl']:.3f}")
        if cfg.save_every and (done % cfg.save_every == 0 or done == cfg.steps):
            name = f"step-{done:06d}"
            save_checkpoint(wrapped, optimizer, checkpoints / name, done, adapter,
                            extra={"history": history, "sampler": sampler.state_dict(), "strategy": strategy,
                                   "config": asdict(cfg), "global_batch": sampler.batch_size})
            if env.is_main:  # the pointer goes last, as in minilora.train
                write_json_atomic(checkpoints / "latest.json", {"step": done, "path": name})
                T._prune_checkpoints(checkpoints, cfg.keep_checkpoints, done)
            _barrier()
    summary = {"method": cfg.method, "strategy": strategy, "world_size": env.world_size, "steps": cfg.steps,
               "final_loss": history[-1]["loss"] if history else None}
    if cfg.save_final:
        summary["saved"] = str(_save_final(wrapped, Path(cfg.out), adapter))
    say(f"done: {summary}")
    return summary


def _save_final(model: nn.Module, out: Path, adapter: str | None) -> Path:
    if adapter is not None:
        save_adapter_sharded(model, out / "adapter", adapter)
        return out / "adapter"
    from reference_models import save_pretrained

    full = gather_full_state(model)
    if not dist.is_initialized() or dist.get_rank() == 0:
        with _plain_parameters(model, full):
            save_pretrained(unwrap(model), out / "model")
    _barrier()
    return out / "model"


def main(argv=None) -> int:
    """`torchrun --nproc_per_node N -m minilora.distributed --strategy S <minilora.train flags>`."""
    import sys

    from minilora.train import loop as T

    parser = T._Parser.build()
    parser.prog = "torchrun --nproc_per_node N -m minilora.distributed"
    parser.add_argument("--strategy", default="full_shard", choices=STRATEGIES,
                        help="ddp: replicate, all-reduce grads; full_shard: FSDP2 reshard after forward (ZeRO-3); "
                             "shard_grad_op: FSDP2 keep params gathered until backward (ZeRO-2-like)")
    args = vars(parser.parse_args(argv))
    strategy = args.pop("strategy")
    try:
        train_distributed(T.TrainConfig(**args), strategy)
    except (ValueError, OSError) as exc:
        print(f"minilora.distributed: error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
