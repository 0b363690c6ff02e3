"""Built-in model presets: the fields of each checkpoint's published config.json that sizes, memory
and the KV cache depend on.

Each preset keeps the config.json keys as the checkpoint publishes them (hub style: rope_theta,
rope_scaling, rotary_pct, sliding_window_pattern, ...; a key the file leaves out takes the
configuration class's default, as in transformers). Beside each: where the values come from, and the
parameter count its publisher states, which the preset's exact count (in brackets, equal to
transformers on the meta device, tests/test_calc_models.py) rounds to. Gemma 3 4B and up are
vision-language checkpoints: their preset is the text model (text_config, model_type gemma3_text),
without the 417M-parameter vision tower.
"""
from __future__ import annotations

__all__ = ["PRESETS"]

_LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)


def _gpt2(n_embd, n_layer, n_head):
    return dict(model_type="gpt2", vocab_size=50257, n_positions=1024, n_embd=n_embd,
                n_layer=n_layer, n_head=n_head, tie_word_embeddings=True)


def _decoder(model_type, vocab, hidden, inter, layers, heads, kv, positions, tie=False, **extra):
    return dict(model_type=model_type, vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                max_position_embeddings=positions, tie_word_embeddings=tie, **extra)


def _llama(vocab, hidden, inter, layers, heads, kv, positions, tie=False, **extra):
    return _decoder("llama", vocab, hidden, inter, layers, heads, kv, positions, tie, **extra)


def _qwen3(hidden, inter, layers, heads, tie):
    return _decoder("qwen3", 151936, hidden, inter, layers, heads, 8, 40960, tie, head_dim=128, rope_theta=1000000.0,
                    use_sliding_window=False, sliding_window=None, max_window_layers=layers)


def _qwen3_moe(hidden, inter, moe_inter, layers, heads):
    return _decoder("qwen3_moe", 151936, hidden, inter, layers, heads, 4, 40960, head_dim=128, rope_theta=1000000.0,
                    moe_intermediate_size=moe_inter, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                    decoder_sparse_step=1, mlp_only_layers=[], use_sliding_window=False, sliding_window=None,
                    max_window_layers=layers)


def _gemma3(hidden, inter, layers, heads, kv, head_dim, window, **extra):
    # google/gemma-3-{4,12,27}b-pt text_config lists only these; vocab_size 262208, 131072 positions,
    # rope_theta 1e6 (local 1e4) and sliding_window_pattern 6 are Gemma3TextConfig's defaults
    return dict(model_type="gemma3_text", hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, sliding_window=window,
                vocab_size=262208, rope_scaling=dict(rope_type="linear", factor=8.0), **extra)


def _pythia(vocab, hidden, layers, heads):
    return dict(model_type="gpt_neox", vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, max_position_embeddings=2048,
                rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True, tie_word_embeddings=False)


