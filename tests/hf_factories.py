"""Tiny random Hugging Face models for tests: built with transformers, never downloaded.

`tiny_hf_model(family)` returns a transformers model in eval mode with seeded random weights;
`save_tiny(family, folder)` saves one with `save_pretrained` (safetensors) and returns it.
Each family's tiny config switches on what makes that family different, at sizes where it bites
within the tests' 10-20 token sequences (windows of 6, soft-caps near the scores' size, a local
RoPE base of its own, part of each head rotated).
"""
from __future__ import annotations

import torch

FAMILIES = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt_neox")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")  # tested in tests/test_moe*.py

DECODER = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=False,
               bos_token_id=0, eos_token_id=0, pad_token_id=None)
# Gemma: a head_dim of its own (transformers' default is 256), scores scaled by query_pre_attn_scalar
# instead, layer 0 slides over 6 keys and layer 1 sees all, and soft-caps near the values' size
# (attention scores here are within +-0.1, logits within +-0.6)
GEMMA = dict(head_dim=8, query_pre_attn_scalar=12, sliding_window=6, pad_token_id=0)
TINY = {
    "gpt2": dict(vocab_size=128, n_positions=64, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0, bos_token_id=0, eos_token_id=0),
    "llama": DECODER,
    "mistral": DECODER,
    "qwen2": DECODER,
    "qwen3": dict(DECODER, head_dim=8),
    "gemma2": dict(DECODER, **GEMMA, attn_logit_softcapping=0.05, final_logit_softcapping=1.0),
    "gemma3_text": dict(DECODER, **GEMMA, sliding_window_pattern=2, rope_local_base_freq=100.0,
                        final_logit_softcapping=1.0),
    "phi3": dict(DECODER, original_max_position_embeddings=64, pad_token_id=0),
    "olmo2": dict(DECODER, pad_token_id=0),
    "gpt_neox": dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     max_position_embeddings=64, rotary_pct=0.5, tie_word_embeddings=False, bos_token_id=0,
                     eos_token_id=0),
    # experts: 4 of them, 2 per token (tests vary both); Qwen's experts smaller than its dense MLP
    "mixtral": dict(DECODER, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(DECODER, moe_intermediate_size=24, shared_expert_intermediate_size=40, num_experts=4,
                      num_experts_per_tok=2),
    "qwen3_moe": dict(DECODER, head_dim=8, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                      norm_topk_prob=True),
}
CONFIG_CLASSES = {"gpt2": "GPT2Config", "llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
                  "qwen3": "Qwen3Config", "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig",
                  "phi3": "Phi3Config", "olmo2": "Olmo2Config", "gpt_neox": "GPTNeoXConfig",
                  "mixtral": "MixtralConfig", "qwen2_moe": "Qwen2MoeConfig", "qwen3_moe": "Qwen3MoeConfig"}


def tiny_hf_config(family: str, **overrides):
    import transformers as tf

    return getattr(tf, CONFIG_CLASSES[family])(**{**TINY[family], **overrides})


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


def assert_training_gradients_equal(hf, ours, x) -> None:
    """One backward of the same next-token loss through a transformers model and ours: every
    parameter's gradient, by name (our names are transformers')."""
    targets = torch.cat([x[:, 1:], torch.full((x.shape[0], 1), -100)], dim=1)  # transformers shifts labels=x
    hf(x, labels=x).loss.backward()
    ours.train()
    ours(x, targets)[1].backward()
    theirs = {n: p.grad for n, p in hf.named_parameters()}
    mine = {n: p.grad for n, p in ours.named_parameters()}
    assert set(mine) == set(theirs)
    for name, grad in mine.items():
        torch.testing.assert_close(grad, theirs[name], rtol=1e-4, atol=1e-7, msg=name)


def save_tiny_families(root, families):
    """One saved tiny checkpoint per family, each in root/<family> (a module fixture's folder)."""
    for family in families:
        save_tiny(family, root / family)
    return root
