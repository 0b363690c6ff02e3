"""reference_models.hub: checkpoint folders in, checkpoint folders out, and a clear error for
every way a folder can be wrong."""
import json
import os

import pytest
import torch
from hf_factories import save_tiny
from safetensors.torch import load_file, save_file

from reference_models import GPT, GPTConfig, Llama, LlamaConfig, from_hf_config, load_pretrained, save_pretrained
from reference_models.hub import config_from_hf



def ids(seq=9):
    return torch.randint(0, 128, (2, seq), generator=torch.Generator().manual_seed(0))


def rewrite_weights(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"has no config\.json"):
        load_pretrained(tmp_path)


def test_unknown_model_type_lists_supported(tmp_path):
    save_tiny("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "bert"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unknown model_type 'bert'; supported: \['gpt2', 'gpt_neox', 'llama', 'mistral', "
                                         r"'qwen2', 'qwen3', 'gemma2', 'gemma3_text', 'phi3', 'olmo2', 'mixtral', 'qwen2_moe', 'qwen3_moe'\]"):
        load_pretrained(tmp_path)


def test_invalid_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON"):
        load_pretrained(tmp_path)


def test_missing_tensor_is_named(tmp_path):
    save_tiny("gpt2", tmp_path)
    rewrite_weights(tmp_path, lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(ValueError, match=r"missing tensors \['transformer\.h\.1\.mlp\.c_fc\.bias'\], unexpected tensors \[\]"):
        load_pretrained(tmp_path)


def test_unexpected_tensor_is_named(tmp_path):
    save_tiny("llama", tmp_path)
    rewrite_weights(tmp_path, lambda t: t.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)}))
    with pytest.raises(ValueError, match=r"missing tensors \[\], unexpected tensors \['model\.layers\.0\.self_attn\.q_proj\.bias'\]"):
        load_pretrained(tmp_path)


def test_misshaped_tensor_names_key_and_both_shapes(tmp_path):
    save_tiny("llama", tmp_path)
    rewrite_weights(tmp_path, lambda t: t.update({"model.layers.1.mlp.up_proj.weight": torch.zeros(48, 32)}))
    with pytest.raises(ValueError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' has shape \(48, 32\) in the "
                                         r"checkpoint, the config needs \(64, 32\)"):
        load_pretrained(tmp_path)


def test_misshaped_conv1d_tensor_reports_file_layout(tmp_path):
    # GPT-2 Conv1D weights are (in, out) in the file; the error speaks in the file's layout
    save_tiny("gpt2", tmp_path)
    rewrite_weights(tmp_path, lambda t: t.update({"transformer.h.0.mlp.c_fc.weight": torch.zeros(32, 100)}))
    with pytest.raises(ValueError, match=r"'transformer\.h\.0\.mlp\.c_fc\.weight' \(Conv1D, stored transposed\) "
                                         r"has shape \(32, 100\) in the checkpoint, the config needs \(32, 128\)"):
        load_pretrained(tmp_path)


def test_corrupt_safetensors(tmp_path):
    save_tiny("gpt2", tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])  # truncated mid-header/data
    with pytest.raises(ValueError, match=r"cannot read .*model\.safetensors as safetensors \(corrupt or truncated\?\)"):
        load_pretrained(tmp_path)


def test_pickle_only_folder_is_refused(tmp_path):
    save_tiny("gpt2", tmp_path)
    os.remove(tmp_path / "model.safetensors")
    (tmp_path / "pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(ValueError, match=r"only pickled weights \(pytorch_model\.bin\).*never unpickles.*safe_serialization=True"):
        load_pretrained(tmp_path)


def test_no_weights_at_all(tmp_path):
    save_tiny("gpt2", tmp_path)
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"neither model\.safetensors nor model\.safetensors\.index\.json"):
        load_pretrained(tmp_path)


