"""Long context: what the chunked loss, activation offload and the tiled MLP hold, as arithmetic (issue 16).

Three switches of TrainingSetup, each mirroring code in this repository (the loss left unset is the
stack's default, training_setup.STACK_LOSS: chunked on minilora, as minilora.train trains, full on hf):

  loss="chunked", loss_chunk=c   reference_models/loss.py: the head and the cross-entropy over chunks
                                 of c learned tokens, each chunk's gradients computed in forward.
      forward, at its end the last chunk's buffers: its logits in the compute dtype and in fp32, alive
                          together for the copy, c*V*(dt + 4) bytes (c*V*4 in fp32, where the copy
                          is the tensor itself), turned in place into the logits' gradient and cast
                          to dt; with a trainable head in a 16-bit dtype also an fp32 (V, C)
                          accumulator and each chunk's (V, C) product in dt (in fp32 the accumulator
                          is the head's gradient itself, which the gradients term counts). Beside
                          them the hidden states' gradient (B*T, C), filled chunk by chunk, and the
                          head's input (B*T, C), the final norm's output, which nothing keeps
      kept for backward   the hidden states' gradient (B*T, C) in their dtype (the final norm's
                          output's: fp32 under autocast over fp32 weights) (and the head's gradient, the
                          gradients term's); not the head's input, the targets or a log-sum-exp.
                          Backward allocates nothing: it scales the kept gradients in place
      Every token is counted as learned: ignored ones (prompts, padding) never reach the head.

  offload_activations=True       minilora/train/offload_activations.py, with full checkpointing: each
                                 block's checkpointed input waits on the host from the moment the
                                 next block saves its own until backward fetches it, one block ahead.
      host                the inputs of every block but the last; on CUDA pinned memory from torch's
                          caching host allocator, which rounds each block up to a power of two
      device              the last block's input never leaves; while backward goes through the
                          blocks it holds two (the one recomputing, the one arriving)

  mlp_tile=t                     reference_models/tiled_mlp.py: every block's dense MLP over tiles of
                                 t tokens of the micro-batch, recomputed one tile at a time in backward.
      kept for backward   the MLP's input (B*T, C) instead of its intermediates (activations.py
                          replays it: Replay.mlp), in every block without checkpointing and in the
                          recomputed block with it
      backward            one tile's intermediates, recomputed and kept for that tile's backward
                          (the replay's bytes for t rows); the backward workspace's MLP part over t
                          rows; an fp32 sum per trainable weight of the MLP (the tiles' gradients
                          are added into it, and handed on once)
      Refused for mixture-of-experts models (reference_models refuses them: the router sees every
      token at once) and with the hf stack (transformers has no tiled MLP).

And a phase of the peak that the full loss hid: backward through the last block, after the head
and the loss have let go of theirs, holds the blocks' saved activations (two inputs with offload),
a recomputed block and the backward workspace.

Exact on CPU against the reference models (tests/test_calc_long_context.py): the saved bytes
against saved_tensors_hooks (with the tiled MLP too, and one tile's), the loss's forward buffers
against the allocations an op-by-op tracker sees, the host bytes against the offloader's host tensors.
"""
from __future__ import annotations

__all__ = ["LOSSES", "DEFAULT_LOSS_CHUNK", "check_long_context", "chunk_tokens", "chunked_loss_bytes", "with_chunked_loss",
           "offload_activation_bytes", "pinned_bytes", "mlp_tile_rows"]

LOSSES = ("full", "chunked")
DEFAULT_LOSS_CHUNK = 1024  # reference_models.loss.DEFAULT_LOSS_CHUNK (tests keep the two equal)


def check_long_context(setup) -> None:
    """Refuse a loss, chunk, offload or MLP tile setting that cannot run, naming the value and what is allowed."""
    if setup.loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {setup.loss!r}")
    chunk = setup.loss_chunk
    if chunk is not None:
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"loss_chunk must be an integer >= 1 (tokens per chunk), got {chunk!r}")
        if chunk > setup.seq:
            raise ValueError(f"loss_chunk must be at most the sequence length {setup.seq} (a longer chunk is the "
                             f"whole sequence), got {chunk}")
        if setup.loss != "chunked":
            raise ValueError(f"loss_chunk applies to loss 'chunked' only (the full loss has no chunks), got loss "
                             f"{setup.loss!r} with loss_chunk {chunk}")
    if setup.offload_activations and setup.grad_ckpt != "full":
        raise ValueError(f"offload_activations needs grad_ckpt 'full' (it moves each block's checkpointed input "
                         f"to the host), got grad_ckpt {setup.grad_ckpt!r}")
    tile = setup.mlp_tile
    if isinstance(tile, bool) or not isinstance(tile, int) or tile < 0:
        raise ValueError(f"mlp_tile must be 0 (off) or an integer >= 1 (tokens per tile), got {tile!r}")
    if tile > setup.seq:
        raise ValueError(f"mlp_tile must be at most the sequence length {setup.seq} (a longer tile is the whole "
                         f"sequence), got {tile}")


