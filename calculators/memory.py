"""Training and inference GPU memory: the terms (terms.py) added up into the peak.

Peak (what torch.cuda.max_memory_allocated would show, the CUDA context excluded):
    static = weights + master weights + optimizer states + strategy buffers + cuBLAS workspaces
             + minilora's 4-bit dequantize buffer
    peak   = static + max( backward start: activations + logits and loss (or the chunked loss)
                                           + gradients already held,
                           backward through the blocks: the blocks' saved activations + one
                                           recomputed block + backward workspace + gradients held
                                           (+ the input the activation offload fetches ahead,
                                           + one recomputed tile of a tiled MLP),
                           backward end:   all gradients + one block's recomputed activations
                                           (+ one MLP tile's) + backward workspace + the first
                                           block's activations,
                           optimizer step: all gradients )
Gradients already held at backward start are all of them with grad_accum > 1 (they persist
between micro-batches), else the head's (lm_head / embedding) with full fine-tuning, else none.
Host memory is the sum of the terms' CPU bytes (the offload optimizer's states, the offloaded
activations). The chunked loss, the activation offload and the tiled MLP are long_context_terms.py's.

The same sum as phases (Breakdown.phases), for a reader: what is held throughout (the static terms
and the CUDA context), then what each moment adds; total_gpu = held + the largest moment. A term
can be alive in part (the gradients produced before backward starts, the first block's
activations at backward end); the terms therefore add up to more than the peak.

A new term is one function in terms.py (model states, buffers) or activation_terms.py (what the
forward saves and backward adds) and one line here, in the phase it is alive in.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .kv_cache import kv_bytes_per_position, kv_cache_bytes, kv_cache_positions
from .long_context_terms import (activation_offload_term, blocks_phase_activations, chunked_loss_term, mlp_tile_term,
                                 with_offload)
from .parameters import parameter_tensors
from .spec import ModelSpec
from .states import model_state_bytes, nf4_bytes, quantized_linears
from .activation_terms import (activations_term, backward_workspace_term, dequantize_buffer_term,
                               first_block_activations, gradients_held_at_backward_start, logits_and_loss_term,
                               recomputed_block_term)
from .terms import (CUBLAS_WORKSPACE, CUDA_CONTEXT, STACK_WORDS, Term, cublas_workspaces_term, cuda_context_term,
                    ddp_buckets_term, gathered_parameters_term, gradients_term, master_weights_term,
                    optimizer_states_term, plan_training, weights_term, widest_intermediate)
from .training_setup import CHECKPOINTING, DTYPE_BYTES, METHODS, OPTIMIZERS, TrainingSetup, describe_recipe

# TrainingSetup, Term and the rest are defined next door and re-exported: `calculators.memory` is
# where bench/ and the tests have always imported them from.
__all__ = ["TrainingSetup", "Term", "Phase", "Breakdown", "training_memory", "inference_memory", "nf4_bytes",
           "DTYPE_BYTES", "METHODS", "OPTIMIZERS", "CHECKPOINTING", "model_state_bytes"]


@dataclass(frozen=True)
class Phase:
    """GPU bytes alive together at one moment of a step, by term name (a term may be alive in part)."""
    name: str
    parts: dict

    @property
    def bytes(self) -> int:
        return sum(self.parts.values())

    def as_dict(self) -> dict:
        return {"name": self.name, "bytes": self.bytes, "parts": self.parts}


def _phase(name: str, *parts: tuple) -> Phase:
    """A Phase from (term name, bytes) pairs, leaving out what is absent or empty."""
    return Phase(name, {term: n for term, n in parts if n})


@dataclass
class Breakdown:
    """A memory answer: the terms, the peak they add up to, and notes saying how."""
    terms: list
    peak: int                     # bytes allocated at the peak (CUDA context excluded)
    total_gpu: int                # peak + CUDA context
    cpu: int                      # host bytes: the terms' CPU bytes (offloaded optimizer states)
    params: int
    trainable: int
    notes: list = field(default_factory=list)
    phases: list = field(default_factory=list)  # [held throughout, then each moment]: see the module docstring
    # training only: what one step holds and saves, for checking against the real tensors
    stack: str | None = None
    recipe: str | None = None         # the code the setup stands for (training_setup.describe_recipe)
    saved_activation_bytes: int | None = None  # saved for backward by forward + loss, as saved_tensors_hooks counts
    model_state_bytes: int | None = None       # weights + gradients + master + optimizer states (+ host), unsharded

    def as_dict(self) -> dict:
        out = {"terms": [t.__dict__ for t in self.terms], "peak_bytes": self.peak,
               "total_gpu_bytes": self.total_gpu, "cpu_bytes": self.cpu, "params": self.params,
               "trainable": self.trainable, "notes": self.notes, "phases": [p.as_dict() for p in self.phases]}
        if self.stack is not None:
            out.update(stack=self.stack, recipe=self.recipe, saved_activation_bytes=self.saved_activation_bytes,
                       model_state_bytes=self.model_state_bytes)
        return out


def _gpu(*terms: Term | None) -> int:
    return sum(t.gpu for t in terms if t is not None)


def training_memory(spec: ModelSpec, setup: TrainingSetup) -> Breakdown:
    """Per-GPU training memory (rank 0's under a sharding strategy), term by term."""
    run = with_offload(plan_training(spec, setup))
    tile = mlp_tile_term(run)  # first: it refuses what cannot be tiled
    weights, gradients, master = weights_term(run), gradients_term(run), master_weights_term(run)
    optimizer = optimizer_states_term(run)
    activations, recomputed = activations_term(run), recomputed_block_term(run)
    logits, workspace = chunked_loss_term(run) or logits_and_loss_term(run), backward_workspace_term(run)
    offload = activation_offload_term(run)
    buffers = (ddp_buckets_term(run), gathered_parameters_term(run, weights.gpu), cublas_workspaces_term(run),
               dequantize_buffer_term(run))
    context = cuda_context_term(run)

    static = _gpu(weights, master, optimizer, *buffers)
    held = gradients_held_at_backward_start(run, gradients.gpu)
    backward_start = _gpu(activations, logits) + held
    in_blocks = blocks_phase_activations(run)
    backward_blocks = in_blocks + _gpu(offload, recomputed, tile, workspace) + held
    backward_end = _gpu(gradients, recomputed, tile, workspace, offload) + first_block_activations(run)
    step = gradients.gpu
    peak = static + max(backward_start, backward_blocks, backward_end, step)
    phases = [_phase("held throughout", *((t.name, t.gpu) for t in (weights, master, optimizer, *buffers, context)
                                          if t is not None)),
              _phase("backward start", ("activations", activations.gpu), (logits.name, logits.gpu),
                     ("gradients", held)),
              _phase("backward through the blocks", ("activations", in_blocks), ("activation offload", _gpu(offload)),
                     ("recomputed block", _gpu(recomputed)), ("recomputed MLP tile", _gpu(tile)),
                     ("backward workspace", workspace.gpu), ("gradients", held)),
              _phase("backward end", ("gradients", gradients.gpu), ("recomputed block", _gpu(recomputed)),
                     ("recomputed MLP tile", _gpu(tile)), ("backward workspace", workspace.gpu),
                     ("activations", first_block_activations(run)), ("activation offload", _gpu(offload))),
              _phase("optimizer step", ("gradients", step))]

    terms = [t for t in (weights, gradients, master, optimizer, activations, offload, recomputed, tile, logits,
                         workspace, *buffers, context) if t is not None]
    recipe = describe_recipe(setup)
    notes = [f"peak = static {static:,} + max(backward start {backward_start:,}, through the blocks "
             f"{backward_blocks:,}, backward end {backward_end:,}, step {step:,})",
             f"strategy {run.strategy} on {setup.gpus} GPU(s); micro-batch {setup.batch}, "
             f"grad_accum {setup.grad_accum}",
             f"recipe ({STACK_WORDS[setup.stack]}): {recipe}"]
    st = run.states
    return Breakdown(terms, peak, peak + context.gpu, sum(t.cpu for t in terms), st.params, st.trainable, notes,
                     phases, stack=setup.stack, recipe=recipe, saved_activation_bytes=run.activations["total"],
                     model_state_bytes=st.weights + st.gradients + st.master + st.optimizer + st.host)


def inference_memory(spec: ModelSpec, batch: int = 1, prompt: int = 512, new_tokens: int = 256,
                     dtype: str = "bf16", quant: str = "none", attn: str = "sdpa",
                     double_quant: bool = True) -> Breakdown:
    """Generation of `new_tokens` after a `prompt`: weights, the KV cache (kv_cache.py), the prefill."""
    for name, value in (("batch", batch), ("prompt", prompt), ("new_tokens", new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "new_tokens" else 1):
            raise ValueError(f"{name} must be an integer >= {0 if name == 'new_tokens' else 1}, got {value!r}")
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if quant not in ("none", "nf4"):
        raise ValueError(f"quant must be none or nf4, got {quant!r}")
    d = DTYPE_BYTES[dtype]
    tensors = parameter_tensors(spec)
    quantized = {f"{lin.name}.weight" for lin in quantized_linears(spec)} if quant == "nf4" else set()
    if quant == "nf4":  # each expert's matrices too, as minilora's quantize_model stores them (ExpertsNF4)
        quantized |= {t.name for t in tensors if t.kind == "experts"}
    nf4 = sum(t.shape[0] * nf4_bytes(t.numel // t.shape[0], 64, double_quant) if t.kind == "experts"
              else nf4_bytes(t.numel, 64, double_quant) for t in tensors if t.name in quantized)
    dense = sum(t.numel for t in tensors if t.name not in quantized)
    kv, pinned = _kv_cache_terms(spec, batch, prompt, new_tokens, dtype)
    total_len = prompt + new_tokens
    inter = widest_intermediate(spec)
    prefill = batch * prompt * (spec.vocab_size + 2 * inter + 2 * spec.hidden_size) * d
    prefill_formula = (f"{batch} batch x {prompt:,} prompt x ({spec.vocab_size:,} vocab + 2 x {inter:,} widest + "
                       f"2 x {spec.hidden_size:,} hidden) x {d} B")
    if attn == "eager":
        prefill += batch * spec.num_heads * prompt * total_len * (4 + d)
        prefill_formula += f" + {batch} batch x {spec.num_heads} heads x {prompt:,} x {total_len:,} positions x " \
                           f"(4 + {d}) B scores and probabilities"
    terms = [Term("weights", nf4 + dense * d, f"{'NF4 linear layers, ' if quant == 'nf4' else ''}{dtype} otherwise",
                  formula=(f"{nf4:,} B NF4 codes and constants + " if nf4 else "") + f"{dense:,} params x {d} B"),
             kv,
             Term("prefill working memory", prefill,
                  "logits for every prompt position + one block's widest intermediates"
                  + (" + eager attention scores" if attn == "eager" else ""), formula=prefill_formula),
             pinned,
             Term("cuBLAS workspace", CUBLAS_WORKSPACE, "torch's cuBLAS workspace for the one thread that "
                  "runs the matmuls (32 MiB on Hopper)", formula=f"{CUBLAS_WORKSPACE:,} B"),
             Term("CUDA context", CUDA_CONTEXT, "assumed 500 MiB for the driver context and kernels; "
                  "not in max_memory_allocated", formula=f"{CUDA_CONTEXT:,} B assumed")]
    terms = [t for t in terms if t is not None]
    at_prefill = {"prefill working memory", PINNED}
    peak = sum(t.gpu for t in terms if t.name != "CUDA context")
    phases = [_phase("held throughout", *((t.name, t.gpu) for t in terms if t.name not in at_prefill)),
              _phase("prefill", *((t.name, t.gpu) for t in terms if t.name in at_prefill))]
    return Breakdown(terms, peak, peak + CUDA_CONTEXT, 0, sum(t.numel for t in tensors), 0, phases=phases)


PINNED = "prompt keys of sliding layers"


def _kv_cache_terms(spec: ModelSpec, batch: int, prompt: int, new_tokens: int, dtype: str) -> tuple:
    """The KV cache after the last step, and what sliding layers hold beyond it right after a
    prefill longer than their window (None when nothing): see kv_cache.py."""
    d = DTYPE_BYTES[dtype]
    positions = prompt + max(new_tokens, 1) - 1   # the last sampled token is never fed back
    per_position = kv_bytes_per_position(spec, d)
    kept = kv_cache_positions(spec, positions)
    cached = (f"MLA latent + rope key of {spec.num_layers} layers" if spec.mla
              else f"keys and values of {spec.num_layers} layers x {spec.num_kv_heads} kv heads x "
                   f"head_dim {spec.head_dim}")
    window = ""
    if spec.sliding_layers:
        window = f"; {spec.sliding_layers} sliding layers keep at most their window of {spec.sliding_window}"
    kv = Term("KV cache", kv_cache_bytes(spec, batch, positions, d),
              f"{cached} x {positions:,} positions (prompt + new tokens - 1: the last token is never fed back)"
              f"{window}, batch {batch}, {dtype}; what transformers' DynamicCache holds after generate() and what "
              "reference_models' cache holds from the prefill on (full-attention layers preallocated)",
              formula="(" + " + ".join(f"{n} layers x {p:,} positions" for p, n in _counts(kept))
              + f") x {batch} batch x {per_position:,} B per position")
    over = max(prompt - (spec.sliding_window or prompt), 0)
    if not (spec.sliding_layers and over):
        return kv, None
    pinned = Term(PINNED, batch * spec.sliding_layers * over * per_position,
                  "right after the prefill a sliding layer's kept keys and values are views pinning the whole "
                  "prompt's, until the first decode step (both caches)",
                  formula=f"{spec.sliding_layers} sliding layers x ({prompt:,} prompt - {spec.sliding_window:,} "
                          f"window) x {batch} batch x {per_position:,} B per position")
    return kv, pinned


def _counts(values: list) -> list[tuple]:
    """[a, a, b, a] -> [(a, 3), (b, 1)], in first-seen order."""
    counts = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    return list(counts.items())
