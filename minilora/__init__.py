"""minilora: LoRA, NF4/QLoRA, a paged CPU-offload optimizer and a training loop, in pure PyTorch.

Imports are lazy: `import minilora` loads no torch, so `python -m minilora.calc` starts fast.
Each public name lives in one module, listed here.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    # LoRA layers and model-level functions (minilora/lora.py, minilora/lora_model.py)
    "LoRAConfig": "lora",
    "LoRALinear": "lora",
    "inject": "lora_model",
    "set_adapter": "lora_model",
    "disable_adapters": "lora_model",
    "delete_adapter": "lora_model",
    "merge": "lora_model",
    "unmerge": "lora_model",
    "unload": "lora_model",
    "trainable_parameters": "lora_model",
    "adapter_names_per_sample": "lora_model",
    # peft's adapter file format (minilora/peft_io.py)
    "save_adapter": "peft_io",
    "load_adapter": "peft_io",
    # adapter arithmetic (minilora/arithmetic.py)
    "combine_adapters": "arithmetic",
    # NF4 / FP4 / INT4 quantization (minilora/nf4.py)
    "nf4_codebook": "nf4",
    "fp4_codebook": "nf4",
    "int4_codebook": "nf4",
    "dynamic_map": "nf4",
    "quantize_4bit": "nf4",
    "dequantize_4bit": "nf4",
    "QuantState4bit": "nf4",
    "quantize_blockwise_8bit": "nf4",
    "dequantize_blockwise_8bit": "nf4",
    "quantization_error": "nf4",
    # QLoRA layers (minilora/qlora.py)
    "LinearNF4": "qlora",
    "quantize_model": "qlora",
    "prepare_for_kbit_training": "qlora",
    # optimizers (minilora/offload.py)
    "CPUOffloadAdamW": "offload",
    # training (minilora/train.py, data.py, tokenizer.py); the `train` function stays in
    # minilora.train so that it does not shadow the module
    "TrainConfig": "train",
    "evaluate": "train",
    "ByteTokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "load_dataset": "data",
    # several GPUs (minilora/distributed.py)
    "init_distributed": "distributed",
    "wrap_model": "distributed",
    "save_adapter_sharded": "distributed",
    "train_distributed": "distributed",
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
