"""Readable reference transformers that load and save real Hugging Face checkpoints.

`GPT` (GPT-2), `GPTNeoX` (Pythia) and `Llama` (LLaMA and the families that are LLaMA with changes:
Mistral, Qwen2, Qwen3, Gemma 2, Gemma 3, Phi-3, OLMo 2, and with experts (moe.py) Mixtral, Qwen2-MoE,
Qwen3-MoE; see families.py) use transformers' module
names, so state-dict keys and LoRA target_modules mean the same thing here and in peft. How a
checkpoint's keys map to ours is checkpoint_keys.py; folders with a quantization_config load through
the format registered in quantized_formats.py (this package imports nothing from minilora; minilora
registers bitsandbytes' 4-bit format there).
"""
from ._common import KVCache
from .families import FAMILIES
from .gpt import GPT, GPTConfig
from .hub import config_from_hf, from_hf_config, load_pretrained, save_pretrained
from .llama import Llama, LlamaConfig
from .moe import MoEConfig
from .neox import GPTNeoX, GPTNeoXConfig

__all__ = ["GPT", "GPTConfig", "Llama", "LlamaConfig", "GPTNeoX", "GPTNeoXConfig", "FAMILIES", "KVCache", "MoEConfig",
           "load_pretrained", "save_pretrained", "from_hf_config", "config_from_hf"]
