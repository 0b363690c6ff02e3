"""The chunked loss, activation offload and the tiled MLP as memory terms, and the phase they bring to light.

long_context.py holds the arithmetic; here it becomes Terms, with their assumptions and formulas
(numbers put in, evaluating to the GPU bytes as terms.py's do), which memory.py places:

    chunked loss            backward start, in place of "logits and loss": its buffers live at
                            forward's end (the loss is forward's last op, every activation still
                            alive), the hidden states' gradient from there into backward
    activation offload      its CPU bytes: the host holding every block input but the last; its GPU
                            bytes: the one input backward fetches ahead, alive while backward goes
                            through the blocks and at backward end (block 0's, fetched last)
    recomputed MLP tile     what one tile of a tiled MLP keeps while backward recomputes it: alive
                            while backward goes through the blocks and at backward end (the
                            backward workspace's MLP part shrinks to a tile: tiled_mlp_workspace)
    backward through the blocks   a phase: the blocks' saved activations (not the head's or the
                            loss's: freed by then), a recomputed block, the backward workspace and
                            the gradients held; with the full loss it stays below backward start,
                            with the chunked loss it can be the peak
"""
from __future__ import annotations

import math
from dataclasses import replace

from .long_context import (DEFAULT_LOSS_CHUNK, chunk_tokens, chunked_loss_bytes, mlp_tile_rows,
                           offload_activation_bytes)
from .lora import lora_layers, lora_tensors
from .parameters import parameter_tensors
from .terms import Term, TrainingRun, attention_width, mlp_width

__all__ = ["with_offload", "chunked_loss_term", "activation_offload_term", "blocks_phase_activations",
           "mlp_tile_term", "tiled_mlp_workspace"]


def with_offload(run: TrainingRun) -> TrainingRun:
    """The run with its activations as the device holds them (offloaded inputs moved out)."""
    return replace(run, activations=offload_activation_bytes(run.activations, run.setup))


def chunked_loss_term(run: TrainingRun) -> Term | None:
    """The chunked loss's bytes: what it keeps for backward and what backward starts with (None with
    the full loss). Refuses LoRA on lm_head, which the chunked loss refuses too."""
    s, spec, d = run.setup, run.spec, run.precision.activations
    if s.loss != "chunked":
        return None
    if s.method != "full" and any(lin.name == "lm_head" for lin in lora_layers(spec, s.lora.targets)):
        raise ValueError("loss 'chunked' multiplies by lm_head's weight itself: LoRA on lm_head needs loss 'full'")
    trainable = s.method == "full"
    b = chunked_loss_bytes(spec, s, d, trainable, run.activations["hidden_bytes"])
    rows, tokens, hidden, vocab = chunk_tokens(s), f"{s.batch} batch x {s.seq:,} seq", spec.hidden_size, spec.vocab_size
    h = run.activations["hidden_bytes"] // (s.batch * s.seq * hidden)  # the final norm's output: B per element
    formula = (f"{tokens} x {hidden:,} hidden x {h} B gradient + {tokens} x {hidden:,} hidden x {h} B head input + "
               + _buffers_formula(rows, vocab, hidden, d, trainable))
    chunk = f"chunks of {rows:,} tokens" + (" (the default)" if s.loss_chunk is None and rows == DEFAULT_LOSS_CHUNK
                                           else "")
    return Term("chunked loss", b["kept"] + b["forward"],
                f"head and loss over {chunk}, each chunk's gradients computed in forward: no (B, T, V) tensor; "
                f"kept for backward: the hidden states' gradient; at forward's end, besides it, "
                f"the head's input and one chunk's logits in {run.precision.name} and fp32"
                + ("; the head's fp32 gradient accumulator" if trainable and d != 4 else ""), formula=formula)


