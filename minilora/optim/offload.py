"""CPUOffloadAdamW: AdamW whose states live in CPU memory, in fixed-size pages.

Where the bytes live (n = elements of one trainable parameter):

    device (GPU)   the parameters; no persistent gradients; `gpu_pages` staging buffers of
                   `page_size` fp32 elements, through which every transfer passes
    host (CPU,     per page: an fp32 gradient buffer (4n), exp_avg and exp_avg_sq (4n + 4n, or with
    pinned)        state_bits=8: uint8 codes + one fp32 absmax per 256 elements each), and an fp32
                   master copy (4n) of 16-bit parameters when master_weights="fp32"

The pieces, one concept per module of minilora/optim:

    pages.py       the parameters cut into pages; the host buffers
    transfer.py    how bytes move: HostLink (parameters in host memory) or DeviceLink (CUDA: side
                   stream, pinned pages, staging buffers, the step pipelined page by page)
    host_grad.py   HostGrad, the `p.grad` of a parameter whose gradient only the host holds
    update.py      the AdamW update of one segment, its kernel passed in, and the write-back
    states.py      m and v: fp32, or bitsandbytes-style blockwise 8-bit
    checkpoint.py  the state dict in torch AdamW's layout

`p.grad` always holds the accumulated gradient, so the standard loop works as with torch AdamW:
`loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), c); opt.step()` clips the host
gradient. step() consumes the gradients (everywhere, so behaviour does not depend on the device):
p.grad is None after it, as after zero_grad().
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor

from minilora.optim import checkpoint
from minilora.optim.host_grad import HostGrad
from minilora.optim.pages import BLOCK_SIZE, MIN_8BIT_SIZE, Page, ParamPages, lay_out
from minilora.optim.states import MomentStates
from minilora.optim.transfer import DeviceLink, HostLink
from minilora.optim.update import AdamWHyper, fused_adamw, single_tensor_adamw, update_segment

__all__ = ["CPUOffloadAdamW"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_layout_arguments(page_size, gpu_pages, master_weights, state_bits, fused) -> None:
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size <= 0:
        raise ValueError(f"page_size must be a positive int (elements per page), got {page_size!r}")
    if isinstance(gpu_pages, bool) or not isinstance(gpu_pages, int) or gpu_pages < 1:
        raise ValueError(f"gpu_pages must be an int >= 1, got {gpu_pages!r}")
    if master_weights not in (None, "fp32"):
        raise ValueError(f"master_weights must be None or 'fp32', got {master_weights!r}")
    if state_bits not in (32, 8):
        raise ValueError(f"state_bits must be 32 or 8, got {state_bits!r}")
    if not isinstance(fused, bool):
        raise TypeError(f"fused must be True or False, got {fused!r}")
    if state_bits == 8 and page_size % BLOCK_SIZE:
        raise ValueError(f"page_size must be a multiple of {BLOCK_SIZE} (the 8-bit block size) "
                         f"with state_bits=8, got {page_size}")


def grad_hook(opt: "CPUOffloadAdamW", info: ParamPages):
    # A weak reference: the hook, which the parameter holds, must not keep the optimizer alive.
    ref = weakref.ref(opt)

    def hook(param):
        if (live := ref()) is not None:
            live.take_grad(info)
    return hook


class CPUOffloadAdamW(torch.optim.Optimizer):
    """AdamW with m, v, gradients (and fp32 master weights) in paged CPU memory.

    A post-accumulate-grad hook moves each gradient to its host pages as soon as backward
    finishes it and sets `p.grad` to a tensor that holds it there: a view of it (fp32 parameters in
    host memory) or a HostGrad (parameters on a GPU, 16-bit parameters). Reading, clipping,
    scaling, zeroing and accumulating `p.grad` act on the host gradient; `host_grad(p)` returns a
    copy of it in fp32.

    `fused` picks the update's kernel: torch's fused CPU AdamW kernel (True) or its single-tensor
    ops (False); see minilora/optim/update.py for which torch optimizer each equals, bit for bit.

    The hooks stay on the parameters while the optimizer lives (they hold it only weakly, so a
    dropped optimizer's hooks do nothing). `close()` removes them (idempotent): gradients then stay
    where autograd puts them, and step() copies whatever `p.grad` holds.

    The trainable parameters are fixed at construction (and add_param_group): one that was frozen
    then (requires_grad=False) has no pages, so step() raises a ValueError if it requires grad later.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 page_size: int = 2**20, gpu_pages: int = 2, master_weights: str | None = None,
                 state_bits: int = 32, *, fused: bool = True):
        checkpoint.check_hyperparameters(lr, betas, eps, weight_decay)
        check_layout_arguments(page_size, gpu_pages, master_weights, state_bits, fused)
        self.page_size, self.gpu_pages = page_size, gpu_pages
        self.master_weights, self.state_bits, self.fused = master_weights, state_bits, fused
        self.kernel = fused_adamw if fused else single_tensor_adamw
        self.states = MomentStates(eight_bit=state_bits == 8, compiled_encoder=fused)
        self.trainable: list[ParamPages] = []   # in param-group order
        self.pages: list[Page] = []
        self.link: HostLink | None = None    # chosen by the first trainable parameter's device
        self.hooks = []
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def make_link(self, device: torch.device) -> HostLink:
        """How bytes move between `device`, where the parameters live, and the host pages:
        DeviceLink on CUDA, HostLink in host memory. (The tests override it to run DeviceLink's
        logic with host tensors standing in for the GPU.)"""
        if device.type == "cuda":
            return DeviceLink(device, self.page_size, self.gpu_pages)
        return HostLink()

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group; the group's trainable parameters get pages of their own."""
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        where = f" in param group {len(self.param_groups)}"
        checkpoint.check_hyperparameters(param_group["lr"], param_group["betas"], param_group["eps"],
                                         param_group["weight_decay"], where)
        if param_group.get("amsgrad") or param_group.get("maximize"):
            raise ValueError(f"amsgrad and maximize are not supported by CPUOffloadAdamW{where}")
        super().add_param_group(param_group)
        first = sum(len(g["params"]) for g in self.param_groups[:-1])
        new = []
        for i, p in enumerate(param_group["params"]):
            if not p.requires_grad:
                continue   # frozen: no state, no pages (it still counts in state_dict indices)
            if p.dtype not in FLOAT_DTYPES:
                raise TypeError(f"parameter {first + i} has dtype {p.dtype}; allowed: float32, bfloat16, float16")
            if not p.is_contiguous():
                raise ValueError(f"parameter {first + i} (shape {tuple(p.shape)}) must be contiguous")
            if p.device.type not in ("cpu", "cuda"):
                raise ValueError(f"parameter {first + i} is on {p.device}; allowed: cpu, cuda")
            device = next((info.tensor.device for info in self.trainable + new), p.device)
            if p.device != device:
                raise ValueError(f"all parameters must be on one device, got {device} and {p.device}")
            new.append(ParamPages(p, param_group, first + i,
                                  quantized=self.state_bits == 8 and p.numel() >= MIN_8BIT_SIZE,
                                  master=self.master_weights == "fp32" and p.dtype != torch.float32))
        if new and self.link is None:
            self.link = self.make_link(new[0].tensor.device)
        self.trainable.extend(new)
        self.pages.extend(lay_out(new, self.page_size, pinned=self.link is not None and self.link.pinned))
        for info in new:
            info.grad_handle = self.link.grad_handle(info)
            self.hooks.append(info.tensor.register_post_accumulate_grad_hook(grad_hook(self, info)))

    # --------------------------------------------------------------------- gradients

    def take_grad(self, info: ParamPages) -> None:
        """The post-accumulate-grad hook (and step(), for gradients it did not see): the host pages
        take whatever p.grad holds, and p.grad becomes the tensor that holds it there."""
        grad = info.tensor.grad
        if grad is None or grad is info.grad_handle:
            return   # none, or accumulated in place (a view) or through HostGrad.add_
        if isinstance(grad, HostGrad) and grad.pages is info:
            info.tensor.grad = info.grad_handle   # an alias of ours (p.grad.detach())
            return
        if grad.is_sparse:
            raise RuntimeError("CPUOffloadAdamW does not support sparse gradients")
        self.link.grad_to_host(info, grad, accumulate=False)
        info.tensor.grad, info.consumed = info.grad_handle, False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """set_to_none=False keeps zeroed gradients, so the next step() updates every parameter that
        had one (weight decay, momentum), as torch does, also when step() consumed it; the default
        forgets them."""
        for info in self.trainable:
            if set_to_none:
                info.tensor.grad = None
            elif info.tensor.grad is not None or info.consumed:
                if info.tensor.grad is None:
                    info.tensor.grad = info.grad_handle
                info.tensor.grad.zero_()
            info.consumed = False

    def host_grad(self, param: Tensor) -> Tensor | None:
        """The accumulated gradient of `param` (fp32, CPU, a copy), or None when it has none."""
        for info in self.trainable:
            if info.tensor is param:
                self.take_grad(info)
                if param.grad is None:
                    return None
                self.link.sync()
                return info.gather("grad").clone()
        raise ValueError(f"parameter of shape {tuple(param.shape)} is not a trainable parameter of this optimizer")

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """torch.nn.utils.clip_grad_norm_'s ops on this optimizer's gradients; returns the total norm.

        One vector_norm per gradient (of the fp32 host values for a HostGrad), the norm of the
        norms, then grad *= clamp(max_norm / (total + 1e-6), max=1). The norms are stacked grouped
        by (device, dtype), the groups in the order their first parameter appears in the
        optimizer's parameter order (param groups in order), and in that order within a group. For
        parameters of one dtype this is torch's own order, bit for bit; for mixed dtypes torch's
        grouping orders the groups otherwise, and the total may differ from torch's in the last bit.
        """
        params = [info.tensor for info in self.trainable if info.tensor.grad is not None]
        if not params:
            return torch.tensor(0.0)
        kinds = list(dict.fromkeys((p.grad.device, p.grad.dtype) for p in params))
        params.sort(key=lambda p: kinds.index((p.grad.device, p.grad.dtype)))
        norms = [torch.linalg.vector_norm(p.grad, norm_type) for p in params]
        total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), norm_type)
        if error_if_nonfinite and bool(total.isnan() | total.isinf()):
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite ({total.item()}); "
                               "pass error_if_nonfinite=False to clip anyway")
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    # --------------------------------------------------------------------------------- step

    def init_state(self, info: ParamPages) -> None:
        """torch's lazy state: step 0, m = v = 0; the master copy starts from the parameter."""
        info.step = torch.tensor(0.0, dtype=torch.float32)
        self.state[info.tensor] = {"step": info.step}
        for seg in info.segments:
            zeros = torch.zeros(seg.hi - seg.lo)
            self.states.write(seg, "exp_avg", zeros)
            self.states.write(seg, "exp_avg_sq", zeros)
            if info.master:
                seg.view("master").copy_(seg.param_slice())

    def check_trainable(self) -> None:
        tracked = {id(info.tensor) for info in self.trainable}
        for index, p in enumerate(p for group in self.param_groups for p in group["params"]):
            if p.requires_grad and id(p) not in tracked:
                raise ValueError(
                    f"parameter {index} (shape {tuple(p.shape)}) requires grad but was frozen when it "
                    "was given to CPUOffloadAdamW, which therefore has no state for it and would never "
                    "update it; freeze it again, or build a new optimizer (or add_param_group) with it")

    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step for every trainable parameter with a gradient, page by page, in the order
        the link gives (see transfer.py); then the gradients are consumed (p.grad = None)."""
        self.check_trainable()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        hyper = {}
        for info in self.trainable:
            self.take_grad(info)
            if info.tensor.grad is None:
                continue
            if info.step is None:
                self.init_state(info)
            info.step += 1
            hyper[id(info)] = AdamWHyper.of(info.group)
        if not hyper:
            return loss
        self.link.begin_step()
        for page in self.link.order(self.pages):
            segments = [seg for seg in page.segments if id(seg.param) in hyper]
            if segments:
                self.link.wait(page)
                for seg in segments:
                    update_segment(seg, self.kernel, hyper[id(seg.param)], self.states, self.link)
                self.link.done(page)
        for info in self.trainable:
            if id(info) in hyper:
                info.tensor.grad, info.consumed = None, True
        self.link.end_step()
        return loss

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """torch AdamW's layout plus "cpu_offload" (see minilora/optim/checkpoint.py)."""
        if self.link is not None:
            self.link.sync()
        return checkpoint.pack(self.param_groups, self.trainable, self.states, self.fused)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict from this class or from torch.optim.AdamW. Everything is checked
        first: a ValueError leaves the optimizer exactly as it was."""
        entries = checkpoint.check(state_dict, self.param_groups, self.trainable)
        if self.link is not None:
            self.link.sync()
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items()
                          if k != "params" and k not in checkpoint.TORCH_FLAGS})
        for info in self.trainable:
            info.step = None
            self.state.pop(info.tensor, None)
        for entry in entries:
            self.init_state(entry.info)
            checkpoint.unpack(entry, self.states)

    # ------------------------------------------------------------------ accounting

    def memory_bytes(self) -> dict:
        """Bytes this optimizer holds: {"cpu": host pages, "device": trainable parameters + staging}."""
        cpu = sum(t.nbytes for page in self.pages for t in page.buffers.values())
        device = sum(info.tensor.nbytes for info in self.trainable)
        return {"cpu": cpu, "device": device + (self.link.staging_bytes if self.link is not None else 0)}

    def close(self) -> None:
        """Remove the post-accumulate-grad hooks from the parameters (idempotent)."""
        hooks, self.hooks = getattr(self, "hooks", []), []
        for handle in hooks:
            handle.remove()

    def __del__(self):
        self.close()
