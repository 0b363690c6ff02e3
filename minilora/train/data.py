"""Training data: Alpaca-style instruction records and plain-text corpora, turned into batches.

Two file kinds, chosen by suffix:

- `.jsonl`: one Alpaca record per line, `{"instruction": str, "input": str (optional), "output": str}`
  (other keys are kept, e.g. `task`, and ignored by training). Each record is rendered with the
  standard Stanford Alpaca prompt, and the loss is masked to the response: the prompt's targets
  are -100, so only the response tokens and the closing EOS are learned.

      tokens   BOS | prompt ............ | response ....... | EOS
      inputs   BOS | prompt ............ | response .......
      targets      | -100 ... -100      | response ....... | EOS

- `.txt`: plain text for language modelling, one token stream cut into windows of
  `max_seq_len + 1` tokens (inputs = window[:-1], targets = window[1:]).

Batches are right-padded (PAD inputs, -100 targets); with causal attention a pad never influences
a real position. `BatchSampler` shuffles with a per-epoch seed and keeps its position as two
integers, so a checkpoint can resume on exactly the next batch.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "IGNORE_INDEX",
    "Example", "Dataset", "BatchSampler",
    "read_alpaca_jsonl", "format_alpaca_prompt", "encode_alpaca", "encode_text",
    "load_dataset", "collate", "eval_batches",
]

IGNORE_INDEX = -100  # cross_entropy's ignore_index, as in transformers and the reference models

# The Stanford Alpaca templates (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT), verbatim.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Example:
    """One training sequence: input_ids[i] is followed by targets[i] (IGNORE_INDEX = no loss)."""

    input_ids: tuple
    targets: tuple


@dataclass
class Dataset:
    examples: list
    path: str = ""
    kind: str = ""            # "alpaca" or "text"
    dropped: int = 0          # records whose prompt left no room for a response in max_seq_len
    records: list = field(default_factory=list, repr=False)  # the raw Alpaca records (alpaca only)

    def __len__(self):
        return len(self.examples)

    @property
    def n_target_tokens(self) -> int:
        return sum(sum(t != IGNORE_INDEX for t in e.targets) for e in self.examples)


def read_alpaca_jsonl(path: str | os.PathLike, tasks=None) -> list[dict]:
    """Parse and validate an Alpaca JSONL file; errors name the file and the 1-based line number.

    `tasks` (a collection of names) keeps only records whose `task` key is one of them.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read data file {path}: {exc.strerror or exc}") from exc
    records = []
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ValueError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
        for key in ("instruction", "output"):
            if key not in record:
                raise ValueError(f"{where}: missing required key {key!r} (an Alpaca record has "
                                 "'instruction', optional 'input', and 'output')")
        for key in ("instruction", "input", "output"):
            if key in record and not isinstance(record[key], str):
                raise ValueError(f"{where}: {key!r} must be a string, got {type(record[key]).__name__}")
        if tasks is not None and record.get("task") not in tasks:
            continue
        records.append(record)
    if not records:
        which = f" with task in {sorted(tasks)}" if tasks is not None else ""
        raise ValueError(f"{path}: no Alpaca records{which}")
    return records


def format_alpaca_prompt(record: dict) -> str:
    if record.get("input"):
        return ALPACA_PROMPT.format(instruction=record["instruction"], input=record["input"])
    return ALPACA_PROMPT_NO_INPUT.format(instruction=record["instruction"])


def encode_alpaca(record: dict, tokenizer, max_seq_len: int) -> Example | None:
    """Prompt and response are tokenized separately and concatenated, so the mask boundary is exact
    (as Stanford Alpaca does). Over-long sequences lose the end of the response; None when the
    prompt alone leaves no response token to learn."""
    prompt = tokenizer.encode(format_alpaca_prompt(record), add_bos=True)
    response = tokenizer.encode(record["output"], add_eos=True)
    tokens = (prompt + response)[: max_seq_len + 1]
    if len(tokens) <= len(prompt):
        return None
    n_masked = len(prompt) - 1  # the first target predicts tokens[1]; prompt tokens end at len(prompt)-1
    targets = [IGNORE_INDEX] * n_masked + tokens[len(prompt):]
    return Example(tuple(tokens[:-1]), tuple(targets))


