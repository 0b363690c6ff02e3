"""calculators.models / parameters / lora: exact parameter counts and names against transformers
(meta device), configs read as transformers reads them, LoRA trainable counts against peft's
get_nb_trainable_parameters."""
import json
import re

import pytest
import torch
import transformers as tf
from hypothesis import given, settings, strategies as st

from calculators import (FAMILIES, PRESETS, ConfigError, count_parameters, lora_trainable_parameters, model_spec,
                         parameter_tensors, parse_targets)


def _hf_config(config: dict):
    # small vocabularies: keep the special-token ids inside them (phi3's default pad id is 32000)
    return tf.AutoConfig.for_model(**{"pad_token_id": None, "bos_token_id": 0, "eos_token_id": 0, **config})


def hf_meta_model(config: dict):
    with torch.device("meta"):
        return tf.AutoModelForCausalLM.from_config(_hf_config(config))


def hf_count(config: dict) -> int:
    return sum(p.numel() for p in hf_meta_model(config).parameters())


def hf_shapes(config: dict) -> dict:
    return {name: tuple(p.shape) for name, p in hf_meta_model(config).named_parameters()}


def our_shapes(config: dict) -> dict:
    spec = model_spec(config)
    # transformers' GPT-2 Conv1D weights are (in, out); we list nn.Linear's (out, in), as reference_models' GPT-2
    conv1d = spec.family == "gpt2"
    return {t.name: t.shape[::-1] if conv1d and t.kind == "linear" else t.shape for t in parameter_tensors(spec)}


def peft_trainable(config: dict, rank: int, targets) -> int:
    import peft
    model = hf_meta_model(config)
    with torch.device("meta"):
        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, target_modules=targets))
    return model.get_nb_trainable_parameters()[0]


