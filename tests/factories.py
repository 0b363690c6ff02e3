"""Tiny reference models for tests, built from our own configs (tests/hf_factories.py builds
transformers' twins). Seeded: the same arguments give the same weights. Every keyword is a config
field, laid over small defaults, so a test states only the shape it cares about."""
from __future__ import annotations

import torch

from reference_models import GPT, GPTConfig, Llama, LlamaConfig

GPT_DEFAULTS = dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
LLAMA_DEFAULTS = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)


def tiny_gpt(seed: int = 0, **config) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**GPT_DEFAULTS, **config}))


def tiny_llama(seed: int = 0, **config) -> Llama:
    torch.manual_seed(seed)
    return Llama(LlamaConfig(**{**LLAMA_DEFAULTS, **config}))


def tiny_model(family: str, seed: int = 0, **config) -> GPT | Llama:
    """"gpt2" -> tiny_gpt, anything else -> tiny_llama with model_type=family."""
    if family == "gpt2":
        return tiny_gpt(seed, **config)
    return tiny_llama(seed, **({"model_type": family} if family != "llama" else {}), **config)
