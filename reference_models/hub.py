"""Load and save Hugging Face checkpoint folders (config.json + safetensors) for the reference models.

How checkpoint keys map, plainly:
- keys are the same names as our modules (we use transformers' names), except
- GPT-2's attn.c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj weights are Conv1D (in, out) in the
  file and nn.Linear (out, in) here: transposed on load and on save;
- a tied lm_head.weight is not in the file (transformers does not write it); it is the
  embedding; if a file does carry it anyway, it is ignored;
- GPT-NeoX checkpoints name the head embed_out (transformers 5 renames it to lm_head on load and
  back on save, and so do we);
- buffers that older checkpoints saved but that are not weights (GPT-2's attn.bias causal mask and
  attn.masked_bias, GPT-NeoX's attention.bias and attention.masked_bias, rotary inv_freq) are skipped.
Weights are read from safetensors only: nothing here ever unpickles.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from torch import nn

from .files import save_safetensors_atomic, write_text_atomic
from .families import FAMILIES, llama_kwargs_from_hf
from .gpt import GPT, GPTConfig
from .llama import Llama, LlamaConfig
from .neox import GPTNeoX, GPTNeoXConfig

__all__ = ["load_pretrained", "save_pretrained", "from_hf_config", "config_from_hf"]

SUPPORTED_MODEL_TYPES = ("gpt2", "gpt_neox", *FAMILIES)
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
IGNORED_KEYS = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.attention\.bias|\.attention\.masked_bias"
                          r"|\.rotary_emb\.inv_freq)$")
# file key prefix -> model key prefix, per model class (the reverse on save)
CHECKPOINT_RENAMES = {GPTNeoX: {"embed_out.": "lm_head."}}
SINGLE_FILE, INDEX_FILE = "model.safetensors", "model.safetensors.index.json"


# ---------------------------------------------------------------------------------------------
# config.json <-> dataclass configs

def _gpt2_config(d: dict) -> GPTConfig:
    if d.get("scale_attn_by_inverse_layer_idx") or d.get("scale_attn_weights") is False or d.get("add_cross_attention"):
        raise ValueError("unsupported GPT-2 variant: scale_attn_by_inverse_layer_idx, scale_attn_weights=False and "
                         "add_cross_attention are not implemented, got "
                         f"{ {k: d.get(k) for k in ('scale_attn_by_inverse_layer_idx', 'scale_attn_weights', 'add_cross_attention')} }")
    names = [f.name for f in GPTConfig.__dataclass_fields__.values() if f.name != "attn_impl"]
    return GPTConfig(**{k: d[k] for k in names if k in d})


def config_from_hf(d: dict) -> GPTConfig | LlamaConfig | GPTNeoXConfig:
    """A transformers config dict (config.json) -> the config of the model that reads it:
    GPTConfig (gpt2), GPTNeoXConfig (gpt_neox) or LlamaConfig (the families in families.py)."""
    if not isinstance(d, dict):
        raise TypeError(f"config must be a dict (config.json content), got {type(d).__name__}")
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unknown model_type {mt!r}; supported: {list(SUPPORTED_MODEL_TYPES)}")
    if mt == "gpt2":
        return _gpt2_config(d)
    if mt == "gpt_neox":
        return GPTNeoXConfig.from_hf_dict(d)
    return LlamaConfig(**llama_kwargs_from_hf(d))


def model_class(config) -> type:
    """The model class a config builds."""
    return {GPTConfig: GPT, LlamaConfig: Llama, GPTNeoXConfig: GPTNeoX}[type(config)]


def from_hf_config(d: dict, attn_impl: str = "sdpa") -> GPT | Llama | GPTNeoX:
    """Build a randomly initialised model from a transformers config dict."""
    config = dataclasses.replace(config_from_hf(d), attn_impl=attn_impl)
    return model_class(config)(config)


# ---------------------------------------------------------------------------------------------
# reading safetensors

def _read_safetensors(path: Path, keys=None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = list(f.keys()) if keys is None else keys
            missing = [k for k in names if k not in f.keys()]
            if missing:
                raise ValueError(f"{path} does not contain {missing[:5]} that the index maps to it")
            return {k: f.get_tensor(k) for k in names}
    except ValueError:
        raise
    except Exception as exc:  # safetensors raises SafetensorError / OSError on truncated or garbage files
        raise ValueError(f"cannot read {path} as safetensors (corrupt or truncated?): {exc}") from exc


def _read_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / SINGLE_FILE).is_file():
        return _read_safetensors(folder / SINGLE_FILE)
    if (folder / INDEX_FILE).is_file():
        try:
            weight_map = json.loads((folder / INDEX_FILE).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{folder / INDEX_FILE} is not a valid index (needs a 'weight_map'): {exc}") from exc
        by_file: dict[str, list[str]] = {}
        for key, fname in weight_map.items():
            by_file.setdefault(fname, []).append(key)
        tensors = {}
        for fname, keys in sorted(by_file.items()):
            if not (folder / fname).is_file():
                raise FileNotFoundError(f"{folder / INDEX_FILE} maps {len(keys)} tensors to {fname}, which is missing")
            tensors.update(_read_safetensors(folder / fname, keys))
        return tensors
    pickled = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    if pickled:
        raise ValueError(
            f"{folder} has only pickled weights ({', '.join(sorted(pickled))}); reference_models reads safetensors "
            "only and never unpickles (a pickle can run arbitrary code). Convert it once, where you trust the file: "
            "transformers.AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, safe_serialization=True)")
    raise FileNotFoundError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}")


def _read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json (a transformers checkpoint folder needs one)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc


# ---------------------------------------------------------------------------------------------
# load

def _is_conv1d(model: nn.Module, key: str) -> bool:
    return isinstance(model, GPT) and key.endswith(CONV1D_SUFFIXES)


def _renamed(model: nn.Module, tensors: dict, on_save: bool = False) -> dict:
    renames = CHECKPOINT_RENAMES.get(type(model), {})
    if on_save:
        renames = {ours: theirs for theirs, ours in renames.items()}
    out = {}
    for key, t in tensors.items():
        old = next((p for p in renames if key.startswith(p)), None)
        out[key if old is None else renames[old] + key[len(old):]] = t
    return out


def _add_prefix(model: nn.Module, tensors: dict) -> dict:
    # A checkpoint of the bare transformer (GPT2Model / LlamaModel, e.g. the original "gpt2" upload)
    # has keys without the "transformer." / "model." / "gpt_neox." prefix.
    tensors = _renamed(model, tensors)
    prefix = model.base_model_prefix + "."
    if any(k.startswith(prefix) for k in tensors):
        return tensors
    return {(k if k.startswith("lm_head.") else prefix + k): v for k, v in tensors.items()}


def _match_state(model: nn.Module, tensors: dict[str, torch.Tensor], dtype) -> dict[str, torch.Tensor]:
    """Check names and shapes against the model; return a state dict in our layout."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = model.config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight")
    tensors = _add_prefix(model, {k: v for k, v in tensors.items() if not IGNORED_KEYS.search(k)})
    if tied:
        tensors.pop("lm_head.weight", None)  # some files carry the tied copy; the embedding is the truth
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match {type(model).__name__}: missing tensors {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}, unexpected tensors {unexpected[:10]}"
                         f"{' ...' if len(unexpected) > 10 else ''}")
    state = {}
    for key, t in tensors.items():
        if _is_conv1d(model, key) and t.dim() == 2:
            t = t.t()  # Conv1D (in, out) -> Linear (out, in)
        if t.shape != expected[key]:
            layout = " (Conv1D, stored transposed)" if _is_conv1d(model, key) else ""
            want = tuple(expected[key])[::-1] if layout else tuple(expected[key])
            raise ValueError(f"tensor {key!r}{layout} has shape {tuple(t.T.shape if layout else t.shape)} in the "
                             f"checkpoint, the config needs {want}")
        if t.is_floating_point() and dtype is not None:
            t = t.to(dtype)
        state[key] = t.contiguous()
    return state


