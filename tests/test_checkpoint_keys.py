"""reference_models.checkpoint_keys: checkpoint keys <-> our state-dict keys, family by family,
checked against the files transformers writes."""
import pytest
import torch
from hf_factories import save_tiny
from safetensors.torch import load_file, save_file
from torch import nn

from reference_models import load_pretrained
from reference_models.checkpoint_keys import checkpoint_tensors, key_layout, match_state, model_keys

FILES = [("gpt2", {}), ("llama", {}), ("llama", {"tie_word_embeddings": True}), ("mistral", {}), ("qwen2", {})]


@pytest.mark.parametrize("family,overrides", FILES)
def test_checkpoint_tensors_are_the_file_transformers_wrote_bit_for_bit(tmp_path, family, overrides):
    save_tiny(family, tmp_path, **overrides)
    written = load_file(tmp_path / "model.safetensors")
    ours = checkpoint_tensors(load_pretrained(tmp_path))
    assert sorted(ours) == sorted(written)
    for key, t in written.items():
        assert ours[key].dtype == t.dtype and torch.equal(ours[key], t), key


@pytest.mark.parametrize("family,overrides", FILES)
def test_match_state_inverts_checkpoint_tensors_on_a_meta_model(tmp_path, family, overrides):
    save_tiny(family, tmp_path, **overrides)
    model = load_pretrained(tmp_path)
    with torch.device("meta"):
        empty = type(model)(model.config)
    state = match_state(empty, model_keys(empty, checkpoint_tensors(model)))
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight")  # one tensor with the embedding: the file holds it once
    assert sorted(state) == sorted(expected)
    for key, t in expected.items():
        assert torch.equal(state[key], t), key


def test_bare_llama_checkpoint_with_rotary_buffers_loads_with_transformers_logits(tmp_path):
    # LlamaModel's keys (no "model." prefix, lm_head kept as is) and the rotary inv_freq buffers
    # older transformers saved: both mapped by Llama's row of KEY_LAYOUTS
    hf = save_tiny("llama", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    bare = {k.removeprefix("model."): v for k, v in tensors.items()}
    for i in range(hf.config.num_hidden_layers):
        bare[f"layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(bare, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ids = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_pretrained(tmp_path)(ids), hf(ids).logits)


def test_rotary_buffer_is_not_ignored_for_gpt2(tmp_path):
    # ignored buffers are per family: a GPT-2 file has no rotary embedding, so such a key is a mistake
    save_tiny("gpt2", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["transformer.h.0.attn.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensors \['transformer\.h\.0\.attn\.rotary_emb\.inv_freq'\]"):
        load_pretrained(tmp_path)


def test_a_model_without_a_key_layout_is_named():
    with pytest.raises(TypeError, match=r"no checkpoint key layout for Sequential; known: \['GPT', 'Llama'\]"):
        key_layout(nn.Sequential())
