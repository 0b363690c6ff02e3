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

Each term also carries its formula with the numbers put in (`python -m minilora.calc vram
--explain`), written so that it evaluates to the term's GPU bytes: numbers joined by x, +, -, /,
parentheses and ceil(...), each number followed by words saying what it counts (no numbers
inside those words).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .activations import ActivationSetup, activation_bytes, block_targets
from .distributed import is_sharded, parse_strategy, shard, shard_note
from .gpus import MiB
from .lora import lora_layers
from .mla import mla_projections
from .moe import busiest_expert_tokens
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
    formula: str = ""             # how `gpu` is computed, with the numbers put in (module docstring)


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

    def sharded(self, category: str, nbytes: int, formula: str, shapes=None, bytes_per_el=None) -> tuple[int, str]:
        """`shard`'s bytes, and the formula that gives them from the unsharded `formula` of `nbytes`."""
        rank0 = self.shard(category, nbytes, shapes, bytes_per_el)
        if not is_sharded(category, self.strategy, self.setup.gpus):
            return rank0, formula
        if self.strategy.startswith("fsdp") and shapes is not None and bytes_per_el:
            return rank0, f"{rank0 // bytes_per_el:,} rank-0 elements x {bytes_per_el} B"
        return rank0, f"ceil(({formula}) / {self.setup.gpus} GPUs)"

    def per_trainable(self, category: str, nbytes: int, bytes_per_el: int) -> tuple[int, str]:
        """Rank 0's bytes and formula of a tensor per trainable parameter (gradients, master copy),
        `nbytes` in all before sharding (0: the run keeps none on the GPU)."""
        if not nbytes:
            return 0, "0 B"
        return self.sharded(category, nbytes, f"{self.states.trainable:,} params x {bytes_per_el} B",
                            self.states.trainable_shapes, bytes_per_el)


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
    """Width of a block's widest activation over all its tokens: the (gated) MLP input (a mixture of
    experts: its dense layers' or shared expert's; routed experts see fewer tokens, see
    backward_workspace_term) or the fused q/k/v output (MLA: its widest projection)."""
    mlp = spec.intermediate_size
    if spec.num_experts:
        mlp = max(spec.intermediate_size if spec.dense_layers else 0, spec.shared_expert_size)
    attention = max(n_out for _, _, n_out, _ in mla_projections(spec)) if spec.mla else spec.q_size + 2 * spec.kv_size
    return max(mlp * (2 if spec.gated_mlp else 1), attention)


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
    if run.spec.num_experts:
        assumption += (f"; all {run.spec.num_experts} experts of every sparse layer resident"
                       + (f" (each expert's matrices in NF4), routers in {p.name}" if s.method == "qlora" else ""))
    nf4 = f"{st.quantized_bytes:,} B NF4 codes and constants + " if st.quantized_bytes else ""
    dense = sum(math.prod(shape) for shape in st.dense_shapes)
    dense = f"{dense:,} frozen params x {p.weights} B + " if dense else ""
    trained = f"{st.trainable:,} {'params' if s.method == 'full' else 'LoRA params'} x " \
              f"{p.weights if s.method == 'full' else p.adapters} B"
    if s.method == "qlora" and run.strategy.startswith("fsdp") and s.gpus > 1:
        # FSDP2 shards parameters only; LinearNF4 keeps its codes and scales in buffers, which every
        # rank holds whole (measured in tests/test_distributed.py)
        dense, formula = run.sharded("weights", st.weights - st.quantized_bytes, dense + trained,
                                     st.dense_shapes + st.trainable_shapes, p.weights)
        return Term("weights", st.quantized_bytes + dense, assumption + f", NF4 buffers replicated and the rest "
                    f"sharded over {s.gpus} GPUs ({run.strategy})", formula=nf4 + formula)
    # FSDP2 chunks every tensor on dim 0 (rank 0 holds the largest piece); ZeRO one flat buffer
    shapes = None if s.method == "qlora" else st.all_shapes + (() if s.method == "full" else st.trainable_shapes)
    gpu, formula = run.sharded("weights", st.weights, nf4 + dense + trained, shapes, p.weights)
    return Term("weights", gpu, assumption + run.shard_note("weights"), formula=formula)


