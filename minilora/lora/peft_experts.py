"""peft's adapter-file format for LoRA on expert tensors (`target_parameters`), and adapters trained
when experts were per-expert linear layers (transformers 4).

peft 0.21's ParamWrapper stores, for a tensor W (E, out, in) adapted with rank r per expert:
    lora_A.weight   (E*r, in)    rows e*r .. e*r + r - 1 are expert e's A   (expert-major)
    lora_B.weight   (out, r*E)   column j*E + e is column j of expert e's B  (rank-major)
ours are A (E, r, in) and B (E, out, r) (lora/experts.py). Each targeted tensor of a module is one
ParamWrapper around the previous one, the tensor registered first innermost: with gate_up_proj and
down_proj both adapted, gate_up_proj's keys are `<experts>.base_layer.lora_A.weight` and down_proj's
`<experts>.lora_A.weight`; a tensor adapted alone has no `.base_layer`.

An adapter trained on transformers 4, where each expert's projections were nn.Linear modules
(`<layer>.block_sparse_moe.experts.<e>.w1`, Qwen's `<layer>.mlp.experts.<e>.gate_proj`), holds one
(r, in) / (out, r) pair per expert and projection. peft 0.21 loads it into the fused tensors by
concatenating an expert's gate and up A along the rank and putting their B block-diagonally (rank
2r; peft/utils/transformers_weight_conversion.py); `fuse_per_expert_tensors` does the same, so
the file reads into the LoRAExperts that its config (target_modules w1, w2, w3) built.
"""
from __future__ import annotations

import re

import torch
from torch import nn

from reference_models.checkpoint_keys import expert_keys
from reference_models.moe import SparseMoE

from .experts import LoRAExperts
from .layer import suffix_match
from .targets import expert_modules

__all__ = ["expert_file_tensors", "expected_expert_tensors", "fuse_per_expert_tensors", "expert_file_fields",
           "router_names"]


def _layers(model: nn.Module, adapter: str) -> dict[str, LoRAExperts]:
    return {n: m for n, m in expert_modules(model).items() if isinstance(m, LoRAExperts) and adapter in m.lora_A}


def _file_prefix(layer: LoRAExperts, name: str, adapter: str, tensor: str) -> str:
    """`<experts>(.base_layer)*` for `tensor`: one .base_layer per adapted tensor registered after it."""
    targeted = [t for t in layer.base_layer.TENSORS if t in layer.lora_A[adapter]]
    return name + ".base_layer" * (len(targeted) - 1 - targeted.index(tensor))


