"""Adapter files in peft's format, so adapters move between minilora and peft both ways.

A folder holds `adapter_config.json` (peft's LoraConfig fields) and `adapter_model.safetensors`
with keys `base_model.model.<module>.lora_A.weight` (r, in), `...lora_B.weight` (out, r) and, for
DoRA, `...lora_magnitude_vector` (out,): the adapter name is dropped on save and put back on load
(peft's get_peft_model_state_dict / set_peft_model_state_dict). GPT-2 in transformers stores its
projections as Conv1D, but the LoRA factors keep these shapes; peft wants `fan_in_fan_out: true`
in the config of a gpt2 model, so we write it for one. LoRA on expert tensors (`target_parameters`)
has its own keys and layouts, and transformers 4's per-expert adapters are fused on load:
lora/peft_experts.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from reference_models.files import save_safetensors_atomic, write_json_atomic
from .layer import LoRAConfig
from .layer import suffix_match
from .model import inject_with_undo, lora_layers
from .targets import in_modules_to_save
from .peft_experts import (expected_expert_tensors, expert_file_fields, expert_file_tensors, fuse_per_expert_tensors,
                           router_names)

__all__ = ["save_adapter", "load_adapter", "load_adapter_weights", "config_from_peft", "CONFIG_NAME",
           "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_INIT_TO_PEFT = {"kaiming": True, "gaussian": "gaussian", "pissa": True, "olora": True}
# peft LoraConfig fields we can honour only at their defaults.
_UNSUPPORTED = {"layers_to_transform": None, "layers_pattern": None, "lora_bias": False, "use_qalora": False,
                "trainable_token_indices": None, "layer_replication": None,
                "alora_invocation_tokens": None, "arrow_config": None, "use_bdlora": None, "kasa_config": None,
                "velora_config": None, "monteclora_config": None}


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "to_hf_dict"):
        return config.to_hf_dict().get("model_type")
    return getattr(config, "model_type", None)


def _targets_for_file(model: nn.Module, wrapped: list[str], config: LoRAConfig):
    """peft re-matches target_modules on load, so write a spec that selects exactly `wrapped`:
    the config's own regex, else the distinct last names when they select nothing more, else full names."""
    if isinstance(config.target_modules, str) and config.target_modules.lower() != "all-linear":
        return config.target_modules
    short = sorted({n.rsplit(".", 1)[-1] for n in wrapped})
    names = [n for n, _ in model.named_modules()]
    selected = {n for n in names if any(suffix_match(n, s) for s in short)}
    inner = {n for n in selected if ".base_layer" in n or ".lora_" in n}
    return short if selected - inner == set(wrapped) else sorted(wrapped)


def save_adapter(model: nn.Module, folder, adapter_name: str = "default") -> Path:
    """Write adapter `adapter_name` as peft would (atomic writes); returns the folder."""
    configs = getattr(model, "lora_configs", {})
    if adapter_name not in configs:
        raise ValueError(f"unknown adapter {adapter_name!r}; this model has {sorted(configs) or 'no adapters'}")
    config = configs[adapter_name]
    layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.lora_A}
    target_parameters, ranks, alphas = expert_file_fields(model, adapter_name, list(layers))
    routers = router_names(model)  # written as target_parameters <router>.weight, as peft does
    tensors = {PREFIX + k: v for k, v in expert_file_tensors(model, adapter_name).items()}
    for name, layer in layers.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
        tensors[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
        if adapter_name in layer.lora_magnitude_vector:
            tensors[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name]
        key = f"{name}.weight" if name in routers else name  # the name peft's rank_pattern meets
        ranks[key], alphas[key] = layer.r[adapter_name], layer.alpha[adapter_name]
    state = model.state_dict(keep_vars=True)
    if config.bias == "all":
        tensors.update({PREFIX + k: v for k, v in state.items() if k == "bias" or k.endswith(".bias")})
    elif config.bias == "lora_only":
        tensors.update({f"{PREFIX}{n}.base_layer.bias": m.base_layer.bias for n, m in layers.items()
                        if getattr(m.base_layer, "bias", None) is not None})
    for key, value in state.items():
        if in_modules_to_save(key, config.modules_to_save):
            tensors[PREFIX + key] = value
    # Ranks / alphas are written per module where they differ from the most common value, with the
    # full module name as the pattern key (combined adapters can have a different rank per layer).
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    alpha = max(set(alphas.values()), key=list(alphas.values()).count)
    first = next(iter(layers.values()), None)
    payload = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if hasattr(model, "lm_head") else None,
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": _targets_for_file(model, [n for n in layers if n not in routers], config),
        "target_parameters": target_parameters,
        "exclude_modules": config.exclude_modules,
        "bias": config.bias,
        "init_lora_weights": _INIT_TO_PEFT[config.init],
        "use_rslora": first.use_rslora[adapter_name] if first else config.use_rslora,
        "use_dora": first is not None and adapter_name in first.lora_magnitude_vector,
        "rank_pattern": {n: v for n, v in ranks.items() if v != r},
        "alpha_pattern": {n: v for n, v in alphas.items() if v != alpha},
        "modules_to_save": config.modules_to_save or None,
        "fan_in_fan_out": _model_type(model) == "gpt2",
        "inference_mode": True,
        "revision": None,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})
    write_json_atomic(folder / CONFIG_NAME, payload)
    return folder