def gradients_term(run: TrainingRun) -> Term:
    gpu, formula = run.per_trainable("gradients", run.states.gradients, run.precision.gradients)
    if run.offload:
        return Term("gradients", gpu, "none kept on the GPU: each .grad is copied to a host fp32 buffer as "
                                      "it is produced", formula=formula)
    return Term("gradients", gpu, f"one {run.precision.name} gradient per trainable parameter"
                + run.shard_note("gradients"), formula=formula)


def master_weights_term(run: TrainingRun) -> Term:
    gpu, formula = run.per_trainable("optimizer", run.states.master, run.precision.master)
    text = "fp32 copy of the trainable weights (mixed precision)" if gpu else \
        "none: optimizer updates the weights in their own dtype"
    return Term("master weights", gpu, text + run.shard_note("optimizer"), formula=formula)


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
                    + (", fp32 master" if run.precision.master else ""), cpu=run.shard("optimizer", st.host),
                    formula=f"{s.offload_gpu_pages} pages x {s.offload_page_size:,} elements x 4 B")
    moments = st.optimizer - st.optimizer_scalars  # the step scalars: every rank keeps them whole
    count = {"adamw": 2, "sgd-momentum": 1}.get(s.optimizer, 0)
    per_el = count * run.precision.optimizer_states
    formula = "0 B"
    # 8-bit states have no fixed bytes per element (an absmax per 256, small tensors in fp32): split flat
    if moments:
        formula = (f"{count} states x {st.trainable:,} params x {run.precision.optimizer_states} B" if per_el else
                   f"{moments:,} B uint8 states with their absmax and the shared maps")
        moments, formula = run.sharded("optimizer", moments, formula, st.trainable_shapes if per_el else None,
                                       per_el or None)
    if st.optimizer_scalars:
        formula = f"{st.optimizer_scalars // 4:,} tensors x 4 B step + {formula}"
    return Term("optimizer states", st.optimizer_scalars + moments, assumption + run.shard_note("optimizer"),
                formula=formula)


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
    experts = ""
    if run.spec.num_experts:  # what the experts keep grows with the routed pairs, not with how they spread
        experts = f"; experts: {run.spec.experts_per_token} routed copies of every token (whatever the balance)"
    parts = [(act["embedding"], "B embedding"), (act["shared"], "B RoPE cos and sin"),
             (act["head"], "B final norm and head input")]
    blocks = " + ".join(f"{n} block{'s' * (n > 1)} x {nbytes:,} B" for nbytes, n in _runs(act["layers"]))
    formula = " + ".join([blocks] * bool(blocks) + [f"{n:,} {what}" for n, what in parts if n]) or "0 B"
    return Term("activations", act["total"] - act["loss"],
                f"saved for backward, batch {s.batch} x seq {s.seq}, {run.precision.name}; {checkpointing}; "
                f"{attention}{dropout}{experts}", formula=formula)


def _runs(values: list) -> list[tuple]:
    """[a, a, b, a] -> [(a, 2), (b, 1), (a, 1)]: equal neighbours counted once."""
    runs = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1] + 1)
        else:
            runs.append((v, 1))
    return runs


def recomputed_block_term(run: TrainingRun) -> Term | None:
    recompute = run.activations["layer_full"] if run.setup.grad_ckpt == "full" else 0
    if not recompute:
        return None
    return Term("recomputed block", recompute,
                "one block's activations rebuilt during its backward (full checkpointing)",
                formula=f"{recompute:,} B one block's saved tensors")


