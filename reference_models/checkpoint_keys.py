"""How a checkpoint's keys map to our models' state-dict keys, family by family, in one place.

Keys are the same names as our modules (we use transformers' names), except where a family's row in
KEY_LAYOUTS says otherwise:
- a checkpoint of the bare transformer (GPT2Model / LlamaModel, e.g. the original "gpt2" upload)
  has keys without the body's prefix ("transformer." / "model.");
- GPT-2's attn.c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj weights are Conv1D (in, out) in the
  file and nn.Linear (out, in) here: transposed on load and on save;
- buffers that older checkpoints saved but that are not weights (GPT-2's attn.bias causal mask and
  attn.masked_bias, GPT-NeoX's attention.bias and attention.masked_bias, rotary inv_freq) are skipped;
- a family's file may name the head otherwise (ours is always lm_head);
- a tied head (lm_head.weight) is not in the file (transformers does not write it): it is the
  embedding; a file that carries it anyway has it ignored.
A new family adds a row (GPT-NeoX's: prefix "gpt_neox.", head "embed_out", its attention mask
buffers ignored; the Llama-like families of families.py share Llama's). Fused projections (Phi-3's
qkv_proj, GPT-NeoX's query_key_value) keep transformers' name and row order, so that a peft adapter
on them means the same here: nothing to map.

The dense loader (hub.py) and every quantized format (quantized_formats.py) go through these
functions, so a key means one thing to all of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .gpt import GPT
from .llama import Llama
from .neox import GPTNeoX

__all__ = ["KeyLayout", "KEY_LAYOUTS", "HEAD", "key_layout", "is_transposed", "model_keys", "match_state",
           "checkpoint_tensors"]

HEAD = "lm_head"  # our models' output projection, in every family


@dataclass(frozen=True)
class KeyLayout:
    """What one family's checkpoint keys change from our state-dict keys."""

    prefix: str                       # the transformer body's name in a *ForCausalLM checkpoint
    head: str = HEAD                  # the output projection's name in the file
    transposed: tuple[str, ...] = ()  # key suffixes of weights stored (in, out)
    ignored: tuple[str, ...] = ()     # key suffixes of saved buffers that are not weights


KEY_LAYOUTS: dict[type[nn.Module], KeyLayout] = {
    GPT: KeyLayout("transformer.", transposed=("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight",
                                               "mlp.c_proj.weight"),
                   ignored=("attn.bias", "attn.masked_bias")),
    Llama: KeyLayout("model.", ignored=("rotary_emb.inv_freq",)),  # every family in families.py
    # Pythia's files carry the causal mask buffers; transformers 5 names the head embed_out in the file
    GPTNeoX: KeyLayout("gpt_neox.", head="embed_out",
                       ignored=("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq")),
}


def key_layout(model: nn.Module) -> KeyLayout:
    for cls in type(model).__mro__:  # the most specific row: a subclass may be another family
        if cls in KEY_LAYOUTS:
            return KEY_LAYOUTS[cls]
    raise TypeError(f"no checkpoint key layout for {type(model).__name__}; known: {[c.__name__ for c in KEY_LAYOUTS]} "
                    "(a family adds a row to reference_models.checkpoint_keys.KEY_LAYOUTS)")


def _ends_with(key: str, suffixes: tuple[str, ...]) -> bool:
    return any(key.endswith("." + s) for s in suffixes)


def is_transposed(model: nn.Module, key: str) -> bool:
    """Is `key` (one of ours) a weight the file stores (in, out)?"""
    return _ends_with(key, key_layout(model).transposed)


def _tied_head(model: nn.Module) -> str | None:
    return f"{HEAD}.weight" if getattr(model.config, "tie_word_embeddings", False) else None


def _renamed(key: str, old: str, new: str) -> str:
    return new + key[len(old):] if key.startswith(old + ".") else key


def model_keys(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors under our keys, in the file's layout: buffers that are not weights and a
    tied head dropped, the body's prefix added to a bare-transformer checkpoint."""
    layout = key_layout(model)
    tensors = {_renamed(k, layout.head, HEAD): v for k, v in tensors.items() if not _ends_with(k, layout.ignored)}
    if not any(k.startswith(layout.prefix) for k in tensors):
        tensors = {(k if k.startswith(HEAD + ".") else layout.prefix + k): v for k, v in tensors.items()}
    tensors.pop(_tied_head(model), None)  # the embedding is the truth
    return tensors


def match_state(model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None
                ) -> dict[str, torch.Tensor]:
    """Check `tensors` (our keys, the file's layout) against what the model still holds on the meta
    device, name by name and shape by shape; return them in our layout, floating ones cast to `dtype`
    (None keeps the file's)."""
    expected = {k: v.shape for k, v in model.state_dict().items() if v.is_meta}
    expected.pop(_tied_head(model), None)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match {type(model).__name__}: missing tensors {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}, unexpected tensors {unexpected[:10]}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
    state = {}
    for key, t in tensors.items():
        transposed = is_transposed(model, key)
        if transposed and t.dim() == 2:
            t = t.t()  # Conv1D (in, out) -> Linear (out, in)
        if t.shape != expected[key]:
            layout = " (Conv1D, stored transposed)" if transposed else ""
            want = tuple(expected[key])[::-1] if transposed else tuple(expected[key])
            raise ValueError(f"tensor {key!r}{layout} has shape {tuple(t.T.shape if transposed else t.shape)} in the "
                             f"checkpoint, the config needs {want}")
        if t.is_floating_point() and dtype is not None:
            t = t.to(dtype)
        state[key] = t.contiguous()
    return state


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict in the file's keys and layout, on the CPU (what model_keys + match_state read back)."""
    layout, tied = key_layout(model), _tied_head(model)
    tensors = {}
    for key, t in model.state_dict().items():
        if key == tied:
            continue  # tied: the embedding is the one copy (transformers writes it the same way)
        if is_transposed(model, key) and t.dim() == 2 and t.is_floating_point():
            t = t.t()  # Linear (out, in) -> Conv1D (in, out); a 4-bit weight's packed bytes are already (out, in)
        tensors[_renamed(key, HEAD, layout.head)] = t.detach().to("cpu").contiguous().clone()
    return tensors
