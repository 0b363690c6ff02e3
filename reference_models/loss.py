"""The language-model loss: the mean cross-entropy of next-token targets, computed two ways.

    full     lm_loss(logits, targets): the head's (B, T, V) logits, upcast to fp32, F.cross_entropy
    chunked  chunked_cross_entropy(hidden, weight, targets, chunk_size): the head and the loss over
             chunks of tokens, each chunk's gradients computed in forward, so no (B, T, V) tensor is
             ever alive (a fused linear cross-entropy, as Liger-Kernel calls it). For Llama 3's
             vocabulary of 128,256 the full loss holds 3.4 GiB at 2,048 tokens; the chunked one a
             (chunk, V) buffer or two, whatever the sequence length.

Both give the same loss to fp32 rounding (the per-token terms are summed in another order) and the
same gradients within rounding (tests/test_loss.py states and checks the bound).

The chunked loss does the head's work once, as the full loss does: forward turns each chunk's
logits into (softmax - one_hot(target)) / N in place and multiplies that by the head (the hidden
rows' gradient) and, when the head trains, by the chunk's hidden rows (the head's gradient); it
keeps the gradients, and backward only multiplies them by the loss's gradient (Liger-Kernel's
fused linear cross-entropy; recomputing the logits in backward instead would cost one more head
matmul per step). Under torch.no_grad, or when nothing needs a gradient, forward computes the loss
alone.

What it holds (N learned tokens, c = chunk_size, C hidden, V vocabulary, dt the compute dtype's
bytes: the autocast dtype, else the hidden states'):
    forward, each chunk its logits (c, V) in dt and their fp32 copy, alive together for the copy
                        (one buffer in fp32: the copy is the tensor itself): c * V * (dt + 4) bytes,
                        or c * V * 4 in fp32; soft-capping adds one more (c, V) buffer in dt. The
                        softmax and its gradient are computed in place in the fp32 buffer, which is
                        freed once cast to dt; then with a trainable head each chunk's (V, C)
                        product in dt is added to an fp32 (V, C) accumulator (in fp32 the
                        accumulator is the head's gradient itself, and the product is added in place)
    forward, throughout the hidden rows' gradient (N, C) in the hidden states' dtype, filled chunk
                        by chunk; with a trainable head the fp32 accumulator, cast to the head's
                        dtype at the end
    kept for backward   those gradients: (N, C), and the head's (V, C) when it trains; nothing else
                        (not the hidden states, the targets or a log-sum-exp). When some targets are
                        ignored, the hidden rows are gathered first (a copy, freed after forward) and
                        their indices are kept, for index_select's backward
    backward            nothing new: the kept gradients are scaled in place (so a second backward
                        through the same graph is refused) or, when the loss's gradient is exactly
                        1, handed on as they are
Tokens whose target is ignored (-100: prompts and padding in instruction data) never reach the head.
Finding them costs one device-to-host sync per call on a GPU, and so does comparing the loss's
gradient with 1 in backward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["IGNORE_INDEX", "LOSSES", "DEFAULT_LOSS_CHUNK", "lm_loss", "chunked_cross_entropy", "check_loss_chunk",
           "check_token_count"]

IGNORE_INDEX = -100
LOSSES = ("full", "chunked")
# Tokens per chunk. The size trades the chunk's buffers, chunk x V x (dt + 4) bytes, against the
# length of the head's matmul, (chunk x C) @ (C x V), and the number of passes: on the CPU here the
# loss (forward and backward, a frozen head) took 0.70-0.83 / 0.64-0.76 / 0.64-0.72 / 0.71-0.72 times
# the full loss's time at 128 / 256 / 512 / 1024 tokens (bench/long_context.py, 32,000 words, width
# 256, three runs): little to choose between on a CPU; a GPU needs a long first dimension to
# fill its matmul units. 1024 keeps it long while the buffers stay small beside a long-context
# step: 0.73 GiB for Llama 3's 128,256-word vocabulary in bf16, against 3.4 GiB for the full loss
# at 2,048 tokens and 134 GiB at 80,000.
DEFAULT_LOSS_CHUNK = 1024


def check_loss_chunk(chunk_size, seq: int | None = None, name: str = "loss chunk") -> None:
    """A chunk is a whole number of tokens, from 1 up to the sequence length (when one is given)."""
    check_token_count(chunk_size, seq, name, "chunk")


def check_token_count(count, seq: int | None, name: str, unit: str) -> None:
    """`count` tokens per `unit` (a loss chunk, an MLP tile): a whole number from 1 up to the sequence
    length (when one is given)."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"{name} must be an integer >= 1 (tokens per {unit}), got {count!r}")
    if seq is not None and count > seq:
        raise ValueError(f"{name} must be at most the sequence length {seq} (a longer {unit} is the whole "
                         f"sequence), got {count}")


