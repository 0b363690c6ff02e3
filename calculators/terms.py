"""The terms of training memory on one GPU: one function per term, each returning its bytes with the
assumption behind them. memory.py adds them up into the peak. This file holds the run (TrainingRun)
and the model-state and buffer terms; activation_terms.py what the forward saves and backward adds.

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

from .activations import ActivationSetup, activation_bytes
from .distributed import fsdp_rank0_elements, is_sharded, parse_strategy, shard, shard_note
from .gpus import MiB
from .mla import mla_projections
from .spec import ModelSpec
from .states import ModelStates, model_state_bytes
from .training_setup import Precision, TrainingSetup, check_setup

__all__ = ["Term", "TrainingRun", "STACK_WORDS", "plan_training", "widest_intermediate", "mlp_width",
           "attention_width", "CUDA_CONTEXT", "CUBLAS_WORKSPACE", "weights_term", "gradients_term",
           "master_weights_term", "optimizer_states_term", "ddp_buckets_term", "gathered_parameters_term",
           "cublas_workspaces_term", "cuda_context_term"]

STACK_WORDS = {"hf": "transformers + peft + bitsandbytes", "minilora": "minilora (reference_models)"}

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
    activation_setup: ActivationSetup  # what the activation replay ran: recipe, targets, dropouts

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
            if isinstance(bytes_per_el, (tuple, list)):   # tensors of several dtypes: rank 0's elements of each
                return rank0, _per_size([(fsdp_rank0_elements([sh], self.setup.gpus), b)
                                         for sh, b in zip(shapes, bytes_per_el)], "rank-0 elements")
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
    act = ActivationSetup.of(spec, setup)
    return TrainingRun(spec, setup, strategy, states, activation_bytes(spec, act), act)


def _per_size(pairs, what: str) -> str:
    """(elements, bytes each) pairs -> "n what x b B + ..." with the elements of each size added up."""
    totals: dict = {}
    for n, b in pairs:
        totals[b] = totals.get(b, 0) + n
    return " + ".join(f"{n:,} {what} x {b} B" for b, n in sorted(totals.items()) if n) or "0 B"


def widest_intermediate(spec: ModelSpec) -> int:
    """Width of a block's widest activation over all its tokens: the (gated) MLP input (a mixture of
    experts: its dense layers' or shared expert's; routed experts see fewer tokens, see
    backward_workspace_term) or the fused q/k/v output (MLA: its widest projection)."""
    return max(mlp_width(spec), attention_width(spec))


def mlp_width(spec: ModelSpec) -> int:
    """The MLP's widest activation: gate and up together (gated), else the up projection's output."""
    mlp = spec.intermediate_size
    if spec.num_experts:
        mlp = max(spec.intermediate_size if spec.dense_layers else 0, spec.shared_expert_size)
    return mlp * (2 if spec.gated_mlp else 1)


def attention_width(spec: ModelSpec) -> int:
    """Attention's widest activation: q, k and v together (MLA: its widest projection)."""
    return max(n_out for _, _, n_out, _ in mla_projections(spec)) if spec.mla else spec.q_size + 2 * spec.kv_size


# --- model states -------------------------------------------------------------------------------

def _weights_assumption(run: TrainingRun) -> str:
    s, st, p = run.setup, run.states, run.precision
    hf = s.stack == "hf"
    adapters = f"{st.trainable:,} LoRA parameters in {p.adapter}"
    if hf and p.adapter != p.linear:
        adapters += " (peft's autocast_adapter_dtype upcasts adapters on a 16-bit base)"
    buffers = ", + RoPE's inv_freq buffers (fp32)" if st.buffers else ""
    if s.method == "full":
        text = f"all {st.params:,} parameters in {p.linear}{buffers}"
    elif s.method == "lora":
        text = f"base weights frozen in {p.linear}, {adapters}{buffers}"
    else:
        bits = "double quantization: 4.127" if s.double_quant else "fp32 absmax: 4.5"
        constants = "a codebook and nested map per layer (bitsandbytes)" if hf else "constants"
        prepare = ""
        if s.prepare_kbit is not False:
            prepare = (" (prepare_model_for_kbit_training casts every weight that is not 4-bit to fp32)" if hf else
                       " (prepare_for_kbit_training keeps the norms in fp32)")
        text = (f"linear layers in NF4 (block {s.block_size}, {bits} bits/param + {constants}); embeddings and "
                f"lm_head in {p.embedding}, norms in {p.norm}{prepare}; {adapters}{buffers}")
    if run.spec.num_experts:
        text += (f"; all {run.spec.num_experts} experts of every sparse layer resident"
                 + (f" (each expert's matrices in NF4), routers in {p.linear}" if s.method == "qlora" else ""))
    return text


def weights_term(run: TrainingRun) -> Term:
    s, st = run.setup, run.states
    text = _weights_assumption(run)
    if s.method == "full":
        shapes, sizes = st.all_shapes, st.all_bytes_per_el
    else:
        shapes = st.dense_shapes + st.trainable_shapes
        sizes = st.dense_bytes_per_el + (st.precision.gradients,) * len(st.trainable_shapes)
    replicated = st.quantized_bytes + st.buffers
    fixed = (f"{st.quantized_bytes:,} B NF4 codes and constants + " if st.quantized_bytes else "") + \
            (f"{st.buffers:,} B buffers + " if st.buffers else "")
    dense = _per_size([(math.prod(sh), b) for sh, b in zip(shapes, sizes)], "params")
    if run.strategy.startswith("fsdp") and s.gpus > 1:
        # FSDP2 chunks every parameter on dim 0 (rank 0 holds the largest piece) and shards
        # parameters only: LinearNF4's codes and scales and the model's buffers are module buffers,
        # which every rank holds whole (measured in tests/test_distributed.py)
        gpu, formula = run.sharded("weights", st.weights - replicated, dense, shapes, sizes)
        nf4 = ", NF4 buffers replicated" if st.quantized_bytes else ""
        return Term("weights", replicated + gpu, f"{text}{nf4}, the rest sharded over {s.gpus} GPUs ({run.strategy})",
                    formula=fixed + formula)
    gpu, formula = run.sharded("weights", st.weights, fixed + dense)
    return Term("weights", gpu, text + run.shard_note("weights"), formula=formula)


def gradients_term(run: TrainingRun) -> Term:
    gpu, formula = run.per_trainable("gradients", run.states.gradients, run.precision.gradients)
    if run.offload:
        return Term("gradients", gpu, "none kept on the GPU: each .grad is copied to a host fp32 buffer as "
                                      "it is produced", formula=formula)
    dtype = {4: "fp32", 2: "16-bit"}[run.precision.gradients]
    return Term("gradients", gpu, f"one {dtype} gradient per trainable parameter (its own dtype)"
                + run.shard_note("gradients"), formula=formula)


def master_weights_term(run: TrainingRun) -> Term:
    gpu, formula = run.per_trainable("optimizer", run.states.master, run.precision.master)
    text = "fp32 copy of the trainable weights (mixed precision)" if gpu else \
        "none: optimizer updates the weights in their own dtype"
    return Term("master weights", gpu, text + run.shard_note("optimizer"), formula=formula)


def optimizer_states_term(run: TrainingRun) -> Term:
    s, st, p = run.setup, run.states, run.precision
    state = "fp32" if p.optimizer_states == 4 else (p.linear if s.method == "full" else p.adapter)
    assumption = {
        "adamw": f"AdamW m and v in {state}"
                 + (" (on the fp32 master copy)" if p.master else " (torch AdamW: the parameters' own dtype)")
                 + " (+4 B step per tensor)",
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
