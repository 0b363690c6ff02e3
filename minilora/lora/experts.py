"""LoRA on a mixture-of-experts layer's 3-D expert tensors, as peft >= 0.18 does with
`target_parameters` (peft/tuners/lora/layer.py, ParamWrapper).

A targeted tensor W (E, out, in) (reference_models.moe.Experts: gate_up_proj (E, 2I, C), down_proj
(E, C, I); expert e's slice is (out, in) like an nn.Linear weight) gets, per adapter, one low-rank
pair per expert:

    expert e:   y = x W[e]^T + scaling * (x A[e]^T) B[e]^T      A (E, r, in), B (E, out, r); B = 0 at init

computed on the tokens routed to e. peft adds scaling * B[e] @ A[e] to all E matrices before the
experts run instead: the same function, but a second copy of the expert tensors per forward. r is
per expert (an adapter trains E * r * (in + out) numbers per tensor) and scaling = alpha / r. peft's
file keeps A as (E*r, in) and B as (out, r*E); lora/peft_experts.py converts.

Which tensors (lora/targets.py): `target_parameters` names them (`experts.gate_up_proj`, rank r). `target_modules`
reaches them by the per-expert names checkpoints use (Mixtral w1, w3, w2; Qwen gate_proj, up_proj,
down_proj: reference_models.checkpoint_keys.EXPERT_KEYS) or through "all-linear", as peft converts a
transformers 4 config: an expert's gate and up projections are one tensor, so both must be named,
and gate_up_proj gets rank 2r and alpha 2*alpha (the two per-expert adapters side by side). The
router is a linear layer (reference_models.moe.Gate) that gets LoRA only when named (target_modules
"gate" or target_parameters "gate.weight"), never through "all-linear" (peft's all-linear adapts it).

As peft's ParamWrapper: no dropout (peft cannot apply it to a weight delta and refuses such an
adapter), no DoRA, no mixed-adapter batches; and no pissa/olora initialisation.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .base import check_rank_fits
from .layer import LowRankAdd

__all__ = ["LoRAExperts", "is_experts"]


def is_experts(module: nn.Module) -> bool:
    """reference_models.moe.Experts, or a module with its protocol (TENSORS, tensor_shape, project, and
    forward(x, expert, project)), such as minilora.quant.experts.ExpertsNF4."""
    return hasattr(type(module), "TENSORS") and hasattr(module, "tensor_shape") and hasattr(module, "project")


class LoRAExperts(nn.Module):
    """An experts module (`base_layer`) plus named adapters on some of its tensors; see the module docstring."""

    def __init__(self, base: nn.Module, name: str = ""):
        super().__init__()
        if not is_experts(base):
            raise TypeError(f"LoRA on expert tensors needs an experts module at {name or 'this module'}, "
                            f"got {type(base).__name__}")
        self.base_layer, self.name = base, name
        self.lora_A = nn.ModuleDict()  # adapter -> {tensor: (E, r, in)}
        self.lora_B = nn.ModuleDict()  # adapter -> {tensor: (E, out, r)}
        self.r: dict[str, dict[str, int]] = {}
        self.alpha: dict[str, dict[str, float]] = {}
        self.scaling: dict[str, dict[str, float]] = {}
        self.use_rslora: dict[str, bool] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False
        self.sample_adapters: list[str] | None = None  # set by adapter_names_per_sample: refused here
        self._unmerged_base = None  # a 4-bit base's quantized tensors before the first merge

    # ---------------------------------------------------------------- adapters
    def check_adapter(self, adapter: str, ranks: dict[str, int], dropout: float = 0.0, init: str = "kaiming",
                      use_dora: bool = False) -> None:
        """Raise if add_adapter(adapter, ranks, ...) would; changes nothing."""
        where = ", ".join(f"{self.name}.{t}" for t in ranks)
        if dropout:
            raise ValueError(f"dropout must be 0 for LoRA on expert tensors ({where}), got {dropout}: peft's "
                             "ParamWrapper cannot apply it and refuses such an adapter")
        if use_dora or init in ("pissa", "olora"):
            raise ValueError(f"LoRA on expert tensors ({where}) has no {'DoRA' if use_dora else init} (peft's "
                             "ParamWrapper neither)")
        if adapter in self.lora_A:
            raise ValueError(f"adapter {adapter!r} already exists in {self.name}")
        for tensor, r in ranks.items():
            if tensor not in self.base_layer.TENSORS:
                raise ValueError(f"{self.name} has expert tensors {self.base_layer.TENSORS}, not {tensor!r}")
            _, out_features, in_features = self.base_layer.tensor_shape(tensor)
            check_rank_fits(r, in_features, out_features, f"{self.name}.{tensor} (per expert)")

    def add_adapter(self, adapter: str, ranks: dict[str, int], alphas: dict[str, float], init: str = "kaiming",
                    use_rslora: bool = False) -> None:
        self.check_adapter(adapter, ranks, init=init)
        dtype, device = self._adapter_dtype_device()
        A, B = nn.ParameterDict(), nn.ParameterDict()
        for tensor, r in ranks.items():
            E, out_features, in_features = self.base_layer.tensor_shape(tensor)
            a = torch.empty(E, r, in_features, dtype=dtype, device=device)
            with torch.no_grad():
                if init == "kaiming":  # as peft's lora_A, one nn.Linear (in -> E*r): bound 1/sqrt(in)
                    nn.init.kaiming_uniform_(a.view(E * r, in_features), a=math.sqrt(5))
                else:
                    nn.init.normal_(a, std=1 / r)
            A[tensor] = nn.Parameter(a)
            B[tensor] = nn.Parameter(torch.zeros(E, out_features, r, dtype=dtype, device=device))
        self.lora_A[adapter], self.lora_B[adapter] = A, B
        self.r[adapter], self.alpha[adapter] = dict(ranks), dict(alphas)
        self.use_rslora[adapter] = use_rslora
        self.scaling[adapter] = {t: alphas[t] / (math.sqrt(r) if use_rslora else r) for t, r in ranks.items()}

    def _adapter_dtype_device(self):
        """Adapters take the expert tensors' dtype (a 4-bit base: its compute_dtype)."""
        base = self.base_layer
        tensor = next(iter(base.parameters()), None)
        if tensor is None:
            tensor = next(iter(base.buffers()))
        return getattr(base, "compute_dtype", None) or tensor.dtype, tensor.device

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        return list(self.lora_A[adapter].values()) + list(self.lora_B[adapter].values())

    def delete_adapter(self, adapter: str) -> None:
        if adapter in self.merged_adapters:
            raise ValueError(f"adapter {adapter!r} is merged into {self.name}; unmerge before deleting it")
        for table in (self.lora_A, self.lora_B):
            if adapter in table:
                del table[adapter]
        for table in (self.r, self.alpha, self.scaling, self.use_rslora):
            table.pop(adapter, None)
        self.active_adapters = [a for a in self.active_adapters if a != adapter]

    def delta_weight(self, adapter: str, tensor: str) -> torch.Tensor:
        """scaling * B[e] @ A[e] for every expert, fp32 (E, out, in)."""
        A, B = self.lora_A[adapter][tensor].float(), self.lora_B[adapter][tensor].float()
        return torch.bmm(B, A) * self.scaling[adapter][tensor]

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        return self.base_layer(x, expert, project=self.project)

    def project(self, tensor: str, x: torch.Tensor, expert: int) -> torch.Tensor:
        """The base's projection of x (n, in) through expert `expert`'s slice of `tensor`, plus the adapters'."""
        y = self.base_layer.project(tensor, x, expert)  # (n, out)
        if self.disabled or self.merged_adapters:
            return y  # merged adapters already live in the base's tensors
        if self.sample_adapters is not None:
            raise ValueError(f"mixed-adapter batches cannot pass LoRA on expert tensors ({self.name}): the MoE "
                             "block mixes every row's tokens before the experts (peft refuses them too)")
        for adapter in self.active_adapters:
            if tensor in self.lora_A[adapter]:
                A = self.lora_A[adapter][tensor][expert]  # (r, in)
                B = self.lora_B[adapter][tensor][expert]  # (out, r)
                y = _low_rank_add(x.to(A.dtype), y, A, B, self.scaling[adapter][tensor])
        return y

    # ---------------------------------------------------------------- merge
    @torch.no_grad()
    def merge(self, adapters: list[str], safe: bool = True) -> None:
        for adapter in adapters:
            if adapter in self.merged_adapters or adapter not in self.lora_A:
                continue
            merged = {}
            for tensor in self.lora_A[adapter]:
                W = _expert_weight(self.base_layer, tensor)
                merged[tensor] = (W.float() + self.delta_weight(adapter, tensor)).to(W.dtype)  # the one rounding
                if safe and not torch.isfinite(merged[tensor]).all():
                    raise ValueError(f"merging adapter {adapter!r} into {self.name}.{tensor} gives non-finite "
                                     "weights; not merged")
            if not self.merged_adapters and hasattr(self.base_layer, "quant_states"):
                self._unmerged_base = self.base_layer.quant_states()
            for tensor, W in merged.items():
                _write_expert_weight(self.base_layer, tensor, W)
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every merged adapter out: a dense base subtracts each delta in fp32, a 4-bit base gets its
        quantized tensors from before the first merge back, bit for bit."""
        if self._unmerged_base is not None and self.merged_adapters:
            self.base_layer.set_quant_states(self._unmerged_base)
            self.merged_adapters.clear()
        self._unmerged_base = None
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            for tensor in self.lora_A[adapter]:
                W = _expert_weight(self.base_layer, tensor)
                unmerged = W.float() - self.delta_weight(adapter, tensor)
                _write_expert_weight(self.base_layer, tensor, unmerged.to(W.dtype))

    def unloaded(self, requantize: bool = False) -> nn.Module:
        """peft's merge_and_unload for this layer: the base with the active adapters merged; a 4-bit base
        becomes dense first (merged in full precision) unless requantize=True."""
        if hasattr(self.base_layer, "dequantized") and not requantize:
            self.unmerge()
            self.base_layer = self.base_layer.dequantized()
        self.merge(self.active_adapters, safe=True)
        return self.base_layer

    def extra_repr(self) -> str:
        ranks = "; ".join(f"{a}: " + ", ".join(f"{t} r={r}" for t, r in self.r[a].items()) for a in self.r)
        return f"{self.name or '?'}; {ranks}"


def _low_rank_add(x, y, A, B, scaling):
    if y.dtype == B.dtype:
        return LowRankAdd.apply(x, y, A, B, scaling)
    return y + (F.linear(F.linear(x, A), B) * scaling).to(y.dtype)


def _expert_weight(base: nn.Module, tensor: str) -> torch.Tensor:
    """The dense (E, out, in) tensor; a 4-bit base dequantizes it."""
    return base.dequantize_weight(tensor) if hasattr(base, "dequantize_weight") else getattr(base, tensor)


def _write_expert_weight(base: nn.Module, tensor: str, weight: torch.Tensor) -> None:
    if hasattr(base, "requantize_"):
        base.requantize_(tensor, weight)
    else:
        getattr(base, tensor).data.copy_(weight)
