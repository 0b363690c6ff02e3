"""The terms of what a training step's forward saves and its backward adds: activations, the
recomputed block, logits and loss, the backward workspace, minilora's 4-bit dequantize buffer, and
which of them are alive at backward start and end. Each reads a TrainingRun (terms.py).

Activations come from activations.py (exact against autograd's saved tensors on CPU, for the stack
the run names); the transient terms (logits gradients, backward workspace, dequantized weights) are
estimates and say so.
"""
from __future__ import annotations

from .long_context_terms import tiled_mlp_workspace
from .moe import busiest_expert_tokens
from .states import quantized_linears
from .terms import STACK_WORDS, Term, TrainingRun, widest_intermediate
from .training_setup import DTYPE_BYTES

__all__ = ["activations_term", "recomputed_block_term", "logits_and_loss_term", "backward_workspace_term",
           "dequantize_buffer_term", "gradients_held_at_backward_start", "first_block_activations"]


def _activations_assumption(run: TrainingRun) -> str:
    s, p, a = run.setup, run.precision, run.activation_setup
    hf = s.stack == "hf"
    checkpointing = {"none": "every block keeps what autograd saves",
                     "full": "checkpointing: each block keeps only its input"
                             + (" (hidden_states; cos/sin go by keyword)" if hf else "")
                             + "; one block is recomputed at a time",
                     "selective": "selective recomputation of attention's (B, H, T, T) core"}[s.grad_ckpt]
    attention = "eager attention keeps (B, H, T, T) scores" if s.attn == "eager" else \
        "SDPA/flash: no (B, H, T, T) matrix" + (" (on CPU with attention dropout: the math kernel's)"
                                               if s.device == "cpu" and a.attn_pdrop else "")
    notes = [checkpointing, attention]
    if hf and s.method == "lora" and p.adapter != p.linear:
        notes.append("peft's fp32 adapters keep an fp32 copy of each adapted input")
    if hf and s.method == "qlora" and s.prepare_kbit is not False:
        notes.append("prepare_model_for_kbit_training: the residual stream is fp32")
    if p.autocast:
        notes.append(f"{p.autocast} autocast: 16-bit copies of the inputs and of the weights that matmuls keep")
    if s.method != "full" and s.lora.dropout > 0:
        notes.append(f"LoRA dropout {s.lora.dropout} keeps a mask and a dropped copy of each adapted input")
    if a.attn_pdrop or a.resid_pdrop or a.embd_pdrop:
        notes.append(f"dropout masks (attention {a.attn_pdrop:g}, residual {a.resid_pdrop:g}, embedding "
                     f"{a.embd_pdrop:g}{', from config.json' if s.model_dropout is None else ''})")
    if hf and s.grad_ckpt == "none" and run.spec.use_cache:
        notes.append("config.use_cache: a DynamicCache keeps copies of k and v")
    if run.spec.mla:          # no reference model to measure against
        notes.append("estimated, not measured (no reference model): multi-head latent attention replayed from "
                     "transformers' DeepseekV3Attention (SDPA's output at the query's head width), the sigmoid "
                     "group-limited router as a softmax top-k one")
    if run.spec.num_experts:  # what the experts keep grows with the routed pairs, not with how they spread
        notes.append(f"experts: {run.spec.experts_per_token} routed copies of every token (whatever the balance)")
    return "; ".join(notes)


def activations_term(run: TrainingRun) -> Term:
    s, act = run.setup, run.activations
    parts = [(act["embedding"], "B embedding"), (act["shared"], "B made once for every layer"),
             (act["head"], "B final norm and head input")]
    blocks = " + ".join(f"{n} block{'s' * (n > 1)} x {nbytes:,} B" for nbytes, n in _runs(act["layers"]))
    formula = " + ".join([blocks] * bool(blocks) + [f"{n:,} {what}" for n, what in parts if n]) or "0 B"
    return Term("activations", act["total"] - act["loss"],
                f"saved for backward by the {STACK_WORDS[s.stack]} forward, batch {s.batch} x seq {s.seq}, "
                f"{run.precision.name}; {_activations_assumption(run)}", formula=formula)


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
                f"logits (B, T, V={vocab:,}) in {'fp32' if run.precision.logits == 4 else '16-bit'} held by the "
                "caller, fp32 log-softmax saved by the loss ("
                + ("transformers' ForCausalLMLoss from labels=" if s.stack == "hf" else "reference_models' lm_loss")
                + "), and two fp32 (B, T, V) gradients alive together at backward start",
                formula=f"{shape} x {run.precision.logits} B logits + {run.activations['loss']:,} B saved by the "
                        f"loss + 2 gradients x {shape} x 4 B")


def backward_workspace_term(run: TrainingRun) -> Term:
    s, spec = run.setup, run.spec
    workspace = s.batch * s.seq * (2 * widest_intermediate(spec) + 2 * spec.hidden_size) * run.precision.activations
    formula = (f"{s.batch} batch x {s.seq:,} seq x (2 x {widest_intermediate(spec):,} widest + 2 x "
               f"{spec.hidden_size:,} hidden) x {run.precision.activations} B")
    tiled = tiled_mlp_workspace(run)
    if tiled is not None:
        workspace, formula = tiled
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
    decoded = ""
    if s.stack == "hf" and s.method == "qlora":
        largest, size = _largest_dequantized_weight(run)
        workspace += largest * size
        formula += f" + {largest:,} elements of the largest quantized weight x {size} B"
        decoded = "; bitsandbytes decodes a 4-bit weight into a new tensor for each matmul (the largest)"
    tile = "; the MLP's over one tile, and fp32 sums of its weights' gradients" if tiled is not None else ""
    return Term("backward workspace", workspace,
                "estimate: gradients of one block's widest intermediates (and of its scores when eager)" + tile
                + experts + decoded, formula=formula)


def _largest_dequantized_weight(run: TrainingRun) -> tuple[int, int]:
    """QLoRA: the elements of the largest 4-bit weight, and the bytes of the dtype it is decoded to."""
    p = run.precision
    largest = max(lin.in_features * lin.out_features for lin in quantized_linears(run.spec, run.setup.stack))
    return largest, DTYPE_BYTES[p.autocast or p.compute]


def dequantize_buffer_term(run: TrainingRun) -> Term | None:
    """minilora's LinearNF4 decodes every 4-bit weight into one reused buffer, held for the run."""
    if run.setup.stack != "minilora" or run.setup.method != "qlora":
        return None
    largest, size = _largest_dequantized_weight(run)
    return Term("4-bit dequantize buffer", largest * size,
                "LinearNF4 decodes each 4-bit weight into one reused dense buffer (matmul_4bit.WeightBuffers) the "
                "size of the largest, in the dtype it multiplies in; held for the whole run",
                formula=f"{largest:,} elements of the largest quantized weight x {size} B")


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
