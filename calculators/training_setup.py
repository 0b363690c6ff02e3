"""What a training run is (TrainingSetup), the choices it allows, and the dtype of each tensor group.

Precision is the one place that decides how many bytes an element of each tensor group takes
(weights, adapters, gradients, master copy, optimizer states, activations, logits). Every memory
term reads it and none re-derives a dtype from the setup, so a precision recipe (peft's fp32
adapters on a 16-bit base, fp32 weights trained under autocast, ...) changes `Precision.of` only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .long_context import check_long_context
from .lora import LoRASpec

__all__ = ["TrainingSetup", "Precision", "check_setup", "DTYPE_BYTES", "METHODS", "OPTIMIZERS",
           "CHECKPOINTING", "ATTENTION"]

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd", "sgd-momentum", "offload", "offload8bit")
CHECKPOINTING = ("none", "full", "selective")
ATTENTION = ("sdpa", "flash", "eager")


@dataclass(frozen=True)
class TrainingSetup:
    method: str = "lora"          # full | lora | qlora
    batch: int = 1                # micro-batch per GPU
    seq: int = 512
    grad_accum: int = 1
    grad_ckpt: str = "none"       # none | full | selective
    attn: str = "sdpa"            # sdpa (= flash) | eager
    dtype: str = "bf16"           # weights and activations (QLoRA: compute dtype of the 4-bit layers)
    master_weights: bool | None = None  # fp32 copy of trainable 16-bit weights; None: yes for full FT
    optimizer: str = "adamw"
    lora: LoRASpec = field(default_factory=LoRASpec)
    double_quant: bool = True     # QLoRA: quantize the absmax constants too (bitsandbytes' compress_statistics)
    block_size: int = 64          # NF4 block
    gpus: int = 1
    zero: str = "none"            # none | ddp | zero1 | zero2 | zero3 | fsdp-full | fsdp-grad-op
    device: str = "cuda"          # cuda | cpu (dropout masks and norm statistics differ, see activations.py)
    offload_page_size: int = 2 ** 20
    offload_gpu_pages: int = 2
    expert_imbalance: float = 1.0  # MoE: the busiest expert gets this many times the balanced N * k / E tokens
    loss: str = "full"            # full | chunked: head and loss over chunks of tokens (long_context.py)
    loss_chunk: int | None = None  # tokens per chunk of the chunked loss; None: DEFAULT_LOSS_CHUNK
    offload_activations: bool = False  # full checkpointing's block inputs wait on the host (long_context.py)


def check_setup(setup: TrainingSetup) -> None:
    """Raise ValueError naming the first setting that is out of range and what is allowed."""
    for name in ("batch", "seq", "grad_accum", "gpus"):
        value = getattr(setup, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    imbalance = setup.expert_imbalance
    if isinstance(imbalance, bool) or not isinstance(imbalance, (int, float)) or not imbalance >= 1:
        raise ValueError(f"expert_imbalance must be a number >= 1 (1: balanced routing), got {imbalance!r}")
    choices = dict(method=METHODS, grad_ckpt=CHECKPOINTING, attn=ATTENTION,
                   dtype=tuple(DTYPE_BYTES), optimizer=OPTIMIZERS, device=("cuda", "cpu"))
    for name, allowed in choices.items():
        if getattr(setup, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(setup, name)!r}")
    check_long_context(setup)


@dataclass(frozen=True)
class Precision:
    """Bytes per element of each tensor group of one training run (0 for a group it does not keep)."""
    name: str                     # the dtype as the user named it, quoted in the assumptions
    weights: int                  # the model's own (not NF4-quantized) weights, frozen or trained
    adapters: int                 # LoRA A and B, and the input each adapter casts to their dtype
    gradients: int                # one gradient per trainable element
    master: int                   # fp32 master copy per trainable element; 0: none
    optimizer_states: int         # each moment (AdamW's m and v, SGD's momentum) per trainable element
    activations: int              # what autograd saves: the compute dtype
    logits: int                   # the lm_head output the caller holds (the loss works in fp32)

    @classmethod
    def of(cls, setup: TrainingSetup) -> "Precision":
        """Today's recipe: everything in `setup.dtype`; an fp32 master copy of the trainable
        weights for full fine-tuning of a 16-bit model (or when asked), and then fp32 optimizer
        states, since the optimizer steps on the master copy."""
        d = DTYPE_BYTES[setup.dtype]
        master = setup.master_weights if setup.master_weights is not None else setup.method == "full"
        master = bool(master) and d != 4  # an fp32 model is its own master copy
        return cls(name=setup.dtype, weights=d, adapters=d, gradients=d, master=4 if master else 0,
                   optimizer_states=4 if master else d, activations=d, logits=d)
