"""Built-in model presets: the size-relevant fields of each model's published config.json.

Only fields that change parameter counts or memory are kept (sizes, heads, head_dim, vocabulary,
context length, tying, biases, experts); the values are those of the config.json files the model
authors published on the Hugging Face hub.
"""
from __future__ import annotations

__all__ = ["PRESETS"]


def _gpt2(n_embd, n_layer, n_head):
    return dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=n_embd,
                n_layer=n_layer, n_head=n_head, tie_word_embeddings=True)


def _llama(vocab, hidden, inter, layers, heads, kv, positions, **extra):
    return dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                max_position_embeddings=positions, tie_word_embeddings=False, **extra)


PRESETS = {
    "gpt2": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
    "llama-2-7b": _llama(32000, 4096, 11008, 32, 32, 32, 4096),
    "llama-2-13b": _llama(32000, 5120, 13824, 40, 40, 40, 4096),
    "llama-2-70b": _llama(32000, 8192, 28672, 80, 64, 8, 4096),
    "llama-3-8b": _llama(128256, 4096, 14336, 32, 32, 8, 8192, rope_theta=500000.0),
    "llama-3.1-8b": _llama(128256, 4096, 14336, 32, 32, 8, 131072, rope_theta=500000.0),
    "llama-3.1-70b": _llama(128256, 8192, 28672, 80, 64, 8, 131072, rope_theta=500000.0),
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, sliding_window=4096, tie_word_embeddings=False),
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=32768, num_local_experts=8, num_experts_per_tok=2,
                         tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=131072, tie_word_embeddings=False),
    "gemma-2-9b": dict(model_type="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
                       num_hidden_layers=42, num_attention_heads=16, num_key_value_heads=8, head_dim=256,
                       max_position_embeddings=8192, sliding_window=4096, query_pre_attn_scalar=256,
                       final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                       tie_word_embeddings=True),
    "phi-3-mini": dict(model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, tie_word_embeddings=False),
}
