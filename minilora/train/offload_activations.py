"""Activation offload for gradient checkpointing: each block's checkpointed input waits for backward
in pinned host memory instead of on the device.

With full checkpointing a block keeps only its input x (B, T, C) for backward, which recomputes
the rest; over L blocks that is L inputs, the term that grows with both depth and context (Llama
3.1 8B at 80,000 tokens: 32 x 0.61 GiB). With ActivationOffload:

    forward   block i's checkpoint saves x_i. When block i+1 saves its input, x_i is copied to
              pinned host memory on a side stream, and its device memory goes back to the
              allocator once the copy has read it (x_i.record_stream). The last block's input
              never leaves: backward needs it first.
    backward  recomputing block i unpacks x_i (back already, or copied now) and starts copying
              x_{i-1} back on a second side stream, so it arrives while block i recomputes and
              runs its backward (prefetch one block).

So the device holds at most two block inputs at a time (the current one and the one in flight)
instead of L, and the host L - 1 of them. Pinned memory comes from torch's caching host allocator,
which rounds each block up to a power of two (calculators counts it so; PYTORCH_ALLOC_CONF=
pinned_max_round_threshold_mb:N turns the rounding off above N MiB). On CPU the same code runs host
to host (the copies are plain copies, no streams), so CI runs every step of it.

    model.set_gradient_checkpointing(True, offload=ActivationOffload(device))

The model enters `saving(layer, x)` around each block's checkpoint call (reference_models'
CausalLM._run_block), so only the tensors checkpoint saves there pass through these hooks: the
block's input x is offloaded; the others it saves (RoPE's cos and sin, shared by every block) stay.
"""
from __future__ import annotations

import contextlib
import weakref

import torch

__all__ = ["ActivationOffload"]


class _Saved:
    """One block's saved input: on the device, on the host, or both (after a fetch).

    `copied` is the CUDA event after which its latest copy has landed (None on CPU, and once waited on)."""

    __slots__ = ("layer", "device", "host", "copied", "previous", "__weakref__")

    def __init__(self, layer: int, x: torch.Tensor, previous: "_Saved | None"):
        self.layer, self.device, self.host, self.copied = layer, x, None, None
        self.previous = weakref.ref(previous) if previous is not None else None


class ActivationOffload:
    """Saved-tensor hooks that move each checkpointed block input to the host and prefetch it back.

    What it holds now, for tests and benchmarks: `host_bytes()` (the storages of this pass's inputs
    on the host), `device_inputs()` (how many of them it holds on the device); `copies` lists this
    pass's copies in the order they were queued, as ("to host" | "to device", layer)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        # two side streams: copies out (forward) and copies in (backward) never wait on each other
        self.d2h = torch.cuda.Stream(self.device) if self.cuda else None
        self.h2d = torch.cuda.Stream(self.device) if self.cuda else None
        self._last: weakref.ref | None = None  # the newest block input of this pass
        self._last_layer = -1
        self._pass: list[weakref.ref] = []  # every block input of this pass, for host_bytes()
        self._input: torch.Tensor | None = None  # the input of the block saving now
        self.copies: list[tuple[str, int]] = []

    @contextlib.contextmanager
    def saving(self, layer: int, x: torch.Tensor):
        """Saved-tensor hooks in force while block `layer` checkpoints its input x (B, T, C)."""
        if layer <= self._last_layer:  # layer 0 again: a new forward pass
            self._last, self._pass, self.copies = None, [], []
        self._last_layer = layer
        # autograd keeps the pack hook as long as the saved tensor: it must not hold x itself
        self._input = x
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield
        finally:
            self._input = None

    def host_bytes(self) -> int:
        return sum(s.host.untyped_storage().nbytes() for s in self._alive() if s.host is not None)

    def device_inputs(self) -> int:
        return sum(s.device is not None for s in self._alive())

    def _alive(self) -> list[_Saved]:
        return [s for ref in self._pass if (s := ref()) is not None]

    def _pack(self, t: torch.Tensor):
        if t is not self._input:
            return t
        previous = self._last() if self._last is not None else None
        if previous is not None and previous.host is None:
            self._offload(previous)  # the block before is done with its input: it leaves now
        saved = _Saved(self._last_layer, t, previous)
        self._last = weakref.ref(saved)
        self._pass.append(self._last)
        return saved

    def _unpack(self, saved):
        if not isinstance(saved, _Saved):
            return saved
        if saved.device is None:
            self._fetch(saved)  # not prefetched (the first block unpacked, or a second backward)
        previous = saved.previous() if saved.previous is not None else None
        if previous is not None and previous.device is None:
            self._fetch(previous)  # prefetch one block: it is recomputed next
        if saved.copied is not None:
            self._stream().wait_event(saved.copied)
            saved.copied = None
        return saved.device

    def _stream(self):
        return torch.cuda.current_stream(self.device)

    def _copy(self, src: torch.Tensor, device, side_stream, after=None):
        """src -> a new tensor on `device` (pinned when it is the host of a CUDA device): on CUDA
        queued on `side_stream` behind the current stream's work (and `after`, an event), returning
        the event that marks its end; on CPU a plain copy and no event."""
        pin = self.cuda and device.type == "cpu"
        dst = torch.empty(src.shape, dtype=src.dtype, device=device, pin_memory=pin)
        if side_stream is None:
            dst.copy_(src)
            return dst, None
        side_stream.wait_stream(self._stream())  # src is written, dst's memory free, on the current stream
        if after is not None:
            side_stream.wait_event(after)
        with torch.cuda.stream(side_stream):
            dst.copy_(src, non_blocking=True)
        # the device tensor's memory must not be handed out again before the side stream is done with
        # it (the pinned host memory's reuse is guarded by torch's host allocator, which records the copy)
        on_device = src if src.device.type == "cuda" else dst
        on_device.record_stream(side_stream)
        return dst, side_stream.record_event()

    def _offload(self, saved: _Saved) -> None:
        self.copies.append(("to host", saved.layer))
        saved.host, saved.copied = self._copy(saved.device, torch.device("cpu"), self.d2h)
        saved.device = None

    def _fetch(self, saved: _Saved) -> None:
        self.copies.append(("to device", saved.layer))
        saved.device, saved.copied = self._copy(saved.host, self.device, self.h2d, after=saved.copied)

