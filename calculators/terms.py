"""The terms of training memory on one GPU: one function per term, each returning its bytes with the
assumption behind them. memory.py adds them up into the peak.

Every term reads a TrainingRun: the model, the setup, and what follows from them, resolved once (the
sharding strategy, the exact model states with their precision, the activation bytes). A term takes
no dtype from the setup itself; `Precision.of` decides them all. A term a setup does not have
(no recomputation without full checkpointing, no cuBLAS workspaces on CPU) is None.

Model states are exact; activations come from activations.py (exact against autograd's saved
tensors on CPU); the transient terms (logits gradients, backward workspace) and the CUDA context
are estimates and say so. The cuBLAS workspaces and the loss's two fp32 gradient buffers were
calibrated against torch.cuda.max_memory_allocated on an H100 (bench/memory_validation.py,
bench/memory_explain.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from .activations import ActivationSetup, activation_bytes, block_targets
from .distributed import parse_strategy, shard, shard_note
from .gpus import MiB
from .lora import lora_layers
from .spec import ModelSpec
from .states import ModelStates, model_state_bytes
from .training_setup import Precision, TrainingSetup, check_setup

__all__ = ["Term", "TrainingRun", "plan_training", "widest_intermediate", "CUDA_CONTEXT", "CUBLAS_WORKSPACE",
           "weights_term", "gradients_term", "master_weights_term", "optimizer_states_term",
           "activations_term", "recomputed_block_term", "logits_and_loss_term", "backward_workspace_term",
           "ddp_buckets_term", "gathered_parameters_term", "cublas_workspaces_term", "cuda_context_term",
           "gradients_held_at_backward_start", "first_block_activations"]

CUDA_CONTEXT = 500 * MiB      # driver + kernels; 300-1000 MiB depending on GPU and libraries
# torch's default cuBLAS workspace per handle on Hopper and newer (CUBLAS_WORKSPACE_CONFIG :4096:8;
# about 8 MiB on older GPUs). torch allocates it through its caching allocator, so it counts in
# max_memory_allocated; each thread that runs matmuls has its own handle: training has two, the
# Python thread (forward) and autograd's device thread (backward), measured on an H100.
CUBLAS_WORKSPACE = 32 * MiB


@dataclass(frozen=True)
class Term:
    name: str
    gpu: int
    assumption: str
    cpu: int = 0


@dataclass(frozen=True)
class TrainingRun:
    """One training run resolved: what every term reads."""
    spec: ModelSpec
    setup: TrainingSetup
    strategy: str                 # a distributed.STRATEGIES name
    states: ModelStates           # exact, on one device before sharding
    activations: dict             # activation_bytes' parts

    @property
    def precision(self) -> Precision:
        return self.states.precision

    @property
    def offload(self) -> bool:    # CPUOffloadAdamW: states on the host, gradients streamed to it
        return self.setup.optimizer.startswith("offload")

    def shard(self, category: str, nbytes: int, shapes=None, bytes_per_el=None) -> int:
        """Rank 0's bytes of a model-state category under this run's strategy (distributed.shard)."""
        return shard(category, nbytes, self.strategy, self.setup.gpus, shapes, bytes_per_el)

    def shard_note(self, category: str) -> str:
        return shard_note(category, self.strategy, self.setup.gpus)


def plan_training(spec: ModelSpec, setup: TrainingSetup) -> TrainingRun:
    """Validate the setup and resolve everything the terms read (errors name the bad value)."""
    check_setup(setup)
    strategy = parse_strategy(setup.zero, setup.gpus)
    states = model_state_bytes(spec, setup)
    p = states.precision
    lora_names = frozenset()
    if setup.method != "full":
        lora_names = block_targets(lin.name for lin in lora_layers(spec, setup.lora.targets))
    act_setup = ActivationSetup(batch=setup.batch, seq=setup.seq, dtype_bytes=p.activations,
                                attn="eager" if setup.attn == "eager" else "sdpa",
                                grad_ckpt=setup.grad_ckpt, device=setup.device,
                                trainable="all" if setup.method == "full" else "lora",
                                lora_targets=lora_names, lora_rank=setup.lora.rank,
                                lora_dropout=setup.lora.dropout, lora_dtype_bytes=p.adapters)
    return TrainingRun(spec, setup, strategy, states, activation_bytes(spec, act_setup))


def widest_intermediate(spec: ModelSpec) -> int:
    """Width of a block's widest activation: the (gated) MLP input or the fused q/k/v output."""
    return max(spec.intermediate_size * (2 if spec.gated_mlp else 1), spec.q_size + 2 * spec.kv_size)


# --- model states -------------------------------------------------------------------------------