def _stored_dtype(tensors: dict) -> torch.dtype:
    return next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)


def load_pretrained(path, dtype: torch.dtype | None = None, device="cpu",
                    attn_impl: str = "sdpa") -> GPT | Llama | GPTNeoX:
    """Load a transformers checkpoint folder (config.json + model.safetensors or a sharded index).

    dtype=None keeps the dtype stored in the file; the model is returned in eval mode on `device`.
    """
    folder = Path(path)
    hf = _read_config(folder)
    config = dataclasses.replace(config_from_hf(hf), attn_impl=attn_impl)
    cls = model_class(config)
    tensors = _read_weights(folder)
    with torch.device("meta"):
        model = cls(config)  # shapes only, no memory, no random init
    qconfig = hf.get("quantization_config")
    if qconfig:
        _load_quantized(model, tensors, qconfig, dtype or _stored_dtype(tensors))
    else:
        state = _match_state(model, tensors, dtype)
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
    return model.to(device).eval()


def _load_quantized(model, tensors, qconfig: dict, dtype) -> None:
    # The seam for 4-bit bitsandbytes checkpoints: minilora.quant.qlora owns the format (packed weights,
    # absmax, quant_map ...) and fills the meta-device model in place (swapping in its 4-bit
    # linears). `tensors` are the file's, untouched: transformers' names, GPT-2 Conv1D layout.
    # Imported only here, so that reference_models never depends on minilora otherwise.
    method = qconfig.get("quant_method")
    if method != "bitsandbytes" or not qconfig.get("load_in_4bit"):
        raise ValueError(f"only 4-bit bitsandbytes quantization_config is supported, got quant_method={method!r}, "
                         f"load_in_4bit={qconfig.get('load_in_4bit')!r}")
    try:
        from minilora.quant.qlora import load_bnb_4bit_state
    except ImportError as exc:
        raise NotImplementedError(f"loading a 4-bit checkpoint needs minilora.quant.qlora.load_bnb_4bit_state: {exc}") from exc
    load_bnb_4bit_state(model, tensors, qconfig, dtype)
    model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"4-bit checkpoint left tensors unloaded: {left[:10]}")