def encode_text(text: str, tokenizer, max_seq_len: int) -> list[Example]:
    """One stream (BOS, text, EOS) cut into windows; consecutive windows share one boundary token."""
    ids = tokenizer.encode(text, add_bos=True, add_eos=True)
    out = []
    for start in range(0, max(len(ids) - 1, 0), max_seq_len):
        window = ids[start : start + max_seq_len + 1]
        if len(window) >= 2:
            out.append(Example(tuple(window[:-1]), tuple(window[1:])))
    return out


def load_dataset(path: str | os.PathLike, tokenizer, max_seq_len: int, tasks=None) -> Dataset:
    """`.jsonl` -> Alpaca records; `.txt` -> a plain-text corpus."""
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise ValueError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        records = read_alpaca_jsonl(path, tasks)
        examples, dropped = [], 0
        for record in records:
            ex = encode_alpaca(record, tokenizer, max_seq_len)
            if ex is None:
                dropped += 1
            else:
                examples.append(ex)
        if not examples:
            raise ValueError(f"{path}: every prompt is longer than max_seq_len={max_seq_len}; raise --max-seq-len")
        return Dataset(examples, str(path), "alpaca", dropped, records)
    if suffix in (".txt", ".md"):
        if tasks is not None:
            raise ValueError(f"task filters apply to .jsonl instruction data, not to {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc
        examples = encode_text(text, tokenizer, max_seq_len)
        if not examples:
            raise ValueError(f"{path}: empty text file")
        return Dataset(examples, str(path), "text")
    raise ValueError(f"data file must be .jsonl (Alpaca records) or .txt (plain text), got {path}")


def collate(examples, pad_id: int):
    """Right-pad to the longest example: inputs with pad_id, targets with IGNORE_INDEX."""
    import torch

    T = max(len(e.input_ids) for e in examples)
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)  # (B, T)
    y = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for i, e in enumerate(examples):
        x[i, : len(e.input_ids)] = torch.tensor(e.input_ids, dtype=torch.long)
        y[i, : len(e.targets)] = torch.tensor(e.targets, dtype=torch.long)
    return x, y


class BatchSampler:
    """Endless shuffled batches with a position that fits in a checkpoint: (epoch, cursor).

    Epoch e visits the examples in `randperm(n, seed=seed + e)`; a batch that runs past the end of
    an epoch continues into the next one, so every batch is full and no example is skipped.
    """

    def __init__(self, n_examples: int, batch_size: int, seed: int = 0, shuffle: bool = True):
        if n_examples < 1:
            raise ValueError(f"n_examples must be >= 1, got {n_examples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.n, self.batch_size, self.seed, self.shuffle = n_examples, batch_size, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        import torch

        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def next_indices(self) -> list[int]:
        out = []
        while len(out) < self.batch_size:
            if self.cursor == self.n:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(out), self.n - self.cursor)
            out += self._order[self.cursor : self.cursor + take]
            self.cursor += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "n": self.n,
                "batch_size": self.batch_size, "seed": self.seed, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        for key in ("n", "batch_size", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(f"data position was saved with {key}={state[key]!r}, "
                                 f"this run has {getattr(self, key)!r}; resume with the same data and batch size")
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)


def eval_batches(dataset: Dataset, batch_size: int, pad_id: int, max_batches: int | None = None):
    """Fixed-order batches over the whole set (or its first max_batches batches)."""
    n_batches = (len(dataset) + batch_size - 1) // batch_size
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(n_batches):
        yield collate(dataset.examples[b * batch_size : (b + 1) * batch_size], pad_id)