SMALL = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4)
THREE = {**SMALL, "num_hidden_layers": 3}
FAMILY_CONFIGS = [
    dict(model_type="gpt2", vocab_size=97, n_positions=40, n_embd=48, n_layer=2, n_head=4),
    dict(model_type="gpt2", vocab_size=97, n_positions=40, n_embd=48, n_layer=3, n_head=4, n_inner=72,
         tie_word_embeddings=False),
    dict(model_type="llama", **SMALL),
    dict(model_type="llama", **SMALL, num_key_value_heads=2, head_dim=16, attention_bias=True, mlp_bias=True,
         tie_word_embeddings=True),
    dict(model_type="llama", **SMALL, num_key_value_heads=1, rope_theta=500000.0,
         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                           original_max_position_embeddings=1024)),
    dict(model_type="granite", **SMALL, num_key_value_heads=2, attention_bias=True, mlp_bias=True),
    dict(model_type="mistral", **SMALL, num_key_value_heads=1),
    dict(model_type="mistral", **SMALL, num_key_value_heads=2, head_dim=8, sliding_window=None),
    dict(model_type="ministral", **THREE, num_key_value_heads=2, head_dim=12, sliding_window=8,
         layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    dict(model_type="mixtral", **SMALL, num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2),
    dict(model_type="qwen2_moe", **THREE, num_key_value_heads=2, num_experts=5, num_experts_per_tok=2,
         moe_intermediate_size=24, shared_expert_intermediate_size=40, mlp_only_layers=[1]),
    dict(model_type="qwen2_moe", **SMALL, num_key_value_heads=4, num_experts=3, num_experts_per_tok=3, moe_intermediate_size=16,
         shared_expert_intermediate_size=8, qkv_bias=False, tie_word_embeddings=True),
    dict(model_type="qwen3_moe", **THREE, num_key_value_heads=2, head_dim=16, num_experts=6, num_experts_per_tok=2,
         moe_intermediate_size=24, decoder_sparse_step=2, attention_bias=True),
    dict(model_type="deepseek_v3", **THREE, num_key_value_heads=4, moe_intermediate_size=24, n_routed_experts=8,
         num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
         qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10, n_group=2, topk_group=1),
    dict(model_type="deepseek_v3", **SMALL, num_key_value_heads=4, moe_intermediate_size=24, n_routed_experts=4,
         num_experts_per_tok=1, n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None,
         qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10, n_group=1, topk_group=1, attention_bias=True),
    dict(model_type="qwen2", **SMALL, num_key_value_heads=2),
    dict(model_type="qwen2", **THREE, num_key_value_heads=4, tie_word_embeddings=True, use_sliding_window=True,
         sliding_window=8, max_window_layers=1),
    dict(model_type="qwen3", **SMALL, num_key_value_heads=2),
    dict(model_type="qwen3", **THREE, num_key_value_heads=1, head_dim=20, attention_bias=True, tie_word_embeddings=True,
         use_sliding_window=True, sliding_window=8, max_window_layers=2),
    dict(model_type="gemma", **SMALL, num_key_value_heads=1, head_dim=24),
    dict(model_type="gemma", **SMALL, num_key_value_heads=4, head_dim=12, tie_word_embeddings=False,
         attention_bias=True),
    dict(model_type="gemma2", **SMALL, num_key_value_heads=2, head_dim=32),
    dict(model_type="gemma2", **SMALL, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
    dict(model_type="gemma3_text", **SMALL, num_key_value_heads=1, head_dim=24, sliding_window=8),
    dict(model_type="gemma3_text", **THREE, num_key_value_heads=2, head_dim=16, attention_bias=True,
         tie_word_embeddings=False, sliding_window_pattern=2, rope_scaling=dict(rope_type="linear", factor=8.0)),
    dict(model_type="phi3", **SMALL, num_key_value_heads=2),
    dict(model_type="phi3", **SMALL, tie_word_embeddings=True, head_dim=16, sliding_window=8),
    dict(model_type="olmo2", **SMALL, num_key_value_heads=2),
    dict(model_type="olmo2", **SMALL, attention_bias=True, tie_word_embeddings=True),
    dict(model_type="olmo3", **{**SMALL, "num_hidden_layers": 5}, num_key_value_heads=2, sliding_window=8),
    dict(model_type="gpt_neox", **SMALL),
    dict(model_type="gpt_neox", **SMALL, use_parallel_residual=False, attention_bias=False, rotary_pct=0.5,
         tie_word_embeddings=True),
]


@pytest.mark.interop
@pytest.mark.parametrize("config", FAMILY_CONFIGS, ids=lambda c: c["model_type"])
def test_parameter_names_shapes_and_count_exact_vs_transformers(config):
    assert our_shapes(config) == hf_shapes(config)
    assert count_parameters(model_spec(config)) == hf_count(config)


def test_every_family_is_tested():
    assert {c["model_type"] for c in FAMILY_CONFIGS} == set(FAMILIES)


@pytest.mark.interop
@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_count_exact_vs_transformers(name):
    assert count_parameters(model_spec(name)) == hf_count(PRESETS[name])


def test_presets_match_published_counts():
    # REFERENCE.md section 2: the totals peft prints for these published configs
    assert count_parameters(model_spec("llama-2-7b")) == 6_738_415_616
    assert count_parameters(model_spec("llama-3-8b")) == 8_030_261_248
    assert count_parameters(model_spec("mistral-7b")) == 7_241_732_096
    # the Pythia README's table (EleutherAI/pythia), exact
    pythia = {"160m": 162_322_944, "410m": 405_334_016, "1b": 1_011_781_632, "1.4b": 1_414_647_808,
              "2.8b": 2_775_208_960, "6.9b": 6_857_302_016, "12b": 11_846_072_320}
    assert {k: count_parameters(model_spec(f"pythia-{k}")) for k in pythia} == pythia
    # Gemma 2 report, table 1: non-embedding parameters, exact (its embedding rows are 256,128, not 256,000)
    gemma2 = {"2b": 2_024_517_888, "9b": 8_324_201_984, "27b": 26_047_480_320}
    assert {k: _non_embedding(f"gemma-2-{k}") for k in gemma2} == gemma2


def _non_embedding(name: str) -> int:
    spec = model_spec(name)
    return count_parameters(spec) - spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)