def weights_term(run: TrainingRun) -> Term:
    s, st, p = run.setup, run.states, run.precision
    assumption = {
        "full": f"all {st.params:,} parameters in {p.name}",
        "lora": f"base weights frozen in {p.name}, {st.trainable:,} LoRA parameters in {p.name}",
        "qlora": (f"linear layers in NF4 (block {s.block_size}, "
                  f"{'double quantization: 4.127' if s.double_quant else 'fp32 absmax: 4.5'} bits/param"
                  f" + constants); embeddings, norms, lm_head and {st.trainable:,} LoRA "
                  f"parameters in {p.name}")}[s.method]
    if s.method == "qlora" and run.strategy.startswith("fsdp") and s.gpus > 1:
        # FSDP2 shards parameters only; LinearNF4 keeps its codes and scales in buffers, which every
        # rank holds whole (measured in tests/test_distributed.py)
        dense = run.shard("weights", st.weights - st.quantized_bytes, st.dense_shapes + st.trainable_shapes,
                          p.weights)
        return Term("weights", st.quantized_bytes + dense, assumption + f", NF4 buffers replicated and the rest "
                    f"sharded over {s.gpus} GPUs ({run.strategy})")
    # FSDP2 chunks every tensor on dim 0 (rank 0 holds the largest piece); ZeRO one flat buffer
    shapes = None if s.method == "qlora" else st.all_shapes + (() if s.method == "full" else st.trainable_shapes)
    return Term("weights", run.shard("weights", st.weights, shapes, p.weights),
                assumption + run.shard_note("weights"))


def gradients_term(run: TrainingRun) -> Term:
    st = run.states
    gpu = run.shard("gradients", st.gradients, st.trainable_shapes, run.precision.gradients) if st.gradients else 0
    if run.offload:
        return Term("gradients", gpu, "none kept on the GPU: each .grad is copied to a host fp32 buffer as "
                                      "it is produced")
    return Term("gradients", gpu, f"one {run.precision.name} gradient per trainable parameter"
                + run.shard_note("gradients"))


def master_weights_term(run: TrainingRun) -> Term:
    st = run.states
    gpu = run.shard("optimizer", st.master, st.trainable_shapes, run.precision.master) if st.master else 0
    text = "fp32 copy of the trainable weights (mixed precision)" if gpu else \
        "none: optimizer updates the weights in their own dtype"
    return Term("master weights", gpu, text + run.shard_note("optimizer"))


def optimizer_states_term(run: TrainingRun) -> Term:
    s, st = run.setup, run.states
    state = "fp32" if run.precision.optimizer_states == 4 else run.precision.name
    assumption = {
        "adamw": f"AdamW m and v in {state} (+4 B step per tensor)",
        "adamw8bit": "bitsandbytes 8-bit AdamW: uint8 m, v + fp32 absmax per 256; tensors < 4096 elements keep fp32",
        "sgd": "plain SGD: no state",
        "sgd-momentum": f"SGD momentum buffer in {state}",
        "offload": "CPUOffloadAdamW: m, v on the host",
        "offload8bit": "CPUOffloadAdamW(state_bits=8): 8-bit m, v on the host",
    }[s.optimizer]
    if run.offload:
        staging = s.offload_gpu_pages * s.offload_page_size * 4
        return Term("optimizer states", staging,
                    f"{assumption}; GPU holds {s.offload_gpu_pages} fp32 staging pages of "
                    f"{s.offload_page_size:,} elements; host: m, v, fp32 grad buffer"
                    + (", fp32 master" if run.precision.master else ""), cpu=run.shard("optimizer", st.host))
    moments = st.optimizer - st.optimizer_scalars  # the step scalars: every rank keeps them whole
    per_el = {"adamw": 2, "sgd-momentum": 1}.get(s.optimizer, 0) * run.precision.optimizer_states
    # 8-bit states have no fixed bytes per element (an absmax per 256, small tensors in fp32): split flat
    if moments:
        moments = run.shard("optimizer", moments, st.trainable_shapes if per_el else None, per_el or None)
    return Term("optimizer states", st.optimizer_scalars + moments, assumption + run.shard_note("optimizer"))


# --- activations and what backward adds -----------------------------------------------------------