def _to_file(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    E, r, in_features = A.shape
    return A.reshape(E * r, in_features), B.permute(1, 2, 0).reshape(B.shape[1], r * E)  # (E*r, in), (out, r*E)


def expert_file_tensors(model: nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """{key without base_model.model.: tensor in peft's layout} of adapter `adapter` on expert tensors."""
    out = {}
    for name, layer in _layers(model, adapter).items():
        for tensor in layer.lora_A[adapter]:
            A, B = _to_file(layer.lora_A[adapter][tensor].detach(), layer.lora_B[adapter][tensor].detach())
            prefix = _file_prefix(layer, name, adapter, tensor)
            out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = A.contiguous(), B.contiguous()
    return out


def expected_expert_tensors(model: nn.Module, adapter: str) -> dict[str, tuple[nn.Parameter, tuple, object]]:
    """{file key (no prefix): (our parameter, the file's shape, file tensor -> our layout)} for loading."""
    out = {}
    for name, layer in _layers(model, adapter).items():
        for tensor in layer.lora_A[adapter]:
            A, B = layer.lora_A[adapter][tensor], layer.lora_B[adapter][tensor]
            E, r, in_features = A.shape
            prefix = _file_prefix(layer, name, adapter, tensor)
            out[f"{prefix}.lora_A.weight"] = (A, (E * r, in_features), lambda t, E=E: t.reshape(E, -1, t.shape[-1]))
            out[f"{prefix}.lora_B.weight"] = (B, (B.shape[1], r * E),
                                              lambda t, E=E: t.reshape(t.shape[0], -1, E).permute(2, 0, 1))
    return out


def router_names(model: nn.Module) -> set[str]:
    """The routers (`<layer>.mlp.gate`) of every sparse MoE block."""
    return {f"{n}.gate" for n, m in model.named_modules() if isinstance(m, SparseMoE)}


def expert_file_fields(model: nn.Module, adapter: str, wrapped: list[str]) -> tuple[list[str] | None, dict, dict]:
    """(target_parameters, {parameter name: rank}, {...: alpha}) for adapter_config.json: the adapted expert
    tensors, and the adapted routers among the LoRALinear modules `wrapped` as `<router>.weight` (peft
    wraps a router's weight: transformers' router is no nn.Linear, so target_modules could not name it),
    by their short names (`experts.gate_up_proj`, `gate.weight`) when these select exactly what is
    adapted, else by full names. ranks / alphas: the expert tensors' (the caller adds the routers')."""
    layers = _layers(model, adapter)
    routers = router_names(model)
    adapted = {f"{n}.{t}" for n, layer in layers.items() for t in layer.lora_A[adapter]}
    adapted |= {f"{n}.weight" for n in routers & set(wrapped)}
    if not adapted:
        return None, {}, {}
    short = sorted({".".join(p.split(".")[-2:]) for p in adapted})
    every = {f"{n}.{t}" for n, m in expert_modules(model).items()
             for t in (m.base_layer if isinstance(m, LoRAExperts) else m).TENSORS} | {f"{n}.weight" for n in routers}
    selected = {p for p in every if any(suffix_match(p, s) for s in short)}
    names = short if selected == adapted else sorted(adapted)
    ranks = {f"{n}.{t}": r for n, layer in layers.items() for t, r in layer.r[adapter].items()}
    alphas = {f"{n}.{t}": a for n, layer in layers.items() for t, a in layer.alpha[adapter].items()}
    return names, ranks, alphas


def fuse_per_expert_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], adapter: str,
                            prefix: str) -> dict[str, torch.Tensor]:
    """A transformers-4 adapter's per-expert tensors -> peft's fused keys and layout (see the module
    docstring), for the LoRAExperts that adapter `adapter` built; the router's block is renamed
    (Mixtral's block_sparse_moe -> mlp). Tensors that fit nothing are left under their keys."""
    ek = expert_keys(model)
    if ek is None:
        return tensors
    pattern = re.compile(rf"^{re.escape(prefix)}(?P<layer>.+)\.{ek.block}\.experts\.(?P<e>\d+)\."
                         rf"(?P<proj>{ek.gate}|{ek.up}|{ek.down})\.lora_(?P<ab>[AB])\.weight$")
    out, found = {}, {}
    for key, t in tensors.items():
        m = pattern.match(key)
        if m is None:
            out[re.sub(rf"\.{ek.block}\.", ".mlp.", key)] = t
        else:
            found[(f"{m['layer']}.mlp.experts", m["proj"], m["ab"], int(m["e"]))] = (key, t)
    for name, layer in _layers(model, adapter).items():
        E = layer.base_layer.tensor_shape("down_proj")[0]
        for tensor in layer.lora_A[adapter]:
            projs = (ek.gate, ek.up) if tensor == "gate_up_proj" else (ek.down,)
            keys = [(name, p, ab, e) for p in projs for ab in "AB" for e in range(E)]
            if not any(k in found for k in keys):
                continue  # a file in peft's own layout, or experts this file does not adapt
            missing = [k for k in keys if k not in found]
            if missing:
                raise ValueError(f"adapter file lacks {len(missing)} per-expert tensors of {name}, e.g. expert "
                                 f"{missing[0][3]}'s {missing[0][1]}.lora_{missing[0][2]}")
            ts = {(p, ab): torch.stack([found.pop((name, p, ab, e))[1] for e in range(E)])
                  for p in projs for ab in "AB"}
            A, B = ts[(projs[0], "A")], ts[(projs[0], "B")]  # (E, r, in), (E, out, r)
            if tensor == "gate_up_proj":  # gate's and up's A along the rank, their B block-diagonal
                A = torch.cat([A, ts[(ek.up, "A")]], dim=1)  # (E, 2r, in)
                B = torch.stack([torch.block_diag(g, u) for g, u in zip(B, ts[(ek.up, "B")])])  # (E, 2I, 2r)
            key = prefix + _file_prefix(layer, name, adapter, tensor)
            out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = _to_file(A, B)
    out.update(dict(found.values()))  # per-expert tensors that fit no adapted tensor: reported by the caller
    return out