def _buffers_formula(rows: int, vocab: int, hidden: int, d: int, trainable: bool) -> str:
    """The formula of chunked_loss_bytes' chunk buffers (the larger branch written out)."""
    chunk = f"{rows:,} chunk tokens x {vocab:,} vocab x {4 if d == 4 else d + 4} B"
    if not trainable or d == 4:
        return chunk
    accumulator = f"{vocab:,} vocab x {hidden:,} hidden x 4 B accumulator"
    if rows * vocab * (d + 4) - vocab * hidden * d >= rows * vocab * d:
        return f"{accumulator} + {chunk} - {vocab:,} vocab x {hidden:,} hidden x {d} B"
    return f"{accumulator} + {rows:,} chunk tokens x {vocab:,} vocab x {d} B"


def activation_offload_term(run: TrainingRun) -> Term | None:
    act, s = run.activations, run.setup
    if not s.offload_activations:
        return None
    moved = act["offloaded"]
    fetched = max(moved, default=0)
    pinned = "pinned, each rounded up to a power of two by torch's host allocator" if s.device == "cuda" else \
        "plain host memory on a CPU"
    return Term("activation offload", fetched,
                f"checkpointed inputs of {len(moved)} of {len(act['layers'])} blocks on the host ({pinned}); "
                "the GPU holds the last block's and, during backward, one more fetched ahead",
                cpu=act["host"], formula=f"1 block input x {fetched:,} B fetched ahead")


def blocks_phase_activations(run: TrainingRun) -> int:
    """Saved activations on the device while backward goes through the blocks: all but the head's
    and the loss's (and, with the offload, all but the last block's input)."""
    act = run.activations
    return act["total"] - act["loss"] - act["head"]


def mlp_tile_term(run: TrainingRun) -> Term | None:
    """One MLP tile's saved bytes, recomputed in backward (None without tiling, or when the whole
    micro-batch fits in one tile). Refuses a mixture of experts, as reference_models does."""
    s, spec = run.setup, run.spec
    if not s.mlp_tile:
        return None
    if spec.num_experts:
        raise ValueError(f"mlp_tile tiles dense MLPs; {spec.name} routes tokens to experts (the router sees every "
                         "token at once), which reference_models does not tile: leave --mlp-tile 0")
    tile = run.activations["mlp_tile"]
    if not tile:
        return None
    return Term("recomputed MLP tile", tile,
                f"every block's MLP over tiles of {s.mlp_tile:,} tokens (reference_models/tiled_mlp.py): forward keeps "
                "only its input; backward recomputes one tile at a time and keeps that tile's intermediates for its "
                "backward", formula=f"{tile:,} B one tile's saved tensors")


def _mlp_weight_elements(run: TrainingRun) -> int:
    """Trainable elements of one block's MLP (the first block's: dense blocks are alike)."""
    if run.setup.method == "full":
        return sum(t.numel for t in parameter_tensors(run.spec) if ".0.mlp." in t.name)
    return sum(math.prod(shape) for name, shape in lora_tensors(run.spec, run.setup.lora) if ".0.mlp." in name)


def tiled_mlp_workspace(run: TrainingRun) -> tuple[int, str] | None:
    """The backward workspace's estimate with a tiled MLP: the gradients of the block's widest
    intermediates, the MLP's over a tile's rows and attention's over all of them (whichever is
    larger: they are not alive together), and the fp32 sums of the MLP's weight gradients. None
    when the MLP runs whole."""
    s, spec, d = run.setup, run.spec, run.precision.activations
    rows, tokens = mlp_tile_rows(s), s.batch * s.seq
    if rows == tokens:
        return None
    mlp, attention, hidden, sums = mlp_width(spec), attention_width(spec), spec.hidden_size, _mlp_weight_elements(run)
    if rows * mlp >= tokens * attention:
        widest = f"2 x {rows:,} tile tokens x {mlp:,} MLP widest"
    else:
        widest = f"2 x {s.batch} batch x {s.seq:,} seq x {attention:,} attention widest"
    nbytes = (2 * max(rows * mlp, tokens * attention) + 2 * tokens * hidden) * d + sums * 4
    return nbytes, (f"({widest} + 2 x {s.batch} batch x {s.seq:,} seq x {hidden:,} hidden) x {d} B + {sums:,} "
                    "trainable MLP elements x 4 B fp32 gradient sums")