def activations_term(run: TrainingRun) -> Term:
    s, act = run.setup, run.activations
    checkpointing = {"none": "every block keeps what autograd saves",
                     "full": "checkpointing: each block keeps only its input; one block is recomputed at a time",
                     "selective": "selective recomputation of attention's (B, H, T, T) core"}[s.grad_ckpt]
    attention = "eager attention keeps (B, H, T, T) scores" if s.attn == "eager" else \
        "SDPA/flash: no (B, H, T, T) matrix"
    dropout = ""
    if s.method != "full" and s.lora.dropout > 0:
        dropout = f"; LoRA dropout {s.lora.dropout} keeps a mask and a dropped copy of each adapted input"
    return Term("activations", act["total"] - act["loss"],
                f"saved for backward, batch {s.batch} x seq {s.seq}, {run.precision.name}; {checkpointing}; "
                f"{attention}{dropout}")


def recomputed_block_term(run: TrainingRun) -> Term | None:
    recompute = run.activations["layer_full"] if run.setup.grad_ckpt == "full" else 0
    if not recompute:
        return None
    return Term("recomputed block", recompute,
                "one block's activations rebuilt during its backward (full checkpointing)")


def logits_and_loss_term(run: TrainingRun) -> Term:
    s, vocab = run.setup, run.spec.vocab_size
    btv = s.batch * s.seq * vocab
    # at backward start nll_loss's fp32 gradient and log_softmax's fp32 gradient are alive together
    # (the cast back to the logits' dtype comes after the first is freed): measured on an H100
    logits = btv * run.precision.logits + run.activations["loss"] + 2 * btv * 4
    return Term("logits and loss", logits,
                f"logits (B, T, V={vocab:,}) in {run.precision.name} held by the caller, fp32 log-softmax "
                "saved by the loss, and two fp32 (B, T, V) gradients alive together at backward start")


def backward_workspace_term(run: TrainingRun) -> Term:
    s, spec = run.setup, run.spec
    workspace = s.batch * s.seq * (2 * widest_intermediate(spec) + 2 * spec.hidden_size) * run.precision.activations
    if s.attn == "eager":
        workspace += 2 * s.batch * spec.num_heads * s.seq ** 2 * 4
    return Term("backward workspace", workspace,
                "estimate: gradients of one block's widest intermediates (and of its scores when eager)")


def gradients_held_at_backward_start(run: TrainingRun, gradients: int) -> int:
    """Gradients alive when backward starts: all of them with grad_accum > 1 (they persist between
    micro-batches), else the head's (lm_head / embedding, produced first) with full fine-tuning."""
    if run.setup.grad_accum > 1:
        return gradients
    if run.setup.method != "full":
        return 0
    spec = run.spec
    head = spec.vocab_size * spec.hidden_size * run.precision.gradients * (1 if spec.tie_word_embeddings else 2)
    return min(head, gradients)


def first_block_activations(run: TrainingRun) -> int:
    """What the first block saved, still alive when backward reaches it last."""
    return run.activations["layers"][0] if run.activations["layers"] else 0


# --- buffers a strategy or the device adds ----------------------------------------------------

def ddp_buckets_term(run: TrainingRun) -> Term | None:
    if run.strategy != "ddp" or run.offload:
        return None
    return Term("DDP gradient buckets", run.states.gradients,
                "a second copy of the gradients (gradient_as_bucket_view=False, torch's default)")


def gathered_parameters_term(run: TrainingRun, weights: int) -> Term | None:
    """Sharded parameters all-gathered for compute; `weights` is the per-rank weights term."""
    s, st = run.setup, run.states
    if s.gpus == 1 or run.strategy not in ("zero3", "fsdp-full", "fsdp-grad-op"):
        return None
    fsdp_qlora = s.method == "qlora" and run.strategy.startswith("fsdp")
    nf4_note = "; NF4 buffers are never sharded, so never gathered" if fsdp_qlora else ""
    if run.strategy == "fsdp-grad-op":
        # every rank ends the forward holding every weight once: the unsharded total minus its own shard
        return Term("gathered parameters", st.weights - weights,
                    "reshard_after_forward=False: every block stays gathered from forward to backward" + nf4_note)
    block = st.block_dense_bytes + (0 if fsdp_qlora else st.block_quantized_bytes)
    return Term("gathered parameters", 2 * block,
                "two transformer blocks all-gathered at once (current + prefetched)" + nf4_note)


def cublas_workspaces_term(run: TrainingRun) -> Term | None:
    if run.setup.device != "cuda":
        return None
    return Term("cuBLAS workspaces", 2 * CUBLAS_WORKSPACE,
                "torch's cuBLAS workspace (32 MiB on Hopper) for the forward thread and for "
                "autograd's backward thread; allocated once, held for the whole run")


def cuda_context_term(run: TrainingRun) -> Term:
    return Term("CUDA context", CUDA_CONTEXT if run.setup.device == "cuda" else 0,
                "assumed 500 MiB for the driver context and kernels (300-1000 MiB by GPU and libraries); "
                "not in max_memory_allocated")