def config_from_peft(raw: dict) -> LoRAConfig:
    """LoRAConfig from an adapter_config.json dict; raises for peft options we do not implement."""
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"only LoRA adapters can be loaded, got peft_type={raw.get('peft_type')!r}")
    odd = {k: raw[k] for k, default in _UNSUPPORTED.items() if raw.get(k, default) not in (default, [], {})}
    if odd:
        raise ValueError(f"adapter_config.json uses peft options minilora does not implement: {odd}")
    init = raw.get("init_lora_weights", True)
    return LoRAConfig(
        r=raw.get("r", 8), alpha=raw.get("lora_alpha", 8), dropout=raw.get("lora_dropout", 0.0),
        target_modules=raw.get("target_modules"), exclude_modules=raw.get("exclude_modules"),
        bias=raw.get("bias", "none"), init="gaussian" if init == "gaussian" else "kaiming",
        use_rslora=bool(raw.get("use_rslora", False)), use_dora=bool(raw.get("use_dora", False)),
        rank_pattern=dict(raw.get("rank_pattern") or {}), alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        modules_to_save=list(raw.get("modules_to_save") or []),
        target_parameters=raw.get("target_parameters") or None,
    )


def load_adapter(model: nn.Module, folder, adapter_name: str = "default") -> dict:
    """Read an adapter saved by peft or by save_adapter into `model` as `adapter_name` (made active).
    Every tensor must land on a module of the right shape and every wrapped module must get its
    tensors; tensors other than LoRA factors are accepted only for biases (when the config's bias is
    not "none") and under modules_to_save. Otherwise a ValueError names them, nothing is copied, and
    the model is left exactly as it was (same modules, weights, active adapters and requires_grad)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for file in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / file).is_file():
            raise FileNotFoundError(f"{folder / file} not found (an adapter folder holds {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME}; .bin adapters are not read: no unpickling)")
    config = config_from_peft(json.loads((folder / CONFIG_NAME).read_text()))
    tensors = load_file(str(folder / WEIGHTS_NAME))
    _, undo = inject_with_undo(model, config, adapter_name)
    try:
        _copy_tensors(model, tensors, adapter_name, config)
    except Exception:  # leave the model as it was
        undo()
        raise
    return {"config": config, "tensors": len(tensors)}


def load_adapter_weights(model: nn.Module, folder, adapter_name: str = "default") -> dict:
    """Copy a saved adapter's tensors into `adapter_name`, which `model` already holds (injected with
    the same config): load_adapter's checks and key mapping, without injecting anything. For callers
    that must keep the model's modules, e.g. minilora.distributed filling a sharded model's stand-ins."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if adapter_name not in getattr(model, "lora_configs", {}):
        raise ValueError(f"the model has no adapter {adapter_name!r} to load into; inject it first "
                         "or call load_adapter")
    config_from_peft(json.loads((folder / CONFIG_NAME).read_text()))  # refuses options we do not implement
    tensors = load_file(str(folder / WEIGHTS_NAME))
    _copy_tensors(model, tensors, adapter_name, model.lora_configs[adapter_name])
    return {"config": model.lora_configs[adapter_name], "tensors": len(tensors)}


def _as_is(t: torch.Tensor) -> torch.Tensor:
    return t


def _is_bias_key(key: str) -> bool:
    return key == "bias" or key.endswith(".bias")


@torch.no_grad()
def _copy_tensors(model: nn.Module, tensors: dict, adapter_name: str, config: LoRAConfig) -> None:
    """Check every tensor first, then copy them all: a refused file copies nothing."""
    layers = {n: m for n, m in lora_layers(model).items() if adapter_name in m.lora_A}
    state = model.state_dict(keep_vars=True)
    expected = {}
    for name, layer in layers.items():
        expected[f"{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
        expected[f"{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
        if adapter_name in layer.lora_magnitude_vector:
            expected[f"{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector[adapter_name]
    # file key (no prefix) -> (our tensor, the file's shape, file tensor -> our layout)
    expected = {k: (t, t.shape, _as_is) for k, t in expected.items()}
    expected.update(expected_expert_tensors(model, adapter_name))
    tensors = fuse_per_expert_tensors(model, tensors, adapter_name, PREFIX)
    problems, seen, plan = [], set(), []
    for key, value in tensors.items():
        short = key[len(PREFIX):] if key.startswith(PREFIX) else key
        target, shape, to_ours = expected.get(short) or (None, None, None)
        if target is None and ".lora_" not in short and short in state:
            if (config.bias != "none" and _is_bias_key(short)) or in_modules_to_save(short, config.modules_to_save):
                target, shape, to_ours = state[short], state[short].shape, _as_is
            else:
                problems.append(f"{key}: not a LoRA tensor, and neither a bias (the config has bias="
                                f"{config.bias!r}) nor under modules_to_save {config.modules_to_save}; "
                                "an adapter file may not overwrite base weights")
                continue
        if target is None:
            problems.append(f"{key}: no such LoRA tensor in the model")
        elif tuple(shape) != tuple(value.shape):
            problems.append(f"{key}: file has {tuple(value.shape)}, model has {tuple(shape)}")
        else:
            plan.append((target, to_ours(value)))
            seen.add(short)
    missing = sorted(set(expected) - seen)
    if missing:
        problems.append(f"the file lacks {len(missing)} tensor(s) the config targets: {missing[:4]}"
                        + (" ..." if len(missing) > 4 else ""))
    if problems:
        raise ValueError("adapter file does not fit the model: " + "; ".join(problems[:8])
                         + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))
    for target, value in plan:
        target.copy_(value.to(target.dtype))
