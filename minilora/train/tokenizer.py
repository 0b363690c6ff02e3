"""Tokenizers for training: a built-in byte-level one, and Hugging Face `tokenizer.json` files.

The byte tokenizer needs no vocabulary file, so every example in this repository runs offline:
ids 0..255 are the UTF-8 bytes themselves and three special ids follow them. Any text
round-trips exactly (`decode(encode(s)) == s`), because UTF-8 is a bijection on valid strings.

    ids:  0 ............ 255 | 256  257  258
          raw UTF-8 bytes    | BOS  EOS  PAD

A local `tokenizer.json` (the `tokenizers` package's file, shipped beside most Hugging Face
checkpoints) is read with `tokenizers.Tokenizer.from_file`; nothing is ever downloaded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer"]


class ByteTokenizer:
    """UTF-8 bytes as token ids, plus BOS/EOS/PAD after them (vocab_size = 259)."""

    name = "byte"
    bos_id = 256
    eos_id = 257
    pad_id = 258
    vocab_size = 259

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = list(text.encode("utf-8"))
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids) -> str:
        """Special ids are dropped; a byte sequence cut inside a character decodes to U+FFFD."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"kind": "byte"}


# Names used for the end-of-text token by common model families, most specific first.
_EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>")
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


class HFTokenizer:
    """A local Hugging Face `tokenizer.json`, through the `tokenizers` package (no transformers needed).

    Special tokens come from a `tokenizer_config.json` beside the file when there is one
    (its `bos_token` / `eos_token` / `pad_token`), else from well-known names in the vocabulary.
    Without a pad token, EOS pads (padded positions never reach the loss: their targets are -100).
    """

    name = "hf"

    def __init__(self, path: str | os.PathLike):
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:  # pragma: no cover - tokenizers is installed with transformers
            raise ValueError(
                f"reading {path} needs the 'tokenizers' package (pip install tokenizers); "
                "or use the built-in byte tokenizer (--tokenizer byte)"
            ) from exc
        self.path = Path(path)
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as exc:
            raise ValueError(f"{self.path} is not a valid tokenizer.json: {exc}") from exc
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        named = _special_tokens_from_config(self.path.parent / "tokenizer_config.json")
        self.eos_id = self._find(named.get("eos_token"), _EOS_NAMES)
        self.bos_id = self._find(named.get("bos_token"), _BOS_NAMES)
        pad = self._find(named.get("pad_token"), _PAD_NAMES)
        if self.eos_id is None:
            raise ValueError(
                f"{self.path}: no end-of-text token found (looked for tokenizer_config.json eos_token "
                f"and {', '.join(_EOS_NAMES)})"
            )
        self.pad_id = pad if pad is not None else self.eos_id

    def _find(self, configured: str | None, names) -> int | None:
        for name in ([configured] if configured else []) + list(names):
            i = self._tok.token_to_id(name)
            if i is not None:
                return i
        return None

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        # add_special_tokens=False: BOS/EOS placement is the data pipeline's decision, not the
        # tokenizer post-processor's (which would add BOS to every piece we encode separately).
        ids = self._tok.encode(text, add_special_tokens=False).ids
        bos = [self.bos_id] if add_bos and self.bos_id is not None else []
        return bos + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids) -> str:
        special = {self.bos_id, self.eos_id, self.pad_id}
        return self._tok.decode([int(i) for i in ids if int(i) not in special], skip_special_tokens=True)

    def to_json(self) -> dict:
        return {"kind": "hf", "path": str(self.path)}


def _special_tokens_from_config(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out = {}
    for key in ("bos_token", "eos_token", "pad_token"):
        value = cfg.get(key)
        if isinstance(value, dict):  # AddedToken serialized as {"content": ...}
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


def load_tokenizer(spec: str | os.PathLike | None = "byte"):
    """"byte" (or None) -> ByteTokenizer; a tokenizer.json file, or a folder holding one -> HFTokenizer."""
    if spec is None or str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"tokenizer must be 'byte', a tokenizer.json file or a folder holding one, got {spec!r}")
    return HFTokenizer(path)
