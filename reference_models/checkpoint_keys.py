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

Experts (EXPERT_KEYS, a row per mixture-of-experts model_type): the file holds one (out, in) matrix per
expert and projection, `<layer>.<block>.experts.<e>.<gate|up|down>.weight` (Mixtral: block
"block_sparse_moe", projections w1, w3, w2; Qwen: "mlp", gate_proj, up_proj, down_proj), which is
what transformers 5.24 writes and the hub's checkpoints hold. In memory (transformers' and ours) a
layer has `mlp.experts.gate_up_proj` (E, 2I, C), the E gate matrices stacked then the E up matrices
concatenated along dim 1, and `mlp.experts.down_proj` (E, C, I). model_keys fuses (a file already
holding the fused tensors is read as it is), checkpoint_tensors splits; a missing, extra or
mis-shaped expert matrix is named by its key in the file.

The dense loader (hub.py) and every quantized format (quantized_formats.py) go through these
functions, so a key means one thing to all of them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from .gpt import GPT
from .llama import Llama
from .neox import GPTNeoX

__all__ = ["KeyLayout", "KEY_LAYOUTS", "HEAD", "key_layout", "is_transposed", "model_keys", "match_state",
           "checkpoint_tensors", "ExpertKeys", "EXPERT_KEYS", "expert_keys"]

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


@dataclass(frozen=True)
class ExpertKeys:
    """How a mixture-of-experts family names its experts in the file (see the module docstring)."""

    block: str   # the MoE block's name in the file (ours is always `mlp`)
    gate: str    # expert e's gate projection (I, C): the first half of gate_up_proj[e]
    up: str      # its up projection (I, C): the second half
    down: str    # its down projection (C, I): down_proj[e]


_QWEN_EXPERTS = ExpertKeys("mlp", "gate_proj", "up_proj", "down_proj")
EXPERT_KEYS: dict[str, ExpertKeys] = {"mixtral": ExpertKeys("block_sparse_moe", "w1", "w3", "w2"),
                                      "qwen2_moe": _QWEN_EXPERTS, "qwen3_moe": _QWEN_EXPERTS}


def expert_keys(model: nn.Module) -> ExpertKeys | None:
    """The model's row of EXPERT_KEYS (None for a dense model)."""
    return EXPERT_KEYS.get(getattr(getattr(model, "config", None), "model_type", None))


def _expert_shapes(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """{"<layer>.mlp.experts": (E, I, C)} for every sparse layer (fused gate_up_proj is (E, 2I, C))."""
    out = {}
    for key, t in model.state_dict().items():
        if key.endswith(".experts.gate_up_proj") and t.dim() == 3:
            out[key[:-len(".gate_up_proj")]] = (t.shape[0], t.shape[1] // 2, t.shape[2])
    return out


def _file_key(ek: ExpertKeys, experts: str, e: int, proj: str) -> str:
    return f"{experts.removesuffix('mlp.experts')}{ek.block}.experts.{e}.{proj}.weight"


def _fuse_experts(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ek = expert_keys(model)
    if ek is None:
        return tensors
    shapes = _expert_shapes(model)
    pattern = re.compile(rf"^(?P<experts>.+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>{ek.gate}|{ek.up}|{ek.down})\.weight$")
    out, found = {}, {}
    for key, t in tensors.items():
        ours = re.sub(rf"\.{ek.block}\.", ".mlp.", key)
        m = pattern.match(ours)
        if m and m["experts"] in shapes:
            found.setdefault(m["experts"], {})[(m["proj"], int(m["e"]))] = (key, t)
        else:
            out[ours] = t
    for experts, mats in found.items():
        E, inter, C = shapes[experts]
        want = {ek.gate: (inter, C), ek.up: (inter, C), ek.down: (C, inter)}
        missing = [_file_key(ek, experts, e, p) for p in want for e in range(E) if (p, e) not in mats]
        extra = sorted(key for (p, e), (key, _) in mats.items() if e >= E)
        if missing or extra:
            raise ValueError(f"checkpoint experts do not match the config's {E}: missing tensors {missing[:6]}, "
                             f"unexpected tensors {extra[:6]}")
        for (p, e), (key, t) in mats.items():
            if tuple(t.shape) != want[p]:
                raise ValueError(f"tensor {key!r} has shape {tuple(t.shape)} in the checkpoint, the config needs "
                                 f"{want[p]} (expert {e} of {E})")
        stack = lambda proj: torch.stack([mats[(proj, e)][1] for e in range(E)])  # noqa: E731  (E, out, in)
        out[f"{experts}.gate_up_proj"] = torch.cat([stack(ek.gate), stack(ek.up)], dim=1)  # (E, 2I, C)
        out[f"{experts}.down_proj"] = stack(ek.down)  # (E, C, I)
    return out


def _split_experts(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    ek = expert_keys(model)
    if ek is None:
        return tensors
    blocks = tuple(experts.removesuffix("experts") for experts in _expert_shapes(model))  # "<layer>.mlp."
    out = {}
    for key, t in tensors.items():
        experts, _, name = key.rpartition(".")
        if experts in {b + "experts" for b in blocks} and name in ("gate_up_proj", "down_proj") and t.dim() == 3:
            if name == "gate_up_proj":
                gate, up = t.chunk(2, dim=1)  # (E, I, C) each
                out.update({_file_key(ek, experts, e, ek.gate): gate[e].clone() for e in range(t.shape[0])})
                out.update({_file_key(ek, experts, e, ek.up): up[e].clone() for e in range(t.shape[0])})
            else:
                out.update({_file_key(ek, experts, e, ek.down): t[e].clone() for e in range(t.shape[0])})
            continue
        block = next((b for b in blocks if key.startswith(b)), None)
        out[key if block is None else block.removesuffix("mlp.") + ek.block + "." + key[len(block):]] = t
    return out


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
    tied head dropped, the body's prefix added to a bare-transformer checkpoint, experts fused."""
    layout = key_layout(model)
    tensors = {_renamed(k, layout.head, HEAD): v for k, v in tensors.items() if not _ends_with(k, layout.ignored)}
    if not any(k.startswith(layout.prefix) for k in tensors):
        tensors = {(k if k.startswith(HEAD + ".") else layout.prefix + k): v for k, v in tensors.items()}
    tensors.pop(_tied_head(model), None)  # the embedding is the truth
    return _fuse_experts(model, tensors)


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
    return _split_experts(model, tensors)
