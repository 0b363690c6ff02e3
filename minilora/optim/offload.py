"""CPUOffloadAdamW: AdamW whose states live in CPU memory, in fixed-size pages.

Where the bytes live (n = elements of one trainable parameter):

    device (GPU)   the parameters; no persistent gradients; `gpu_pages` staging buffers of
                   `page_size` fp32 elements, through which every transfer passes
    host (CPU,     per page: an fp32 gradient buffer (4n), exp_avg and exp_avg_sq (4n + 4n, or with
    pinned)        state_bits=8: uint8 codes + one fp32 absmax per 256 elements each), and an fp32
                   master copy (4n) of 16-bit parameters when master_weights="fp32"

    backward:  grad final -> post-accumulate-grad hook --D2H (side stream)--> host grad; free grad
    step:      for each page: m, v, (master) updated on the CPU --H2D (side stream)--> parameter,
               while the CPU already computes the next page

Pages: the trainable parameters, in param-group order, are laid end to end and cut every
`page_size` elements; a parameter may straddle pages. A page is the unit of storage, transfer and
work, so the optimizer's device memory does not grow with the model.

Numerics: the update is torch.optim.AdamW(foreach=False)'s `_single_tensor_adam`, op for op, on
each page's slice; elementwise ops give the same bits on any slicing, so fp32 parameters match
torch bit for bit. One rewrite, where parameters live on the GPU without a master copy: the step
`(-step_size * m) / denom` is written over the consumed gradient, shipped to the device and added
there (`p.mul_(1 - lr*wd); p.add_(step)`), the same arithmetic as torch's
`p.addcdiv_(m, denom, value=-step_size)`. step() consumes the gradients (everywhere, so behaviour
does not depend on the device): a backward after step() starts a new accumulation, as it would
after zero_grad().

fused=True (opt-in) runs torch's fused CPU AdamW kernel (`torch._fused_adamw_`, what
torch.optim.AdamW(fused=True) calls) on each page's slice instead: one pass over the page instead
of about seven. Bit-identical to torch.optim.AdamW(fused=True) when no parameter straddles a page
(the kernel's vector lanes and scalar tail then fall on the same elements as on the whole tensor),
within a few ulps otherwise. For parameters on the GPU without a master copy the kernel writes the
step into a zeroed host buffer (weight decay 0) and the device applies decay and the add, as in the
default path; for 16-bit parameters with master_weights="fp32" it updates the master copy.
With state_bits=8, fused=True also encodes the 8-bit states in one torch.compile'd loop per 1M
elements (minilora/_encode8_fused.py; the same codes as the eager encoder, about 3.5x faster).

8-bit states (state_bits=8) follow bitsandbytes' blockwise 8-bit Adam: m is stored with the signed
dynamic map, v with the unsigned one, blocks of 256 elements each with an fp32 absmax; tensors with
fewer than 4096 elements keep 32-bit states. The update itself is the fp32 one above, on
dequantized states.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["CPUOffloadAdamW"]

BLOCK_SIZE = 256        # 8-bit quantization block, as bitsandbytes' blockwise optimizers
MIN_8BIT_SIZE = 4096    # smaller tensors keep 32-bit states (bitsandbytes' min_8bit_size)
_NONE, _HELD, _CONSUMED = 0, 1, 2   # host gradient status of a parameter
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass
class _Segment:
    """Elements [lo, hi) of one flattened parameter, stored in one page at the given offsets."""
    param: "_Param"
    lo: int
    hi: int
    grad_off: int     # in page.grad
    state_off: int    # in page.exp_avg/exp_avg_sq (fp32), or page.*_code (uint8) when 8-bit
    absmax_off: int   # 8-bit only: in page.*_absmax (one entry per 256-element block)
    master_off: int   # in page.master, -1 without a master copy


@dataclass
class _Page:
    segments: list
    buffers: dict     # name -> 1-D host tensor: grad, exp_avg, exp_avg_sq, exp_avg_code, ...


@dataclass
class _Param:
    tensor: Tensor
    group: dict
    index: int            # the parameter's index in torch's state_dict (all groups, all params)
    quantized: bool       # 8-bit m and v
    master: bool          # fp32 master copy on the host
    segments: list = field(default_factory=list)   # [(page, segment)] in element order
    grad_status: int = _NONE
    step: Tensor | None = None   # None until the first step with a gradient (torch's lazy state)


def _check_hyperparameters(lr, betas, eps, weight_decay, where: str = "") -> None:
    lr = float(lr)
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0{where}, got {lr}")
    if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
        raise ValueError(f"betas must be a pair (beta1, beta2){where}, got {betas!r}")
    for i, beta in enumerate(betas):
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1){where}, got {float(beta)}")
    if not float(eps) >= 0.0:
        raise ValueError(f"eps must be >= 0{where}, got {eps}")
    if not float(weight_decay) >= 0.0:
        raise ValueError(f"weight_decay must be >= 0{where}, got {weight_decay}")


def _grad_hook(opt, info):
    # A weak reference: the hook, which the parameter holds, must not keep the optimizer alive.
    ref = weakref.ref(opt)

    def hook(param):
        if (live := ref()) is not None:
            live._take_grad(info)
    return hook


class CPUOffloadAdamW(torch.optim.Optimizer):
    """AdamW with m, v, gradients (and fp32 master weights) in paged CPU memory.

    Gradients never persist on the device: each one is moved to its host buffer by a
    post-accumulate-grad hook as soon as backward finishes it, so `p.grad` is always None; read the
    accumulated gradient with `host_grad(p)` and clip it with `clip_grad_norm_(max_norm)`.

    The hooks stay on the parameters while the optimizer lives (they hold it only weakly, so a
    dropped optimizer's hooks do nothing). Call `close()` when done with it (idempotent): it removes
    them, after which backward leaves gradients in `p.grad` and this optimizer collects no more.

    The trainable parameters are fixed at construction (and add_param_group): one that was frozen
    then (requires_grad=False) has no pages, so step() raises a ValueError if it requires grad later.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 page_size: int = 2**20, gpu_pages: int = 2, master_weights: str | None = None,
                 state_bits: int = 32, *, fused: bool = False, _force_staging: bool = False):
        _check_hyperparameters(lr, betas, eps, weight_decay)
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
        self.page_size, self.gpu_pages = page_size, gpu_pages
        self.master_weights, self.state_bits, self.fused = master_weights, state_bits, fused
        self._force_staging = _force_staging   # tests: route CPU transfers through staging too
        self._params: list[_Param] = []
        self._pages: list[_Page] = []
        self._hooks = []
        self._tracked: set[int] = set()   # id() of the parameters with pages and a hook
        self._device = None
        self._ready = False
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self._ready = True
        self._lay_out(self._params)

        cuda = self._device is not None and self._device.type == "cuda"
        self._stream = torch.cuda.Stream(self._device) if cuda else None
        self._staging = []   # [gpu_pages] x fp32 (page_size,) on the device
        if cuda or _force_staging:
            device = self._device or torch.device("cpu")
            self._staging = [torch.empty(page_size, dtype=torch.float32, device=device)
                             for _ in range(gpu_pages)]
        self._slot = 0
        if state_bits == 8:
            from minilora.quant.nf4 import dynamic_map   # the shared quantizer (bitsandbytes' maps)
            self._maps = {"exp_avg": dynamic_map(signed=True), "exp_avg_sq": dynamic_map(signed=False)}

    # ------------------------------------------------------------------------------ set-up

    def add_param_group(self, param_group: dict) -> None:
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        where = f" in param group {len(self.param_groups)}"
        _check_hyperparameters(param_group["lr"], param_group["betas"], param_group["eps"],
                               param_group["weight_decay"], where)
        if param_group.get("amsgrad") or param_group.get("maximize"):
            raise ValueError(f"amsgrad and maximize are not supported by CPUOffloadAdamW{where}")
        super().add_param_group(param_group)
        first = sum(len(g["params"]) for g in self.param_groups[:-1])
        new = []
        for i, p in enumerate(param_group["params"]):
            if not p.requires_grad:
                continue   # frozen: no state, no pages (it still counts in state_dict indices)
            if p.dtype not in _FLOAT_DTYPES:
                raise TypeError(f"parameter {first + i} has dtype {p.dtype}; allowed: float32, bfloat16, float16")
            if not p.is_contiguous():
                raise ValueError(f"parameter {first + i} (shape {tuple(p.shape)}) must be contiguous")
            if p.device.type not in ("cpu", "cuda"):
                raise ValueError(f"parameter {first + i} is on {p.device}; allowed: cpu, cuda")
            if self._device is None:
                self._device = p.device
            elif p.device != self._device:
                raise ValueError(f"all parameters must be on one device, got {self._device} and {p.device}")
            new.append(_Param(p, param_group, first + i,
                              quantized=self.state_bits == 8 and p.numel() >= MIN_8BIT_SIZE,
                              master=self.master_weights == "fp32" and p.dtype != torch.float32))
        self._params.extend(new)
        self._tracked.update(id(info.tensor) for info in new)
        for info in new:
            self._hooks.append(info.tensor.register_post_accumulate_grad_hook(_grad_hook(self, info)))
        if self._ready:   # a group added after construction gets pages of its own
            self._lay_out(new)

    def _lay_out(self, params: list[_Param]) -> None:
        """Cut `params` into new pages and allocate each page's host buffers (zeros)."""
        per_page: list[list] = []
        pos = 0   # position in the flat space of these parameters
        for info in params:
            if info.quantized:   # 8-bit blocks must not straddle pages: start on a block boundary
                pos = -(-pos // BLOCK_SIZE) * BLOCK_SIZE
            lo, n = 0, info.tensor.numel()
            while lo < n:
                page, in_page = divmod(pos, self.page_size)
                take = min(n - lo, self.page_size - in_page)
                per_page.extend([] for _ in range(page + 1 - len(per_page)))
                per_page[page].append((info, lo, lo + take))
                lo, pos = lo + take, pos + take
        pin = self._device is not None and self._device.type == "cuda"
        for items in per_page:
            sizes = dict(grad=0, state=0, code=0, absmax=0, master=0)
            page = _Page([], {})
            for info, lo, hi in items:
                n = hi - lo
                seg = _Segment(info, lo, hi, sizes["grad"], sizes["code" if info.quantized else "state"],
                               sizes["absmax"], sizes["master"] if info.master else -1)
                sizes["grad"] += n
                if info.quantized:
                    sizes["code"] += n
                    sizes["absmax"] += -(-n // BLOCK_SIZE)
                else:
                    sizes["state"] += n
                sizes["master"] += n if info.master else 0
                page.segments.append(seg)
                info.segments.append((page, seg))

            def zeros(count, dtype=torch.float32):
                return torch.zeros(count, dtype=dtype, pin_memory=pin)
            page.buffers["grad"] = zeros(sizes["grad"])
            for name in ("exp_avg", "exp_avg_sq"):
                page.buffers[name] = zeros(sizes["state"])
                if sizes["code"]:
                    page.buffers[name + "_code"] = zeros(sizes["code"], torch.uint8)
                    page.buffers[name + "_absmax"] = zeros(sizes["absmax"])
            if sizes["master"]:
                page.buffers["master"] = zeros(sizes["master"])
            self._pages.append(page)

    # ------------------------------------------------------------------ device <-> host moves

    def _side(self):
        return torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()

    def _sync(self) -> None:
        """Wait for every queued transfer: the CPU may then read and write the host pages."""
        if self._stream is not None:
            self._stream.synchronize()

    def _next_staging(self, n: int) -> Tensor:
        buf = self._staging[self._slot][:n]
        self._slot = (self._slot + 1) % len(self._staging)
        return buf

    def _take_grad(self, info: _Param) -> None:
        """The post-accumulate-grad hook: add p.grad into the host buffer, then free p.grad."""
        grad = info.tensor.grad
        if grad is None:
            return
        if grad.is_sparse:
            raise RuntimeError("CPUOffloadAdamW does not support sparse gradients")
        flat = grad.detach().reshape(-1)
        fresh = info.grad_status != _HELD
        if self._stream is not None:   # the grad is final only once backward's queued kernels ran
            self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with self._side():
            for page, seg in info.segments:
                host = page.buffers["grad"][seg.grad_off:seg.grad_off + seg.hi - seg.lo]
                src = flat[seg.lo:seg.hi]
                if not self._staging:
                    host.copy_(src) if fresh else host.add_(src)
                elif fresh and src.dtype == torch.float32 and self._stream is not None:
                    host.copy_(src, non_blocking=True)
                else:   # convert / accumulate on the device, in fp32, in a staging buffer
                    buf = self._next_staging(src.numel())
                    if fresh:
                        buf.copy_(src)
                    else:
                        buf.copy_(host, non_blocking=True)
                        buf.add_(src)
                    host.copy_(buf, non_blocking=True)
        if self._stream is not None:   # keep their memory until the side stream has read them
            grad.record_stream(self._stream)
            flat.record_stream(self._stream)   # a copy when the gradient was not contiguous
        info.tensor.grad = None
        info.grad_status = _HELD

    def _upload(self, param: Tensor, src: Tensor, decay: float | None, overwrite: bool) -> None:
        """param <- src (overwrite) or param <- param * decay + src, via staging on CUDA."""
        with self._side():
            if self._staging:
                buf = self._next_staging(src.numel())
                buf.copy_(src, non_blocking=True)
                src = buf
            if overwrite:
                param.copy_(src)
            else:
                if decay is not None:
                    param.mul_(decay)
                param.add_(src)

    # ------------------------------------------------------------------------- 8-bit states

    def _read_state(self, page: _Page, seg: _Segment, name: str) -> Tensor:
        """fp32 view (32-bit) or dequantized copy (8-bit) of one state over one segment."""
        n = seg.hi - seg.lo
        if not seg.param.quantized:
            return page.buffers[name][seg.state_off:seg.state_off + n]
        from minilora.quant.nf4 import dequantize_blockwise_8bit
        codes = page.buffers[name + "_code"][seg.state_off:seg.state_off + n]
        absmax = page.buffers[name + "_absmax"][seg.absmax_off:seg.absmax_off - (-n // BLOCK_SIZE)]
        return dequantize_blockwise_8bit(codes, absmax, self._maps[name], BLOCK_SIZE)

    def _write_state(self, page: _Page, seg: _Segment, name: str, value: Tensor) -> None:
        n = seg.hi - seg.lo
        if not seg.param.quantized:
            page.buffers[name][seg.state_off:seg.state_off + n].copy_(value)
            return
        from minilora.quant.nf4 import quantize_blockwise_8bit
        codes, absmax = quantize_blockwise_8bit(value, self._maps[name], BLOCK_SIZE, fused=self.fused)
        page.buffers[name + "_code"][seg.state_off:seg.state_off + n].copy_(codes)
        page.buffers[name + "_absmax"][seg.absmax_off:seg.absmax_off + absmax.numel()].copy_(absmax)

    # --------------------------------------------------------------------------------- step

    def _init_state(self, info: _Param) -> None:
        """torch's lazy state: step 0, m = v = 0; the master copy starts from the parameter."""
        info.step = torch.tensor(0.0, dtype=torch.float32)
        self.state[info.tensor] = {"step": info.step}
        flat = info.tensor.detach().reshape(-1)
        for page, seg in info.segments:
            zeros = torch.zeros(seg.hi - seg.lo)
            self._write_state(page, seg, "exp_avg", zeros)
            self._write_state(page, seg, "exp_avg_sq", zeros)
            if info.master:
                page.buffers["master"][seg.master_off:seg.master_off + seg.hi - seg.lo].copy_(flat[seg.lo:seg.hi])

    def close(self) -> None:
        """Remove the post-accumulate-grad hooks from the parameters (idempotent). Gradients already
        collected stay (host_grad, step); later backwards leave theirs in `p.grad`."""
        hooks, self._hooks = getattr(self, "_hooks", []), []
        for handle in hooks:
            handle.remove()

    def _check_trainable(self) -> None:
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) not in self._tracked:
                    raise ValueError(
                        f"parameter {index} (shape {tuple(p.shape)}) requires grad but was frozen when it "
                        "was given to CPUOffloadAdamW, which therefore has no state for it and would never "
                        "update it; freeze it again, or build a new optimizer (or add_param_group) with it")
                index += 1

    @torch.no_grad()
    def step(self, closure=None):
        self._check_trainable()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync()
        if self._stream is not None:   # params may still be read by backward's queued kernels
            self._stream.wait_stream(torch.cuda.current_stream(self._device))
        scalars = {}
        for info in self._params:
            if info.grad_status != _HELD:
                continue
            if info.step is None:
                self._init_state(info)
            info.step += 1
            g = info.group
            lr, (beta1, beta2) = float(g["lr"]), (float(b) for b in g["betas"])
            step = info.step.item()
            # torch's scalars, computed the same way in Python floats
            step_size = lr / (1 - beta1 ** step)
            bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
            decay = 1 - lr * g["weight_decay"] if g["weight_decay"] != 0 else None
            scalars[id(info)] = (beta1, beta2, step_size, bias_correction2_sqrt, float(g["eps"]), decay)
        for page in self._pages:
            for seg in page.segments:
                if id(seg.param) in scalars:
                    self._update_segment(page, seg, *scalars[id(seg.param)])
        for info in self._params:
            if id(info) in scalars:
                info.grad_status = _CONSUMED
        if self._stream is not None:   # the next forward waits for the last uploads, not the CPU
            torch.cuda.current_stream(self._device).wait_stream(self._stream)
        return loss

    def _update_segment(self, page, seg, beta1, beta2, step_size, bias_correction2_sqrt, eps, decay):
        info, n = seg.param, seg.hi - seg.lo
        grad = page.buffers["grad"][seg.grad_off:seg.grad_off + n]
        exp_avg = self._read_state(page, seg, "exp_avg")
        exp_avg_sq = self._read_state(page, seg, "exp_avg_sq")
        param = info.tensor.detach().view(-1)[seg.lo:seg.hi]
        if self.fused and (info.master or self._staging or param.dtype == torch.float32):
            self._fused_segment(page, seg, param, grad, exp_avg, exp_avg_sq, beta1, beta2, eps, decay)
            return
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = exp_avg_sq.sqrt().div_(bias_correction2_sqrt).add_(eps)
        if not info.master and not self._staging:   # parameters in CPU memory: torch's own two ops
            if decay is not None:
                param.mul_(decay)
            param.addcdiv_(exp_avg, denom, value=-step_size)
        elif info.master:
            master = page.buffers["master"][seg.master_off:seg.master_off + n]
            if decay is not None:
                master.mul_(decay)
            master.addcdiv_(exp_avg, denom, value=-step_size)
            self._upload(param, master, None, overwrite=True)   # rounds to the parameter's dtype
        else:
            # addcdiv computes value * m / denom in that order; the same ops, with the add on the device
            torch.mul(exp_avg, -step_size, out=grad)
            grad.div_(denom)
            self._upload(param, grad, decay, overwrite=False)
        if info.quantized:
            self._write_state(page, seg, "exp_avg", exp_avg)
            self._write_state(page, seg, "exp_avg_sq", exp_avg_sq)

    def _fused_segment(self, page, seg, param, grad, exp_avg, exp_avg_sq, beta1, beta2, eps, decay):
        """fused=True: torch's fused AdamW kernel on the host slice (info.step is already counted)."""
        info, n = seg.param, seg.hi - seg.lo
        group = info.group
        kwargs = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=eps, amsgrad=False, maximize=False)
        wd = float(group["weight_decay"])
        if info.master:
            target = page.buffers["master"][seg.master_off:seg.master_off + n]
        elif not self._staging:
            target = param   # fp32 parameter in CPU memory: torch's own kernel on it
        else:                # parameter on the GPU: the kernel writes the step into zeros
            target, wd = grad.new_zeros(n), 0.0
        # the kernel also writes `grad` (it may unscale it in place); the host buffer is consumed anyway
        torch._fused_adamw_([target], [grad], [exp_avg], [exp_avg_sq], [], [info.step], weight_decay=wd, **kwargs)
        if info.master:
            self._upload(param, target, None, overwrite=True)   # rounds to the parameter's dtype
        elif self._staging:
            self._upload(param, target, decay, overwrite=False)
        if info.quantized:
            self._write_state(page, seg, "exp_avg", exp_avg)
            self._write_state(page, seg, "exp_avg_sq", exp_avg_sq)

    # --------------------------------------------------------------------- gradients

    def zero_grad(self, set_to_none: bool = True) -> None:
        """set_to_none=False keeps zeroed gradients, so the next step() updates every parameter that
        had one (weight decay, momentum), as torch does; the default forgets them."""
        if not set_to_none:   # the CPU writes the host buffers (the default waits for nothing)
            self._sync()
        for info in self._params:
            info.tensor.grad = None
            if set_to_none or info.grad_status == _NONE:
                info.grad_status = _NONE
            else:
                for page, seg in info.segments:
                    page.buffers["grad"][seg.grad_off:seg.grad_off + seg.hi - seg.lo].zero_()
                info.grad_status = _HELD

    def _gather(self, info: _Param, name: str) -> Tensor:
        """One state (or the gradient) of one parameter as an fp32 CPU tensor of its shape."""
        pieces = []
        for page, seg in info.segments:
            if name in ("exp_avg", "exp_avg_sq"):
                pieces.append(self._read_state(page, seg, name))
            else:
                off = seg.grad_off if name == "grad" else seg.master_off
                pieces.append(page.buffers[name][off:off + seg.hi - seg.lo])
        flat = pieces[0] if len(pieces) == 1 else torch.cat(pieces) if pieces else torch.zeros(0)
        return flat.view(info.tensor.shape)

    def host_grad(self, param: Tensor) -> Tensor | None:
        """The accumulated gradient of `param` (fp32, CPU, a copy), or None when it has none."""
        self._sync()
        for info in self._params:
            if info.tensor is param:
                return self._gather(info, "grad").clone() if info.grad_status == _HELD else None
        raise ValueError(f"parameter of shape {tuple(param.shape)} is not a trainable parameter of this optimizer")

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """torch.nn.utils.clip_grad_norm_ on the host gradients; returns the total norm.

        The same ops as torch: one vector_norm per gradient (a straddling gradient is gathered
        first so the reduction order is torch's), the norm of the norms, then
        grad *= clamp(max_norm / (total + 1e-6), max=1). Only parameters holding a gradient take
        part, and their norms are stacked in torch's order, not in plain parameter order: grouped by
        (device, dtype), the groups in the order their first parameter appears in the optimizer's
        parameter order (param groups in order, parameters in group order), and within each group in
        that parameter order.
        """
        self._sync()
        held = [info for info in self._params if info.grad_status == _HELD]
        if not held:
            return torch.tensor(0.0)
        kinds = list(dict.fromkeys((i.tensor.device, i.tensor.dtype) for i in held))
        held.sort(key=lambda i: kinds.index((i.tensor.device, i.tensor.dtype)))
        norms = [torch.linalg.vector_norm(self._gather(info, "grad"), norm_type) for info in held]
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
        if error_if_nonfinite and bool(total.isnan() | total.isinf()):
            raise RuntimeError(f"the total norm of order {norm_type} of the gradients is non-finite ({total.item()}); "
                               "pass error_if_nonfinite=False to clip anyway")
        coef = torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)
        for info in held:
            for page, seg in info.segments:
                page.buffers["grad"][seg.grad_off:seg.grad_off + seg.hi - seg.lo].mul_(coef)
        return total

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        """torch AdamW's layout, {"state": {index: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups"},
        plus one top-level key, "cpu_offload", that torch.optim.AdamW ignores (and does not return).

        States are fp32 CPU tensors shaped like their parameter (8-bit states dequantized); each
        per-parameter entry holds exactly torch's three keys. "cpu_offload" maps a parameter index
        to what makes our own resume exact: "step" (the step it belongs to), "master" (fp32 master
        weights, with master_weights="fp32") and, for 8-bit states, the raw flat
        "exp_avg_code"/"exp_avg_absmax"/"exp_avg_sq_code"/"exp_avg_sq_absmax". load_state_dict uses
        them only while their "step" equals the entry's; otherwise (a checkpoint that torch AdamW
        loaded, stepped and saved) m and v come from "exp_avg"/"exp_avg_sq" (requantized when
        8-bit) and the master copy from the parameter.
        """
        self._sync()
        groups, start = [], 0
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
            groups.append(packed)
        state, extras = {}, {}
        for info in self._params:
            if info.step is None:
                continue
            state[info.index] = {"step": info.step.clone(), "exp_avg": self._gather(info, "exp_avg").clone(),
                                 "exp_avg_sq": self._gather(info, "exp_avg_sq").clone()}
            if not (info.master or info.quantized):
                continue
            extra = {"step": info.step.clone()}
            if info.master:
                extra["master"] = self._gather(info, "master").clone()
            if info.quantized:
                for name in ("exp_avg", "exp_avg_sq"):
                    for kind in ("code", "absmax"):
                        extra[f"{name}_{kind}"] = torch.cat([
                            self._raw(page, seg, name, kind) for page, seg in info.segments]).clone()
            extras[info.index] = extra
        return {"state": state, "param_groups": groups, "cpu_offload": extras}

    @staticmethod
    def _raw(page, seg, name, kind):
        n = seg.hi - seg.lo
        if kind == "code":
            return page.buffers[name + "_code"][seg.state_off:seg.state_off + n]
        return page.buffers[name + "_absmax"][seg.absmax_off:seg.absmax_off - (-n // BLOCK_SIZE)]

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict from this class or from torch.optim.AdamW.

        Everything is checked first: a ValueError leaves the optimizer exactly as it was.
        """
        saved_groups, saved_state = state_dict["param_groups"], state_dict["state"]
        saved_extras = {int(i): e for i, e in (state_dict.get("cpu_offload") or {}).items()}
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(f"state dict has {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}")
        for i, (group, saved) in enumerate(zip(self.param_groups, saved_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"param group {i} has {len(group['params'])} parameters, "
                                 f"the state dict's has {len(saved['params'])}")
            _check_hyperparameters(saved["lr"], saved["betas"], saved["eps"], saved["weight_decay"],
                                   f" in the state dict's param group {i}")
            if saved.get("amsgrad") or saved.get("maximize"):
                raise ValueError(f"the state dict's param group {i} uses amsgrad/maximize, "
                                 "which CPUOffloadAdamW does not support")
        by_index = {info.index: info for info in self._params}
        all_params = [p for g in self.param_groups for p in g["params"]]
        plan = []   # (info, step, entry, extra or None): what the second pass writes
        for index, entry in saved_state.items():
            index = int(index)
            if not 0 <= index < len(all_params):
                raise ValueError(f"state dict has state for parameter {index}, but there are {len(all_params)}")
            if index not in by_index:
                raise ValueError(f"state dict has state for parameter {index}, which does not require grad")
            info = by_index[index]
            if "step" not in entry:
                raise ValueError(f"state for parameter {index} has no 'step'")
            try:
                step = float(entry["step"])
            except (TypeError, ValueError, RuntimeError):
                raise ValueError(f"state for parameter {index}: 'step' must be a number, got {entry['step']!r}") from None
            if not (math.isfinite(step) and step >= 0):
                raise ValueError(f"state for parameter {index}: 'step' must be finite and >= 0, got {step}")
            shape = tuple(info.tensor.shape)
            for name in ("exp_avg", "exp_avg_sq"):
                got = tuple(entry[name].shape) if name in entry else None
                if got != shape:
                    raise ValueError(f"state for parameter {index}: {name} has shape {got}, "
                                     f"but the parameter has shape {shape}")
            extra = saved_extras.get(index)
            if extra is not None and ("step" not in extra or float(extra["step"]) != step):
                extra = None   # stale (e.g. stepped by torch AdamW since): rebuild from the entry
            if extra is not None:
                n, blocks = info.tensor.numel(), -(-info.tensor.numel() // BLOCK_SIZE)
                if info.quantized and all(f"{a}_{k}" in extra for a in ("exp_avg", "exp_avg_sq")
                                          for k in ("code", "absmax")):
                    for name in ("exp_avg", "exp_avg_sq"):
                        for kind, want in (("code", n), ("absmax", blocks)):
                            got = extra[f"{name}_{kind}"].numel()
                            if got != want:
                                raise ValueError(f"state for parameter {index}: 8-bit {name}_{kind} has "
                                                 f"{got} elements, expected {want}")
                if info.master and extra.get("master") is not None and extra["master"].numel() != n:
                    raise ValueError(f"state for parameter {index}: master has {extra['master'].numel()} "
                                     f"elements, expected {n}")
            plan.append((info, step, entry, extra))
        # ---- checked: from here on nothing raises on the state dict's content
        self._sync()
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})
        for info in self._params:
            info.step = None
            self.state.pop(info.tensor, None)
        for info, step, entry, extra in plan:
            self._init_state(info)   # also: master <- the parameter
            info.step.fill_(step)
            raw = (extra is not None and info.quantized
                   and all(f"{a}_{k}" in extra for a in ("exp_avg", "exp_avg_sq") for k in ("code", "absmax")))
            for name in ("exp_avg", "exp_avg_sq"):
                flat = entry[name].detach().to("cpu", torch.float32).reshape(-1)
                if raw:
                    codes = extra[name + "_code"].detach().to("cpu", torch.uint8).reshape(-1)
                    absmax = extra[name + "_absmax"].detach().to("cpu", torch.float32).reshape(-1)
                for page, seg in info.segments:
                    if raw:   # exact resume: the stored codes, not a requantization
                        blocks = seg.lo // BLOCK_SIZE, -(-seg.hi // BLOCK_SIZE)
                        self._raw(page, seg, name, "code").copy_(codes[seg.lo:seg.hi])
                        self._raw(page, seg, name, "absmax").copy_(absmax[blocks[0]:blocks[1]])
                    else:
                        self._write_state(page, seg, name, flat[seg.lo:seg.hi].clone())
            master = extra.get("master") if extra is not None else None
            if info.master and master is not None:
                flat = master.detach().to("cpu", torch.float32).reshape(-1)
                for page, seg in info.segments:
                    page.buffers["master"][seg.master_off:seg.master_off + seg.hi - seg.lo].copy_(flat[seg.lo:seg.hi])

    # ------------------------------------------------------------------ accounting

    def memory_bytes(self) -> dict:
        """Bytes this optimizer holds: {"cpu": host pages, "device": trainable parameters + staging}."""
        cpu = sum(t.nbytes for page in self._pages for t in page.buffers.values())
        device = sum(info.tensor.nbytes for info in self._params) + sum(b.nbytes for b in self._staging)
        return {"cpu": cpu, "device": device}

    def __del__(self):
        self.close()
