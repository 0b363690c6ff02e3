"""Training and inference GPU memory, term by term, each with the assumption behind it.

Model states are exact bytes (they equal the sum of the real tensors' nbytes in the tests);
activations come from activations.py (exact against autograd's saved tensors on CPU); the
transient terms (logits gradients, backward workspace) and the CUDA context are estimates and say so.
The cuBLAS workspaces and the loss's two fp32 gradient buffers were calibrated against
torch.cuda.max_memory_allocated on an H100 (bench/memory_validation.py, bench/memory_explain.py).

Peak (what torch.cuda.max_memory_allocated would show, the CUDA context excluded):
    weights + master weights + optimizer states + cuBLAS workspaces
    + max( backward start: activations + logits buffers + gradients already held,
           backward end:   all gradients + one block's recomputed activations + workspace,
           optimizer step: all gradients )
Gradients already held at backward start are the head's (lm_head / embedding) with
grad_accum = 1, and all of them with grad_accum > 1 (they persist between micro-batches).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .activations import ActivationSetup, activation_bytes, block_targets
from .distributed import parse_strategy, shard
from .gpus import MiB
from .lora import LoRASpec, lora_layers, lora_tensors
from .models import ModelSpec, parameter_tensors

__all__ = ["TrainingSetup", "Term", "Breakdown", "training_memory", "inference_memory", "nf4_bytes",
           "DTYPE_BYTES", "METHODS", "OPTIMIZERS", "CHECKPOINTING", "model_state_bytes"]

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd", "sgd-momentum", "offload", "offload8bit")
CHECKPOINTING = ("none", "full", "selective")
CUDA_CONTEXT = 500 * MiB      # driver + kernels; 300-1000 MiB depending on GPU and libraries
# torch's default cuBLAS workspace per handle on Hopper and newer (CUBLAS_WORKSPACE_CONFIG :4096:8;
# about 8 MiB on older GPUs). torch allocates it through its caching allocator, so it counts in
# max_memory_allocated; each thread that runs matmuls has its own handle: training has two, the
# Python thread (forward) and autograd's device thread (backward), measured on an H100.
CUBLAS_WORKSPACE = 32 * MiB
BNB_BLOCK, BNB_MIN_8BIT = 256, 4096


@dataclass(frozen=True)
class TrainingSetup:
    method: str = "lora"          # full | lora | qlora
    batch: int = 1                # micro-batch per GPU
    seq: int = 512
    grad_accum: int = 1
    grad_ckpt: str = "none"       # none | full | selective
    attn: str = "sdpa"            # sdpa (= flash) | eager
    dtype: str = "bf16"           # weights and activations (QLoRA: compute dtype of the 4-bit layers)
    master_weights: bool | None = None  # fp32 copy of trainable 16-bit weights; None: yes for full FT
    optimizer: str = "adamw"
    lora: LoRASpec = field(default_factory=LoRASpec)
    double_quant: bool = True     # QLoRA: quantize the absmax constants too (bitsandbytes' compress_statistics)
    block_size: int = 64          # NF4 block
    gpus: int = 1
    zero: str = "none"            # none | ddp | zero1 | zero2 | zero3 | fsdp-full | fsdp-grad-op
    device: str = "cuda"          # cuda | cpu (dropout masks and norm statistics differ, see activations.py)
    offload_page_size: int = 2 ** 20
    offload_gpu_pages: int = 2


@dataclass(frozen=True)
class Term:
    name: str
    gpu: int
    assumption: str
    cpu: int = 0


@dataclass
class Breakdown:
    terms: list
    peak: int                     # bytes allocated at the peak (CUDA context excluded)
    total_gpu: int                # peak + CUDA context
    cpu: int                      # host bytes (offloaded states)
    params: int
    trainable: int
    notes: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"terms": [t.__dict__ for t in self.terms], "peak_bytes": self.peak,
                "total_gpu_bytes": self.total_gpu, "cpu_bytes": self.cpu, "params": self.params,
                "trainable": self.trainable, "notes": self.notes}


def _check(setup: TrainingSetup) -> None:
    for name in ("batch", "seq", "grad_accum", "gpus"):
        value = getattr(setup, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    choices = dict(method=METHODS, grad_ckpt=CHECKPOINTING, attn=("sdpa", "flash", "eager"),
                   dtype=tuple(DTYPE_BYTES), optimizer=OPTIMIZERS, device=("cuda", "cpu"))
    for name, allowed in choices.items():
        if getattr(setup, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(setup, name)!r}")


def nf4_bytes(numel: int, block_size: int = 64, double_quant: bool = True) -> int:
    """Bytes of one NF4 weight in memory: packed codes (two per byte), then per block of
    `block_size` an fp32 absmax, or with double quantization a uint8 absmax plus one fp32 absmax2
    per 256 blocks and an fp32 offset (REFERENCE.md section 1: 4.5 vs 4.127 bits per parameter).
    The 16-entry codebook and the 256-entry dynamic map are shared constants, not counted
    (bitsandbytes' serialized format repeats them per layer: 64 B + 1 KiB)."""
    packed = (numel + 1) // 2
    blocks = -(-numel // block_size)
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * -(-blocks // 256) + 4


def _adam8bit_bytes(n: int) -> int:
    """bitsandbytes 8-bit m and v of one tensor: uint8 + an fp32 absmax per 256 elements; tensors
    under 4096 elements keep fp32 states."""
    return 2 * (n + 4 * -(-n // BNB_BLOCK)) if n >= BNB_MIN_8BIT else 2 * 4 * n


def _widest_intermediate(spec: ModelSpec) -> int:
    """Width of a block's widest activation: the (gated) MLP input or the fused q/k/v output."""
    return max(spec.intermediate_size * (2 if spec.gated_mlp else 1), spec.q_size + 2 * spec.kv_size)


def _in_first_block(name: str) -> bool:
    return ".layers.0." in name or ".h.0." in name


def _optimizer_state_bytes(shapes_numel, optimizer, state_bytes):
    """Optimizer states on the device for the given trainable tensors (list of numel)."""
    if optimizer == "adamw":  # m and v, plus torch's per-tensor fp32 `step`
        return sum(2 * n * state_bytes + 4 for n in shapes_numel)
    if optimizer == "adamw8bit":  # bitsandbytes: uint8 m, v + fp32 absmax per 256; small tensors fp32
        total = 2 * 256 * 4  # the signed and unsigned dynamic maps, shared by all tensors
        return total + sum(_adam8bit_bytes(n) for n in shapes_numel)
    if optimizer == "sgd-momentum":
        return sum(n * state_bytes for n in shapes_numel)
    return 0  # sgd, offload (states live on the host)


def _offload_host_bytes(numels, master_fp32, eight_bit):
    """CPUOffloadAdamW host memory (interfaces.md): m, v, fp32 grad buffer, fp32 master."""
    total = 0
    for n in numels:
        total += _adam8bit_bytes(n) if eight_bit else 8 * n
        total += 4 * n + (4 * n if master_fp32 else 0)
    return total


def model_state_bytes(spec: ModelSpec, setup: TrainingSetup) -> dict:
    """Exact bytes of weights, gradients, master weights and optimizer states on ONE device,
    before sharding: {"weights", "gradients", "master", "optimizer", "host", "trainable",
    "params", "trainable_shapes", "all_shapes"}."""
    d = DTYPE_BYTES[setup.dtype]
    tensors = parameter_tensors(spec)
    quantized_bytes, dense_shapes = 0, []  # NF4 bytes (LinearNF4 buffers) and the 16-bit frozen tensors
    block = {"quantized": 0, "dense": 0}  # the first transformer block's weight bytes (incl. its adapters)
    if setup.method == "full":
        trainable_shapes = [t.shape for t in tensors]
        frozen_bytes = 0
        block["dense"] = sum(t.numel for t in tensors if _in_first_block(t.name)) * d
    else:
        lora = lora_tensors(spec, setup.lora)
        trainable_shapes = [shape for _, shape in lora]
        block["dense"] = sum(math.prod(shape) for name, shape in lora if _in_first_block(name)) * d
        quantized = {f"{lin.name}.weight" for lin in _quantized_linears(spec)} if setup.method == "qlora" else set()
        frozen_bytes = 0
        for t in tensors:
            if t.name in quantized:
                nbytes, kind = nf4_bytes(t.numel, setup.block_size, setup.double_quant), "quantized"
            elif setup.method == "qlora" and t.kind == "experts":
                per = t.numel // t.shape[0]  # each expert quantized as its own (out, in) matrix
                nbytes, kind = t.shape[0] * nf4_bytes(per, setup.block_size, setup.double_quant), "quantized"
            else:
                nbytes, kind = t.numel * d, "dense"
                frozen_bytes += nbytes
                dense_shapes.append(t.shape)
            if kind == "quantized":
                quantized_bytes += nbytes
            if _in_first_block(t.name):
                block[kind] += nbytes
        frozen_bytes += quantized_bytes
    numels = [math.prod(s) for s in trainable_shapes]
    trainable = sum(numels)
    master = setup.master_weights if setup.master_weights is not None else setup.method == "full"
    master = bool(master) and d != 4
    state_bytes = 4 if (master or d == 4) else d
    offload = setup.optimizer.startswith("offload")
    out = {
        "weights": frozen_bytes + trainable * d,
        "gradients": 0 if offload else trainable * d,
        "master": 0 if offload else (4 * trainable if master else 0),
        "optimizer": _optimizer_state_bytes(numels, setup.optimizer, state_bytes),
        "optimizer_scalars": 4 * len(numels) if setup.optimizer == "adamw" else 0,
        "host": _offload_host_bytes(numels, master, setup.optimizer == "offload8bit") if offload else 0,
        "trainable": trainable, "params": sum(t.numel for t in tensors),
        "trainable_shapes": trainable_shapes, "all_shapes": [t.shape for t in tensors],
        "master_fp32": master, "state_bytes": state_bytes,
        "quantized_bytes": quantized_bytes, "dense_shapes": dense_shapes,
        "block_quantized_bytes": block["quantized"], "block_dense_bytes": block["dense"],
    }
    return out


def _quantized_linears(spec: ModelSpec):
    """QLoRA quantizes every linear layer except lm_head (embeddings and norms stay 16-bit)."""
    from .models import linear_layers
    return [lin for lin in linear_layers(spec) if lin.name != "lm_head"]


def training_memory(spec: ModelSpec, setup: TrainingSetup) -> Breakdown:
    _check(setup)
    strategy = parse_strategy(setup.zero, setup.gpus)
    n_gpu, d = setup.gpus, DTYPE_BYTES[setup.dtype]
    states = model_state_bytes(spec, setup)
    terms = []
    dname = setup.dtype
    w_assume = {"full": f"all {states['params']:,} parameters in {dname}",
                "lora": f"base weights frozen in {dname}, {states['trainable']:,} LoRA parameters in {dname}",
                "qlora": (f"linear layers in NF4 (block {setup.block_size}, "
                          f"{'double quantization: 4.127' if setup.double_quant else 'fp32 absmax: 4.5'} bits/param"
                          f" + constants); embeddings, norms, lm_head and {states['trainable']:,} LoRA "
                          f"parameters in {dname}")}[setup.method]
    fsdp = strategy.startswith("fsdp") and n_gpu > 1

    def sharded(category, nbytes, shapes=None, per_el=None):
        # FSDP2 chunks every tensor on dim 0 (rank 0 holds the largest piece); ZeRO one flat buffer
        return shard(category, nbytes, strategy, n_gpu, shapes, per_el)

    tshapes = states["trainable_shapes"]
    all_shapes = states["all_shapes"] + ([] if setup.method == "full" else tshapes)
    if setup.method == "qlora" and fsdp:
        # FSDP2 shards parameters only; LinearNF4 keeps its codes and scales in buffers, which every
        # rank holds whole (measured in tests/test_distributed.py)
        dense = states["weights"] - states["quantized_bytes"]
        weights = states["quantized_bytes"] + sharded("weights", dense, states["dense_shapes"] + tshapes, d)
        w_note = f", NF4 buffers replicated and the rest sharded over {n_gpu} GPUs ({strategy})"
    else:
        weights = sharded("weights", states["weights"], None if setup.method == "qlora" else all_shapes, d)
        w_note = _shard_note("weights", strategy, n_gpu)
    terms.append(Term("weights", weights, w_assume + w_note))
    grads = 0 if not states["gradients"] else sharded("gradients", states["gradients"], tshapes, d)
    offload = setup.optimizer.startswith("offload")
    terms.append(Term("gradients", grads,
                      "none kept on the GPU: each .grad is copied to a host fp32 buffer as it is produced"
                      if offload else f"one {dname} gradient per trainable parameter" + _shard_note("gradients", strategy, n_gpu)))
    master = 0 if not states["master"] else sharded("optimizer", states["master"], tshapes, 4)
    terms.append(Term("master weights", master,
                      ("fp32 copy of the trainable weights (mixed precision)" if master else
                       "none: optimizer updates the weights in their own dtype") + _shard_note("optimizer", strategy, n_gpu)))
    sb = states["state_bytes"]
    scalars = states["optimizer_scalars"]  # per-tensor step counters: every rank keeps them whole
    moments = states["optimizer"] - scalars
    per_el = {"adamw": 2 * sb, "sgd-momentum": sb}.get(setup.optimizer)
    opt = scalars + (0 if not moments else sharded("optimizer", moments, tshapes if per_el else None, per_el))
    opt_assume = {
        "adamw": f"AdamW m and v in {'fp32' if sb == 4 else dname} (+4 B step per tensor)",
        "adamw8bit": "bitsandbytes 8-bit AdamW: uint8 m, v + fp32 absmax per 256; tensors < 4096 elements keep fp32",
        "sgd": "plain SGD: no state",
        "sgd-momentum": f"SGD momentum buffer in {'fp32' if sb == 4 else dname}",
        "offload": "CPUOffloadAdamW: m, v on the host",
        "offload8bit": "CPUOffloadAdamW(state_bits=8): 8-bit m, v on the host",
    }[setup.optimizer]
    host = 0
    if offload:
        staging = setup.offload_gpu_pages * setup.offload_page_size * 4
        host = sharded("optimizer", states["host"])
        terms.append(Term("optimizer states", staging,
                          f"{opt_assume}; GPU holds {setup.offload_gpu_pages} fp32 staging pages of "
                          f"{setup.offload_page_size:,} elements; host: m, v, fp32 grad buffer"
                          + (", fp32 master" if states["master_fp32"] else ""), cpu=host))
        opt = staging
    else:
        terms.append(Term("optimizer states", opt, opt_assume + _shard_note("optimizer", strategy, n_gpu)))

    # activations: what autograd saves, replayed from the reference models' code
    lora_names = frozenset()
    if setup.method != "full":
        lora_names = block_targets(lin.name for lin in lora_layers(spec, setup.lora.targets))
    act_setup = ActivationSetup(batch=setup.batch, seq=setup.seq, dtype_bytes=d,
                                attn="eager" if setup.attn == "eager" else "sdpa",
                                grad_ckpt=setup.grad_ckpt, device=setup.device,
                                trainable="all" if setup.method == "full" else "lora",
                                lora_targets=lora_names, lora_rank=setup.lora.rank,
                                lora_dropout=setup.lora.dropout)
    act = activation_bytes(spec, act_setup)
    ckpt_note = {"none": "every block keeps what autograd saves",
                 "full": "checkpointing: each block keeps only its input; one block is recomputed at a time",
                 "selective": "selective recomputation of attention's (B, H, T, T) core"}[setup.grad_ckpt]
    attn_note = "eager attention keeps (B, H, T, T) scores" if setup.attn == "eager" else "SDPA/flash: no (B, H, T, T) matrix"
    lora_note = ""
    if setup.method != "full" and setup.lora.dropout > 0:
        lora_note = f"; LoRA dropout {setup.lora.dropout} keeps a mask and a dropped copy of each adapted input"
    terms.append(Term("activations", act["total"] - act["loss"],
                      f"saved for backward, batch {setup.batch} x seq {setup.seq}, {dname}; {ckpt_note}; "
                      f"{attn_note}{lora_note}"))
    recompute = act["layer_full"] if setup.grad_ckpt == "full" else 0
    if recompute:
        terms.append(Term("recomputed block", recompute,
                          "one block's activations rebuilt during its backward (full checkpointing)"))
    btv = setup.batch * setup.seq * spec.vocab_size
    # at backward start nll_loss's fp32 gradient and log_softmax's fp32 gradient are alive together
    # (the cast back to the logits' dtype comes after the first is freed): measured on an H100
    logits = btv * d + act["loss"] + 2 * btv * 4
    terms.append(Term("logits and loss", logits,
                      f"logits (B, T, V={spec.vocab_size:,}) in {dname} held by the caller, fp32 log-softmax "
                      "saved by the loss, and two fp32 (B, T, V) gradients alive together at backward start"))
    inter = _widest_intermediate(spec)
    workspace = setup.batch * setup.seq * (2 * inter + 2 * spec.hidden_size) * d
    if setup.attn == "eager":
        workspace += 2 * setup.batch * spec.num_heads * setup.seq ** 2 * 4
    terms.append(Term("backward workspace", workspace,
                      "estimate: gradients of one block's widest intermediates (and of its scores when eager)"))

    extra = _strategy_buffers(setup, strategy, states, weights)
    if setup.device == "cuda":
        extra.append(Term("cuBLAS workspaces", 2 * CUBLAS_WORKSPACE,
                          "torch's cuBLAS workspace (32 MiB on Hopper) for the forward thread and for "
                          "autograd's backward thread; allocated once, held for the whole run"))
    terms += extra

    static = weights + master + opt + sum(t.gpu for t in extra)
    head_grads = 0
    if setup.method == "full":
        head_grads = spec.vocab_size * spec.hidden_size * d * (1 if spec.tie_word_embeddings else 2)
        head_grads = min(head_grads, grads)
    held = grads if setup.grad_accum > 1 else head_grads
    act_total = act["total"] - act["loss"]
    start = act_total + logits + held
    end = grads + recompute + workspace + (act["layers"][0] if act["layers"] else 0)
    step = grads
    peak = static + max(start, end, step)
    context = CUDA_CONTEXT if setup.device == "cuda" else 0
    terms.append(Term("CUDA context", context,
                      "assumed 500 MiB for the driver context and kernels (300-1000 MiB by GPU and libraries); "
                      "not in max_memory_allocated"))
    notes = [f"peak = static {static:,} + max(backward start {start:,}, backward end {end:,}, step {step:,})",
             f"strategy {strategy} on {n_gpu} GPU(s); micro-batch {setup.batch}, grad_accum {setup.grad_accum}"]
    return Breakdown(terms, peak, peak + context, host, states["params"], states["trainable"], notes)


def _shard_note(category, strategy, n):
    from .distributed import _SHARDED
    if n > 1 and category in _SHARDED[strategy]:
        return f", sharded over {n} GPUs ({strategy})"
    return ""


def _strategy_buffers(setup, strategy, states, weights):
    """Per-GPU buffers a strategy adds; `weights` is the per-rank weights term already counted."""
    out = []
    if strategy == "ddp" and not setup.optimizer.startswith("offload"):
        out.append(Term("DDP gradient buckets", states["gradients"],
                        "a second copy of the gradients (gradient_as_bucket_view=False, torch's default)"))
    fsdp_qlora = setup.method == "qlora" and strategy.startswith("fsdp")
    nf4_note = "; NF4 buffers are never sharded, so never gathered" if fsdp_qlora else ""
    if strategy in ("zero3", "fsdp-full") and setup.gpus > 1:
        block = states["block_dense_bytes"] + (0 if fsdp_qlora else states["block_quantized_bytes"])
        out.append(Term("gathered parameters", 2 * block,
                        "two transformer blocks all-gathered at once (current + prefetched)" + nf4_note))
    if strategy == "fsdp-grad-op" and setup.gpus > 1:
        # every rank ends the forward holding every weight once: the unsharded total minus its own shard
        out.append(Term("gathered parameters", states["weights"] - weights,
                        "reshard_after_forward=False: every block stays gathered from forward to backward"
                        + nf4_note))
    return out


def inference_memory(spec: ModelSpec, batch: int = 1, prompt: int = 512, new_tokens: int = 256,
                     dtype: str = "bf16", quant: str = "none", attn: str = "sdpa",
                     double_quant: bool = True) -> Breakdown:
    """Generation with the reference models' KV cache (preallocated for prompt + new_tokens)."""
    for name, value in (("batch", batch), ("prompt", prompt), ("new_tokens", new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "new_tokens" else 1):
            raise ValueError(f"{name} must be an integer >= {0 if name == 'new_tokens' else 1}, got {value!r}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if quant not in ("none", "nf4"):
        raise ValueError(f"quant must be none or nf4, got {quant!r}")
    d = DTYPE_BYTES[dtype]
    tensors = parameter_tensors(spec)
    quantized = {f"{lin.name}.weight" for lin in _quantized_linears(spec)} if quant == "nf4" else set()
    weights = sum(nf4_bytes(t.numel, 64, double_quant) if t.name in quantized else t.numel * d for t in tensors)
    total_len = prompt + new_tokens
    kv = 2 * spec.num_layers * batch * spec.num_kv_heads * total_len * spec.head_dim * d
    inter = _widest_intermediate(spec)
    prefill = batch * prompt * (spec.vocab_size + 2 * inter + 2 * spec.hidden_size) * d
    if attn == "eager":
        prefill += batch * spec.num_heads * prompt * total_len * (4 + d)
    terms = [Term("weights", weights, f"{'NF4 linear layers, ' if quant == 'nf4' else ''}{dtype} otherwise"),
             Term("KV cache", kv, f"keys and values of {spec.num_layers} layers x {spec.num_kv_heads} kv heads x "
                                  f"{total_len} positions x batch {batch}, {dtype}, preallocated"),
             Term("prefill working memory", prefill,
                  "logits for every prompt position + one block's widest intermediates"
                  + (" + eager attention scores" if attn == "eager" else "")),
             Term("cuBLAS workspace", CUBLAS_WORKSPACE, "torch's cuBLAS workspace for the one thread that "
                  "runs the matmuls (32 MiB on Hopper)"),
             Term("CUDA context", CUDA_CONTEXT, "assumed 500 MiB for the driver context and kernels; "
                  "not in max_memory_allocated")]
    peak = weights + kv + prefill + CUBLAS_WORKSPACE
    return Breakdown(terms, peak, peak + CUDA_CONTEXT, 0, sum(t.numel for t in tensors), 0)
