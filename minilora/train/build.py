"""What a run trains with: the device and precision, the model prepared for the method (full, LoRA,
QLoRA) and its tokenizer, and the optimizer."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import TrainConfig
from .tokenizer import load_tokenizer

__all__ = ["resolve_device", "autocast", "lora_config", "build_model", "make_optimizer"]


def resolve_device(cfg: TrainConfig) -> torch.device:
    """auto, cpu, cuda or cuda:N only; a CUDA device must exist here (ValueError otherwise)."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}") from exc
    if device.type == "cpu" and device.index is None:
        return device
    if device.type != "cuda":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} asked for, but CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"device {cfg.device!r} asked for, but this machine has {count} CUDA device(s) "
                         f"(cuda:0 to cuda:{count - 1})")
    return device


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA by default ("auto"); fp32 on CPU unless --precision bf16 asks for it."""
    use = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


def lora_config(cfg: TrainConfig):
    from minilora.lora.layer import LoRAConfig

    targets = cfg.lora_targets
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets)


def build_model(cfg: TrainConfig, model=None, device=None):
    """Load (or take) the base model and prepare it for cfg.method; returns (model, tokenizer).

    full: every parameter trains. lora: the base is frozen and adapters are injected.
    qlora: linear layers (not lm_head) become frozen 4-bit NF4/FP4, then adapters are injected.
    """
    device = device or resolve_device(cfg)
    if model is None:
        import minilora.quant.qlora  # noqa: F401 (registers bitsandbytes' 4-bit format: 4-bit folders load too)
        from reference_models import load_pretrained

        if not cfg.model:
            raise ValueError("model is required: a folder with config.json and model.safetensors")
        if not (Path(cfg.model) / "config.json").is_file():
            raise ValueError(f"model must be a folder with config.json and *.safetensors, got {cfg.model!r}")
        model = load_pretrained(cfg.model, device=device)
    model.to(device)
    tok_spec = cfg.tokenizer
    if tok_spec is None:
        tok_spec = Path(cfg.model) if cfg.model and (Path(cfg.model) / "tokenizer.json").is_file() else "byte"
    tokenizer = load_tokenizer(tok_spec)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}; use a matching --tokenizer")
    if cfg.method == "full":
        model.requires_grad_(True)
        return model, tokenizer
    model.requires_grad_(False)
    if cfg.method == "qlora":
        from minilora.quant.qlora import prepare_for_kbit_training, quantize_model

        quantize_model(model, quant_type=cfg.quant_type, block_size=cfg.quant_block_size,
                       double_quant=cfg.double_quant)
        prepare_for_kbit_training(model, use_gradient_checkpointing=cfg.grad_checkpointing)
    from minilora.lora.model import inject

    inject(model, lora_config(cfg))
    return model, tokenizer


def make_optimizer(cfg: TrainConfig, params: list, device: torch.device):
    """AdamW, or minilora's CPUOffloadAdamW with --optimizer offload (one process only: see TrainConfig)."""
    if cfg.optimizer == "offload":
        from minilora.optim.offload import CPUOffloadAdamW

        return CPUOffloadAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, state_bits=cfg.offload_state_bits)
    # fused AdamW on CUDA (one kernel for all tensors); the default foreach path on CPU.
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda" or None)
