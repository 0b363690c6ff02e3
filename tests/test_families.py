"""Each decoder family against transformers, where what makes it different bites.

tests/test_reference_models.py runs the shared checks (logits, bf16, greedy generation, loss,
eager vs SDPA, sharded files, save -> transformers) on every family of tests/hf_factories.py. Here:
bit-identical logits per family (the same ops in the same order), random shapes (odd head counts,
GQA, explicit head_dim, tied heads), every rope_type, sliding windows (which layers, the window
in generation, what the KV cache keeps), config.json in transformers 4.x's spelling, and the one-
line refusals. Each feature is also switched off to show that the equality checks would see it.
"""
import dataclasses
import json

import pytest
import torch
import transformers as tf
from hf_factories import FAMILIES, assert_training_gradients_equal, save_tiny
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_models import config_from_hf, load_pretrained, save_pretrained

DECODERS = [f for f in FAMILIES if f != "gpt2"]
HF_ATTN = {"gemma2": "eager"}  # transformers runs Gemma 2 eager only (SDPA has no soft-capping)


def ids(batch=2, seq=17, vocab=128, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def twins(family, folder, dtype=torch.float32, impl="sdpa", **overrides):
    """The same tiny checkpoint in transformers and in ours."""
    save_tiny(family, folder, **overrides)
    hf = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=HF_ATTN.get(family, impl))
    return hf.eval(), load_pretrained(folder, dtype=dtype, attn_impl=impl)


def logits_of(model, x):
    with torch.no_grad():
        out = model(x)
    return out if torch.is_tensor(out) else out.logits


def hf_greedy(hf, prompt, n):
    return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0,
                       eos_token_id=None, attention_mask=torch.ones_like(prompt))


def rebuilt(model, **changes):
    """Our model again with some config fields changed and the same weights."""
    config = dataclasses.replace(model.config, **changes)
    other = type(model)(config)
    other.load_state_dict(model.state_dict())
    return other.eval()


@pytest.mark.parametrize("dtype,impl", [(torch.float32, "sdpa"), (torch.bfloat16, "sdpa"),
                                        (torch.float32, "eager"), (torch.bfloat16, "eager")])
@pytest.mark.parametrize("family", DECODERS)
def test_logits_bit_identical_to_transformers(family, dtype, impl, tmp_path):
    # each family runs transformers' ops in transformers' order: norms and their roundings, RoPE
    # angles in fp32, fp32 rotation (OLMo 2), soft-caps, q/k norms, fused splits
    hf, ours = twins(family, tmp_path, dtype=dtype, impl=impl)
    x = ids()
    assert torch.equal(logits_of(ours, x), logits_of(hf, x))


@pytest.mark.parametrize("family", DECODERS)
def test_full_fine_tuning_gradients_equal_transformers(family, tmp_path):
    # every parameter's gradient of the same loss, by name (our names are transformers')
    hf, ours = twins(family, tmp_path)
    assert_training_gradients_equal(hf, ours, ids())


@st.composite
def shapes(draw, family):
    heads = draw(st.sampled_from([1, 2, 3, 6]))  # hidden 24: head_dim 24, 12, 8, 4
    kv = heads // draw(st.sampled_from([g for g in (1, 2, 3, 6) if heads % g == 0]))
    kw = dict(hidden_size=24, num_attention_heads=heads, num_hidden_layers=draw(st.integers(1, 3)),
              tie_word_embeddings=draw(st.booleans()))
    if family == "gpt_neox":
        kw.update(use_parallel_residual=draw(st.booleans()))
    else:
        kw.update(num_key_value_heads=kv)
        head_dim = draw(st.sampled_from([None, 6, 10]))
        if head_dim or family.startswith("gemma"):  # Gemma's default head_dim is 256
            kw.update(head_dim=head_dim or 8)
    return kw, draw(st.integers(1, 12))


