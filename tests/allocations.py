"""Counting what torch allocates on the CPU, op by op (torch's own memory statistics are CUDA-only),
and what autograd keeps for backward.

`saved_bytes(fn)` counts what autograd saves while fn() runs, each storage once, parameters
excluded (the bookkeeping calculators.activations replays).

`AllocationTracker` is a TorchDispatchMode: every aten op's outputs pass through it, and an output
whose storage is new (not one of the op's inputs', not seen before) is an allocation, freed when
its storage dies (a weak reference). It records the bytes alive at the peak, the largest single
allocation, and every allocation's shape. Memory an op's kernel allocates and frees inside itself
(BLAS packing buffers) is invisible to it, as it is to autograd's saved tensors.
"""
from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class AllocationTracker(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.live = 0      # bytes allocated inside the mode and alive now
        self.peak = 0      # the most that were alive at once
        self.largest = 0   # the largest single allocation
        self.shapes: list[tuple] = []
        self._alive: dict[int, weakref.ref] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._record(t, inputs)
        return out

    def _record(self, t: torch.Tensor, inputs: set) -> None:
        storage = t.untyped_storage()
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in inputs or key in self._alive:
            return
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self.largest = max(self.largest, nbytes)
        self.shapes.append(tuple(t.shape))

        def freed(_, key=key, nbytes=nbytes):
            self.live -= nbytes
            self._alive.pop(key, None)

        self._alive[key] = weakref.ref(storage, freed)


def saved_bytes(fn, params=()) -> int:
    """Bytes of the tensors autograd saves while fn() runs, each storage once, `params` excluded."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())
