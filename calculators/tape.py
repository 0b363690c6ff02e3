"""A symbolic forward pass: tensors without data, and autograd's rule for what each op keeps.

A `Sym` is a tensor reduced to what memory depends on: its storage (views share one), its element
count, its dtype and whether it requires grad. `Tape` runs ops on them as PyTorch does and records
each storage an op saves for backward once: the bookkeeping of
torch.autograd.graph.saved_tensors_hooks keyed by untyped_storage().data_ptr(). Parameters are
never recorded: an op that keeps a weight keeps the parameter itself, which is model state.

What an op saves follows from three rules, each in one place here:
  - autograd's formula for the op: F.linear(x, W) keeps x only when W needs a gradient; a * b keeps
    b when a needs one and a when b does; pow, silu and gelu keep their input; tanh, rsqrt and
    softmax their output; a sum, a view or a multiply by a Python number keeps nothing;
  - dtype promotion: fp32 with bf16 gives fp32, so a residual stream that is fp32 (autocast, or
    prepare_model_for_kbit_training) stays fp32 through every add and multiply;
  - torch.autocast: linear layers, matmuls and SDPA cast floating inputs to the autocast dtype (a new
    storage, kept when the op needs it: the 16-bit copy of a weight is kept when the input needs a
    gradient); ops on autocast's fp32 list cast to fp32: on CUDA layer_norm, softmax, pow, rsqrt and
    the losses, on CPU only the losses (torch/csrc/autocast_mode.cpp; tests/test_calc_tape.py).
Device differences: dropout keeps a bool mask on CUDA and one in the input's dtype on CPU; LayerNorm's
mean and rstd are fp32 on CUDA and in the input's dtype on CPU; SDPA with dropout on CPU falls back
to the math kernel (`Tape.sdpa`).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DTYPE_SIZE", "Sym", "Tape", "AttentionShape", "promote"]

DTYPE_SIZE = {"fp32": 4, "bf16": 2, "fp16": 2, "int64": 8, "int32": 4, "bool": 1}
_FLOATS = ("fp32", "bf16", "fp16")


def promote(a: str, b: str) -> str:
    """torch's type promotion between two floating dtypes."""
    return a if a == b else "fp32"


class Sym:
    """A tensor: `storage` is shared by its views (an identity object), `numel` and `dtype` are its own."""
    __slots__ = ("numel", "dtype", "grad", "storage", "storage_bytes", "param")

    def __init__(self, numel: int, dtype: str, grad: bool, storage=None, storage_bytes: int | None = None,
                 param: bool = False):
        self.numel, self.dtype, self.grad, self.param = numel, dtype, grad, param
        self.storage = storage if storage is not None else object()
        self.storage_bytes = numel * DTYPE_SIZE[dtype] if storage_bytes is None else storage_bytes

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_SIZE[self.dtype]

    def view(self, numel: int | None = None) -> "Sym":
        """A view: same storage (split, transpose, a reshape that needs no copy)."""
        return Sym(self.numel if numel is None else numel, self.dtype, self.grad, self.storage, self.storage_bytes)


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    heads: int
    kv_heads: int
    seq: int
    head_dim: int

    @property
    def bhtd(self) -> int:
        return self.batch * self.heads * self.seq * self.head_dim

    @property
    def bhtt(self) -> int:
        return self.batch * self.heads * self.seq * self.seq