PRESETS = {
    # huggingface.co/openai-community/gpt2{,-medium,-large,-xl}; 124M / 355M / 774M / 1.5B
    "gpt2": _gpt2(768, 12, 12),
    "gpt2-medium": _gpt2(1024, 24, 16),
    "gpt2-large": _gpt2(1280, 36, 20),
    "gpt2-xl": _gpt2(1600, 48, 25),
    # meta-llama/Llama-2-{7,13,70}b-hf; 7B / 13B / 70B
    "llama-2-7b": _llama(32000, 4096, 11008, 32, 32, 32, 4096),
    "llama-2-13b": _llama(32000, 5120, 13824, 40, 40, 40, 4096),
    "llama-2-70b": _llama(32000, 8192, 28672, 80, 64, 8, 4096),
    # meta-llama/Meta-Llama-3-8B, Llama-3.1-{8,70}B; 8B / 8B / 70B
    "llama-3-8b": _llama(128256, 4096, 14336, 32, 32, 8, 8192, rope_theta=500000.0),
    "llama-3.1-8b": _llama(128256, 4096, 14336, 32, 32, 8, 131072, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE),
    "llama-3.1-70b": _llama(128256, 8192, 28672, 80, 64, 8, 131072, rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE),
    # meta-llama/Llama-3.2-{1,3}B; model card 1.23B [1,235,814,400] / 3.21B [3,212,749,824], shared embeddings
    "llama-3.2-1b": _llama(128256, 2048, 8192, 16, 32, 8, 131072, tie=True, head_dim=64,
                           rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
    "llama-3.2-3b": _llama(128256, 3072, 8192, 28, 24, 8, 131072, tie=True, head_dim=128,
                           rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}),
    # HuggingFaceTB/SmolLM2-{135M,1.7B} (model_type llama); 135M [134,515,008] / 1.7B [1,711,376,384]
    "smollm2-135m": _llama(49152, 576, 1536, 30, 9, 3, 8192, tie=True, rope_theta=100000.0),
    "smollm2-1.7b": _llama(49152, 2048, 8192, 24, 32, 32, 8192, tie=True, rope_theta=130000.0),
    # mistralai/Mistral-7B-v0.1; 7B [7,241,732,096]
    "mistral-7b": _decoder("mistral", 32000, 4096, 14336, 32, 32, 8, 32768, sliding_window=4096),
    # mistralai/Mistral-Nemo-Base-2407: head_dim 128 although 5120 / 32 = 160; 12B [12,247,782,400]
    "mistral-nemo": _decoder("mistral", 131072, 5120, 14336, 40, 32, 8, 1024000, head_dim=128,
                             rope_theta=1000000.0, sliding_window=None),
    # mistralai/Mixtral-8x7B-v0.1; 46.7B total, 12.9B active [46,702,792,704 / 12,879,925,248]
    "mixtral-8x7b": _decoder("mixtral", 32000, 4096, 14336, 32, 32, 8, 32768, num_local_experts=8,
                             num_experts_per_tok=2, rope_theta=1000000.0, sliding_window=None),
    # mistralai/Mixtral-8x22B-v0.1; 141B total, 39B active [140,620,634,112 / 39,152,031,744]
    "mixtral-8x22b": _decoder("mixtral", 32000, 6144, 16384, 56, 48, 8, 65536, num_local_experts=8,
                              num_experts_per_tok=2, rope_theta=1000000.0, sliding_window=None),
    # Qwen/Qwen3-30B-A3B, Qwen3-235B-A22B: 128 experts, 8 per token, on every layer; model cards 30.5B total
    # / 3.3B activated / 29.9B non-embedding [30,532,122,624 / 3,353,032,704 / 29,909,792,768], 235B / 22B /
    # 234B [235,093,634,560 / 22,190,763,520 / 233,848,974,848]
    "qwen3-30b-a3b": _qwen3_moe(2048, 6144, 768, 48, 32),
    "qwen3-235b-a22b": _qwen3_moe(4096, 12288, 1536, 94, 64),
    # deepseek-ai/DeepSeek-V3: MLA, 3 dense layers, then 256 routed experts (8 per token) + 1 shared; 671B
    # total, 37B activated in the report [671,026,404,352 / 37,552,282,624] (the hub's 685B adds the 14B
    # multi-token-prediction module, which transformers does not build)
    "deepseek-v3": dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                        num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, num_experts_per_tok=8,
                        first_k_dense_replace=3, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                        qk_nope_head_dim=128, v_head_dim=128, n_group=8, topk_group=4, norm_topk_prob=True,
                        routed_scaling_factor=2.5, max_position_embeddings=163840, rope_theta=10000,
                        rope_scaling=dict(type="yarn", factor=40, original_max_position_embeddings=4096,
                                          beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
                        tie_word_embeddings=False),
    # Qwen/Qwen2.5-7B; 7.61B [7,615,616,512]
    "qwen2.5-7b": _decoder("qwen2", 152064, 3584, 18944, 28, 28, 4, 131072, rope_theta=1000000.0,
                           use_sliding_window=False, sliding_window=131072, max_window_layers=28),
    # Qwen/Qwen3-{0.6,1.7,4,8,14,32}B; model cards (total / non-embedding): 0.6B / 0.44B [596,049,920],
    # 1.7B / 1.4B [1,720,574,976], 4.0B / 3.6B [4,022,468,096], 8.2B / 6.95B [8,190,735,360],
    # 14.8B / 13.2B [14,768,307,200], 32.8B / 31.2B [32,762,123,264]
    "qwen3-0.6b": _qwen3(1024, 3072, 28, 16, tie=True),
    "qwen3-1.7b": _qwen3(2048, 6144, 28, 16, tie=True),
    "qwen3-4b": _qwen3(2560, 9728, 36, 32, tie=True),
    "qwen3-8b": _qwen3(4096, 12288, 36, 32, tie=False),
    "qwen3-14b": _qwen3(5120, 17408, 40, 40, tie=False),
    "qwen3-32b": _qwen3(5120, 25600, 64, 64, tie=False),
    # google/gemma-2-{2b,9b,27b}: every other layer slides over 4096 positions; 2.6B [2,614,341,888],
    # 9B [9,241,705,984], 27B [27,227,128,320]; Gemma 2 report, table 1: non-embedding 2,024,517,888,
    # 8,324,201,984 and 26,047,480,320, equal to ours (its embedding counts use 256,128 rows)
    "gemma-2-2b": _decoder("gemma2", 256000, 2304, 9216, 26, 8, 4, 8192, True, head_dim=256, sliding_window=4096,
                           query_pre_attn_scalar=256, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma-2-9b": _decoder("gemma2", 256000, 3584, 14336, 42, 16, 8, 8192, True, head_dim=256, sliding_window=4096,
                           query_pre_attn_scalar=256, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma-2-27b": _decoder("gemma2", 256000, 4608, 36864, 46, 32, 16, 8192, True, head_dim=128, sliding_window=4096,
                            query_pre_attn_scalar=144, final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    # google/gemma-3-1b-pt (text only) and the text_config of google/gemma-3-{4,12,27}b-pt: five of every
    # six layers slide. Gemma 3 report, table 1, non-embedding: 698M, 3,209M, 10,759M, 25,600M (ours:
    # 697,896,064, 3,209,010,688, 10,759,155,456, 25,599,716,096); totals [999,885,952], [3,880,263,168],
    # [11,766,034,176], [27,009,346,304] (its embedding column, 675M for 4B, counts more than 262,208 x 2,560)
    "gemma-3-1b": _decoder("gemma3_text", 262144, 1152, 6912, 26, 4, 1, 32768, True, head_dim=256,
                           sliding_window=512, sliding_window_pattern=6, rope_theta=1000000.0,
                           rope_local_base_freq=10000.0, query_pre_attn_scalar=256),
    "gemma-3-4b": _gemma3(2560, 10240, 34, 8, 4, 256, 1024),
    "gemma-3-12b": _gemma3(3840, 15360, 48, 16, 8, 256, 1024),
    "gemma-3-27b": _gemma3(5376, 21504, 62, 32, 16, 128, 1024, query_pre_attn_scalar=168),
    # microsoft/Phi-3-mini-4k-instruct; 3.8B [3,821,079,552]
    "phi-3-mini": _decoder("phi3", 32064, 3072, 8192, 32, 32, 32, 4096, sliding_window=2047),
    # microsoft/Phi-3.5-mini-instruct; 3.8B [3,821,079,552]. Its rope_scaling (longrope, 2 x 48 factors)
    # is left out: it changes neither counts nor memory (a config.json you pass is read in full)
    "phi-3.5-mini": _decoder("phi3", 32064, 3072, 8192, 32, 32, 32, 131072, sliding_window=262144,
                             original_max_position_embeddings=4096),
    # allenai/OLMo-2-1124-7B; 7B (7.30B) [7,298,617,344]
    "olmo-2-7b": _decoder("olmo2", 100352, 4096, 11008, 32, 32, 32, 4096, rope_theta=500000.0),
    # EleutherAI/pythia-{160m,...,12b}; the Pythia README's exact counts, equal to ours
    "pythia-160m": _pythia(50304, 768, 12, 12),        # 162,322,944
    "pythia-410m": _pythia(50304, 1024, 24, 16),       # 405,334,016
    "pythia-1b": _pythia(50304, 2048, 16, 8),          # 1,011,781,632
    "pythia-1.4b": _pythia(50304, 2048, 24, 16),       # 1,414,647,808
    "pythia-2.8b": _pythia(50304, 2560, 32, 32),       # 2,775,208,960
    "pythia-6.9b": _pythia(50432, 4096, 32, 32),       # 6,857,302,016
    "pythia-12b": _pythia(50688, 5120, 36, 40),        # 11,846,072,320
}
