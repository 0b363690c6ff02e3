"""HostGrad: `p.grad` of a parameter whose accumulated gradient lives in the host pages, where no
tensor of the parameter's device and dtype can view it (the parameter is on a GPU, or 16-bit while
the host gradient is fp32).

A HostGrad has the parameter's shape, dtype and device and no storage of its own; its ops act on
the host gradient, so the idioms written against `p.grad` keep their meaning:

    reads                  vector_norm works on the fp32 host gradient itself; any other read
                           (clone, equal, .float(), .cpu(), item, sum, ...) sees it rounded to
                           the parameter's dtype, on its device
    elementwise in place   mul_, div_, zero_, fill_, clamp_(min/max)_, nan_to_num_, add_, sub_,
                           copy_ (by a scalar, a 0-d tensor or a tensor of the parameter's shape)
                           change the host gradient, page segment by page segment
    accumulation           autograd's `p.grad += new_grad` (a second backward before step())
                           adds new_grad to the host gradient through the link (on CUDA: on the
                           side stream, through a staging buffer)
    _foreach_ forms        of the above, and _foreach_norm (clip_grad_norm_(..., foreach=True))
    GradScaler.unscale_    _amp_foreach_non_finite_check_and_unscale_ on the host gradient
    detach / .data         another HostGrad of the same host gradient

torch.nn.utils.clip_grad_norm_ therefore clips the host gradient: it takes one vector_norm per
gradient (the subclass is not on torch's foreach fast path) and multiplies each in place.
Anything else that would write a HostGrad, and any view of one (a write through the view could
not reach the host), raises and says what to call instead: never a silent no-op.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["HostGrad"]

aten = torch.ops.aten

ELEMENTWISE_IN_PLACE = {
    aten.mul_.Tensor, aten.mul_.Scalar, aten.div_.Tensor, aten.div_.Scalar, aten.zero_.default,
    aten.fill_.Scalar, aten.fill_.Tensor, aten.clamp_.default, aten.clamp_.Tensor, aten.clamp_min_.default,
    aten.clamp_min_.Tensor, aten.clamp_max_.default, aten.clamp_max_.Tensor, aten.nan_to_num_.default,
    aten.add_.Tensor, aten.add_.Scalar, aten.sub_.Tensor, aten.sub_.Scalar, aten.copy_.default,
}
HOW = ("read it with p.grad.clone() or opt.host_grad(p), and change it with in-place elementwise "
       "ops on p.grad itself (mul_, div_, zero_, clamp_, add_, copy_)")


class HostGrad(Tensor):
    """p.grad standing in for the host gradient of `pages` (a ParamPages); `link` moves bytes."""

    @staticmethod
    def __new__(cls, pages, link):
        p = pages.tensor
        return Tensor._make_wrapper_subclass(cls, p.shape, dtype=p.dtype, device=p.device, requires_grad=False)

    def __init__(self, pages, link):
        self.pages, self.link = pages, link

    __torch_function__ = torch._C._disabled_torch_function_impl

    def host_value(self) -> Tensor:
        """The accumulated gradient: fp32, in host memory, shaped like the parameter."""
        self.link.sync()
        return self.pages.gather("grad")

    def __repr__(self):
        return f"HostGrad(dtype={self.dtype}, device={self.device}, host fp32 value={self.host_value()!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.detach.default:
            return HostGrad(args[0].pages, args[0].link)
        if func is aten.linalg_vector_norm.default:
            grad = args[0]
            return func(grad.host_value(), *args[1:], **kwargs).to(grad.device)
        if func in ELEMENTWISE_IN_PLACE and isinstance(args[0], HostGrad):
            args[0].change(func, args[1:], kwargs)
            return args[0]
        if func is aten._amp_foreach_non_finite_check_and_unscale_.default:
            return unscale(*args)
        if func._schema.name.startswith("aten::_foreach_"):
            return foreach(func, args, kwargs)
        refuse_writes_and_views(func, args, kwargs)
        return func(*materialize(args), **materialize(kwargs))

    def change(self, func, args, kwargs) -> None:
        """An elementwise in-place op on the host gradient."""
        other = args[0] if args else None
        whole = (isinstance(other, Tensor) and not isinstance(other, HostGrad) and other.shape == self.shape
                 and kwargs.get("alpha", 1) == 1)
        if whole and func in (aten.add_.Tensor, aten.copy_.default):   # autograd's accumulation, a set
            self.link.grad_to_host(self.pages, other, accumulate=func is aten.add_.Tensor)
            return
        self.link.sync()
        for seg in self.pages.segments:
            func(seg.view("grad"), *[self.part(a, seg, func) for a in args],
                 **{k: self.part(v, seg, func) for k, v in kwargs.items()})

    def part(self, arg, seg, func):
        """One argument of an elementwise op, for one segment: a scalar as it is, a 0-d tensor on the
        host, a tensor of the parameter's shape sliced to the segment."""
        if isinstance(arg, HostGrad):
            arg = arg.host_value()
        if not isinstance(arg, Tensor):
            return arg
        if arg.dim() == 0:
            return arg.cpu()
        if arg.shape != self.shape:
            raise RuntimeError(f"{func} on a HostGrad takes scalars, 0-d tensors or tensors of the parameter's "
                               f"shape {tuple(self.shape)}, got shape {tuple(arg.shape)}; {HOW}")
        return arg.detach().reshape(-1)[seg.lo:seg.hi].cpu()


