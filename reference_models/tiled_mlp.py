"""The MLP over tiles of tokens: forward keeps only the MLP's input, backward recomputes one tile at
a time, so the MLP's (tokens, intermediate) tensors exist for one tile only (Arctic Long Sequence
Training's TiledMLP, arXiv 2506.13996; Unsloth's long-context mode does the same).

An MLP is computed token by token, so cutting the tokens into tiles changes nothing but memory.
For Llama 3.1 8B the MLP's intermediates (gate, up, act(gate) * up, and the LoRA paths' inputs,
14,336 wide) are most of what one block keeps: with full checkpointing the one recomputed block
and the backward workspace, without it every block's activations. `TileableMLP` is the base of
every dense MLP here; CausalLM.set_mlp_tiling(tile) switches it on.

What a tiled MLP holds (N = B * T tokens of the micro-batch, cut into tiles of t rows in order; C
hidden; the MLP's own code decides the rest):
    kept for backward   its input (N, C), a tensor the block made anyway (when another op keeps it
                        too, nothing new)
    forward             one tile's intermediates at a time (no autograd graph), and the output
    backward            one tile's intermediates, recomputed and kept for that tile's backward; the
                        input's gradient (N, C); an fp32 sum of each trainable weight's gradient
                        over the tiles, cast to the weight's dtype at the end

Equality with the untiled MLP: each tile's matmuls see fewer rows, and a BLAS may pick another
kernel for another row count (MKL's fp32 GEMM does for 1 to 5 rows and some odd counts; cuBLAS
picks kernels by shape too). Where the kernels match row for row the outputs and the input's
gradient are bit-identical, and so are the loss and every gradient outside the MLP; the MLP's own
weight gradients are sums over tiles, in another order, so they agree to rounding.
tests/test_tiled_mlp.py states and checks both.

Dropout inside the MLP (GPT-2's, LoRA's) draws its masks again in backward: the random state of the
forward is replayed, tiles in the same order, as torch.utils.checkpoint replays a block's.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .loss import check_token_count

__all__ = ["TileableMLP", "tiled_mlp", "check_mlp_tile"]


def check_mlp_tile(tile, seq: int | None = None, name: str = "mlp_tile") -> None:
    """A tile is a whole number of tokens, from 1 up to the sequence length (when one is given)."""
    check_token_count(tile, seq, name, "tile")


class TileableMLP(nn.Module):
    """A dense MLP whose `per_token(x)` computes each token independently; forward runs it whole, or
    over tiles of `tile` tokens when set (CausalLM.set_mlp_tiling) and there are more tokens than that."""

    tile: int | None = None

    def per_token(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tile is None or x.numel() <= self.tile * x.shape[-1]:
            return self.per_token(x)
        return tiled_mlp(self, x, self.tile)


def tiled_mlp(mlp: TileableMLP, x: torch.Tensor, tile: int) -> torch.Tensor:
    """mlp.per_token(x) over tiles of `tile` tokens: x (..., C) -> (..., C_out). When autograd needs
    it (x or a weight of the MLP requires grad), only x is kept and backward recomputes each tile."""
    check_mlp_tile(tile, name="tile")
    rows = x.reshape(-1, x.shape[-1])  # (N, C), a view of the norm's output
    trainable = [p for p in mlp.parameters() if p.requires_grad]
    if torch.is_grad_enabled() and (x.requires_grad or trainable):
        out = _TiledMLP.apply(mlp, tile, rows, *trainable)
    else:
        out = _forward_tiles(mlp, rows, tile)
    return out.view(*x.shape[:-1], out.shape[-1])  # (N, C_out) -> (..., C_out)


def _forward_tiles(mlp: TileableMLP, rows: torch.Tensor, tile: int) -> torch.Tensor:
    """(N, C) -> (N, C_out), one tile's intermediates alive at a time."""
    first = mlp.per_token(rows[:tile])
    out = first.new_empty((rows.shape[0], first.shape[-1]))
    out[:tile] = first
    del first
    for start in range(tile, rows.shape[0], tile):
        out[start:start + tile] = mlp.per_token(rows[start:start + tile])
    return out


class _TiledMLP(torch.autograd.Function):
    """The MLP over tiles, saving only its input. Backward returns the weights' gradients as this
    Function's own (summed over tiles) instead of letting each tile accumulate into .grad: every
    weight then gets one gradient per backward, as DDP's and CPUOffloadAdamW's hooks expect."""

    @staticmethod
    def forward(ctx, mlp, tile, rows, *weights):
        # rows (N, C) -> (N, C_out); runs without grad (a Function's forward does)
        device, kind = rows.device, rows.device.type
        ctx.mlp, ctx.tile, ctx.weights = mlp, tile, weights
        # backward runs outside the caller's autocast (on CUDA on autograd's own thread): its recompute re-enters it
        ctx.autocast = dict(device_type=kind, enabled=torch.is_autocast_enabled(kind),
                            dtype=torch.get_autocast_dtype(kind), cache_enabled=torch.is_autocast_cache_enabled())
        ctx.rng = _rng_state(device) if mlp.training else None  # dropout is only drawn in training
        ctx.save_for_backward(rows)
        return _forward_tiles(mlp, rows, tile)

    @staticmethod
    def backward(ctx, grad_out):
        (rows,) = ctx.saved_tensors
        want_rows, want = ctx.needs_input_grad[2], ctx.needs_input_grad[3:]
        weights = [w for w, needed in zip(ctx.weights, want) if needed]
        grad_rows = torch.empty_like(rows) if want_rows else None  # (N, C)
        sums = [None] * len(weights)  # fp32, one per weight that needs a gradient
        with _replayed_rng(ctx.rng, rows.device):
            for start in range(0, rows.shape[0], ctx.tile):
                end = start + ctx.tile
                part = rows[start:end].detach().requires_grad_(want_rows)
                with torch.enable_grad(), torch.autocast(**ctx.autocast):
                    # through a view: autocast caches its casts of a leaf that requires grad (it means
                    # weights), and the forward's input is no leaf; the tile keeps what the forward would
                    out = ctx.mlp.per_token(part.view_as(part))  # (t, C_out), its graph alive until grad returns
                # outside autocast, as autograd runs any backward
                grads = torch.autograd.grad(out, [part] * want_rows + weights, grad_out[start:end],
                                            allow_unused=True)
                del out
                if want_rows:
                    grad_rows[start:end] = grads[0]
                for i, g in enumerate(grads[want_rows:]):
                    if g is not None:
                        # a copy the first time: autograd may hand back a view of a tensor it still holds
                        sums[i] = g.to(torch.float32, copy=True) if sums[i] is None else sums[i].add_(g)
        by_weight = iter(None if s is None else s.to(w.dtype) for s, w in zip(sums, weights))
        return (None, None, grad_rows, *(next(by_weight) if needed else None for needed in want))


def _rng_state(device: torch.device) -> tuple:
    """The CPU generator's state, and the CUDA device's when the tiles run there."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


@contextlib.contextmanager
def _replayed_rng(state: tuple | None, device: torch.device):
    """Inside: the random state the forward started from; after: the state from before (fork_rng)."""
    if state is None:
        yield
        return
    cpu, cuda = state
    with torch.random.fork_rng(devices=[device] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
        yield
