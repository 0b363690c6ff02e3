"""reference_models.checkpoint_keys: checkpoint keys <-> our state-dict keys, family by family,
checked against the files transformers writes."""
import pytest
import torch
from hf_factories import save_tiny
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

from reference_models import GPT, GPTConfig, Llama, LlamaConfig, load_pretrained
from reference_models.checkpoint_keys import (
    KEY_LAYOUTS, KeyLayout, checkpoint_tensors, key_layout, match_state, model_keys,
)

FILES = [("gpt2", {}), ("llama", {}), ("llama", {"tie_word_embeddings": True}), ("mistral", {}), ("qwen2", {})]


@pytest.mark.parametrize("family,overrides", FILES)
def test_checkpoint_tensors_are_the_file_transformers_wrote_bit_for_bit(tmp_path, family, overrides):
    save_tiny(family, tmp_path, **overrides)
    written = load_file(tmp_path / "model.safetensors")
    ours = checkpoint_tensors(load_pretrained(tmp_path))
    assert sorted(ours) == sorted(written)
    for key, t in written.items():
        assert ours[key].dtype == t.dtype and torch.equal(ours[key], t), key


def random_model(draw):
    torch.manual_seed(draw(st.integers(0, 99)))
    heads, tied = draw(st.sampled_from([1, 2, 4])), draw(st.booleans())
    if draw(st.booleans()):
        return GPT(GPTConfig(vocab_size=draw(st.integers(8, 40)), n_positions=16, n_embd=8 * heads,
                             n_layer=draw(st.integers(1, 3)), n_head=heads, n_inner=draw(st.sampled_from([None, 12])),
                             tie_word_embeddings=tied))
    return Llama(LlamaConfig(vocab_size=draw(st.integers(8, 40)), hidden_size=8 * heads,
                             intermediate_size=draw(st.integers(4, 24)), num_hidden_layers=draw(st.integers(1, 3)),
                             num_attention_heads=heads, num_key_value_heads=draw(st.sampled_from([1, heads])),
                             tie_word_embeddings=tied, model_type=draw(st.sampled_from(["llama", "mistral"]))))


@given(data=st.data(), bare=st.booleans(), with_buffers=st.booleans())
def test_match_state_inverts_checkpoint_tensors_on_a_meta_model(data, bare, with_buffers):
    # the file as transformers writes it, or as the bare transformer with saved buffers; both load back
    model = random_model(data.draw)
    layout = key_layout(model)
    file = checkpoint_tensors(model)
    if bare:
        file = {k.removeprefix(layout.prefix): v for k, v in file.items()}
    if with_buffers:
        block = ("" if bare else layout.prefix) + ("h.0." if isinstance(model, GPT) else "layers.0.self_attn.")
        file.update({block + name: torch.ones(2) for name in layout.ignored})
    with torch.device("meta"):
        empty = type(model)(model.config)
    state = match_state(empty, model_keys(empty, file))
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


@pytest.mark.parametrize("bare", [False, True])
def test_a_family_row_that_renames_the_head_maps_it_both_ways(monkeypatch, bare):
    # GPT-NeoX's files call the head embed_out; a family like that is one row in KEY_LAYOUTS
    class RenamedHead(Llama):
        pass

    monkeypatch.setitem(KEY_LAYOUTS, RenamedHead, KeyLayout("model.", head="embed_out"))
    torch.manual_seed(0)
    model = RenamedHead(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                    num_attention_heads=2))
    file = checkpoint_tensors(model)
    assert "lm_head.weight" not in file and torch.equal(file["embed_out.weight"], model.lm_head.weight)
    assert key_layout(Llama(model.config)).head == "lm_head"  # the parent family keeps its row
    if bare:
        file = {k.removeprefix("model."): v for k, v in file.items()}
    with torch.device("meta"):
        empty = RenamedHead(model.config)
    state = match_state(empty, model_keys(empty, file))
    assert sorted(state) == sorted(model.state_dict())
    assert all(torch.equal(state[k], t) for k, t in model.state_dict().items())


def test_a_model_without_a_key_layout_is_named():
    with pytest.raises(TypeError, match=r"no checkpoint key layout for Sequential; known: \['GPT', 'Llama', 'GPTNeoX'\]"):
        key_layout(nn.Sequential())
