"""LoRA: a frozen linear layer plus named low-rank adapters (Hu et al. 2021, arXiv:2106.09685).

         x (.., in)
         |---------------------------.
         |                           | dropout (skipped when p = 0: no copy of x)
   base_layer: W (out, in)      A: (r, in)      one (A, B) pair per adapter name
   frozen, maybe 4-bit               |
         |                      B: (out, r)     B starts at 0, so a fresh adapter is a no-op
         |                           | * scaling = alpha / r   (alpha / sqrt(r) with rsLoRA)
         '------------ + ------------'
                       y (.., out)

Parameter names follow peft (`base_layer.weight`, `lora_A.<name>.weight`, `lora_B.<name>.weight`,
`lora_magnitude_vector.<name>`), so peft's adapter files map onto this module one to one.
DoRA (Liu et al. 2024, arXiv:2402.09353) rescales each output row of W + scaling*B@A to a learned
magnitude m; the norm is treated as a constant in backward (paper section 4.3), as peft does.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .base import is_linear_like, base_weight, snapshot_base, restore_base, write_base_weight, check_rank_fits

__all__ = ["LoRAConfig", "LoRALinear", "LowRankAdd", "autocast_dtype", "pattern_matches", "pattern_value",
           "suffix_match"]

INITS = ("kaiming", "gaussian", "pissa", "olora")
BIASES = ("none", "all", "lora_only")


@dataclass
class LoRAConfig:
    """What to adapt and how. `target_modules` matches like peft: a list matches a full module
    name or a `.`-suffix of it (`"q_proj"` matches `model.layers.0.self_attn.q_proj`), a string is a
    regex that must match the full name, "all-linear" is every linear layer but the output head
    (and, in a mixture-of-experts model, the routers; the experts are in: see lora/experts.py).
    `target_parameters` (peft >= 0.18) names parameters the same way as a list does modules
    (`"experts.gate_up_proj"` matches `model.layers.0.mlp.experts.gate_up_proj`): 3-D expert tensors,
    or the 2-D weight of a linear layer such as a router (`"gate.weight"`).
    `rank_pattern` / `alpha_pattern` override r / alpha for names matching `(.*\\.)?<key>$`."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    init: str = "kaiming"
    use_rslora: bool = False
    use_dora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    modules_to_save: list[str] = field(default_factory=list)
    target_parameters: list[str] | None = None

    def __post_init__(self):
        for key, value in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        for key, value in [("alpha", self.alpha), *((f"alpha_pattern[{k!r}]", v) for k, v in self.alpha_pattern.items())]:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"{key} must be > 0, got {value!r}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIASES:
            raise ValueError(f"bias must be one of {BIASES}, got {self.bias!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, str) or not all(isinstance(t, str) and t for t in
                                                                  self.target_parameters):
                raise ValueError(f"target_parameters must be a list of parameter names (as peft's), "
                                 f"got {self.target_parameters!r}")
            self.target_parameters = sorted(self.target_parameters) or None
        if isinstance(self.target_modules, (list, tuple, set)):
            self.target_modules = sorted(self.target_modules)
            empty_ok = self.target_parameters is not None  # peft: target_modules=[] adapts parameters only
            if (not self.target_modules and not empty_ok) or "" in self.target_modules:
                raise ValueError(f"target_modules must be a non-empty list of names, got {self.target_modules!r}")
        if isinstance(self.exclude_modules, (tuple, set)):
            self.exclude_modules = sorted(self.exclude_modules)
        self.modules_to_save = list(self.modules_to_save or [])

    def rank_for(self, name: str) -> int:
        return pattern_value(self.rank_pattern, name, self.r)

    def alpha_for(self, name: str) -> float:
        return pattern_value(self.alpha_pattern, name, self.alpha)


def suffix_match(name: str, target: str) -> bool:
    """peft's list rule: `target` is the full module (or parameter) name or a `.`-suffix of it."""
    return name == target or name.endswith("." + target)


def pattern_matches(key: str, name: str) -> bool:
    """Whether rank_pattern / alpha_pattern key `key` selects module `name`: peft's `(.*\\.)?(key)$`."""
    return re.match(rf"(.*\.)?({key})$", name) is not None


def pattern_value(patterns: dict, name: str, default):
    """peft's get_pattern_key: the first key `k` with `(.*\\.)?(k)$` matching the module name wins."""
    for key, value in patterns.items():
        if pattern_matches(key, name):
            return value
    return default