def chunk_tokens(setup) -> int:
    """Rows of one chunk: loss_chunk (default DEFAULT_LOSS_CHUNK), at most the batch's tokens."""
    return min(setup.loss_chunk or DEFAULT_LOSS_CHUNK, setup.batch * setup.seq)


def mlp_tile_rows(setup) -> int:
    """Rows one MLP call computes at once: mlp_tile, or every token of the micro-batch without tiling."""
    tokens = setup.batch * setup.seq
    return min(setup.mlp_tile, tokens) if setup.mlp_tile else tokens


def chunked_loss_bytes(spec, setup, dtype_bytes: int, head_trainable: bool, hidden_bytes: int) -> dict:
    """{"kept": kept from forward to backward (the hidden states' gradient, as large as the hidden
    states: hidden_bytes, activation_bytes' "hidden_bytes"), "forward": alive besides it at forward's end, its last chunk (the chunk's
    buffers in dtype_bytes, the compute dtype, and the head's input)}, neither counting the head's own
    gradient (the gradients term's), as in the module docstring."""
    hidden, vocab, d = spec.hidden_size, spec.vocab_size, dtype_bytes
    rows = chunk_tokens(setup)
    chunk = rows * vocab * (4 if d == 4 else d + 4)  # its logits in dt and in fp32 (one buffer in fp32)
    buffers = chunk
    if head_trainable and d != 4:
        # the fp32 accumulator, and each chunk's (V, C) product in dt beside the chunk's dt gradient;
        # at the end the accumulator's cast is the head's gradient, counted with the gradients
        product = vocab * hidden * d
        buffers = vocab * hidden * 4 + max(chunk - product, rows * vocab * d)
    return {"kept": hidden_bytes, "forward": hidden_bytes + buffers}


def with_chunked_loss(act: dict, spec, setup, head_gradient_bytes: int) -> dict:
    """activation_bytes' parts (replayed with the full loss) as the chunked loss leaves them: the final
    norm keeps what it keeps, lm_head keeps nothing (the loss multiplies by its weight itself), and
    the loss keeps the hidden states' gradient and, when the head trains, the head's gradient
    (head_gradient_bytes per element; saved_tensors_hooks sees it, the gradients term counts it).
    Unchanged with the full loss."""
    if setup.loss != "chunked":
        return act
    loss = act["hidden_bytes"] + spec.vocab_size * spec.hidden_size * head_gradient_bytes
    total = act["total"] - act["head"] - act["loss"] + act["final_norm"] + loss
    return {**act, "head": act["final_norm"], "loss": loss, "total": total}


def pinned_bytes(nbytes: int, device: str) -> int:
    """What torch's caching host allocator takes for `nbytes` of pinned memory: the next power of two
    (its default; PYTORCH_ALLOC_CONF=pinned_max_round_threshold_mb:N stops rounding above N MiB).
    On a CPU there is nothing to pin: the bytes themselves."""
    if device != "cuda" or nbytes == 0:
        return nbytes
    return 1 << (nbytes - 1).bit_length()


def offload_activation_bytes(act: dict, setup) -> dict:
    """activation_bytes' parts as the device holds them with the offload: every block's input but
    the last moved out of "layers" and "total" into "offloaded" (their bytes, one per block), and
    "host" (what holds them there). `act` must come from full checkpointing, where each layer's
    part is its checkpointed input. Without the offload: `act` with nothing offloaded."""
    if not setup.offload_activations:
        return {**act, "offloaded": [], "host": 0}
    moved = act["layers"][:-1]  # the last block's input never leaves
    return {**act, "layers": [0] * len(moved) + act["layers"][-1:], "total": act["total"] - sum(moved),
            "offloaded": moved, "host": sum(pinned_bytes(n, setup.device) for n in moved)}
