"""calculators: parameter counts, memory and cost arithmetic for full / LoRA / QLoRA training.

Pure Python: imports neither torch nor minilora nor reference_models, so it runs anywhere and
`python -m minilora.calc` starts fast. The memory model mirrors the code that trains: transformers +
peft + bitsandbytes (TrainingSetup(stack="hf"), the default) or the reference models (stack="minilora").
"""
from .activations import ActivationSetup, activation_bytes, block_targets
from .cost import CostEstimate, training_cost
from .distributed import (STRATEGIES, deepspeed_zero2_estimate, deepspeed_zero3_estimate,
                          fsdp_rank0_elements, parse_strategy)
from .fit import fits, largest_fitting, methods_that_fit
from .gpus import GPU, GPUS, gpu_from_text, parse_size
from .kv_cache import kv_bytes_per_position, kv_cache_bytes, kv_cache_positions
from .lora import DEFAULT_TARGETS, LoRASpec, lora_layers, lora_tensors, lora_trainable_parameters, parse_targets
from .memory import Breakdown, Phase, inference_memory, training_memory
from .states import ModelStates, model_state_bytes, nf4_bytes
from .terms import Term
from .training_setup import STACK_VERSIONS, Precision, TrainingSetup, describe_recipe
from .models import (FAMILIES, PRESETS, ConfigError, ModelSpec, count_parameters, linear_layers,
                     load_config, model_spec, parameter_tensors)
from .moe import active_parameters, busiest_expert_tokens, expert_parameters

__all__ = [
    "ActivationSetup", "activation_bytes", "block_targets",
    "CostEstimate", "training_cost",
    "STRATEGIES", "deepspeed_zero2_estimate", "deepspeed_zero3_estimate", "fsdp_rank0_elements", "parse_strategy",
    "fits", "largest_fitting", "methods_that_fit",
    "GPU", "GPUS", "gpu_from_text", "parse_size",
    "kv_bytes_per_position", "kv_cache_bytes", "kv_cache_positions",
    "DEFAULT_TARGETS", "LoRASpec", "lora_layers", "lora_tensors", "lora_trainable_parameters", "parse_targets",
    "Breakdown", "Phase", "inference_memory", "training_memory", "ModelStates", "model_state_bytes", "nf4_bytes", "Term",
    "Precision", "TrainingSetup", "STACK_VERSIONS", "describe_recipe",
    "FAMILIES", "PRESETS", "ConfigError", "ModelSpec", "count_parameters", "linear_layers", "load_config",
    "model_spec", "parameter_tensors",
    "active_parameters", "busiest_expert_tokens", "expert_parameters",
]