@pytest.mark.parametrize("family", DECODERS)
@settings(max_examples=3)
@given(data=st.data())
def test_random_shapes_bit_identical_and_saved_back_for_transformers(tmp_path_factory, family, data):
    # odd head counts, GQA and MQA, explicit head_dim, tied and untied heads, 1-3 layers
    overrides, seq = data.draw(shapes(family))
    folder = tmp_path_factory.mktemp("shape")
    hf, ours = twins(family, folder / "hf", **overrides)
    assert (ours.lm_head.weight is ours.get_input_embeddings().weight) == overrides["tie_word_embeddings"]
    x = ids(batch=2, seq=seq)
    assert torch.equal(logits_of(ours, x), logits_of(hf, x))
    save_pretrained(ours, folder / "ours")
    back = tf.AutoModelForCausalLM.from_pretrained(folder / "ours", attn_implementation=HF_ATTN.get(family, "sdpa"))
    assert torch.equal(logits_of(back.eval(), x), logits_of(hf, x))


ROPE = {
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 3.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 16.0, "beta_slow": 2.0},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8},
    "longrope": {"short_factor": [1.0 + i / 8 for i in range(4)], "long_factor": [2.0 + i / 2 for i in range(4)],
                 "original_max_position_embeddings": 8},
}
ROPE_CASES = [("llama", t) for t in ROPE] + [
    ("mistral", "dynamic"), ("qwen2", "llama3"), ("qwen3", "yarn"), ("gemma2", "linear"), ("gemma3_text", "linear"),
    ("phi3", "longrope"), ("olmo2", "yarn"), ("gpt_neox", "dynamic")]


def rope_overrides(family, rope_type):
    params = {"rope_type": rope_type, "rope_theta": 500.0, **ROPE[rope_type]}
    kw = dict(max_position_embeddings=16)
    if family == "gpt_neox":  # head_dim 8, half of it rotated: 2 frequencies
        params.update(partial_rotary_factor=0.5)
    elif family == "phi3":  # Phi-4-mini's layout: longrope on half of each head, the switch at 8 positions
        params.update(partial_rotary_factor=0.5, short_factor=[1.0, 1.5], long_factor=[2.0, 3.0])
        kw.update(original_max_position_embeddings=8)
    if family == "gemma3_text":  # scaling on the global layers; the sliding ones keep plain RoPE
        params = {"full_attention": params, "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}
    return dict(kw, rope_parameters=params)


@pytest.mark.parametrize("family,rope_type", ROPE_CASES)
def test_rope_scaling_logits_and_generation_equal_transformers(family, rope_type, tmp_path):
    # 6 + 14 tokens pass max_position_embeddings (16) and the original 8: dynamic grows its base
    # step by step, longrope switches to its long factors (Phi-3 then recomputes the cache)
    hf, ours = twins(family, tmp_path / "hf", **rope_overrides(family, rope_type))
    assert ours.config.rope_scaling["rope_type"] == rope_type
    x = ids(seq=20)
    assert torch.equal(logits_of(ours, x), logits_of(hf, x))
    prompt = ids(seq=6, seed=1)
    assert torch.equal(ours.generate(prompt, 14, temperature=0), hf_greedy(hf, prompt, 14))
    assert not torch.equal(logits_of(rebuilt(ours, rope_scaling=None), x), logits_of(ours, x))
    save_pretrained(ours, tmp_path / "ours")
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation=HF_ATTN.get(family, "sdpa"))
    assert torch.equal(logits_of(back.eval(), x), logits_of(hf, x))


SLIDING = {
    "mistral": dict(sliding_window=4),
    "phi3": dict(sliding_window=4),
    "qwen2": dict(use_sliding_window=True, max_window_layers=1, sliding_window=4),
    "qwen3": dict(use_sliding_window=True, max_window_layers=1, sliding_window=4),
    "gemma2": dict(sliding_window=4),
    "gemma3_text": dict(sliding_window=4, num_hidden_layers=3, sliding_window_pattern=3),
}


