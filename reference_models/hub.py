"""Load and save Hugging Face checkpoint folders (config.json + safetensors) for the reference models.

How checkpoint keys map to ours (prefixes, GPT-2's Conv1D transposes, skipped buffers, the tied
lm_head) is checkpoint_keys.py; a folder with a quantization_config is read and written by the
format registered for it (quantized_formats.py: minilora registers bitsandbytes' 4-bit format).
Weights are read from safetensors only: nothing here ever unpickles.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .checkpoint_keys import checkpoint_tensors, match_state, model_keys
from .families import FAMILIES, llama_kwargs_from_hf
from .files import save_safetensors_atomic, write_text_atomic
from .gpt import GPT, GPTConfig
from .llama import Llama, LlamaConfig
from .neox import GPTNeoX, GPTNeoXConfig
from .quantized_formats import format_for_config, format_for_model

__all__ = ["load_pretrained", "save_pretrained", "from_hf_config", "config_from_hf"]

SUPPORTED_MODEL_TYPES = ("gpt2", "gpt_neox", *FAMILIES)
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


def _model_class(config) -> type:
    """The model class a config builds."""
    return {GPTConfig: GPT, LlamaConfig: Llama, GPTNeoXConfig: GPTNeoX}[type(config)]


def from_hf_config(d: dict, attn_impl: str = "sdpa") -> GPT | Llama | GPTNeoX:
    """Build a randomly initialised model from a transformers config dict."""
    config = dataclasses.replace(config_from_hf(d), attn_impl=attn_impl)
    return _model_class(config)(config)


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

def _stored_dtype(tensors: dict) -> torch.dtype:
    return next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)


def load_pretrained(path, dtype: torch.dtype | None = None, device="cpu",
                    attn_impl: str = "sdpa") -> GPT | Llama | GPTNeoX:
    """Load a transformers checkpoint folder (config.json + model.safetensors or a sharded index).

    dtype=None keeps the dtype stored in the file; the model is returned in eval mode on `device`.
    A folder with a quantization_config loads through the format registered for it.
    """
    folder = Path(path)
    hf = _read_config(folder)
    config = dataclasses.replace(config_from_hf(hf), attn_impl=attn_impl)
    cls = _model_class(config)
    qconfig = hf.get("quantization_config")
    quantized = format_for_config(qconfig) if qconfig else None
    tensors = _read_weights(folder)
    with torch.device("meta"):
        model = cls(config)  # shapes only, no memory, no random init
    if quantized:
        quantized.load(model, tensors, qconfig, dtype or _stored_dtype(tensors))
    else:
        model.load_state_dict(match_state(model, model_keys(model, tensors), dtype), strict=False, assign=True)
    model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"checkpoint left tensors unloaded: {left[:10]}")
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# save

def save_pretrained(model: GPT | Llama | GPTNeoX, path) -> Path:
    """Write config.json and model.safetensors that transformers' from_pretrained loads (a model with
    quantized layers in their registered format, with its quantization_config)."""
    if not isinstance(model, (GPT, Llama, GPTNeoX)):
        raise TypeError(f"save_pretrained expects a reference_models GPT, Llama or GPTNeoX, got {type(model).__name__}")
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    hf = model.config.to_hf_dict()
    quantized = format_for_model(model)
    if quantized:
        tensors, hf["quantization_config"] = quantized.save(model)
    else:
        tensors = checkpoint_tensors(model)
    hf["dtype"] = str(_stored_dtype(tensors)).removeprefix("torch.")
    save_safetensors_atomic(tensors, folder / SINGLE_FILE, metadata={"format": "pt"})
    write_text_atomic(folder / "config.json", json.dumps(hf, indent=2, sort_keys=True) + "\n")
    return folder
