"""The AdamW update of one segment, with its kernel passed in, and its write-back to the parameter.

Two kernels, each torch's own arithmetic on one segment's slices:

    single_tensor_adamw   torch.optim.AdamW(foreach=False)'s `_single_tensor_adam`, op for op:
                          elementwise ops give the same bits on any slicing, so the result is
                          torch's bit for bit however the pages cut a parameter
    fused_adamw           torch's fused CPU kernel (`torch._fused_adamw_`, what
                          torch.optim.AdamW(fused=True) runs on the CPU): one pass instead of
                          about seven; torch's bits when the pages cut a parameter at multiples of
                          16 elements (pages.py aligns them so when page_size is a multiple of 16)

The kernel runs in place on an fp32 host tensor, the update's target:

    the parameter itself     an fp32 parameter in host memory (torch's own ops on it)
    its master copy          16-bit parameters with master_weights="fp32"; the write-back copies
                             it into the parameter (one rounding)
    a zeroed step buffer     otherwise (a parameter on the GPU, or 16-bit without a master copy):
                             the kernel runs without weight decay and leaves -step in the buffer;
                             the write-back applies `p.mul_(1 - lr * wd); p.add_(-step)` where the
                             parameter lives, the same arithmetic as torch's `p.mul_(...)` then
                             `p.addcdiv_(m, denom, value=-step_size)` (addcdiv computes
                             value * m / denom, then adds it)
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor

from minilora.optim.pages import Segment

__all__ = ["AdamWHyper", "Kernel", "single_tensor_adamw", "fused_adamw", "update_segment"]


class AdamWHyper(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float

    @classmethod
    def of(cls, group: dict) -> "AdamWHyper":
        beta1, beta2 = group["betas"]
        return cls(float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
                   float(group["weight_decay"]))


# (target, grad, exp_avg, exp_avg_sq, step, hyper): updates target, exp_avg, exp_avg_sq in place;
# `step` is the parameter's step count, already incremented for this step (a 0-d fp32 tensor)
Kernel = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, AdamWHyper], None]


def single_tensor_adamw(param, grad, exp_avg, exp_avg_sq, step: Tensor, h: AdamWHyper) -> None:
    if h.weight_decay != 0:
        param.mul_(1 - h.lr * h.weight_decay)
    exp_avg.lerp_(grad, 1 - h.beta1)
    exp_avg_sq.mul_(h.beta2).addcmul_(grad, grad, value=1 - h.beta2)
    count = step.item()
    # torch's scalars, computed the same way in Python floats
    step_size = h.lr / (1 - h.beta1 ** count)
    bias_correction2_sqrt = (1 - h.beta2 ** count) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(h.eps)
    param.addcdiv_(exp_avg, denom, value=-step_size)


def fused_adamw(param, grad, exp_avg, exp_avg_sq, step: Tensor, h: AdamWHyper) -> None:
    # the kernel may also write `grad` (it unscales it in place when given a grad_scale); the
    # host gradient is consumed by the step anyway
    torch._fused_adamw_([param], [grad], [exp_avg], [exp_avg_sq], [], [step], lr=h.lr, beta1=h.beta1,
                        beta2=h.beta2, weight_decay=h.weight_decay, eps=h.eps, amsgrad=False, maximize=False)


def update_segment(seg: Segment, kernel: Kernel, h: AdamWHyper, states, link) -> None:
    """Update one segment: m, v and the parameter's elements [seg.lo, seg.hi).

    `states` reads and writes m and v (minilora.optim.states.MomentStates); `link` moves bytes to
    the parameter (minilora.optim.transfer: HostLink or DeviceLink)."""
    info = seg.param
    param = seg.param_slice()
    exp_avg, exp_avg_sq = states.read(seg, "exp_avg"), states.read(seg, "exp_avg_sq")
    decay = None
    if info.master:
        target = seg.view("master")
    elif link.updates_in_place(param):
        target = param
    else:
        target = link.host_zeros(seg.hi - seg.lo)
        decay = 1 - h.lr * h.weight_decay if h.weight_decay != 0 else 1.0
        h = h._replace(weight_decay=0.0)
    kernel(target, seg.view("grad"), exp_avg, exp_avg_sq, info.step, h)
    if target is not param:
        link.write_back(param, target, decay)
    if info.quantized:
        states.write(seg, "exp_avg", exp_avg)
        states.write(seg, "exp_avg_sq", exp_avg_sq)
