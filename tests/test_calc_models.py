"""calculators.models / calculators.lora: exact parameter counts against transformers (meta device)
and LoRA trainable counts against peft's get_nb_trainable_parameters."""
import pytest
import torch
import transformers as tf
from hypothesis import given, settings, strategies as st

from calculators import PRESETS, ConfigError, count_parameters, lora_trainable_parameters, model_spec, parse_targets


def _hf_config(config: dict):
    # small vocabularies: keep the special-token ids inside them (phi3's default pad id is 32000)
    return tf.AutoConfig.for_model(**{"pad_token_id": None, "bos_token_id": 0, "eos_token_id": 0, **config})


def hf_count(config: dict) -> int:
    cfg = _hf_config(config)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def peft_trainable(config: dict, rank: int, targets) -> int:
    import peft
    cfg = _hf_config(config)
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(cfg)
        model = peft.get_peft_model(model, peft.LoraConfig(r=rank, target_modules=targets))
    return model.get_nb_trainable_parameters()[0]


SMALL = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4)
FAMILY_CONFIGS = [
    dict(model_type="gpt2", vocab_size=97, n_positions=40, n_embd=48, n_layer=2, n_head=4),
    dict(model_type="gpt2", vocab_size=97, n_positions=40, n_embd=48, n_layer=3, n_head=4, n_inner=72,
         tie_word_embeddings=False),
    dict(model_type="llama", **SMALL),
    dict(model_type="llama", **SMALL, num_key_value_heads=2, head_dim=16, attention_bias=True, mlp_bias=True,
         tie_word_embeddings=True),
    dict(model_type="mistral", **SMALL, num_key_value_heads=1),
    dict(model_type="mistral", **SMALL, num_key_value_heads=2, head_dim=8),
    dict(model_type="mixtral", **SMALL, num_key_value_heads=2, num_local_experts=3, num_experts_per_tok=2),
    dict(model_type="qwen2", **SMALL, num_key_value_heads=2),
    dict(model_type="qwen2", **SMALL, num_key_value_heads=4, tie_word_embeddings=True),
    dict(model_type="gemma", **SMALL, num_key_value_heads=1, head_dim=24),
    dict(model_type="gemma", **SMALL, num_key_value_heads=4, head_dim=12, tie_word_embeddings=False,
         attention_bias=True),
    dict(model_type="gemma2", **SMALL, num_key_value_heads=2, head_dim=32),
    dict(model_type="gemma2", **SMALL, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False),
    dict(model_type="phi3", **SMALL, num_key_value_heads=2),
    dict(model_type="phi3", **SMALL, tie_word_embeddings=True),
]


@pytest.mark.interop
@pytest.mark.parametrize("config", FAMILY_CONFIGS, ids=lambda c: c["model_type"])
def test_parameter_count_exact_vs_transformers(config):
    assert count_parameters(model_spec(config)) == hf_count(config)


@pytest.mark.interop
@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_count_exact_vs_transformers(name):
    assert count_parameters(model_spec(name)) == hf_count(PRESETS[name])


def test_presets_match_published_counts():
    # REFERENCE.md section 2: the totals peft prints for these published configs
    assert count_parameters(model_spec("llama-2-7b")) == 6_738_415_616
    assert count_parameters(model_spec("llama-3-8b")) == 8_030_261_248
    assert count_parameters(model_spec("mistral-7b")) == 7_241_732_096


@settings(max_examples=10)
@given(family=st.sampled_from(["llama", "mistral", "qwen2", "gemma2", "phi3"]),
       layers=st.integers(1, 3), heads=st.sampled_from([2, 4]), kv_div=st.sampled_from([1, 2]),
       head_dim=st.sampled_from([None, 8, 20]), tie=st.booleans())
@pytest.mark.interop
def test_parameter_count_exact_property(family, layers, heads, kv_div, head_dim, tie):
    config = dict(model_type=family, vocab_size=53, hidden_size=40, intermediate_size=24,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // kv_div,
                  tie_word_embeddings=tie)
    if head_dim is not None:
        config["head_dim"] = head_dim
    elif family in ("gemma2",):
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
    ("mistral-7b", 16, ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("mixtral-8x7b", 8, "all-linear"),
    ("mixtral-8x7b", 4, ["q_proj", "w2", "w1", "w3"]),
    ("mixtral-8x7b", 4, r".*experts\.w[13]"),
    ("qwen2.5-7b", 8, r".*\.(q|v)_proj"),
    ("gemma-2-9b", 16, "all-linear"),
    ("phi-3-mini", 8, ["qkv_proj", "gate_up_proj"]),
]


@pytest.mark.interop
@pytest.mark.parametrize("name,rank,targets", LORA_CASES, ids=lambda v: str(v)[:24])
def test_lora_trainable_exact_vs_peft(name, rank, targets):
    spec = model_spec(name)
    assert lora_trainable_parameters(spec, rank, targets) == peft_trainable(PRESETS[name], rank, targets)


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


def test_config_folder_and_file_agree(tmp_path):
    import json
    (tmp_path / "config.json").write_text(json.dumps(PRESETS["mistral-7b"]))
    assert count_parameters(model_spec(str(tmp_path))) == count_parameters(model_spec("mistral-7b"))
    assert count_parameters(model_spec(str(tmp_path / "config.json"))) == 7_241_732_096


@pytest.mark.parametrize("key,value", [("num_local_experts", -1), ("num_local_experts", 0), ("num_local_experts", "8"),
                                       ("num_experts_per_tok", 2.0), ("num_experts_per_tok", True)])
def test_mixtral_expert_counts_must_be_positive_integers(key, value):
    import re
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
