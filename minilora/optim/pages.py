"""Paging: the trainable parameters laid end to end and cut into fixed-size pages of host memory.

The parameters, in param-group order, are laid end to end and cut every `page_size` elements; a
parameter may straddle pages. A page is the unit of storage, transfer and work, so the optimizer's
device memory does not grow with the model. Each page holds 1-D host tensors (pinned when the
parameters are on CUDA, so copies to and from the device are asynchronous):

    grad                                 fp32   the accumulated gradient
    exp_avg, exp_avg_sq                  fp32   m and v (32-bit states)
    exp_avg_code, exp_avg_sq_code        uint8  m and v (8-bit states), with
    exp_avg_absmax, exp_avg_sq_absmax    fp32   one absmax per 256-element block
    master                               fp32   master weights of 16-bit parameters

A parameter starts on a multiple of 256 elements when its states are 8-bit (a block must not
straddle pages) and otherwise on a multiple of 16 when `page_size` is one: the fused CPU AdamW kernel
works in 64-byte units of 16 fp32 elements, so a page cut then falls where the kernel would have cut
the whole tensor, and a straddling parameter gets the bits the kernel gives the whole tensor.
Unpinned, the gradient buffers of all pages are slices of one tensor, so that the gradient of a
straddling parameter is still contiguous (`p.grad` can then be a view of it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["BLOCK_SIZE", "MIN_8BIT_SIZE", "FUSED_UNIT", "Page", "Segment", "ParamPages", "lay_out"]

BLOCK_SIZE = 256        # 8-bit quantization block, as bitsandbytes' blockwise optimizers
MIN_8BIT_SIZE = 4096    # smaller tensors keep 32-bit states (bitsandbytes' min_8bit_size)
FUSED_UNIT = 16         # fp32 elements in the fused CPU AdamW kernel's 64-byte task unit
STATES = ("exp_avg", "exp_avg_sq")


@dataclass(eq=False)
class Page:
    segments: list["Segment"]
    buffers: dict[str, Tensor]         # name -> 1-D host tensor (see the module docstring)
    arrival: int = 0                   # when its gradient last reached the host (orders the step)
    grad_ready: object = None          # CUDA event: the device-to-host gradient copies are done
    uploaded: object = None            # CUDA event: the host-to-device copies that read it are done


@dataclass(eq=False)
class Segment:
    """Elements [lo, hi) of one flattened parameter, stored in `page` at `offsets[buffer name]`."""
    param: "ParamPages"
    page: Page
    lo: int
    hi: int
    offsets: dict[str, int]

    def view(self, name: str) -> Tensor:
        """This segment's part of one page buffer (a view: writing it writes the page)."""
        n = self.hi - self.lo
        count = -(-n // BLOCK_SIZE) if name.endswith("_absmax") else n
        start = self.offsets[name]
        return self.page.buffers[name][start:start + count]

    def param_slice(self) -> Tensor:
        return self.param.tensor.detach().view(-1)[self.lo:self.hi]


@dataclass(eq=False)
class ParamPages:
    """One trainable parameter: where its elements live in the pages, and its optimizer state."""
    tensor: Tensor
    group: dict
    index: int                  # the parameter's index in torch's state_dict (all groups, all params)
    quantized: bool             # 8-bit m and v
    master: bool                # fp32 master copy on the host
    segments: list[Segment] = field(default_factory=list)   # in element order
    step: Tensor | None = None  # None until the first step with a gradient (torch's lazy state)
    grad_handle: Tensor | None = None   # what p.grad holds while the host pages hold its gradient
    consumed: bool = False      # step() used its gradient and set p.grad to None

    def gather(self, name: str) -> Tensor:
        """One page buffer's elements of this parameter, shaped like it (a view when in one page)."""
        pieces = [seg.view(name) for seg in self.segments]
        flat = pieces[0] if len(pieces) == 1 else torch.cat(pieces) if pieces else torch.zeros(0)
        return flat.view(self.tensor.shape)

    def grad_view(self) -> Tensor:
        """The host gradient as one view shaped like the parameter. Needs unpinned pages, whose
        gradient buffers are slices of one tensor (a straddling parameter's elements are adjacent)."""
        if not self.segments:
            return torch.zeros(self.tensor.shape)
        first = self.segments[0].view("grad")
        return first.as_strided((self.tensor.numel(),), (1,)).view(self.tensor.shape)


def alignment(info: ParamPages, page_size: int) -> int:
    if info.quantized:
        return BLOCK_SIZE
    return FUSED_UNIT if page_size % FUSED_UNIT == 0 else 1


def cut(params: list[ParamPages], page_size: int) -> list[list[tuple[ParamPages, int, int]]]:
    """Per page, the (parameter, lo, hi) element ranges it holds."""
    per_page: list[list] = []
    pos = 0   # position in the flat space of these parameters
    for info in params:
        step = alignment(info, page_size)
        pos = -(-pos // step) * step
        lo, n = 0, info.tensor.numel()
        while lo < n:
            page, in_page = divmod(pos, page_size)
            take = min(n - lo, page_size - in_page)
            per_page.extend([] for _ in range(page + 1 - len(per_page)))
            per_page[page].append((info, lo, lo + take))
            lo, pos = lo + take, pos + take
    return per_page


def lay_out(params: list[ParamPages], page_size: int, pinned: bool) -> list[Page]:
    """Cut `params` into new pages, allocate each page's host buffers (zeros) and record in each
    parameter where its segments are."""
    layout = []
    for items in cut(params, page_size):
        page, sizes = Page([], {}), dict.fromkeys(("grad", "state", "code", "absmax", "master"), 0)
        for info, lo, hi in items:
            n = hi - lo
            offsets = {"grad": sizes["grad"]}
            kind = "code" if info.quantized else "state"
            for name in STATES:
                offsets[name + ("_code" if info.quantized else "")] = sizes[kind]
                if info.quantized:
                    offsets[name + "_absmax"] = sizes["absmax"]
            if info.master:
                offsets["master"] = sizes["master"]
            sizes["grad"] += n
            sizes[kind] += n
            sizes["absmax"] += -(-n // BLOCK_SIZE) if info.quantized else 0
            sizes["master"] += n if info.master else 0
            seg = Segment(info, page, lo, hi, offsets)
            page.segments.append(seg)
            info.segments.append(seg)
        layout.append((page, sizes))
    grads = None if pinned else torch.zeros(sum(sizes["grad"] for _, sizes in layout))
    start = 0
    for page, sizes in layout:
        allocate(page, sizes, pinned, None if grads is None else grads[start:start + sizes["grad"]])
        start += sizes["grad"]
    return [page for page, _ in layout]


def allocate(page: Page, sizes: dict, pinned: bool, grad: Tensor | None) -> None:
    def zeros(count, dtype=torch.float32):
        return torch.zeros(count, dtype=dtype, pin_memory=pinned)

    page.buffers["grad"] = zeros(sizes["grad"]) if grad is None else grad
    for name in STATES:
        page.buffers[name] = zeros(sizes["state"])
        if sizes["code"]:
            page.buffers[name + "_code"] = zeros(sizes["code"], torch.uint8)
            page.buffers[name + "_absmax"] = zeros(sizes["absmax"])
    if sizes["master"]:
        page.buffers["master"] = zeros(sizes["master"])
