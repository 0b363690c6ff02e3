"""The hook for quantized checkpoint folders.

reference_models reads and writes dense weights only. A package that owns a quantized layer (minilora's
LinearNF4) registers the format that fills a model with that layer from the file's tensors and writes
them back; `load_pretrained` calls it when config.json has a quantization_config, `save_pretrained`
when the model holds the format's layers. Registration is what keeps the dependency one way:
minilora imports reference_models, never the reverse.
"""
from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

__all__ = ["QuantizedFormat", "BNB_4BIT", "register_quantized_format", "format_for_config", "format_for_model"]

BNB_4BIT = "bitsandbytes 4-bit"  # BitsAndBytesConfig(load_in_4bit=True)

# what to import for a known format that nobody registered yet (named here, never imported)
_PROVIDERS = {BNB_4BIT: "import minilora.quant.qlora first (it registers bitsandbytes' 4-bit format, "
                        "which loads into minilora's LinearNF4)"}


class QuantizedFormat(Protocol):
    name: str                 # what format_for_config calls a quantization_config of this kind
    layer: type[nn.Module]    # the module class the quantized weights load into

    def load(self, model: nn.Module, tensors: dict[str, torch.Tensor], quantization_config: dict,
             dtype: torch.dtype) -> None:
        """Fill the meta-device `model` in place from the file's tensors (its keys, its layout),
        swapping in `layer` where the file holds quantized weights; `dtype` for the dense rest."""

    def save(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
        """(the file's tensors, config.json's quantization_config) for a model holding `layer`s."""


_FORMATS: dict[str, QuantizedFormat] = {}


def register_quantized_format(fmt: QuantizedFormat) -> None:
    """Make load_pretrained / save_pretrained use `fmt` for its kind of quantization_config."""
    if fmt.name not in _PROVIDERS:
        raise ValueError(f"unknown quantized format {fmt.name!r}; known: {sorted(_PROVIDERS)}")
    _FORMATS[fmt.name] = fmt


def format_for_config(quantization_config: dict) -> QuantizedFormat:
    """The registered format for config.json's quantization_config, or a one-line error saying why not."""
    method, load_in_4bit = quantization_config.get("quant_method"), quantization_config.get("load_in_4bit")
    if method != "bitsandbytes" or not load_in_4bit:
        raise ValueError(f"only 4-bit bitsandbytes quantization_config is supported, got quant_method={method!r}, "
                         f"load_in_4bit={load_in_4bit!r}")
    if BNB_4BIT not in _FORMATS:
        raise RuntimeError(f"this checkpoint holds {BNB_4BIT} weights and no loader for them is registered: "
                         f"{_PROVIDERS[BNB_4BIT]}")
    return _FORMATS[BNB_4BIT]


def format_for_model(model: nn.Module) -> QuantizedFormat | None:
    """The registered format whose layer the model holds, None for a dense model."""
    for fmt in _FORMATS.values():
        if any(isinstance(m, fmt.layer) for m in model.modules()):
            return fmt
    return None
