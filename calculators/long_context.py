"""Long context: what the chunked loss and activation offload hold, as arithmetic (issue 16).

Two switches of TrainingSetup, both mirroring code in this repository:

  loss="chunked", loss_chunk=c   reference_models/loss.py: the head and the cross-entropy over chunks
                                 of c learned tokens, each chunk's logits recomputed in backward.
      kept for backward   the final norm's output (B*T, C) in the compute dtype (a new saving unless
                          the head's own weight gradient keeps it already: full fine-tuning), the
                          targets (B*T int64) and one fp32 log-sum-exp per token
      backward start      the hidden states' gradient (B*T, C), and one chunk's logits in the compute
                          dtype and in fp32, alive together for the copy: c*V*(dt + 4) bytes (c*V*4
                          in fp32, where the copy is the tensor itself); with a trainable head in a
                          16-bit dtype also an fp32 (V, C) accumulator and each chunk's (V, C)
                          product (in fp32 the accumulator is the head's gradient itself)
      Every token is counted as learned: ignored ones (prompts, padding) never reach the head.

  offload_activations=True       minilora/train/offload_activations.py, with full checkpointing: each
                                 block's checkpointed input waits on the host from the moment the
                                 next block saves its own until backward fetches it, one block ahead.
      host                the inputs of every block but the last; on CUDA pinned memory from torch's
                          caching host allocator, which rounds each block up to a power of two
      device              the last block's input never leaves; while backward goes through the
                          blocks it holds two (the one recomputing, the one arriving)

And a phase of the peak that the full loss hid: backward through the last block, after the head
and the loss have let go of theirs, holds the blocks' saved activations (two inputs with offload),
a recomputed block and the backward workspace.

Exact on CPU against the reference models (tests/test_calc_long_context.py): the saved bytes
against saved_tensors_hooks, the loss's backward buffers against the allocations an op-by-op
tracker sees, the host bytes against the offloader's host tensors.
"""
from __future__ import annotations

__all__ = ["LOSSES", "DEFAULT_LOSS_CHUNK", "check_long_context", "chunk_tokens", "chunked_loss_bytes",
           "offload_activation_bytes", "pinned_bytes"]

LOSSES = ("full", "chunked")
DEFAULT_LOSS_CHUNK = 1024  # reference_models.loss.DEFAULT_LOSS_CHUNK (tests keep the two equal)


def check_long_context(setup) -> None:
    """Refuse a loss, chunk or offload setting that cannot run, naming the value and what is allowed."""
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


def chunk_tokens(setup) -> int:
    """Rows of one chunk: loss_chunk (default DEFAULT_LOSS_CHUNK), at most the batch's tokens."""
    return min(setup.loss_chunk or DEFAULT_LOSS_CHUNK, setup.batch * setup.seq)


def chunked_loss_bytes(spec, setup, dtype_bytes: int, head_trainable: bool) -> dict:
    """{"saved": kept for backward, "backward": alive at backward start besides it and besides the
    head's own gradient (which the gradients term counts)}, as in the module docstring."""
    tokens, hidden, vocab, d = setup.batch * setup.seq, spec.hidden_size, spec.vocab_size, dtype_bytes
    saved = tokens * 8 + tokens * 4 + (0 if head_trainable else tokens * hidden * d)
    rows = chunk_tokens(setup)
    chunk = rows * vocab * (4 if d == 4 else d + 4)  # its logits in dt and in fp32 (one buffer in fp32)
    buffers = chunk
    if head_trainable and d != 4:
        # the fp32 accumulator, and each chunk's (V, C) product in dt beside the chunk's dt gradient;
        # at the end the accumulator's cast is the head's gradient, counted with the gradients
        product = vocab * hidden * d
        buffers = vocab * hidden * 4 + max(chunk - product, rows * vocab * d)
    return {"saved": saved, "backward": tokens * hidden * d + buffers}


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