def materialize(tree):
    """HostGrads -> ordinary tensors (the host gradient in the parameter's dtype, on its device)."""
    if isinstance(tree, HostGrad):
        return tree.host_value().to(device=tree.device, dtype=tree.dtype)
    if isinstance(tree, (list, tuple)):
        return type(tree)(materialize(x) for x in tree)
    if isinstance(tree, dict):
        return {k: materialize(v) for k, v in tree.items()}
    return tree


def refuse_writes_and_views(func, args, kwargs) -> None:
    schema = func._schema
    values = list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args):]]
    for arg, value in zip(schema.arguments, values):
        hosts = [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, HostGrad)]
        if hosts and arg.alias_info is not None:
            why = "it would write it" if arg.alias_info.is_write else "a view: writes through it could not reach the host"
            raise RuntimeError(f"p.grad of a parameter offloaded by CPUOffloadAdamW is a HostGrad, a stand-in for "
                               f"its gradient in host memory; {func} is not supported on it ({why}); {HOW}")


def foreach(func, args, kwargs):
    """torch._foreach_op(tensors, ...) as op on each tensor: the HostGrads' through HostGrad."""
    tensors, rest = args[0], args[1:]
    name = func._schema.name.removeprefix("aten::_foreach_")
    if name == "norm":   # _foreach_norm.Scalar(tensors, ord=2, dtype=None)
        ord, dtype = (list(rest) + [2, None][len(rest):])[:2]
        dtype = kwargs.get("dtype", dtype)
        return [torch.linalg.vector_norm(t, kwargs.get("ord", ord), dtype=dtype) for t in tensors]
    packet = getattr(aten, name, None)
    overload = {"List": "Tensor", "ScalarList": "Scalar"}.get(func._overloadname, func._overloadname)
    single = getattr(packet, overload, None) or getattr(packet, "default", None)
    if single is None or not name.endswith("_"):
        refuse_writes_and_views(func, args, kwargs)
        return func(*materialize(args), **materialize(kwargs))
    for i, t in enumerate(tensors):
        each = [a[i] if isinstance(a, (list, tuple)) else a for a in rest]
        if isinstance(t, HostGrad):
            HostGrad.__torch_dispatch__(single, (HostGrad,), (t, *each), kwargs)
        else:
            single(t, *each, **kwargs)
    return None


def unscale(grads, found_inf: Tensor, inv_scale: Tensor):
    """GradScaler's unscale: grad *= inv_scale in place, found_inf = 1 if any value is not finite."""
    plain = [g for g in grads if not isinstance(g, HostGrad)]
    if plain:
        aten._amp_foreach_non_finite_check_and_unscale_.default(plain, found_inf, inv_scale)
    for grad in grads:
        if isinstance(grad, HostGrad):
            grad.link.sync()
            found = torch.zeros_like(found_inf, device="cpu")
            aten._amp_foreach_non_finite_check_and_unscale_.default(
                [seg.view("grad") for seg in grad.pages.segments], found, inv_scale.cpu())
            found_inf.copy_(torch.maximum(found_inf, found.to(found_inf.device)))
    return None
