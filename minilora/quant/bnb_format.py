"""bitsandbytes' 4-bit checkpoint format, in one place: what transformers writes for a model loaded
with BitsAndBytesConfig(load_in_4bit=True), and reads back.

Per quantized linear, prefix `<module>.` (bitsandbytes' Linear4bit state dict, QuantState.as_dict(packed=True)):
    weight                               uint8 ((n + 1) // 2, 1)   packed codes, (out, in) order
    weight.absmax                        fp32 (blocks,) | uint8 (blocks,) when double quantized
    weight.quant_map                     fp32 (16,)     the codebook
    weight.nested_absmax                 fp32 (ceil(blocks / 256),)        double quant only
    weight.nested_quant_map              fp32 (256,)    the dynamic map    double quant only
    weight.quant_state.bitsandbytes__nf4 uint8 JSON: quant_type, blocksize, dtype, shape
                                         (+ nested_blocksize, nested_dtype, nested_offset)
    bias                                 as stored, when the layer has one
Every other tensor is dense, under the keys reference_models.checkpoint_keys maps (GPT-2's Conv1D
weights that stayed dense are still stored transposed; transformers transposes before quantizing,
so 4-bit bytes are always (out, in)). config.json carries a `quantization_config`
(Bnb4bitFormat.save writes the one transformers writes).

`Bnb4bitFormat(layer)` is the hook reference_models.load_pretrained / save_pretrained call for
these folders; minilora.quant.qlora registers it with its LinearNF4 as the layer (passed in, because
LinearNF4's own state dict is written with quant_state_to_dict from here).
"""
from __future__ import annotations

import json
import re

import torch
from torch import nn

from reference_models.checkpoint_keys import HEAD, checkpoint_tensors, match_state, model_keys
from reference_models.moe import Experts, SparseMoE
from reference_models.quantized_formats import BNB_4BIT

from .nf4 import QuantState4bit, codebook, dynamic_map

__all__ = ["STORABLE", "quant_state_to_dict", "quant_state_from_dict", "Bnb4bitFormat"]

STORABLE = ("nf4", "fp4")  # what bitsandbytes' format holds; "int4" lives only in minilora.quant.nf4
_QS_KEY = re.compile(r"^(?P<prefix>.+)\.weight\.quant_state\.bitsandbytes__(?P<quant_type>nf4|fp4)$")
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------ one weight <-> its tensors

