"""minilora/train/tokenizer.py: the byte tokenizer round-trips any text; tokenizer.json files load locally."""
import json

import pytest
from hypothesis import given, strategies as st

from minilora.train.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


@given(st.text())
def test_byte_tokenizer_round_trips_any_utf8_text(text):
    tok = ByteTokenizer()
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert all(0 <= i < 256 for i in ids[1:-1])
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text


def test_byte_tokenizer_special_ids_are_past_the_bytes():
    tok = ByteTokenizer()
    assert {tok.bos_id, tok.eos_id, tok.pad_id} == {256, 257, 258}
    assert tok.vocab_size == 259
    assert tok.decode([104, 105, tok.pad_id, tok.eos_id]) == "hi"


def test_byte_tokenizer_rejects_non_str():
    with pytest.raises(TypeError, match="expects a str, got bytes"):
        ByteTokenizer().encode(b"abc")


def _write_tokenizer_json(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<pad>": 1, "hello": 2, "world": 3, "[UNK]": 4}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))


def test_hf_tokenizer_json_from_a_folder(tmp_path):
    _write_tokenizer_json(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello world", add_eos=True) == [2, 3, 0]
    assert (tok.eos_id, tok.pad_id, tok.vocab_size) == (0, 1, 5)
    assert tok.decode([2, 3, 0]) == "hello world"


def test_hf_tokenizer_reads_special_tokens_from_tokenizer_config(tmp_path):
    _write_tokenizer_json(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<pad>"}}))
    assert load_tokenizer(tmp_path / "tokenizer.json").eos_id == 1


def test_load_tokenizer_bad_paths(tmp_path):
    with pytest.raises(ValueError, match="tokenizer must be 'byte'"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
