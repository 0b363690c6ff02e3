"""Links: how bytes move between where the parameters live and the host pages.

    HostLink     parameters in host memory: nothing moves. An fp32 parameter's `p.grad` is a view
                 of its host gradient and the kernel updates the parameter in place.
    DeviceLink   parameters on a GPU. One side CUDA stream carries every copy, through `gpu_pages`
                 fp32 staging buffers of `page_size` elements on the device:

    backward:  grad final -> post-accumulate-grad hook --D2H (side stream)--> pinned host grad;
               the device gradient is freed once copied; p.grad becomes a HostGrad
    step:      pages in the order their gradients reached the host; per page: wait for its D2H
               copies (an event), update it on the CPU, queue its H2D copies on the side stream and
               go on to the next page while they run, so the D2H tail, the CPU update and the H2D
               copies overlap and the step approaches the slowest of the three

DeviceLink is written against torch.device: given a CPU device (no streams, no events, no pinned
memory) it runs the same staging logic on host tensors, which is how the tests exercise it.
"""
from __future__ import annotations

import contextlib
import itertools

import torch
from torch import Tensor

from minilora.optim.host_grad import HostGrad
from minilora.optim.pages import Page, ParamPages

__all__ = ["HostLink", "DeviceLink"]


class HostLink:
    """Parameters in host memory: the host pages are next to them."""
    pinned = False
    staging_bytes = 0

    def grad_handle(self, info: ParamPages) -> Tensor:
        """What p.grad holds while the pages hold the gradient: a view of it when the parameter is
        fp32 (every torch idiom then works on it unchanged), else a HostGrad of the parameter's dtype."""
        if info.tensor.dtype == torch.float32:
            return info.grad_view()
        return HostGrad(info, self)

    def grad_to_host(self, info: ParamPages, grad: Tensor, accumulate: bool) -> None:
        flat = grad.detach().reshape(-1)
        for seg in info.segments:
            host = seg.view("grad")
            host.add_(flat[seg.lo:seg.hi]) if accumulate else host.copy_(flat[seg.lo:seg.hi])

    def updates_in_place(self, param: Tensor) -> bool:
        return param.dtype == torch.float32

    def host_zeros(self, n: int) -> Tensor:
        return torch.zeros(n, pin_memory=self.pinned)

    def write_back(self, param: Tensor, src: Tensor, decay: float | None) -> None:
        """decay None: param <- src (rounded to its dtype); else param <- param * decay + src."""
        apply(param, src, decay)

    # the step's schedule: nothing to wait for in host memory
    def begin_step(self) -> None:
        pass

    def order(self, pages: list[Page]) -> list[Page]:
        return pages

    def wait(self, page: Page) -> None:
        pass

    def done(self, page: Page) -> None:
        pass

    def end_step(self) -> None:
        pass

    def sync(self) -> None:
        pass


def apply(param: Tensor, src: Tensor, decay: float | None) -> None:
    if decay is None:
        param.copy_(src)
        return
    if decay != 1.0:
        param.mul_(decay)
    param.add_(src)


class DeviceLink(HostLink):
    """Parameters on `device`: copies on a side stream, through staging buffers on the device."""

    def __init__(self, device: torch.device, page_size: int, gpu_pages: int):
        self.device = device
        cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if cuda else None
        self.pinned = cuda
        self.staging = [torch.empty(page_size, dtype=torch.float32, device=device) for _ in range(gpu_pages)]
        self.staging_bytes = sum(b.nbytes for b in self.staging)
        self.slots = itertools.cycle(self.staging)
        self.arrivals = itertools.count(1)

    def side(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def next_staging(self, n: int) -> Tensor:
        # reusing a buffer is safe without events: every use of it is queued on the one side stream
        return next(self.slots)[:n]

    def record(self) -> object:
        return self.stream.record_event() if self.stream is not None else None

    def grad_handle(self, info: ParamPages) -> Tensor:
        return HostGrad(info, self)

    def updates_in_place(self, param: Tensor) -> bool:
        return False

    def grad_to_host(self, info: ParamPages, grad: Tensor, accumulate: bool) -> None:
        """Queue grad (+ the host gradient when accumulating) -> the host pages, in fp32."""
        if self.stream is not None:   # the gradient is final only once backward's queued kernels ran
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        flat = grad.detach().reshape(-1)
        with self.side():
            for seg in info.segments:
                host, src = seg.view("grad"), flat[seg.lo:seg.hi]
                if not accumulate and src.dtype == torch.float32 and self.stream is not None:
                    host.copy_(src, non_blocking=True)   # straight into pinned memory
                else:   # convert or accumulate on the device, in fp32, in a staging buffer
                    buf = self.next_staging(src.numel())
                    if accumulate:
                        buf.copy_(host, non_blocking=True)
                        buf.add_(src)
                    else:
                        buf.copy_(src)
                    host.copy_(buf, non_blocking=True)
                seg.page.arrival, seg.page.grad_ready = next(self.arrivals), self.record()
        if self.stream is not None:   # keep their memory until the side stream has read them
            grad.record_stream(self.stream)
            flat.record_stream(self.stream)   # a copy when the gradient was not contiguous

    def write_back(self, param: Tensor, src: Tensor, decay: float | None) -> None:
        """Queue src -> staging -> param (see HostLink.write_back). `src` is pinned: the caching
        host allocator keeps a dropped one alive until the copy has read it."""
        with self.side():
            buf = self.next_staging(src.numel())
            buf.copy_(src, non_blocking=True)
            apply(param, buf, decay)

    def begin_step(self) -> None:
        if self.stream is not None:   # backward's queued kernels may still read the parameters
            self.stream.wait_stream(torch.cuda.current_stream(self.device))

    def order(self, pages: list[Page]) -> list[Page]:
        """Pages whose gradients reached the host first go first (backward finishes the last layers'
        first), so the CPU starts while the side stream still copies the remaining gradients."""
        return sorted(pages, key=lambda page: page.arrival)

    def wait(self, page: Page) -> None:
        """Before the CPU touches a page: its gradient copies have landed, and the previous step's
        uploads from its master copy are done."""
        for event in (page.grad_ready, page.uploaded):
            if event is not None:
                event.synchronize()

    def done(self, page: Page) -> None:
        page.uploaded = self.record()

    def end_step(self) -> None:
        if self.stream is not None:   # the next forward waits for the uploads, not for the CPU
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    def sync(self) -> None:
        """Wait for every queued copy: the CPU may then read and write any page."""
        if self.stream is not None:
            self.stream.synchronize()