# ---------------------------------------------------------------------------------------------
# save

def save_pretrained(model: GPT | Llama | GPTNeoX, path) -> Path:
    """Write config.json and model.safetensors that transformers' from_pretrained loads."""
    if not isinstance(model, (GPT, Llama, GPTNeoX)):
        raise TypeError(f"save_pretrained expects a reference_models GPT, Llama or GPTNeoX, got {type(model).__name__}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    hf = model.config.to_hf_dict()
    if any(getattr(type(m), "is_quantized_4bit", False) for m in model.modules()):
        from minilora.quant.qlora import bnb_4bit_state_dict

        tensors, qconfig = bnb_4bit_state_dict(model)
        hf["quantization_config"] = qconfig
    else:
        tensors = {}
        for key, t in model.state_dict().items():
            if key == "lm_head.weight" and model.config.tie_word_embeddings:
                continue  # tied: the embedding is the one copy (transformers writes it the same way)
            if _is_conv1d(model, key):
                t = t.t()  # Linear (out, in) -> Conv1D (in, out)
            tensors[key] = t.detach().to("cpu").contiguous().clone()
        tensors = _renamed(model, tensors, on_save=True)
    hf["dtype"] = str(_stored_dtype(tensors)).removeprefix("torch.")
    save_safetensors_atomic(tensors, folder / SINGLE_FILE, metadata={"format": "pt"})
    write_text_atomic(folder / "config.json", json.dumps(hf, indent=2, sort_keys=True) + "\n")
    return folder