def _check_targets(targets: torch.Tensor, leading: tuple) -> None:
    if targets.shape != leading:
        raise ValueError(f"targets must have shape {leading} (batch, seq), got {tuple(targets.shape)}")


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over non-ignored (-100) targets, in fp32.

    targets are already the next tokens: targets[:, t] is the token that should follow
    idx[:, t] (transformers' `labels` instead equal input_ids and are shifted inside the model).
    """
    _check_targets(targets, tuple(logits.shape[:2]))
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_size: int = DEFAULT_LOSS_CHUNK, softcap: float | None = None) -> torch.Tensor:
    """lm_loss(softcap(hidden @ weight.T), targets) without the (B, T, V) logits.

    hidden (B, T, C): the final norm's output; weight (V, C): the head's (a bias-free linear layer);
    targets (B, T) as in lm_loss; softcap: Gemma's final_logit_softcapping (logits -> cap *
    tanh(logits / cap)). The head runs in the autocast dtype when autocast is on, as F.linear would.
    Under torch.no_grad, or when neither hidden nor weight needs a gradient, only the loss is computed.
    """
    _check_targets(targets, tuple(hidden.shape[:2]))
    check_loss_chunk(chunk_size, name="chunk_size")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (vocab, {hidden.shape[-1]}), got {tuple(weight.shape)}")
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)  # (B*T, C), (B*T,)
    learned = targets != IGNORE_INDEX
    if not bool(learned.all()):
        rows = learned.nonzero()[:, 0]  # (N,)
        hidden, targets = hidden.index_select(0, rows), targets.index_select(0, rows)  # (N, C), (N,)
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        with torch.autocast(device, enabled=False):
            return _chunk_loop(hidden, weight.to(dtype), targets, chunk_size, softcap)
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, softcap, dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of softcap(hidden @ weight.T) over rows whose targets are all learned.

    Forward computes the loss and, chunk by chunk, its gradients (the chunk's logits turned in place
    into (softmax - one_hot(target)) / N, then multiplied by the head and by the chunk's hidden rows),
    and keeps those; backward only scales them by the loss's gradient (in place; not at all when it
    is exactly 1, so the common case is bit-identical to a forward that folded the scale in)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, softcap, dtype):
        # hidden (N, C), weight (V, C), targets (N,) -> the mean loss, fp32 scalar
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        with torch.autocast(hidden.device.type, enabled=False):
            grad_hidden = torch.empty_like(hidden) if want_hidden else None  # (N, C)
            # the head's gradient is summed over the chunks in fp32 (in fp32 it is the gradient itself)
            grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
            loss = _chunk_loop(hidden, weight.to(dtype), targets, chunk_size, softcap, grad_hidden, grad_weight)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)  # (V, C)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.scaled = False
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.scaled:  # (before unpacking, whose version check would name no cause)
            raise RuntimeError("the chunked loss computes its gradients in forward and its backward scales them in "
                               "place, so it runs once per forward; for a second backward through the same graph "
                               "(retain_graph=True) use set_loss('full')")
        grad_hidden, grad_weight = ctx.saved_tensors
        if bool(grad_loss != 1):  # (one device-to-host sync) exactly 1: the kept gradients as they are
            ctx.scaled = True
            for grad in (grad_hidden, grad_weight):
                if grad is not None:
                    grad.mul_(grad_loss)
        return grad_hidden, grad_weight, None, None, None, None


def _chunk_loop(hidden, w, targets, chunk_size, softcap, grad_hidden=None, grad_weight=None) -> torch.Tensor:
    """The one loop over chunks: the mean loss over hidden's N rows (returned) and, written into
    grad_hidden (N, C) and summed into the fp32 grad_weight (V, C) where given, its gradients. w is
    the head in the compute dtype."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    scale = 1.0 / max(hidden.shape[0], 1)  # d mean / d each row's loss (no rows: no chunks, a NaN mean)
    for start in range(0, hidden.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        total += _chunk(hidden[rows], w, targets[rows], softcap, scale,
                        None if grad_hidden is None else grad_hidden[rows], grad_weight)
    return total / hidden.shape[0]


def _chunk(hidden, w, targets, softcap, scale, grad_hidden, grad_weight) -> torch.Tensor:
    """One chunk: the sum of its rows' losses; its rows of grad_hidden and its share of grad_weight
    (fp32) when they are given. A function of its own so that the chunk's (c, V) buffers are freed
    before the next chunk's exist."""
    h = hidden.to(w.dtype)  # (c, C)
    logits, squashed = _chunk_logits(h, w, softcap)  # (c, V) fp32
    target_logit = logits.gather(1, targets[:, None])[:, 0]  # (c,)
    peak = logits.amax(dim=1, keepdim=True)  # (c, 1)
    sums = logits.sub_(peak).exp_().sum(dim=1)  # (c,); logits now hold exp(z - peak)
    loss = (sums.log().add_(peak[:, 0]) - target_logit).sum()  # log-sum-exp - the target's logit
    if grad_hidden is None and grad_weight is None:
        return loss
    grad = logits.mul_((scale / sums)[:, None])  # softmax / N, in place
    del logits  # one name for the fp32 buffer, so that the cast below frees it (in 16 bits)
    grad[torch.arange(h.shape[0], device=h.device), targets] -= scale  # minus the one-hot target / N
    grad = grad.to(w.dtype)  # d loss / d logits, in the head's dtype
    if squashed is not None:  # d(cap * tanh(z / cap)) / dz = 1 - tanh(z / cap)^2
        grad.mul_(squashed.square_().neg_().add_(1))
    if grad_hidden is not None:  # (c, C), written in place when the dtypes allow
        if grad_hidden.dtype == grad.dtype:
            torch.mm(grad, w, out=grad_hidden)
        else:
            grad_hidden.copy_(grad @ w)
    if grad_weight is not None:  # (V, C), accumulated in fp32 over the chunks
        if grad.dtype == torch.float32:
            grad_weight.addmm_(grad.t(), h)
        else:
            grad_weight += grad.t() @ h
    return loss


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, softcap: float | None):
    """(c, C) hidden rows in the head's dtype -> their fp32 logits (c, V) and, when soft-capped,
    tanh(z / cap) in dt (its derivative's factor); the dt logits are freed once copied, as the
    module docstring counts."""
    z = h @ w.t()  # (c, V)
    squashed = None
    if softcap is not None:  # the same ops in the same dtype as the full path: tanh(z / cap) * cap
        squashed = z.div_(softcap).tanh_()
        z = squashed * softcap
    return z.float(), squashed