# What the model cards and reports state, to the precision they state it: (total or non-embedding, value, unit)
PUBLISHED = {
    "llama-3.2-1b": ("total", 1.23e9, 1e7), "llama-3.2-3b": ("total", 3.21e9, 1e7),
    "qwen3-0.6b": ("non-embedding", 0.44e9, 1e7), "qwen3-1.7b": ("non-embedding", 1.4e9, 1e8),
    "qwen3-4b": ("total", 4.0e9, 1e8), "qwen3-8b": ("non-embedding", 6.95e9, 1e7),
    "qwen3-14b": ("non-embedding", 13.2e9, 1e8), "qwen3-32b": ("non-embedding", 31.2e9, 1e8),
    "gemma-3-1b": ("non-embedding", 698e6, 1e6), "gemma-3-4b": ("non-embedding", 3209e6, 1e6),
    "gemma-3-12b": ("non-embedding", 10759e6, 1e6), "gemma-3-27b": ("non-embedding", 25600e6, 1e6),
    "phi-3.5-mini": ("total", 3.8e9, 1e8), "olmo-2-7b": ("total", 7.3e9, 1e8), "mistral-nemo": ("total", 12.2e9, 1e8),
    "smollm2-135m": ("total", 135e6, 1e6), "smollm2-1.7b": ("total", 1.7e9, 1e8),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_presets_agree_with_published_counts_to_their_precision(name):
    kind, value, unit = PUBLISHED[name]
    count = count_parameters(model_spec(name)) if kind == "total" else _non_embedding(name)
    assert abs(count - value) < unit, f"{name}: {count:,} vs published {value:,.0f} ({kind})"


@settings(max_examples=12)
@given(family=st.sampled_from(["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2",
                               "gpt_neox", "granite", "ministral", "olmo3"]),
       layers=st.integers(1, 3), heads=st.sampled_from([2, 4]), kv_div=st.sampled_from([1, 2]),
       head_dim=st.sampled_from([None, 8, 20]), tie=st.booleans())
@pytest.mark.interop
def test_parameter_count_exact_property(family, layers, heads, kv_div, head_dim, tie):
    config = dict(model_type=family, vocab_size=53, hidden_size=40, intermediate_size=24,
                  num_hidden_layers=layers, num_attention_heads=heads, tie_word_embeddings=tie)
    if family != "gpt_neox":  # GPT-NeoX has neither GQA nor its own head_dim
        config["num_key_value_heads"] = heads // kv_div
        if head_dim is not None:
            config["head_dim"] = head_dim
        elif family in ("gemma2", "gemma3_text", "qwen3", "ministral"):  # defaults 256 / 128 / none (MinistralConfig)
            config["head_dim"] = 40 // heads
    assert count_parameters(model_spec(config)) == hf_count(config)


LORA_CASES = [
    ("gpt2", 8, ["c_attn"]),
    ("gpt2", 8, ["c_attn", "c_proj"]),
    ("gpt2", 4, "all-linear"),
    ("gpt2", 4, r"transformer\.h\.(0|5)\.mlp\.c_fc"),
    ("llama-2-7b", 8, ["q_proj", "v_proj"]),
    ("llama-2-7b", 16, ["q_proj", "v_proj"]),
    ("llama-3-8b", 16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("llama-3-8b", 64, "all-linear"),
    ("llama-3-8b", 8, ["self_attn.o_proj", "model.layers.3.mlp.down_proj"]),
    ("llama-3.2-1b", 16, "all-linear"),
    ("smollm2-135m", 8, None),
    ("mistral-7b", 16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("mistral-nemo", 8, ["q_proj", "o_proj"]),
    ("mixtral-8x7b", 8, "all-linear"),
    ("mixtral-8x7b", 4, ["q_proj", "w2", "w1", "w3"]),
    ("mixtral-8x7b", 4, r".*experts\.w[13]"),
    ("qwen2.5-7b", 8, r".*\.(q|v)_proj"),
    ("qwen3-0.6b", 8, None),
    ("qwen3-0.6b", 16, "all-linear"),
    ("qwen3-8b", 8, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("gemma-2-9b", 16, "all-linear"),
    ("gemma-2-2b", 4, ["down_proj"]),
    ("gemma-3-1b", 8, None),
    ("gemma-3-4b", 8, r".*self_attn\.(q|k)_proj"),
    ("phi-3-mini", 8, ["qkv_proj", "gate_up_proj"]),
    ("phi-3.5-mini", 16, "all-linear"),
    ("olmo-2-7b", 8, "all-linear"),
    ("pythia-160m", 8, None),
    ("pythia-160m", 4, "all-linear"),
    ("pythia-410m", 8, ["dense"]),
    ("pythia-1b", 8, r".*mlp\.dense_.*"),
]


@pytest.mark.interop
@pytest.mark.parametrize("name,rank,targets", LORA_CASES, ids=lambda v: str(v)[:24])
def test_lora_trainable_exact_vs_peft(name, rank, targets):
    spec = model_spec(name)
    assert lora_trainable_parameters(spec, rank, targets) == peft_trainable(PRESETS[name], rank, targets)


@pytest.mark.interop
@pytest.mark.parametrize("config", [c for c in FAMILY_CONFIGS
                                    if c["model_type"] in ("gemma", "granite", "ministral", "olmo3")],
                         ids=lambda c: c["model_type"])
def test_lora_all_linear_exact_vs_peft_for_families_without_presets(config):
    assert lora_trainable_parameters(model_spec(config), 4, "all-linear") == peft_trainable(config, 4, "all-linear")


def test_lora_counts_reference_numbers():
    # what peft prints today (REFERENCE.md section 2); also checked live against peft above
    assert lora_trainable_parameters(model_spec("gpt2"), 8, ["c_attn"]) == 294_912
    assert lora_trainable_parameters(model_spec("llama-3-8b"), 64, "all-linear") == 167_772_160


def test_parse_targets():
    assert parse_targets("q_proj,v_proj") == ["q_proj", "v_proj"]
    assert parse_targets("ALL-LINEAR") == "all-linear"
    assert parse_targets(r".*\.q_proj") == r".*\.q_proj"
    assert parse_targets(None) is None
    with pytest.raises(ValueError, match="not a valid regular expression"):
        parse_targets("(q_proj")


def test_bad_lora_inputs():
    spec = model_spec("gpt2")
    with pytest.raises(ValueError, match=r"rank must be in 1\.\.768 for c_attn \(768 -> 2304\), got 0"):
        lora_trainable_parameters(spec, 0, ["c_attn"])
    with pytest.raises(ValueError, match="rank must be in 1..768"):
        lora_trainable_parameters(spec, 769, ["c_attn"])
    with pytest.raises(ValueError, match="match no linear layer.*c_attn"):
        lora_trainable_parameters(spec, 8, ["q_proj"])
    with pytest.raises(ValueError, match="both w1 and w3"):
        lora_trainable_parameters(model_spec("mixtral-8x7b"), 8, ["w1"])
    with pytest.raises(ValueError, match="match no linear layer.*query_key_value"):
        lora_trainable_parameters(model_spec("pythia-160m"), 8, ["q_proj"])


def test_bad_configs(tmp_path):
    with pytest.raises(ConfigError, match="unknown model 'llama-9b'.*llama-2-7b"):
        model_spec("llama-9b")
    with pytest.raises(ConfigError, match="config file not found"):
        model_spec(str(tmp_path / "nope" / "config.json"))
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read .* as JSON"):
        model_spec(str(tmp_path))
    bad.write_text('{"model_type": "llama", "hidden_size": 64}')
    with pytest.raises(ConfigError, match="missing vocab_size, num_hidden_layers"):
        model_spec(str(bad))
    with pytest.raises(ConfigError, match="model_type must be one of"):
        model_spec({"model_type": "bert"})
    with pytest.raises(ConfigError, match="hidden_size must be a positive integer, got 0"):
        model_spec(dict(model_type="llama", **{**SMALL, "hidden_size": 0}))
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        model_spec(dict(model_type="llama", **SMALL, num_key_value_heads=3))
    with pytest.raises(ConfigError, match=r"missing vocab_size, n_layer"):
        model_spec(dict(model_type="gpt2", n_embd=48, n_head=4))
    with pytest.raises(ConfigError, match=r"n_embd \(50\) must be a multiple of n_head \(4\)"):
        model_spec(dict(model_type="gpt2", vocab_size=97, n_embd=50, n_layer=1, n_head=4))


def test_config_folder_and_file_agree(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["mistral-7b"]))
    assert count_parameters(model_spec(str(tmp_path))) == count_parameters(model_spec("mistral-7b"))
    assert count_parameters(model_spec(str(tmp_path / "config.json"))) == 7_241_732_096


@pytest.mark.parametrize("key,value", [("num_local_experts", -1), ("num_local_experts", 0), ("num_local_experts", "8"),
                                       ("num_experts_per_tok", 2.0), ("num_experts_per_tok", True)])
def test_mixtral_expert_counts_must_be_positive_integers(key, value):
    config = {**PRESETS["mixtral-8x7b"], key: value}
    with pytest.raises(ConfigError, match=f"{key} must be a positive integer, got {re.escape(repr(value))}"):
        model_spec(config)


def test_deeply_nested_config_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="cannot read .* as JSON"):
        model_spec(str(tmp_path))


def test_mixtral_cannot_route_to_more_experts_than_it_has():
    with pytest.raises(ConfigError, match=r"num_experts_per_tok \(9\) must be at most num_local_experts \(8\)"):
        model_spec({**PRESETS["mixtral-8x7b"], "num_experts_per_tok": 9})


# Configs as people bring them: written by transformers 5's config classes (rope_parameters, layer_types)
# or in the hub's older keys (rope_theta, rope_scaling, rotary_pct, rope_local_base_freq, ...).
BASE = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=4,
            max_position_embeddings=64)
LLAMA3 = dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)
CONFIG_CASES = [
    ("llama", dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3)),
    ("llama", dict(rope_scaling=dict(type="dynamic", factor=2.0))),
    ("llama", dict(rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16))),
    ("mistral", dict(num_key_value_heads=2, sliding_window=5)),
    ("ministral", dict(num_key_value_heads=2, head_dim=12, sliding_window=5,
                       layer_types=["sliding_attention", "full_attention"] * 2)),
    ("qwen2", dict(num_key_value_heads=2, use_sliding_window=True, sliding_window=5, max_window_layers=2)),
    ("qwen3", dict(num_key_value_heads=1, use_sliding_window=True, sliding_window=5, max_window_layers=1,
                   rope_scaling=dict(rope_type="linear", factor=2.0))),
    ("gemma2", dict(head_dim=12, sliding_window=5)),
    ("gemma3_text", dict(head_dim=12, sliding_window=5, sliding_window_pattern=3, rope_theta=20000.0,
                         rope_local_base_freq=500.0, rope_scaling=dict(rope_type="linear", factor=8.0))),
    ("phi3", dict(num_key_value_heads=2, sliding_window=5, partial_rotary_factor=0.5)),
    ("phi3", dict(rope_scaling=dict(type="su", short_factor=[1.0] * 6, long_factor=[2.0] * 6,
                                    original_max_position_embeddings=16))),
    ("olmo2", dict(num_key_value_heads=2, rope_theta=500000.0)),
    ("olmo3", dict(sliding_window=5)),
    ("gpt_neox", dict(rotary_pct=0.5, rotary_emb_base=20000)),
]