@pytest.mark.parametrize("family", SLIDING)
def test_sliding_window_layers_generation_and_cache_equal_transformers(family, tmp_path):
    hf, ours = twins(family, tmp_path, **SLIDING[family])
    n = hf.config.num_hidden_layers  # Mistral and Phi-3 have no layer_types: their window is on every layer
    assert ours.config.layer_types == list(getattr(hf.config, "layer_types", None) or ["sliding_attention"] * n)
    assert "sliding_attention" in ours.config.layer_types
    x = ids()
    assert torch.equal(logits_of(ours, x), logits_of(hf, x))
    no_window = rebuilt(ours, sliding_window=None, layer_types=None)
    assert (logits_of(no_window, x) - logits_of(ours, x)).abs().max() > 1e-4  # the window bites
    prompt = ids(seq=6, seed=1)
    assert torch.equal(ours.generate(prompt, 12, temperature=0), hf_greedy(hf, prompt, 12))
    # after a prompt of 9 both caches hold 9 positions on full layers and window - 1 = 3 on sliding ones
    cache = ours.new_cache(2, 9)
    with torch.no_grad():
        ours(x[:, :9], kv_cache=cache)
        theirs = hf(x[:, :9], use_cache=True).cache
    assert [k.shape[2] for k in cache.k] == [layer.keys.shape[2] for layer in theirs.layers]
    for kind, k in zip(ours.config.layer_types, cache.k):
        assert k.shape[2] == (3 if kind == "sliding_attention" else 9)


def test_sliding_cache_stops_growing_at_the_window(tmp_path):
    _, ours = twins("gemma2", tmp_path, sliding_window=4)  # layer 0 slides, layer 1 attends fully
    cache = ours.new_cache(1, 40)
    kept, held = [], []
    with torch.no_grad():
        for token in ids(batch=1, seq=40).split(1, dim=1):
            ours(token, kv_cache=cache)
            kept.append(cache.k[0].shape[2])
            held.append(cache.k[0].untyped_storage().nbytes() // cache.k[0][:, :, :1].nbytes)
    assert kept[:3] == [1, 2, 3] and set(kept[3:]) == {3}  # window - 1 positions visible to the next query
    assert held[:4] == [1, 2, 3, 4] and set(held[4:]) == {4}  # in storage, as transformers: the window
    assert cache.k[1].shape[2] == 40


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "gemma2", "gemma3_text", "phi3", "gpt_neox"])
@pytest.mark.parametrize("prompt", [3, 9])
def test_kv_cache_bytes_equal_the_calculator(family, prompt, tmp_path):
    # calculators.kv_cache_bytes counts what transformers' DynamicCache holds once generate(prompt, n)
    # has run its prompt + n - 1 positions: every position on full layers, the window on sliding
    # ones. Ours holds the same then (full layers are preallocated for exactly those positions).
    from calculators import kv_cache_bytes, model_spec

    _, ours = twins(family, tmp_path, **SLIDING.get(family, {}))
    spec = model_spec(ours.config.to_hf_dict())
    x, n = ids(batch=2, seq=prompt + 6), 7
    cache = ours.new_cache(2, prompt + n - 1)  # what generate allocates
    with torch.no_grad():
        ours(x[:, :prompt], kv_cache=cache)
        for step in range(prompt, prompt + n - 1):
            ours(x[:, step:step + 1], kv_cache=cache)
    assert cache.nbytes() == kv_cache_bytes(spec, 2, prompt + n - 1, dtype_bytes=4)


SOFT_CAPS = [("gemma2", "attn_logit_softcapping"), ("gemma2", "final_logit_softcapping"),
             ("gemma2", "query_pre_attn_scalar"), ("gemma3_text", "final_logit_softcapping"),
             ("gemma3_text", "rope_local_base_freq")]


@pytest.mark.parametrize("family,field", SOFT_CAPS)
def test_gemma_specific_fields_change_the_logits(family, field, tmp_path):
    # equality with transformers means something only if each field bites at the tiny sizes
    _, ours = twins(family, tmp_path)
    assert getattr(ours.config, field) is not None
    x = ids()
    assert (logits_of(rebuilt(ours, **{field: None}), x) - logits_of(ours, x)).abs().max() > 1e-4