def autocast_dtype(tensor: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast runs matmuls in on `tensor`'s device, or None where autocast is off.

    A custom autograd Function's forward runs under the caller's autocast, but its backward does not
    (on CUDA it runs on the autograd engine's own thread): a Function that mixes dtypes, such as fp32
    adapters on a bf16-autocast forward, casts to this dtype itself in forward, saves the casts, and
    casts each gradient back to its input's dtype in backward."""
    device_type = tensor.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


class LowRankAdd(torch.autograd.Function):
    """result + scaling * (h @ A^T) @ B^T, with the backward written out.

    Same math as autograd would do for `result + F.linear(F.linear(h, A), B) * scaling`, but: the scale
    and the add are fused into one addmm (no extra passes over the (N, out) activations), and the
    skinny backward products are computed in the layout BLAS runs fast: g @ B, an (N, out) x (out, r)
    product with a tiny output, runs ~3x faster on CPU as (B^T @ g^T)^T. The base layer's weight never
    appears here: a frozen W gets no gradient and costs nothing in backward but g @ W for the input.

    Under autocast (QLoRA on CUDA: fp32 adapters, bf16 compute) every input is cast to the autocast
    dtype up front, as autocast casts addmm's inputs, so the output has that dtype; backward computes
    in it too and returns each gradient in its input's dtype (fp32 for fp32 adapters).
    """

    @staticmethod
    def forward(ctx, h, result, A, B, scaling):
        ctx.dtypes = (h.dtype, result.dtype, A.dtype, B.dtype)
        dtype = autocast_dtype(h)
        if dtype is not None:
            h, result, A, B = h.to(dtype), result.to(dtype), A.to(dtype), B.to(dtype)
        h2 = h.reshape(-1, h.shape[-1])  # (N, in)
        down = h2 @ A.t()  # (N, r)
        ctx.save_for_backward(h2, down, A, B)
        ctx.scaling, ctx.h_shape = scaling, h.shape
        return torch.addmm(result.reshape(-1, B.shape[0]), down, B.t(), alpha=scaling).view(result.shape)

    @staticmethod
    def backward(ctx, grad):
        h2, down, A, B = ctx.saved_tensors
        h_dtype, result_dtype, A_dtype, B_dtype = ctx.dtypes
        need_h, _, need_A, need_B, _ = ctx.needs_input_grad
        g = grad.reshape(-1, grad.shape[-1]).to(down.dtype)  # (N, out), in forward's compute dtype
        g_down = (B.t() @ g.t()).t() * ctx.scaling if need_h or need_A else None  # (N, r)
        grad_h = (g_down @ A).view(ctx.h_shape).to(h_dtype) if need_h else None  # (.., in)
        grad_A = (g_down.t() @ h2).to(A_dtype) if need_A else None  # (r, in)
        grad_B = ((down.t() @ g).t() * ctx.scaling).to(B_dtype) if need_B else None  # (out, r)
        return grad_h, grad.to(result_dtype), grad_A, grad_B, None


class LoRALinear(nn.Module):
    """A linear-like `base_layer` plus any number of named adapters; see the module docstring."""

    def __init__(self, base: nn.Module, name: str = ""):
        super().__init__()
        if not is_linear_like(base):
            raise TypeError(f"LoRA needs a linear layer at {name or 'this module'}, got {type(base).__name__} "
                            "(allowed: nn.Linear or a module with lora_compatible = True)")
        self.base_layer = base
        self.name = name  # the module path, for error messages
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA's m, one value per output row
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.sample_adapters: list[str] | None = None  # set by lora_model.adapter_names_per_sample
        self._dora_norm: dict[str, torch.Tensor] = {}  # ||W + dW|| rows at merge time, to undo it exactly
        # a non-nn.Linear (4-bit) base's stored weight before the first merge: unmerge restores it exactly
        # instead of requantizing deQ(Q(W + dW)) - dW (which moves W by up to a quantization step)
        self._unmerged_base = None

    # ---------------------------------------------------------------- adapters
    def check_adapter(self, adapter: str, r: int, init: str = "kaiming", check_rank: bool = True) -> None:
        """Raise if add_adapter(adapter, r, init=init) would; changes nothing."""
        check_rank_fits(r, self.in_features, self.out_features, self.name, check_rank)
        if adapter in self.lora_A:
            raise ValueError(f"adapter {adapter!r} already exists in {self.name}")
        if self.merged_adapters and init in ("pissa", "olora"):
            raise ValueError(f"init={init!r} rewrites the base weight of {self.name}; unmerge "
                             f"{self.merged_adapters} first")

    def add_adapter(self, adapter: str, r: int, alpha: float, dropout: float = 0.0, init: str = "kaiming",
                    use_rslora: bool = False, use_dora: bool = False, check_rank: bool = True) -> None:
        self.check_adapter(adapter, r, init, check_rank)
        dtype, device = self._adapter_dtype_device()
        self.lora_A[adapter] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[adapter] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.r[adapter], self.alpha[adapter], self.dropout[adapter] = r, alpha, float(dropout)
        self.use_rslora[adapter] = use_rslora
        self.scaling[adapter] = alpha / math.sqrt(r) if use_rslora else alpha / r
        if init in ("pissa", "olora"):
            self._init_from_weight(adapter, init)
        else:
            self._init_random(adapter, init)
        if use_dora:
            with torch.no_grad():
                # m starts at ||W + scaling*B@A|| per row, so the DoRA layer starts equal to plain LoRA.
                norm = (base_weight(self.base_layer).float() + self.delta_weight(adapter)).norm(dim=1)
            self.lora_magnitude_vector[adapter] = nn.Parameter(norm.to(dtype))

    def _adapter_dtype_device(self):
        """Adapters take the base weight's dtype (a 4-bit base: its compute_dtype), without dequantizing."""
        base = self.base_layer
        if isinstance(base, nn.Linear):
            return base.weight.dtype, base.weight.device
        tensor = next(iter(base.parameters()), None)
        if tensor is None:
            tensor = next(iter(base.buffers()))
        return getattr(base, "compute_dtype", None) or torch.float32, tensor.device

    @torch.no_grad()
    def _init_random(self, adapter: str, init: str) -> None:
        A, B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        if init == "kaiming":  # nn.Linear's own init, as loralib and peft
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        else:
            nn.init.normal_(A, std=1 / self.r[adapter])
        nn.init.zeros_(B)

    @torch.no_grad()
    def _init_from_weight(self, adapter: str, init: str) -> None:
        """PiSSA (arXiv:2404.02948) and OLoRA (arXiv:2406.01775) start from the principal directions of W
        and subtract them from W, so the model output is unchanged at step 0 (the base weight changes)."""
        r, scaling = self.r[adapter], self.scaling[adapter]
        w = base_weight(self.base_layer)
        w32 = w.float()
        if init == "pissa":
            U, S, Vh = torch.linalg.svd(w32, full_matrices=False)
            root = (S[:r] / scaling).sqrt()
            a, b = root[:, None] * Vh[:r], U[:, :r] * root[None, :]
        else:
            Q, R = torch.linalg.qr(w32)
            a, b = R[:r], Q[:, :r]
        self.lora_A[adapter].weight.copy_(a)
        self.lora_B[adapter].weight.copy_(b)
        write_base_weight(self.base_layer, (w32 - scaling * (b @ a)).to(w.dtype))

    def delete_adapter(self, adapter: str) -> None:
        if adapter in self.merged_adapters:
            raise ValueError(f"adapter {adapter!r} is merged into {self.name}; unmerge before deleting it")
        for table in (self.lora_A, self.lora_B, self.lora_magnitude_vector):
            if adapter in table:
                del table[adapter]
        for table in (self.r, self.alpha, self.scaling, self.dropout, self.use_rslora):
            table.pop(adapter, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter]

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        """The tensors adapter `adapter` trains here (what set_adapter unfreezes)."""
        params = [self.lora_A[adapter].weight, self.lora_B[adapter].weight]
        return params + ([self.lora_magnitude_vector[adapter]] if adapter in self.lora_magnitude_vector else [])

    def delta_weight(self, adapter: str) -> torch.Tensor:
        """scaling * B @ A as fp32 (out, in): merges round once, from fp32, into the base dtype."""
        A = self.lora_A[adapter].weight.float()
        B = self.lora_B[adapter].weight.float()
        return (B @ A) * self.scaling[adapter]

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disabled or self.merged_adapters:
            return result  # merged adapters already live in base_layer's weight
        if self.sample_adapters is not None:
            return self._mixed_batch_forward(x, result)
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                result = self._add_adapter(adapter, x, result)
        return result

    def _add_adapter(self, adapter: str, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """result + what adapter `adapter` adds for input x (result holds base_layer(x) so far)."""
        A = self.lora_A[adapter].weight  # (r, in)
        B = self.lora_B[adapter].weight  # (out, r)
        scaling = self.scaling[adapter]
        x = x.to(A.dtype)
        p = self.dropout[adapter]
        h = F.dropout(x, p, self.training) if p > 0 and self.training else x
        if adapter not in self.lora_magnitude_vector:
            if result.dtype == B.dtype:
                return LowRankAdd.apply(h, result, A, B, scaling)
            return result + (F.linear(F.linear(h, A), B) * scaling).to(result.dtype)
        # DoRA: y = m / ||W + s*B@A||_row * (W x + s*B A x) + bias; the norm is a constant in backward.
        # As peft, "W x" is taken from `result` (minus the bias), which holds the adapters added before.
        W = base_weight(self.base_layer).to(x.dtype)
        norm = (W + scaling * (B @ A).detach()).norm(dim=1).detach()  # (out,)
        mag = self.lora_magnitude_vector[adapter] / norm  # (out,)
        if h is x:
            bias = getattr(self.base_layer, "bias", None)
            plain = result.to(x.dtype) - bias if bias is not None else result.to(x.dtype)
        else:  # with dropout, the rescaled base path sees the same dropped-out input (as peft)
            plain = F.linear(h, W)
        lora = F.linear(F.linear(h, A), B)  # (.., r) -> (.., out)
        return result + ((mag - 1) * plain + mag * lora * scaling).to(result.dtype)

    def _mixed_batch_forward(self, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """Row i of the batch uses adapter sample_adapters[i] ("__base__": none), as peft's
        _mixed_batch_forward: one LoRA pass per distinct adapter over its rows."""
        names = self.sample_adapters
        if len(names) != x.shape[0]:
            raise ValueError(f"adapter_names_per_sample has {len(names)} names for a batch of {x.shape[0]} "
                             f"rows at {self.name}")
        for adapter in dict.fromkeys(names):  # distinct names, first-seen order
            if adapter == "__base__" or adapter not in self.lora_A:
                continue
            rows = torch.tensor([i for i, n in enumerate(names) if n == adapter], device=x.device)
            out = self._add_adapter(adapter, x.index_select(0, rows), result.index_select(0, rows))
            result = result.index_copy(0, rows, out)
        return result

    # ---------------------------------------------------------------- merge
    @torch.no_grad()
    def merge(self, adapters: list[str], safe: bool = True) -> None:
        for adapter in adapters:
            if adapter in self.merged_adapters or adapter not in self.lora_A:
                continue
            if adapter in self.lora_magnitude_vector and self.merged_adapters:
                raise ValueError(f"DoRA adapter {adapter!r} can only be merged into {self.name} alone; "
                                 f"{self.merged_adapters} are merged already")
            W = base_weight(self.base_layer)
            new = W.float() + self.delta_weight(adapter)
            norm = None
            if adapter in self.lora_magnitude_vector:
                norm = new.norm(dim=1)
                new = (self.lora_magnitude_vector[adapter].float() / norm)[:, None] * new
            new = new.to(W.dtype)  # the one rounding
            if safe and not torch.isfinite(new).all():
                raise ValueError(f"merging adapter {adapter!r} into {self.name} gives non-finite weights "
                                 f"(max |dW| = {self.delta_weight(adapter).abs().max().item():.3g}); not merged")
            if norm is not None:
                self._dora_norm[adapter] = norm
            if not self.merged_adapters and not isinstance(self.base_layer, nn.Linear):
                self._unmerged_base = snapshot_base(self.base_layer)
            write_base_weight(self.base_layer, new)
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take all merged adapters out (there is no partial unmerge). An nn.Linear base subtracts each
        delta in fp32 (exact up to one rounding per step); any other (4-bit) base gets back the stored
        weight it had before the first merge, bit for bit."""
        if self._unmerged_base is not None and self.merged_adapters:
            restore_base(self.base_layer, self._unmerged_base)
            self._unmerged_base = None
            self.merged_adapters.clear()
            self._dora_norm.clear()
            return
        self._unmerged_base = None
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            W = base_weight(self.base_layer)
            old = W.float()
            if adapter in self.lora_magnitude_vector:
                norm = self._dora_norm.pop(adapter)
                old = old / (self.lora_magnitude_vector[adapter].float() / norm)[:, None]
            write_base_weight(self.base_layer, (old - self.delta_weight(adapter)).to(W.dtype))

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{a}: r={self.r[a]} scaling={self.scaling[a]:.4g}"
                          + (" dora" if a in self.lora_magnitude_vector else "") for a in self.lora_A)
        return f"{self.name or '?'} ({self.in_features} -> {self.out_features}); {ranks}"
