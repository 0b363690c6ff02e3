"""minilora: LoRA, NF4/QLoRA, a paged CPU-offload optimizer and a training loop, in pure PyTorch.

Imports are lazy: `import minilora` loads no torch, so `python -m minilora.calc` starts fast.
Each public name lives in one module, listed here.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    # LoRA layers and model-level functions (minilora/lora/layer.py, minilora/lora/model.py)
    "LoRAConfig": "lora.layer",
    "LoRALinear": "lora.layer",
    "LoRAExperts": "lora.experts",
    "inject": "lora.model",
    "set_adapter": "lora.model",
    "disable_adapters": "lora.model",
    "delete_adapter": "lora.model",
    "merge": "lora.model",
    "unmerge": "lora.model",
    "unload": "lora.model",
    "trainable_parameters": "lora.model",
    "adapter_names_per_sample": "lora.model",
    # peft's adapter file format (minilora/lora/peft_io.py)
    "save_adapter": "lora.peft_io",
    "load_adapter": "lora.peft_io",
    # adapter arithmetic (minilora/lora/arithmetic.py)
    "combine_adapters": "lora.arithmetic",
    # NF4 / FP4 / INT4 quantization (minilora/quant/nf4.py)
    "nf4_codebook": "quant.nf4",
    "fp4_codebook": "quant.nf4",
    "int4_codebook": "quant.nf4",
    "dynamic_map": "quant.nf4",
    "quantize_4bit": "quant.nf4",
    "dequantize_4bit": "quant.nf4",
    "QuantState4bit": "quant.nf4",
    "quantize_blockwise_8bit": "quant.nf4",
    "dequantize_blockwise_8bit": "quant.nf4",
    "quantization_error": "quant.nf4",
    # QLoRA layers (minilora/quant/qlora.py)
    "LinearNF4": "quant.qlora",
    "ExpertsNF4": "quant.qlora",
    "quantize_model": "quant.qlora",
    "prepare_for_kbit_training": "quant.qlora",
    # optimizers (minilora/optim/offload.py)
    "CPUOffloadAdamW": "optim.offload",
    # training (minilora/train/: config.py, loop.py, checkpoint.py, data.py, tokenizer.py); the
    # `train` function stays in minilora.train so that it does not shadow the module
    "TrainConfig": "train.config",
    "evaluate": "train.loop",
    "train_distributed": "train.loop",
    "save_checkpoint": "train.checkpoint",
    "load_checkpoint": "train.checkpoint",
    "ByteTokenizer": "train.tokenizer",
    "load_tokenizer": "train.tokenizer",
    "load_dataset": "train.data",
    # several GPUs (minilora/distributed/)
    "init_distributed": "distributed",
    "wrap_model": "distributed",
    "save_adapter_sharded": "distributed",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'minilora' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"minilora.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