TRANSFORMERS_4_SPELLING = {
    # config.json keys as transformers 4.x wrote them, replacing 5.x's rope_parameters / layer_types
    "llama": {"rope_theta": 500.0, "rope_scaling": {"type": "linear", "factor": 2.0}},
    "gemma3_text": {"rope_theta": 1000.0, "rope_local_base_freq": 50.0, "sliding_window_pattern": 2,
                    "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "phi3": {"rope_theta": 500.0, "original_max_position_embeddings": 8, "partial_rotary_factor": 0.5,
             "rope_scaling": {"type": "longrope", "short_factor": [1.0, 1.5], "long_factor": [3.0, 3.5]}},
    "gpt_neox": {"rotary_emb_base": 300.0, "rotary_pct": 1.0},
    "qwen2": {"rope_theta": 800.0, "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
}


@pytest.mark.parametrize("family", TRANSFORMERS_4_SPELLING)
def test_transformers_4_config_json_reads_as_transformers_5_reads_it(family, tmp_path):
    save_tiny(family, tmp_path)
    path = tmp_path / "config.json"
    d = {k: v for k, v in json.loads(path.read_text()).items()
         if k not in ("rope_parameters", "layer_types", "_sliding_window_pattern")}
    path.write_text(json.dumps({**d, **TRANSFORMERS_4_SPELLING[family]}))
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = load_pretrained(tmp_path)
    x = ids(seq=12)
    assert torch.equal(logits_of(ours, x), logits_of(hf, x))
    assert torch.equal(ours.generate(ids(seq=5), 12, temperature=0), hf_greedy(hf, ids(seq=5), 12))


BASE = {"hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 2}
REFUSED = [
    ({"model_type": "llama", "rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4}},
     r"rope_type 'proportional' is not supported; supported: \['default', 'linear'"),
    ({"model_type": "llama", "rope_scaling": {"type": "yarn"}}, r"rope_type 'yarn' needs \['factor'\]"),
    ({"model_type": "llama", "partial_rotary_factor": 0.5},
     r"partial_rotary_factor=0.5 \(LlamaForCausalLM rotates whole heads"),
    ({"model_type": "phi3", "rope_scaling": {"type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
      "original_max_position_embeddings": 8}, r"short_factor has 1 entries, the rotated dimensions need 4"),
    ({"model_type": "phi3", "resid_pdrop": 0.1}, r"resid_pdrop=0.1 \(residual and embedding dropout"),
    ({"model_type": "phi3", "embd_pdrop": 0.1}, r"embd_pdrop=0.1"),
    ({"model_type": "gemma2", "use_bidirectional_attention": True}, r"use_bidirectional_attention=True"),
    ({"model_type": "gemma3_text", "attn_logit_softcapping": 50.0},
     r"attn_logit_softcapping=50.0 \(transformers' Gemma 3 does not apply it"),
    ({"model_type": "gemma3_text", "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     r"rope_parameters.sliding_attention.rope_type='linear'"),
    ({"model_type": "deepseek_v3"}, r"unknown model_type 'deepseek_v3'; supported: \['gpt2', 'gpt_neox', 'llama'"),
    ({"model_type": "gpt_neox", "rotary_pct": 0.2}, r"partial_rotary_factor 0.2 rotates 1 of head_dim 8"),
]


@pytest.mark.parametrize("config,message", REFUSED)
def test_unsupported_features_are_refused_in_one_line_naming_field_and_value(config, message):
    with pytest.raises(ValueError, match=message) as err:
        config_from_hf({**BASE, **config})
    assert "\n" not in str(err.value)


def test_gpt_neox_checkpoint_keys_as_pythia_ships_them(tmp_path):
    # Pythia's files: the head as embed_out, and buffers that are not weights (the causal mask
    # attention.bias, attention.masked_bias, rotary inv_freq); we write what transformers 5 writes
    from safetensors.torch import load_file, save_file

    hf = save_tiny("gpt_neox", tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    weights = load_file(path)
    assert "embed_out.weight" in weights and "lm_head.weight" not in weights
    buffers = {}
    for i in range(2):
        prefix = f"gpt_neox.layers.{i}.attention."
        buffers.update({prefix + "bias": torch.ones(1, 1, 64, 64, dtype=torch.bool),
                        prefix + "masked_bias": torch.tensor(-1e9), prefix + "rotary_emb.inv_freq": torch.ones(2)})
    save_file({**weights, **buffers}, path)
    ours = load_pretrained(tmp_path / "hf")
    assert torch.equal(logits_of(ours, ids()), logits_of(hf, ids()))
    save_pretrained(ours, tmp_path / "ours")
    assert set(load_file(tmp_path / "ours" / "model.safetensors")) == set(weights)