def logits_and_loss_term(run: TrainingRun) -> Term:
    s, vocab = run.setup, run.spec.vocab_size
    btv = s.batch * s.seq * vocab
    # at backward start nll_loss's fp32 gradient and log_softmax's fp32 gradient are alive together
    # (the cast back to the logits' dtype comes after the first is freed): measured on an H100
    logits = btv * run.precision.logits + run.activations["loss"] + 2 * btv * 4
    shape = f"{s.batch} batch x {s.seq:,} seq x {vocab:,} vocab"
    return Term("logits and loss", logits,
                f"logits (B, T, V={vocab:,}) in {run.precision.name} held by the caller, fp32 log-softmax "
                "saved by the loss, and two fp32 (B, T, V) gradients alive together at backward start",
                formula=f"{shape} x {run.precision.logits} B logits + {run.activations['loss']:,} B saved by the "
                        f"loss + 2 gradients x {shape} x 4 B")


def backward_workspace_term(run: TrainingRun) -> Term:
    s, spec = run.setup, run.spec
    workspace = s.batch * s.seq * (2 * widest_intermediate(spec) + 2 * spec.hidden_size) * run.precision.activations
    formula = (f"{s.batch} batch x {s.seq:,} seq x (2 x {widest_intermediate(spec):,} widest + 2 x "
               f"{spec.hidden_size:,} hidden) x {run.precision.activations} B")
    experts = ""
    if spec.num_experts:  # the busiest expert's gate/up gradients, over the tokens routed to it
        busiest = busiest_expert_tokens(spec, s.batch * s.seq, s.expert_imbalance)
        expert = busiest * (4 * spec.moe_intermediate_size + 2 * spec.hidden_size) * run.precision.activations
        experts = f"; the busiest expert's {busiest:,} tokens (imbalance {s.expert_imbalance:g} x balanced)"
        if expert > workspace:
            workspace, formula = expert, (f"{busiest:,} busiest-expert tokens x (4 x {spec.moe_intermediate_size:,} "
                                          f"expert I + 2 x {spec.hidden_size:,} hidden) x {run.precision.activations} B")
    if s.attn == "eager":
        workspace += 2 * s.batch * spec.num_heads * s.seq ** 2 * 4
        formula += f" + 2 scores x {s.batch} batch x {spec.num_heads} heads x {s.seq:,} x {s.seq:,} seq x 4 B"
    return Term("backward workspace", workspace,
                "estimate: gradients of one block's widest intermediates (and of its scores when eager)" + experts,
                formula=formula)


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
                "a second copy of the gradients (gradient_as_bucket_view=False, torch's default)",
                formula=f"{run.states.gradients:,} B gradients")


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
                    "reshard_after_forward=False: every block stays gathered from forward to backward" + nf4_note,
                    formula=f"{st.weights:,} B all weights - {weights:,} B own shard")
    block = st.block_dense_bytes + (0 if fsdp_qlora else st.block_quantized_bytes)
    return Term("gathered parameters", 2 * block,
                "two transformer blocks all-gathered at once (current + prefetched)" + nf4_note,
                formula=f"2 blocks x {block:,} B")


def cublas_workspaces_term(run: TrainingRun) -> Term | None:
    if run.setup.device != "cuda":
        return None
    return Term("cuBLAS workspaces", 2 * CUBLAS_WORKSPACE,
                "torch's cuBLAS workspace (32 MiB on Hopper) for the forward thread and for "
                "autograd's backward thread; allocated once, held for the whole run",
                formula=f"2 threads x {CUBLAS_WORKSPACE:,} B")


def cuda_context_term(run: TrainingRun) -> Term:
    cuda = run.setup.device == "cuda"
    return Term("CUDA context", CUDA_CONTEXT if cuda else 0,
                "assumed 500 MiB for the driver context and kernels (300-1000 MiB by GPU and libraries); "
                "not in max_memory_allocated", formula=f"{CUDA_CONTEXT:,} B assumed" if cuda else "0 B on a CPU")
