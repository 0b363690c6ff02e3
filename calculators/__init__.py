"""calculators: parameter counts and memory arithmetic for LoRA / QLoRA / full fine-tuning, torch-free."""
from .lora import DEFAULT_TARGETS, LoRASpec, lora_layers, lora_trainable_parameters, parse_targets
from .models import (FAMILIES, PRESETS, ConfigError, ModelSpec, count_parameters, linear_layers,
                     load_config, model_spec, parameter_tensors)

__all__ = ["FAMILIES", "PRESETS", "ConfigError", "ModelSpec", "count_parameters", "linear_layers",
           "load_config", "model_spec", "parameter_tensors", "DEFAULT_TARGETS", "LoRASpec", "lora_layers",
           "lora_trainable_parameters", "parse_targets"]