@pytest.mark.interop
@pytest.mark.parametrize("family,extra", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_json_written_by_transformers_reads_like_the_hub_keys(tmp_path, family, extra):
    import dataclasses
    tf.AutoConfig.for_model(family, **BASE, **extra).save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in written and "rope_scaling" not in written  # transformers 5's layout
    from_file, from_hub_keys = model_spec(str(tmp_path)), model_spec(dict(model_type=family, **BASE, **extra))
    assert dataclasses.replace(from_file, name="") == dataclasses.replace(from_hub_keys, name="")


@pytest.mark.interop
@pytest.mark.parametrize("family,extra", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_spec_says_which_layers_slide_and_how_rope_is_built_as_transformers(family, extra):
    from transformers.cache_utils import DynamicCache
    config = tf.AutoConfig.for_model(family, **BASE, **extra)
    spec = model_spec(dict(model_type=family, **BASE, **extra))
    cache = DynamicCache(config=config)  # what generate() uses: one cache layer per decoder layer
    assert spec.layer_types == tuple("sliding_attention" if getattr(layer, "is_sliding", False) else "full_attention"
                                     for layer in cache.layers)
    windows = {layer.sliding_window for layer in cache.layers if getattr(layer, "is_sliding", False)}
    assert {spec.sliding_window} - {None} == windows
    model = hf_meta_model(dict(model_type=family, **BASE, **extra))
    rotary = (model.gpt_neox if family == "gpt_neox" else model.model).rotary_emb
    rope = config.rope_parameters
    if spec.local_rope_theta is not None:  # one cos/sin table per layer type
        rope, inv_freq = rope["full_attention"], rotary.full_attention_inv_freq
        assert spec.local_rope_theta == config.rope_parameters["sliding_attention"]["rope_theta"]
        assert spec.rope_type == rotary.rope_type["full_attention"]
    else:
        inv_freq = rotary.inv_freq
        assert spec.rope_type == rotary.rope_type
    assert (spec.rope_theta, spec.rotary_dim) == (rope["rope_theta"], 2 * inv_freq.numel())


REFUSED = [
    (dict(model_type="llama", **SMALL, rope_scaling=dict(rope_type="mrope", mrope_section=[1, 1])),
     r"rope_scaling rope_type must be one of default, linear, dynamic, yarn, longrope, llama3, got 'mrope'"),
    (dict(model_type="phi3", **SMALL, rope_scaling=dict(rope_type="linear", factor=2.0)),
     r"rope_type must be one of default, longrope, got 'linear'"),
    (dict(model_type="llama", **SMALL, sliding_window=4096),
     r"sliding_window=4096 is not read: this family has no sliding-window attention \(model_type llama\)"),
    (dict(model_type="mistral", **SMALL, num_key_value_heads=2, sliding_window=8,
          layer_types=["sliding_attention", "full_attention"]),
     r"layer_types=\['sliding_attention', 'full_attention'\] is not read: this family slides every layer"),
    (dict(model_type="gemma2", **SMALL, layer_types=["sliding_attention"]),
     r"layer_types must list 'full_attention' or 'sliding_attention' for each of the 2 layers"),
    (dict(model_type="qwen2", **SMALL, num_key_value_heads=2, layer_types=["sliding_attention"] * 2),
     r"layer_types has sliding layers but sliding_window is None"),
    (dict(model_type="gemma3_text", **SMALL, head_dim=12, use_bidirectional_attention=True),
     r"use_bidirectional_attention=True makes it an encoder"),
    (dict(model_type="gpt_neox", **SMALL, head_dim=8), r"head_dim=8 is not read: this family uses 12"),
    (dict(model_type="llama", **SMALL, rope_parameters={"full_attention": {"rope_type": "default"}}),
     r"rope_parameters is given per layer type \(full_attention\), which this family does not read"),
    (dict(model_type="gpt_neox", **SMALL, rotary_pct=1.5), r"rotary_pct must be in \(0, 1\], got 1.5"),
    (dict(model_type="gemma2", **SMALL, sliding_window=0), r"sliding_window must be a positive integer, got 0"),
    (dict(model_type="qwen3", **SMALL, num_key_value_heads=2, rope_theta=None), r"rope_theta must be a positive number"),
    (dict(model_type="gpt2", vocab_size=97, n_embd=48, n_layer=2, n_head=4, add_cross_attention=True),
     r"add_cross_attention=True is not modelled by the calculator \(use False\) \(model_type gpt2\)"),
    (dict(model_type="mixtral", **SMALL, num_key_value_heads=2, router_jitter_noise=0.1), r"router_jitter_noise=0.1 is not modelled"),
    (dict(model_type="gemma3", text_config=dict(model_type="gemma3_text")),
     r"model_type must be one of .*, got 'gemma3'; its text_config \(model_type 'gemma3_text'\) describes"),
]


@pytest.mark.parametrize("config,message", REFUSED, ids=[m[:30] for _, m in REFUSED])
def test_what_the_calculator_does_not_model_is_refused_in_one_line(config, message):
    with pytest.raises(ConfigError, match=message) as exc:
        model_spec(config)
    assert "\n" not in str(exc.value)


@settings(max_examples=30)
@given(family=st.sampled_from(["mistral", "ministral", "mixtral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3",
                               "olmo3"]),
       layers=st.integers(1, 13), window=st.sampled_from([None, 1, 7, 4096]), use_window=st.booleans(),
       max_window_layers=st.integers(0, 13), pattern=st.integers(1, 7))
@pytest.mark.interop
def test_sliding_layers_and_window_as_transformers_cache_decides_property(family, layers, window, use_window,
                                                                          max_window_layers, pattern):
    from transformers.cache_utils import DynamicCache
    config = dict(model_type=family, **{**SMALL, "num_hidden_layers": layers}, num_key_value_heads=2, head_dim=12,
                  sliding_window=window, use_sliding_window=use_window, max_window_layers=max_window_layers)
    if family == "gemma3_text":
        config["sliding_window_pattern"] = pattern
    cache = DynamicCache(config=_hf_config(config))
    sliding = [getattr(layer, "is_sliding", False) for layer in cache.layers]
    if any(sliding) and window is None:  # a sliding layer without a window: transformers' cache cannot work
        with pytest.raises(ConfigError, match="sliding_window"):
            model_spec(config)
        return
    spec = model_spec(config)
    assert spec.layer_types == tuple("sliding_attention" if s else "full_attention" for s in sliding)
    assert spec.sliding_window == (window if any(sliding) else None)