def quant_state_to_dict(state: QuantState4bit) -> dict[str, torch.Tensor]:
    """bitsandbytes QuantState.as_dict(packed=True) under `weight.*`, plus `weight` itself."""
    if state.quant_type not in STORABLE:
        raise ValueError(f"bitsandbytes' format stores nf4 or fp4, got quant_type {state.quant_type!r}")
    out = {"weight": state.packed, "weight.absmax": state.absmax, "weight.quant_map": state.codebook}
    meta = {"quant_type": state.quant_type, "blocksize": state.block_size,
            "dtype": str(state.dtype).removeprefix("torch."), "shape": list(state.shape)}
    if state.double_quant:
        out["weight.nested_absmax"] = state.absmax2
        out["weight.nested_quant_map"] = dynamic_map(signed=True, device=state.absmax.device)
        meta.update(nested_blocksize=state.dq_block_size, nested_dtype="float32", nested_offset=state.offset.item())
    # bitsandbytes' pack_dict_to_tensor: json.dumps with default separators, as uint8 bytes
    out[f"weight.quant_state.bitsandbytes__{state.quant_type}"] = torch.tensor(
        list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
    return out


def _read_meta(tensors: dict[str, torch.Tensor], where: str) -> tuple[dict, str]:
    """The quant_state JSON and the quant type its key names, checked."""
    packed_keys = [k for k in tensors if k.startswith("weight.quant_state.")]
    if len(packed_keys) != 1 or not _QS_KEY.match("m." + packed_keys[0]):
        raise ValueError(f"{where}weight needs exactly one weight.quant_state.bitsandbytes__nf4|fp4 entry, "
                         f"got {packed_keys}")
    try:
        meta = json.loads(bytes(tensors[packed_keys[0]].cpu().tolist()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}{packed_keys[0]} is not a JSON quant state: {exc}") from exc
    quant_type = packed_keys[0].rsplit("__", 1)[1]
    for field in ("quant_type", "blocksize", "dtype", "shape"):
        if field not in meta:
            raise ValueError(f"{where}{packed_keys[0]} lacks {field!r} (has {sorted(meta)})")
    if meta["quant_type"] != quant_type:
        raise ValueError(f"{where}quant_state says quant_type {meta['quant_type']!r} under key {packed_keys[0]!r}")
    if meta["dtype"] not in _DTYPE_NAMES:
        raise ValueError(f"{where}quant_state dtype must be one of {sorted(_DTYPE_NAMES)}, got {meta['dtype']!r}")
    return meta, quant_type


def _check_maps(tensors: dict[str, torch.Tensor], quant_type: str, nested: bool, where: str) -> None:
    """The stored codebook and dynamic map are bitsandbytes' own (no custom codebooks)."""
    for key in ("weight", "weight.absmax", "weight.quant_map"):
        if key not in tensors:
            raise ValueError(f"{where}{key} is missing from the 4-bit state dict")
    if not torch.equal(tensors["weight.quant_map"].cpu().float(), codebook(quant_type)):
        raise ValueError(f"{where}weight.quant_map is not the {quant_type} codebook; custom codebooks are not supported")
    if nested:
        for key in ("weight.nested_absmax", "weight.nested_quant_map"):
            if key not in tensors:
                raise ValueError(f"{where}{key} is missing but the quant state is double quantized")
        if not torch.equal(tensors["weight.nested_quant_map"].cpu().float(), dynamic_map(signed=True)):
            raise ValueError(f"{where}weight.nested_quant_map is not bitsandbytes' signed dynamic map")


def quant_state_from_dict(tensors: dict[str, torch.Tensor], prefix: str = "") -> QuantState4bit:
    """The inverse: keys `weight`, `weight.absmax`, ... (prefix stripped) -> QuantState4bit."""
    where = prefix or "<module>."
    meta, quant_type = _read_meta(tensors, where)
    nested = "nested_offset" in meta
    _check_maps(tensors, quant_type, nested, where)
    shape = torch.Size(meta["shape"])
    n, block_size = shape.numel(), meta["blocksize"]
    packed, absmax = tensors["weight"], tensors["weight.absmax"]
    if packed.dtype != torch.uint8:
        packed = packed.view(torch.uint8)  # quant_storage other than uint8 holds the same bytes
    if packed.numel() != (n + 1) // 2:
        raise ValueError(f"{where}weight has {packed.numel()} bytes, quant_state shape {tuple(shape)} needs {(n + 1) // 2}")
    blocks = -(-n // block_size)
    if absmax.numel() != blocks or absmax.dtype != (torch.uint8 if nested else torch.float32):
        raise ValueError(f"{where}weight.absmax is {absmax.dtype} with {absmax.numel()} entries, expected "
                         f"{'uint8' if nested else 'float32'} with ceil({n}/{block_size}) = {blocks}")
    state = QuantState4bit(packed.reshape(-1, 1), absmax, shape, _DTYPE_NAMES[meta["dtype"]], block_size, quant_type)
    if nested:
        state.absmax2 = tensors["weight.nested_absmax"].float()
        state.offset = torch.tensor(float(meta["nested_offset"]), dtype=torch.float32)  # as bitsandbytes' from_dict
        state.dq_block_size = int(meta.get("nested_blocksize", 256))
        if state.absmax2.numel() != -(-blocks // state.dq_block_size):
            raise ValueError(f"{where}weight.nested_absmax has {state.absmax2.numel()} entries, expected "
                             f"ceil({blocks}/{state.dq_block_size})")
    return state


# ------------------------------------------------------------------- a model <-> its checkpoint

def _quantized_prefixes(tensors: dict[str, torch.Tensor]) -> list[str]:
    # a quantized module is one with a quant_state or an absmax entry (a missing quant_state is
    # then reported by quant_state_from_dict instead of as unexpected keys)
    return sorted({m.group("prefix") for m in map(_QS_KEY.match, tensors) if m}
                  | {k[:-len(".weight.absmax")] for k in tensors if k.endswith(".weight.absmax")})


class Bnb4bitFormat:
    """The reference_models.quantized_formats hook for transformers + bitsandbytes 4-bit folders,
    loading into `layer`: a class with `from_state(QuantState4bit, bias, compute_dtype)` and
    `quant_type`, `double_quant`, `compute_dtype` attributes (minilora's LinearNF4)."""

    name = BNB_4BIT

    def __init__(self, layer: type[nn.Module]):
        self.layer = layer

    def load(self, model: nn.Module, tensors: dict[str, torch.Tensor], quantization_config: dict,
             dtype: torch.dtype) -> None:
        """Fill a meta-device model from the file's tensors, building layers straight from the stored
        bytes (no requantization); the dense rest is checked and loaded as reference_models does."""
        tensors = model_keys(model, tensors)
        prefixes = _quantized_prefixes(tensors)
        if not prefixes:
            raise ValueError("quantization_config says 4-bit but the checkpoint has no "
                             "weight.quant_state.bitsandbytes__* keys")
        compute = quantization_config.get("bnb_4bit_compute_dtype") or dtype
        compute_dtype = _DTYPE_NAMES.get(compute, compute) if isinstance(compute, str) else compute
        for prefix in prefixes:
            self._swap_in(model, prefix, tensors, compute_dtype)
        model.load_state_dict(match_state(model, tensors, dtype), strict=False, assign=True)

    def _swap_in(self, model: nn.Module, prefix: str, tensors: dict[str, torch.Tensor], compute_dtype) -> None:
        """Replace the nn.Linear at `prefix` by a 4-bit layer holding its tensors (popped from `tensors`)."""
        try:
            target = model.get_submodule(prefix)
        except AttributeError:
            raise ValueError(f"4-bit checkpoint has {prefix}.weight but {type(model).__name__} has no module {prefix!r}")
        if not isinstance(target, nn.Linear):  # a subclass too: transformers quantizes Qwen2-MoE's shared_expert_gate
            raise ValueError(f"4-bit weight {prefix}.weight targets a {type(target).__name__}, expected nn.Linear")
        own = {k[len(prefix) + 1:]: tensors.pop(k) for k in list(tensors)
               if k == prefix + ".weight" or k.startswith(prefix + ".weight.")}
        state = quant_state_from_dict(own, prefix + ".")
        if tuple(state.shape) != (target.out_features, target.in_features):
            raise ValueError(f"{prefix}.weight quant_state has shape {tuple(state.shape)}, the model needs "
                             f"({target.out_features}, {target.in_features})")
        bias = tensors.pop(prefix + ".bias", None)
        if (bias is None) != (target.bias is None):
            raise ValueError(f"{prefix}.bias is {'missing' if bias is None else 'unexpected'} in the 4-bit checkpoint")
        model.set_submodule(prefix, self.layer.from_state(state, bias, compute_dtype))

    def save(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, quantization_config) as transformers + bitsandbytes save a 4-bit model."""
        layers = [m for m in model.modules() if isinstance(m, self.layer)]
        experts = [n for n, m in model.named_modules() if isinstance(m, Experts) and any(
            isinstance(c, self.layer) for c in m.modules())]
        if experts:
            raise ValueError(f"{experts[0]} holds 4-bit experts, which transformers 5.24 + bitsandbytes cannot read "
                             "(it keeps experts dense): unload(model) first, or quantize_model(..., experts=False) "
                             "for a 4-bit folder transformers reads")
        if not layers:
            raise ValueError(f"{type(model).__name__} has no {self.layer.__name__} layers to save in 4-bit format")
        kinds = {(m.quant_type, m.double_quant, m.compute_dtype) for m in layers}
        if len(kinds) != 1:
            raise ValueError(f"one quantization_config per checkpoint: layers differ in (quant_type, double_quant, "
                             f"compute_dtype): {sorted(map(str, kinds))}")
        quant_type, double_quant, compute_dtype = kinds.pop()
        # dense linear layers transformers would otherwise quantize (Gate subclasses included: Qwen2-MoE's
        # shared_expert_gate); a router is no nn.Linear in transformers, which never quantizes it
        routers = {f"{n}.gate" for n, m in model.named_modules() if isinstance(m, SparseMoE)}
        skipped = sorted({n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in routers})
        skipped = None if set(skipped) <= {HEAD} else skipped  # transformers always keeps the head
        config = {
            "_load_in_4bit": True, "_load_in_8bit": False,
            "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."), "bnb_4bit_quant_storage": "uint8",
            "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
            "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
            "llm_int8_skip_modules": skipped, "llm_int8_threshold": 6.0,
            "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
        }
        return checkpoint_tensors(model), config
