"""The language-model loss: the mean cross-entropy of next-token targets, computed two ways.

    full     lm_loss(logits, targets): the head's (B, T, V) logits, upcast to fp32, F.cross_entropy
    chunked  chunked_cross_entropy(hidden, weight, targets, chunk_size): the head and the loss over
             chunks of tokens, and backward recomputes each chunk's logits, so no (B, T, V) tensor
             is ever alive (a fused linear cross-entropy, as Liger-Kernel and Cut Cross-Entropy
             call it). For Llama 3's vocabulary of 128,256 the full loss holds 3.4 GiB at 2,048
             tokens; the chunked one a (chunk, V) buffer or two, whatever the sequence length.

Both give the same loss to fp32 rounding (the per-token terms are summed in another order) and the
same gradients within rounding (tests/test_loss.py states and checks the bound).

What the chunked loss holds (N learned tokens, c = chunk_size, C hidden, V vocabulary, dt the
compute dtype's bytes: the autocast dtype, else the hidden states'):
    kept for backward   the learned tokens' hidden states (N, C) in their dtype, their targets (N,)
                        int64 and the log-sum-exp of each (N,) fp32; when some targets are ignored,
                        the hidden rows are gathered first (a copy) and their indices kept
    each chunk          its logits (c, V) in dt and their fp32 copy, alive together for the copy
                        (one buffer in fp32: the copy is the tensor itself): c * V * (dt + 4) bytes,
                        or c * V * 4 in fp32; soft-capping adds one more (c, V) buffer in dt. The
                        softmax and its gradient are computed in place in the fp32 buffer.
    backward            the gradient of the hidden states (N, C), and with a trainable head an fp32
                        (V, C) accumulator for the head's gradient (in fp32 it is the gradient
                        itself; otherwise each chunk's (V, C) product in dt is added to it, and it
                        is cast to the head's dtype at the end)
Tokens whose target is ignored (-100: prompts and padding in instruction data) never reach the head.
Finding them costs one device-to-host sync per call on a GPU.
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
# loss took 1.23 / 1.11 / 1.04 / 1.02 times the full loss's time at 128 / 256 / 512 / 1024 tokens
# (bench/long_context.py, 32,000 words, width 256); a GPU, too, needs a long first dimension to
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
    return _LinearCrossEntropy.apply(hidden, weight, targets, chunk_size, softcap, dtype)


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, softcap: float | None):
    """(c, C) hidden rows -> their fp32 logits (c, V) and, when soft-capped, tanh(z / cap) in dt
    (its derivative's factor); the dt logits are freed once copied, as the module docstring counts."""
    z = h.to(w.dtype) @ w.t()  # (c, V)
    squashed = None
    if softcap is not None:  # the same ops in the same dtype as the full path: tanh(z / cap) * cap
        squashed = z.div_(softcap).tanh_()
        z = squashed * softcap
    return z.float(), squashed


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of softcap(hidden @ weight.T) over rows whose targets are all learned.

    Forward keeps only the log-sum-exp of each row; backward recomputes each chunk's logits and
    turns them in place into the gradient (softmax - one_hot(target)) * grad / N."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, softcap, dtype):
        # hidden (N, C), weight (V, C), targets (N,) -> the mean loss, fp32 scalar
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dtype)
            lse = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # (N,)
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk_size):
                rows = slice(start, start + chunk_size)
                logits, _ = _chunk_logits(hidden[rows], w, softcap)  # (c, V) fp32
                target_logit = logits.gather(1, targets[rows, None])[:, 0]  # (c,)
                peak = logits.amax(dim=1, keepdim=True)  # (c, 1)
                lse[rows] = logits.sub_(peak).exp_().sum(dim=1).log_().add_(peak[:, 0])
                total += (lse[rows] - target_logit).sum()
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.chunk_size, ctx.softcap, ctx.dtype = chunk_size, softcap, dtype
        return total / hidden.shape[0]

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, targets, lse = ctx.saved_tensors
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        w = weight.to(ctx.dtype)
        scale = grad_loss.float() / hidden.shape[0]
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            _chunk_backward(hidden[rows], w, targets[rows], lse[rows], scale, ctx.softcap,
                            grad_hidden[rows] if want_hidden else None, grad_weight)
        if want_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def _chunk_backward(hidden, w, targets, lse, scale, softcap, grad_hidden, grad_weight) -> None:
    """One chunk's share of backward: its rows of grad_hidden, and its sum into grad_weight (fp32).

    A function of its own so that the chunk's (c, V) buffers are freed before the next chunk's exist."""
    h = hidden.to(w.dtype)  # (c, C)
    grad, squashed = _chunk_logits(h, w, softcap)  # (c, V) fp32, recomputed
    grad.sub_(lse[:, None]).exp_()  # softmax
    grad[torch.arange(h.shape[0], device=h.device), targets] -= 1  # minus the one-hot target
    grad = grad.mul_(scale).to(w.dtype)  # d loss / d logits, in the head's dtype
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