class Tape:
    """Ops on Syms, recording what each saves for backward (see the module docstring)."""

    def __init__(self, device: str = "cuda", autocast: str | None = None):
        self.device, self.autocast = device, autocast
        self.saved: dict = {}             # storage -> bytes, in the order first saved

    # --- bookkeeping --------------------------------------------------------------------------
    def tensor(self, numel: int, dtype: str, grad: bool = False) -> Sym:
        return Sym(numel, dtype, grad)

    def param(self, numel: int, dtype: str, trainable: bool) -> Sym:
        """A weight: kept by an op as the parameter itself, so never counted."""
        return Sym(numel, dtype, trainable, param=True)

    def save(self, *xs: Sym) -> None:
        for x in xs:
            if not x.param:
                self.saved.setdefault(x.storage, x.storage_bytes)

    def keep(self, numel: int, dtype: str) -> None:
        """An op's own saved buffer that no other tensor shares (a mask, a logsumexp)."""
        self.save(Sym(numel, dtype, False))

    def total(self) -> int:
        return sum(self.saved.values())

    def mark(self) -> int:
        return len(self.saved)

    def since(self, mark: int, exclude=frozenset()) -> int:
        """Bytes saved after `mark` (dicts keep insertion order), storages in `exclude` left out."""
        return sum(n for key, n in list(self.saved.items())[mark:] if key not in exclude)

    # --- casts ----------------------------------------------------------------------------------
    def to(self, x: Sym, dtype: str) -> Sym:
        """x.to(dtype): a new storage unless the dtype is already that; nothing saved."""
        return x if x.dtype == dtype else Sym(x.numel, dtype, x.grad)

    def lower(self, x: Sym) -> Sym:
        """autocast's cast for ops that run in the autocast dtype (linear, matmul, SDPA)."""
        return self.to(x, self.autocast) if self.autocast and x.dtype in _FLOATS else x

    def _fp32(self, x: Sym) -> Sym:
        """autocast's cast for ops on its fp32 list on CUDA (layer_norm, softmax, pow, rsqrt)."""
        return self.to(x, "fp32") if self.autocast and self.device == "cuda" else x

    # --- ops --------------------------------------------------------------------------------
    def linear(self, x: Sym, n_in: int, n_out: int, trainable: bool, weight_dtype: str) -> Sym:
        """F.linear / addmm with a (n_out, n_in) weight: keeps x for the weight's gradient, and the
        weight for x's gradient (a parameter, not counted, unless autocast made a copy of it)."""
        x = self.lower(x)
        if trainable:
            self.save(x)
        if x.grad and self.autocast and weight_dtype != self.autocast:
            self.keep(n_in * n_out, self.autocast)  # the weight cast to the autocast dtype
        return Sym(x.numel // n_in * n_out, x.dtype, x.grad or trainable)

    def bmm(self, a: Sym, b: Sym, out_numel: int) -> Sym:
        """torch.bmm / a batched matmul on (copies or views of) its operands: each kept for the other's gradient."""
        if a.grad:
            self.save(b)
        if b.grad:
            self.save(a)
        return Sym(out_numel, promote(a.dtype, b.dtype), a.grad or b.grad)

    def mul(self, a: Sym, b: Sym) -> Sym:
        """a * b (broadcasting): b kept for a's gradient, a for b's."""
        if a.grad:
            self.save(b)
        if b.grad:
            self.save(a)
        return Sym(max(a.numel, b.numel), promote(a.dtype, b.dtype), a.grad or b.grad)

    def add(self, a: Sym, b: Sym) -> Sym:
        return Sym(max(a.numel, b.numel), promote(a.dtype, b.dtype), a.grad or b.grad)

    def scalar(self, x: Sym) -> Sym:
        """x * c, x + c, -x with a Python number c: a new tensor, nothing kept."""
        return Sym(x.numel, x.dtype, x.grad)

    def saves_input(self, x: Sym, fp32_list: bool = False) -> Sym:
        """silu, gelu, pow(x, n): the input is kept. `fp32_list`: pow is on autocast's fp32 list."""
        x = self._fp32(x) if fp32_list else x
        if x.grad:
            self.save(x)
        return Sym(x.numel, x.dtype, x.grad)

    def saves_output(self, x: Sym, fp32_list: bool = False) -> Sym:
        """tanh, rsqrt: the output is kept. `fp32_list`: rsqrt is on autocast's fp32 list."""
        x = self._fp32(x) if fp32_list else x
        out = Sym(x.numel, x.dtype, x.grad)
        if x.grad:
            self.save(out)
        return out

    def softmax(self, x: Sym, dtype: str | None = None) -> Sym:
        """softmax(x, dtype=dtype): keeps its output."""
        x = self._fp32(x) if dtype is None else x
        return self.saves_output(Sym(x.numel, dtype or x.dtype, x.grad))

    def dropout(self, x: Sym, p: float) -> Sym:
        """F.dropout in training: keeps the mask (bool on CUDA, x's dtype on CPU) when x needs a gradient."""
        if p <= 0:
            return x
        if x.grad:
            self.keep(x.numel, x.dtype if self.device == "cpu" else "bool")
        return Sym(x.numel, x.dtype, x.grad)

    def layer_norm(self, x: Sym, rows: int, trainable: bool) -> Sym:
        """F.layer_norm: keeps x, mean and rstd (rows each; fp32 on CUDA, x's dtype on CPU)."""
        x = self._fp32(x)
        if x.grad or trainable:
            self.save(x)
            self.keep(2 * rows, "fp32" if self.device == "cuda" else x.dtype)
        return Sym(x.numel, x.dtype, x.grad or trainable)

    def embedding(self, idx: Sym, trainable: bool, numel: int, dtype: str) -> Sym:
        """F.embedding: keeps the indices when the table trains."""
        if trainable:
            self.save(idx)
        return Sym(numel, dtype, trainable)

    def cross_entropy(self, logits: Sym, targets: int) -> None:
        """F.cross_entropy(logits (rows, V), targets): log_softmax keeps its fp32 output, nll_loss the
        int64 targets (`targets` elements in their storage) and its fp32 total_weight scalar."""
        if logits.grad:
            self.save(Sym(logits.numel, "fp32", True))
            self.keep(targets, "int64")
            self.keep(1, "fp32")

    def sdpa(self, q: Sym, k: Sym, v: Sym, shape: AttentionShape, dropout: float, v_is_view: bool = False,
             mask: int = 0) -> Sym:
        """F.scaled_dot_product_attention, causal. The flash / memory-efficient kernels keep q, k, v
        (GQA unexpanded), the output and an fp32 logsumexp (B, H, T). With a boolean `mask` of that many
        elements (a sliding window shorter than the sequence) the caller has expanded k and v to every
        head (repeat_kv: GQA needs no mask), and the kernel keeps the mask converted to q's dtype, a copy
        per call. On CPU with dropout the math kernel runs instead, in fp32: it keeps q and k^T (scaled
        copies), v (upcast, GQA-expanded, or a view of the given v when `v_is_view`: fp32, no expansion,
        and a (B*H, T, D) layout), the softmax, the dropout mask and the dropped probabilities (B, H, T, T
        each); a mask is added, not kept. Output: (B, T, H*D)."""
        if mask and shape.kv_heads < shape.heads:   # repeat_kv: (B, H_kv, T, D) -> (B, H, T, D), new tensors
            k, v = Sym(shape.bhtd, k.dtype, k.grad), Sym(shape.bhtd, v.dtype, v.grad)
        q, k, v = self.lower(q), self.lower(k), self.lower(v)
        grad = q.grad or k.grad or v.grad
        out = Sym(shape.bhtd, q.dtype, grad)
        if not grad:
            return out
        if self.device == "cpu" and dropout > 0:
            scores = q.grad or k.grad
            kept = [(q.grad, shape.bhtd),             # k^T * scale, for q's gradient
                    (k.grad, shape.bhtd),             # q * scale, for k's
                    (scores, 2 * shape.bhtt),         # the softmax and the dropout mask
                    (v.grad, shape.bhtt)]             # the dropped probabilities, for v's
            for needed, numel in kept:
                if needed:
                    self.keep(numel, "fp32")
            if scores and v_is_view and v.dtype == "fp32" and shape.kv_heads == shape.heads:
                self.save(v)                          # v, for the probabilities' gradient
            elif scores:
                self.keep(shape.bhtd, "fp32")
            return out
        self.save(q, k, v, out)
        self.keep(shape.batch * shape.heads * shape.seq, "fp32")
        if mask:
            self.keep(mask, q.dtype)                  # the boolean mask as an additive one, in q's dtype
        return out
