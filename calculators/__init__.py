"""calculators: parameter counts, memory and cost arithmetic for full / LoRA / QLoRA training.

Pure Python: imports neither torch nor minilora nor reference_models, so it runs anywhere and
`python -m minilora.calc` starts fast. The memory model mirrors the reference models' code.
"""
from .activations import ActivationSetup, activation_bytes, block_targets
from .cost import CostEstimate, training_cost
from .distributed import (STRATEGIES, deepspeed_zero2_estimate, deepspeed_zero3_estimate,
                          fsdp_rank0_elements, parse_strategy)
from .fit import fits, largest_fitting, methods_that_fit
from .gpus import GPU, GPUS, gpu_from_text, parse_size
from .kv_cache import kv_bytes_per_position, kv_cache_bytes, kv_cache_positions
from .lora import DEFAULT_TARGETS, LoRASpec, lora_layers, lora_tensors, lora_trainable_parameters, parse_targets
from .memory import (Breakdown, Term, TrainingSetup, inference_memory, model_state_bytes, nf4_bytes,
                     training_memory)
from .models import (FAMILIES, PRESETS, ConfigError, ModelSpec, count_parameters, linear_layers,
                     load_config, model_spec, parameter_tensors)

__all__ = [
    "ActivationSetup", "activation_bytes", "block_targets",
    "CostEstimate", "training_cost",
    "STRATEGIES", "deepspeed_zero2_estimate", "deepspeed_zero3_estimate", "fsdp_rank0_elements", "parse_strategy",
    "fits", "largest_fitting", "methods_that_fit",
    "GPU", "GPUS", "gpu_from_text", "parse_size",
    "kv_bytes_per_position", "kv_cache_bytes", "kv_cache_positions",
    "DEFAULT_TARGETS", "LoRASpec", "lora_layers", "lora_tensors", "lora_trainable_parameters", "parse_targets",
    "Breakdown", "Term", "TrainingSetup", "inference_memory", "model_state_bytes", "nf4_bytes", "training_memory",
    "FAMILIES", "PRESETS", "ConfigError", "ModelSpec", "count_parameters", "linear_layers", "load_config",
    "model_spec", "parameter_tensors",
]
