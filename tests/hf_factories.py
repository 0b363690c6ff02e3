"""Tiny random Hugging Face models for tests: built with transformers, never downloaded.

`tiny_hf_model(family)` returns a transformers model in eval mode with seeded random weights;
`save_tiny(family, folder)` saves one with `save_pretrained` (safetensors) and returns it.
"""
from __future__ import annotations

import torch

FAMILIES = ("gpt2", "llama", "mistral", "qwen2")


def tiny_hf_config(family: str, **overrides):
    import transformers as tf

    if family == "gpt2":
        kw = dict(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                  bos_token_id=0, eos_token_id=0)
        kw.update(overrides)
        return tf.GPT2Config(**kw)
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  rms_norm_eps=1e-6, tie_word_embeddings=False,
                  bos_token_id=0, eos_token_id=0, pad_token_id=None)
    common.update(overrides)
    cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
    return cls(**common)


def tiny_hf_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    import transformers as tf

    config = tiny_hf_config(family, **overrides)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Random init leaves some weights at exactly 0/1 (biases, norms); perturb every parameter so
    # that a wrong mapping of any tensor shows up in the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def save_tiny(family: str, folder, seed: int = 0, dtype=torch.float32, **overrides):
    model = tiny_hf_model(family, seed=seed, dtype=dtype, **overrides)
    model.save_pretrained(str(folder), safe_serialization=True)
    return model
