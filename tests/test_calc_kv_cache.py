"""calculators.kv_cache: the KV-cache bytes equal, byte for byte, the storage of the key and value
tensors transformers' generate() holds, for every family (GQA, explicit head_dim, sliding windows)."""
import pytest
import torch
import transformers as tf
from hypothesis import given, settings, strategies as st

from calculators import kv_bytes_per_position, kv_cache_bytes, kv_cache_positions, model_spec

SIZES = dict(vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
             max_position_embeddings=64)
WINDOW = 5
# windows shorter than the prompt + generated tokens below, so sliding layers stop growing
CASES = [
    dict(model_type="gpt2", vocab_size=97, n_embd=48, n_layer=2, n_head=4, n_positions=64),
    dict(model_type="llama", **SIZES, num_key_value_heads=2, head_dim=8),
    dict(model_type="mistral", **SIZES, num_key_value_heads=1, sliding_window=WINDOW),
    dict(model_type="ministral", **SIZES, num_key_value_heads=2, head_dim=12, sliding_window=WINDOW,
         layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"]),
    dict(model_type="qwen2", **SIZES, num_key_value_heads=2, use_sliding_window=True, sliding_window=WINDOW,
         max_window_layers=2),
    dict(model_type="qwen3", **SIZES, num_key_value_heads=2, head_dim=16),
    dict(model_type="gemma2", **SIZES, num_key_value_heads=2, head_dim=16, sliding_window=WINDOW),
    dict(model_type="gemma3_text", **SIZES, num_key_value_heads=1, head_dim=24, sliding_window=WINDOW,
         sliding_window_pattern=3),
    dict(model_type="phi3", **SIZES, num_key_value_heads=2, sliding_window=WINDOW),
    dict(model_type="olmo2", **SIZES, num_key_value_heads=2),
    dict(model_type="olmo3", **SIZES, num_key_value_heads=2, sliding_window=WINDOW),
    dict(model_type="gpt_neox", **SIZES),
    dict(model_type="mixtral", **SIZES, num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2,
         sliding_window=WINDOW),
    dict(model_type="qwen2_moe", **SIZES, num_key_value_heads=2, num_experts=3, num_experts_per_tok=2,
         moe_intermediate_size=16, shared_expert_intermediate_size=16, use_sliding_window=True,
         sliding_window=WINDOW, max_window_layers=3),
    dict(model_type="qwen3_moe", **SIZES, num_key_value_heads=2, head_dim=16, num_experts=3, num_experts_per_tok=2,
         moe_intermediate_size=16, use_sliding_window=True, sliding_window=WINDOW),
]


def tiny_model(config: dict, dtype=torch.float32):
    torch.manual_seed(0)
    hf = tf.AutoConfig.for_model(**{"pad_token_id": None, "bos_token_id": 0, "eos_token_id": 0, **config})
    return tf.AutoModelForCausalLM.from_config(hf, dtype=dtype).eval()


def cache_storage_bytes(cache) -> int:
    """Bytes of the storages the cache's key and value tensors keep alive (a view pins its whole base)."""
    return sum(t.untyped_storage().nbytes() for layer in cache.layers for t in (layer.keys, layer.values))


def generate_cache(model, batch: int, prompt: int, new_tokens: int):
    ids = torch.randint(1, 97, (batch, prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             return_dict_in_generate=True)
    return out.cache


@pytest.mark.interop
@pytest.mark.parametrize("config", CASES, ids=lambda c: c["model_type"])
@pytest.mark.parametrize("batch,prompt,new_tokens", [(2, 7, 6), (1, 3, 2)])
def test_kv_cache_bytes_exact_vs_transformers_generate(config, batch, prompt, new_tokens):
    cache = generate_cache(tiny_model(config), batch, prompt, new_tokens)
    positions = prompt + new_tokens - 1  # the last generated token is never fed back
    spec = model_spec(config)
    assert kv_cache_bytes(spec, batch, positions, dtype_bytes=4) == cache_storage_bytes(cache)
    # each layer: its positions, a sliding layer's visible keys being the last window - 1 of them
    visible = [n - 1 if t == "sliding_attention" and positions >= spec.sliding_window else n
               for n, t in zip(kv_cache_positions(spec, positions), spec.layer_types)]
    assert [layer.keys.shape[-2] for layer in cache.layers] == visible
    assert kv_cache_positions(spec, positions) == [
        t.untyped_storage().nbytes() // (batch * spec.num_kv_heads * spec.head_dim * 4)
        for t in (layer.keys for layer in cache.layers)]


@pytest.mark.interop
def test_kv_cache_bytes_exact_in_bf16_with_gqa_and_an_explicit_head_dim():
    config = dict(model_type="gemma3_text", **SIZES, num_key_value_heads=2, head_dim=32, sliding_window=WINDOW)
    cache = generate_cache(tiny_model(config, torch.bfloat16), 3, 6, 5)
    assert kv_cache_bytes(model_spec(config), 3, 10, dtype_bytes=2) == cache_storage_bytes(cache)


@pytest.mark.interop
def test_after_a_long_prefill_a_sliding_layer_still_pins_the_whole_prompt():
    # the documented exception: the kept window - 1 positions are a view of the prefill's keys
    config = CASES[2]  # mistral, every layer slides
    model, prompt = tiny_model(config), 3 * WINDOW
    with torch.no_grad():
        out = model(torch.randint(1, 97, (1, prompt)), use_cache=True)
    spec = model_spec(config)
    assert all(layer.keys.shape[-2] == WINDOW - 1 for layer in out.cache.layers)
    assert cache_storage_bytes(out.cache) == spec.num_layers * prompt * kv_bytes_per_position(spec, 4)
    assert kv_cache_bytes(spec, 1, prompt, 4) == spec.num_layers * WINDOW * kv_bytes_per_position(spec, 4)


@settings(max_examples=20)
@given(positions=st.integers(0, 10_000), window=st.integers(1, 4096), batch=st.integers(1, 8),
       dtype_bytes=st.sampled_from([1, 2, 4]))
def test_sliding_layers_stop_growing_at_their_window(positions, window, batch, dtype_bytes):
    spec = model_spec({**dict(model_type="gemma2", **SIZES, head_dim=16), "sliding_window": window})
    per_layer = batch * kv_bytes_per_position(spec, dtype_bytes)
    sliding, full = spec.sliding_layers, spec.num_layers - spec.sliding_layers
    assert (sliding, full) == (2, 2)  # gemma 2 alternates, starting with a sliding layer
    assert kv_cache_bytes(spec, batch, positions, dtype_bytes) == per_layer * (
        sliding * min(positions, window) + full * positions)


def test_gqa_and_head_dim_set_the_bytes_per_position():
    nemo = model_spec("mistral-nemo")  # 8 KV heads of 128 (not 32 heads of 5120 / 32 = 160)
    assert kv_bytes_per_position(nemo, 2) == 2 * 8 * 128 * 2
    assert kv_cache_bytes(nemo, 1, 1000, 2) == 40 * 1000 * 2 * 8 * 128 * 2


@pytest.mark.parametrize("kwargs,message", [
    (dict(batch=0, positions=8), "batch must be an integer >= 1, got 0"),
    (dict(batch=1, positions=-1), "positions must be an integer >= 0, got -1"),
    (dict(batch=1, positions=2.5), "positions must be an integer >= 0, got 2.5"),
    (dict(batch=1, positions=8, dtype_bytes=0), "dtype_bytes must be an integer >= 1, got 0"),
])
def test_bad_kv_cache_inputs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        kv_cache_bytes(model_spec("gpt2"), **kwargs)


# inference_memory's KV cache: GQA (one and two kv heads), explicit head_dims, sliding windows shorter than
# the prompt (every layer, alternating, from max_window_layers on), MLA's latent; prompt 7 > window 5
INFERENCE = [CASES[1], CASES[2], CASES[4], CASES[6], CASES[7], CASES[0],
             dict(model_type="deepseek_v3", vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, moe_intermediate_size=16, n_routed_experts=4,
                  num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16,
                  q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10, max_position_embeddings=64)]


@pytest.mark.interop
@pytest.mark.parametrize("config", INFERENCE, ids=lambda c: c["model_type"])
def test_inference_kv_cache_term_exact_vs_transformers_generate_and_reference_models_cache(config):
    from calculators import inference_memory
    from reference_models import from_hf_config

    batch, prompt, new_tokens = 2, 7, 6
    terms = {t.name: t.gpu for t in inference_memory(model_spec(config), batch=batch, prompt=prompt,
                                                     new_tokens=new_tokens, dtype="fp32").terms}
    hf = tiny_model(config)
    assert terms["KV cache"] == cache_storage_bytes(generate_cache(hf, batch, prompt, new_tokens))
    if config["model_type"] == "deepseek_v3":   # no reference model
        return
    ours = from_hf_config(hf.config.to_dict()).eval()
    cache = ours.new_cache(batch, prompt + new_tokens - 1)   # what ours.generate allocates
    ids = torch.randint(1, 97, (batch, prompt), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours(ids, kv_cache=cache)   # the prefill: sliding layers pin the whole prompt's keys until the next step
        assert cache.nbytes() == terms["KV cache"] + terms.get("prompt keys of sliding layers", 0)
        for _ in range(new_tokens - 1):
            ours(ids[:, :1], kv_cache=cache)
    assert cache.nbytes() == terms["KV cache"]
    if any(t == "sliding_attention" for t in model_spec(config).layer_types):
        assert terms["prompt keys of sliding layers"] > 0