def test_sharded_index_with_missing_shard(tmp_path):
    from hf_factories import tiny_hf_model

    tiny_hf_model("llama").save_pretrained(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    os.remove(shard)
    with pytest.raises(FileNotFoundError, match=rf"maps \d+ tensors to {shard.name}, which is missing"):
        load_pretrained(tmp_path)


def test_unsupported_rope_scaling_and_gpt2_variants():
    base = dict(model_type="llama", hidden_size=32, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"rope_type 'llama3' needs \['factor', 'low_freq_factor', 'high_freq_factor'\]"):
        config_from_hf({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}})
    with pytest.raises(ValueError, match=r"rope_type 'mrope' is not supported; supported: \['default', 'linear', "
                                         r"'dynamic', 'yarn', 'llama3', 'longrope'\]"):
        config_from_hf({**base, "rope_theta": 1e4, "rope_scaling": {"type": "mrope", "factor": 2.0}})
    with pytest.raises(ValueError, match=r"scale_attn_by_inverse_layer_idx"):
        config_from_hf({"model_type": "gpt2", "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(TypeError, match=r"config must be a dict \(config\.json content\), got list"):
        config_from_hf([])


def test_old_style_rope_theta_and_qwen2_layout():
    cfg = config_from_hf(dict(model_type="llama", hidden_size=32, num_attention_heads=4, rope_theta=5e5))
    assert cfg.rope_theta == 5e5
    # (Qwen2's kv heads default to 32, as in transformers: a 4-head config must say how many it has)
    cfg = config_from_hf(dict(model_type="qwen2", hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                              num_hidden_layers=2))
    assert (cfg.attention_bias, cfg.o_proj_bias, cfg.sliding_window) == (True, False, None)
    cfg = config_from_hf(dict(model_type="qwen2", hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                              num_hidden_layers=4, use_sliding_window=True, max_window_layers=2, sliding_window=8))
    assert (cfg.sliding_window, cfg.layer_types) == (8, ["full_attention"] * 2 + ["sliding_attention"] * 2)


def test_old_gpt2_checkpoint_without_prefix_with_mask_buffers_and_tied_head(tmp_path):
    # The original "gpt2" upload: GPT2Model keys (no "transformer." prefix), the causal-mask
    # buffers attn.bias / attn.masked_bias saved as tensors, and (elsewhere) a copy of the tied head.
    hf = save_tiny("gpt2", tmp_path)

    def old_style(t):
        for k in list(t):
            t[k.removeprefix("transformer.")] = t.pop(k)
        for i in range(2):
            t[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
            t[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        t["lm_head.weight"] = t["wte.weight"].clone()

    rewrite_weights(tmp_path, old_style)
    ours = load_pretrained(tmp_path)
    with torch.no_grad():
        assert (ours(ids()) - hf(ids()).logits).abs().max().item() <= 1e-5


def test_dtype_and_device_arguments(tmp_path):
    save_tiny("qwen2", tmp_path)
    model = load_pretrained(tmp_path, dtype=torch.float16)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert not model.training
    assert load_pretrained(tmp_path).lm_head.weight.dtype == torch.float32  # dtype=None keeps the file's


def test_bf16_model_saves_bf16_file_with_dtype_in_config(tmp_path):
    save_tiny("llama", tmp_path / "src")
    model = load_pretrained(tmp_path / "src", dtype=torch.bfloat16)
    save_pretrained(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_file(tmp_path / "out" / "model.safetensors")["lm_head.weight"].dtype == torch.bfloat16


def test_save_is_atomic_and_overwrites(tmp_path):
    torch.manual_seed(0)
    a = GPT(GPTConfig(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    b = GPT(GPTConfig(vocab_size=32, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    save_pretrained(a, tmp_path)
    save_pretrained(b, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no temp files left
    torch.testing.assert_close(load_pretrained(tmp_path).transformer.wte.weight, b.transformer.wte.weight)
    tensors = load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in tensors  # tied: written once, as transformers does
    assert tensors["transformer.h.0.mlp.c_fc.weight"].shape == (8, 32)  # Conv1D layout (in, out)


def test_save_rejects_other_modules_and_failed_write_leaves_old_file(tmp_path, monkeypatch):
    with pytest.raises(TypeError, match=r"expects a reference_models GPT, Llama or GPTNeoX, got Linear"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path)
    model = Llama(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                              num_attention_heads=2))
    save_pretrained(model, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    import safetensors.torch

    def boom(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_quantization_config_other_than_bnb_4bit_is_refused(tmp_path):
    save_tiny("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"only 4-bit bitsandbytes quantization_config is supported, got "
                                         r"quant_method='bitsandbytes', load_in_4bit=None"):
        load_pretrained(tmp_path)


def test_from_hf_config_builds_trainable_random_model():
    model = from_hf_config(dict(model_type="mistral", vocab_size=64, hidden_size=16, intermediate_size=32,
                                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2),
                           attn_impl="eager")
    assert isinstance(model, Llama) and model.config.attn_impl == "eager"
    assert model.config.sliding_window == 4096  # Mistral's default when the key is absent
    logits, loss = model(torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_saved_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_pretrained(GPT(GPTConfig(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2)), tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes and set(modes.values()) == {0o644}, modes


@pytest.mark.parametrize("family,overrides", [
    ("mistral", {"num_attention_heads": 16}),                          # kv heads default to 8, not 16
    ("qwen2", {"num_attention_heads": 64, "hidden_size": 128}),        # kv heads default to 32, not 64
    ("qwen2", {"num_attention_heads": 32, "use_sliding_window": True,  # max_window_layers defaults to 28:
               "sliding_window": 4}),                                  # both layers keep full attention
])
def test_keys_missing_from_config_json_take_the_family_defaults_transformers_uses(family, overrides):
    import transformers as tf

    cls = {"mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config}[family]
    small = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
                 max_position_embeddings=32)
    small.update(overrides)
    written = {"model_type": family, **small}  # what a sparse config.json holds: no kv heads, no windows
    theirs = cls(**small)
    ours = from_hf_config(written).config
    assert ours.num_key_value_heads == theirs.num_key_value_heads
    if family == "qwen2":
        sliding = [t == "sliding_attention" for t in theirs.layer_types]
        assert (ours.sliding_window is not None) == any(sliding)
