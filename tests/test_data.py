"""minilora/train/data.py: the loss mask covers exactly the response; bad JSONL names its line; batching."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, strategies as st

from minilora.train.data import (
    ALPACA_PROMPT, ALPACA_PROMPT_NO_INPUT, IGNORE_INDEX, BatchSampler, collate, encode_alpaca,
    encode_text, format_alpaca_prompt, load_dataset, read_alpaca_jsonl,
)
from minilora.train.tokenizer import ByteTokenizer

DATA = Path(__file__).resolve().parent.parent / "minilora" / "data"
TOK = ByteTokenizer()


@given(st.text(max_size=30), st.text(max_size=30), st.text(max_size=30))
def test_mask_covers_exactly_the_response_tokens(instruction, input_, output):
    record = {"instruction": instruction, "input": input_, "output": output}
    ex = encode_alpaca(record, TOK, max_seq_len=4096)
    prompt_ids = TOK.encode(format_alpaca_prompt(record))
    # Learned targets are exactly the response bytes then EOS, and they sit after the whole prompt.
    learned = [t for t in ex.targets if t != IGNORE_INDEX]
    assert learned == TOK.encode(output) + [TOK.eos_id]
    first = next(i for i, t in enumerate(ex.targets) if t != IGNORE_INDEX)
    assert first == len(prompt_ids)  # input_ids[first] is the last prompt token (after BOS)
    assert all(t != IGNORE_INDEX for t in ex.targets[first:])
    # Teacher forcing: targets are the inputs shifted by one wherever they are learned.
    full = list(ex.input_ids) + [TOK.eos_id]
    assert all(full[i + 1] == t for i, t in enumerate(ex.targets) if t != IGNORE_INDEX)
    assert TOK.decode(ex.input_ids) == format_alpaca_prompt(record) + output


def test_alpaca_templates_are_the_stanford_ones():
    assert format_alpaca_prompt({"instruction": "I", "input": "X"}) == ALPACA_PROMPT.format(instruction="I", input="X")
    assert format_alpaca_prompt({"instruction": "I", "input": ""}).startswith(
        "Below is an instruction that describes a task. Write a response")
    assert ALPACA_PROMPT_NO_INPUT.endswith("### Instruction:\n{instruction}\n\n### Response:\n")


def test_truncation_keeps_the_prompt_and_drops_prompt_only_records():
    record = {"instruction": "x" * 10, "output": "y" * 500}
    prompt_len = len(TOK.encode(format_alpaca_prompt(record), add_bos=True))
    ex = encode_alpaca(record, TOK, max_seq_len=prompt_len + 5)
    assert len(ex.input_ids) == len(ex.targets) == prompt_len + 5
    assert sum(t != IGNORE_INDEX for t in ex.targets) == 6
    assert encode_alpaca(record, TOK, max_seq_len=prompt_len - 1) is None


@pytest.mark.parametrize("line, message", [
    ("{not json", r"bad\.jsonl:3: invalid JSON"),
    ("[1, 2]", r"bad\.jsonl:3: a record must be a JSON object, got list"),
    ('{"instruction": "a"}', r"bad\.jsonl:3: missing required key 'output'"),
    ('{"instruction": 5, "output": "b"}', r"bad\.jsonl:3: 'instruction' must be a string, got int"),
])
def test_malformed_jsonl_fails_with_its_line_number(tmp_path, line, message):
    good = json.dumps({"instruction": "a", "input": "", "output": "b"})
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n\n" + line + "\n" + good + "\n")  # line 2 is blank, line 3 is bad
    with pytest.raises(ValueError, match=message):
        read_alpaca_jsonl(path)


def test_non_utf8_line_names_its_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff", "output": "b"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid UTF-8"):
        read_alpaca_jsonl(path)


def test_load_dataset_rejects_unknown_suffix_and_missing_file(tmp_path):
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"must be \.jsonl .* or \.txt .*got .*d\.csv"):
        load_dataset(tmp_path / "d.csv", TOK, 64)
    with pytest.raises(ValueError, match="data file not found"):
        load_dataset(tmp_path / "nope.txt", TOK, 64)


@given(st.text(min_size=1, max_size=300), st.integers(2, 40))
def test_text_windows_cover_the_stream_once(text, max_seq_len):
    examples = encode_text(text, TOK, max_seq_len)
    ids = TOK.encode(text, add_bos=True, add_eos=True)
    assert [t for e in examples for t in e.targets] == ids[1:]
    assert all(len(e.input_ids) <= max_seq_len for e in examples)


def test_collate_pads_inputs_and_ignores_padded_targets():
    ex = [encode_alpaca({"instruction": "a", "output": "bc"}, TOK, 512),
          encode_alpaca({"instruction": "a", "input": "long input", "output": "b"}, TOK, 512)]
    x, y = collate(ex, TOK.pad_id)
    n0 = len(ex[0].input_ids)
    assert x.shape == y.shape == (2, len(ex[1].input_ids))
    assert (x[0, n0:] == TOK.pad_id).all() and (y[0, n0:] == IGNORE_INDEX).all()
    assert x.dtype == y.dtype == torch.long


def test_batch_sampler_resumes_on_exactly_the_next_batch():
    a = BatchSampler(10, 4, seed=3)
    seen = [a.next_indices() for _ in range(7)]  # crosses epochs: 28 indices from 10 examples
    assert sorted(seen[0] + seen[1] + seen[2][:2]) == list(range(10))  # epoch 0 is a permutation
    b = BatchSampler(10, 4, seed=3)
    for _ in range(3):
        b.next_indices()
    c = BatchSampler(10, 4, seed=3)
    c.load_state_dict(b.state_dict())
    assert [c.next_indices() for _ in range(4)] == seen[3:]
    with pytest.raises(ValueError, match="batch_size=4.*this run has 5"):
        BatchSampler(10, 5, seed=3).load_state_dict(b.state_dict())


def test_shipped_data_is_small_valid_and_reproducible():
    spec = importlib.util.spec_from_file_location("make_data", DATA.parent.parent / "scripts" / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    files = make_data.generate()
    assert sum(len(v) for v in files.values()) < 2_000_000
    for name, content in files.items():
        assert (DATA / name).read_bytes() == content, f"{name} is out of date: run scripts/make_data.py"
    records = read_alpaca_jsonl(DATA / "instruct_train.jsonl")
    assert {r["task"] for r in records} == set(make_data.TASKS)
    upper = read_alpaca_jsonl(DATA / "instruct_train.jsonl", tasks={"upper"})
    assert upper and all(r["output"] == r["input"].upper() for r in upper)
