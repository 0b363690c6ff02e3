"""Model states: the exact bytes of weights, gradients, master weights and optimizer states on one
device before sharding (they equal the sum of the real tensors' nbytes after one optimizer step:
tests/test_calc_memory.py for minilora, tests/test_calc_stack_hf.py for transformers + peft +
bitsandbytes).

NF4 sizes follow bitsandbytes' layout (REFERENCE.md section 1); AdamW keeps m, v and a 4-byte
`step` per tensor; bitsandbytes' 8-bit AdamW keeps uint8 m, v with an fp32 absmax per 256
elements; CPUOffloadAdamW keeps its states on the host. Which tensors train, and each tensor's
dtype, come from the setup's recipe (`Precision.of`), decided once. What the transformers stack
holds besides the parameters: RoPE's inv_freq and original_inv_freq buffers (fp32, per rotary
embedding), Gemma's embed_scale buffer, and per 4-bit layer its own 16-entry codebook and, with
double quantization, its own 256-entry nested map (bitsandbytes' QuantState, measured on CPU); a
4-bit layer's bias is cast to the compute dtype by Linear4bit's first forward. bitsandbytes replaces
nn.Linear layers only: transformers' 3-D expert tensors and routers stay dense (minilora's quantize_model
stores each expert in NF4).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .lora import lora_tensors
from .parameters import Linear, Tensor, linear_layers, parameter_tensors
from .spec import ModelSpec
from .training_setup import DTYPE_BYTES, Precision, TrainingSetup

__all__ = ["ModelStates", "model_state_bytes", "nf4_bytes", "quantized_linears", "hf_buffer_bytes"]

BNB_BLOCK, BNB_MIN_8BIT = 256, 4096


@dataclass(frozen=True)
class ModelStates:
    """Model-state bytes on ONE device before sharding, and the tensor shapes sharding needs."""
    weights: int                  # every weight: frozen (NF4 or dense) and trainable
    gradients: int                # 0 with an offload optimizer (each .grad goes to the host)
    master: int                   # fp32 master copy of the trainable weights
    optimizer: int                # optimizer states on the device, `optimizer_scalars` included
    optimizer_scalars: int        # AdamW's fp32 `step` per tensor: never sharded
    host: int                     # the offload optimizer's host bytes
    params: int                   # the model's parameter count (adapters excluded)
    trainable: int                # trainable elements (all parameters, or the adapters)
    trainable_shapes: tuple       # shapes of the trainable tensors
    all_shapes: tuple             # shapes of the model's parameters (adapters excluded)
    all_bytes_per_el: tuple       # each parameter's bytes per element, as the recipe holds it dense
    dense_shapes: tuple           # LoRA / QLoRA: shapes of the frozen tensors kept dense
    dense_bytes_per_el: tuple     # ... and their bytes per element
    quantized_bytes: int          # QLoRA: the NF4 codes and constants (module buffers, not parameters)
    buffers: int                  # the model's own buffers (transformers' RoPE inv_freq), never sharded
    block_quantized_bytes: int    # the first transformer block's NF4 bytes
    block_dense_bytes: int        # the first transformer block's other weight bytes (adapters included)
    precision: Precision


def nf4_bytes(numel: int, block_size: int = 64, double_quant: bool = True) -> int:
    """Bytes of one NF4 weight in memory: packed codes (two per byte), then per block of
    `block_size` an fp32 absmax, or with double quantization a uint8 absmax plus one fp32 absmax2
    per 256 blocks and an fp32 offset (REFERENCE.md section 1: 4.5 vs 4.127 bits per parameter).
    The 16-entry codebook and the 256-entry dynamic map are shared constants, not counted
    (bitsandbytes' serialized format repeats them per layer: 64 B + 1 KiB)."""
    packed = (numel + 1) // 2
    blocks = -(-numel // block_size)
    if not double_quant:
        return packed + 4 * blocks
    return packed + blocks + 4 * -(-blocks // 256) + 4


def hf_buffer_bytes(spec: ModelSpec, precision: Precision) -> int:
    """transformers' buffers: inv_freq and original_inv_freq (fp32, rotary_dim / 2 each) per rotary
    embedding (two with a local RoPE base: Gemma 3, OLMo 3), and Gemma's embed_scale scalar."""
    ropes = 0 if not spec.rotary_dim else (2 if spec.local_rope_theta is not None else 1)
    scale = DTYPE_BYTES[precision.linear] if spec.scaled_embeddings else 0
    return ropes * 2 * (spec.rotary_dim // 2) * 4 + scale


def quantized_linears(spec: ModelSpec, stack: str = "minilora") -> list[Linear]:
    """QLoRA quantizes every linear layer except lm_head; embeddings and norms stay 16-bit. bitsandbytes
    (stack "hf") replaces every nn.Linear, Qwen2-MoE's shared_expert_gate included; minilora's
    quantize_model keeps a MoE gate dense (shared_expert_gate, like the router)."""
    return [lin for lin in linear_layers(spec) if lin.name != "lm_head"
            and (stack == "hf" or not lin.name.endswith("shared_expert_gate"))]


def _in_first_block(name: str) -> bool:  # GPT-2's `h.0` or the Llama family's `layers.0`
    return ".layers.0." in name or ".h.0." in name


def _adam8bit_bytes(n: int) -> int:
    """bitsandbytes 8-bit m and v of one tensor: uint8 + an fp32 absmax per 256 elements; tensors
    under 4096 elements keep fp32 states."""
    return 2 * (n + 4 * -(-n // BNB_BLOCK)) if n >= BNB_MIN_8BIT else 2 * 4 * n


def _optimizer_state_bytes(numels: list[int], optimizer: str, state_bytes: list[int]) -> int:
    """Optimizer states on the device for the given trainable tensors (numel, and bytes per state element)."""
    if optimizer == "adamw":  # m and v, plus torch's per-tensor fp32 `step`
        return sum(2 * n * b + 4 for n, b in zip(numels, state_bytes))
    if optimizer == "adamw8bit":  # bitsandbytes: uint8 m, v + fp32 absmax per 256; small tensors fp32
        total = 2 * 256 * 4  # the signed and unsigned dynamic maps, shared by all tensors
        return total + sum(_adam8bit_bytes(n) for n in numels)
    if optimizer == "sgd-momentum":
        return sum(n * b for n, b in zip(numels, state_bytes))
    return 0  # sgd, offload (states live on the host)


def _offload_host_bytes(numels: list[int], master_fp32: bool, eight_bit: bool) -> int:
    """CPUOffloadAdamW host memory (interfaces.md): m, v, fp32 grad buffer, fp32 master."""
    total = 0
    for n in numels:
        total += _adam8bit_bytes(n) if eight_bit else 8 * n
        total += 4 * n + (4 * n if master_fp32 else 0)
    return total


def _nf4_size(tensor: Tensor, setup: TrainingSetup, quantized: set) -> int | None:
    """NF4 bytes of a frozen tensor that QLoRA quantizes; None for one that stays dense. The
    transformers stack also holds each layer's codebook (64 B) and nested map (1 KiB)."""
    constants = (64 + (1024 if setup.double_quant else 0)) if setup.stack == "hf" else 0
    if tensor.name in quantized:
        return nf4_bytes(tensor.numel, setup.block_size, setup.double_quant) + constants
    if setup.method == "qlora" and tensor.kind == "experts" and setup.stack == "minilora":
        per = tensor.numel // tensor.shape[0]  # each expert quantized as its own (out, in) matrix
        return tensor.shape[0] * (nf4_bytes(per, setup.block_size, setup.double_quant) + constants)
    return None


def _trainable_bytes(trainable: list, p: Precision, setup: TrainingSetup) -> list[int]:
    """Bytes per element of each trainable tensor: the recipe's (Precision.gradients), except peft's
    ParamWrapper adapters (on a router's or an expert tensor's parameter), made in their parameter's
    dtype: fp32 after prepare_model_for_kbit_training, even without autocast_adapter_dtype."""
    wrapped = 4 if setup.stack == "hf" and setup.method != "full" and p.embedding == "fp32" else p.gradients
    return [wrapped if ".mlp.experts." in name or name.split(".lora_")[0].endswith(".mlp.gate") else p.gradients
            for name, _ in trainable]


def _dense_dtype(tensor: Tensor, p: Precision, setup: TrainingSetup) -> str:
    """The dtype a parameter is held in, by kind (prepare_model_for_kbit_training changes some)."""
    if tensor.kind in ("embedding", "head") or (tensor.kind in ("experts", "router") and setup.stack == "hf"):
        return p.embedding   # hf: every weight bitsandbytes leaves dense (3-D experts too) is fp32 after prepare
    if tensor.kind == "norm":
        return p.norm
    if tensor.kind == "bias" and setup.method == "qlora" and setup.stack == "hf":
        return p.compute   # Linear4bit's forward: bias.data = bias.data.to(x.dtype), x in the compute dtype
    return p.linear


def model_state_bytes(spec: ModelSpec, setup: TrainingSetup) -> ModelStates:
    """Exact bytes of weights, gradients, master weights and optimizer states on ONE device,
    before sharding: full fine-tuning trains every parameter; LoRA and QLoRA train the adapters
    and freeze the rest (QLoRA's linear layers in NF4)."""
    p = Precision.of(setup)
    tensors = parameter_tensors(spec)
    sizes = [DTYPE_BYTES[_dense_dtype(t, p, setup)] for t in tensors]
    if setup.method == "full":
        trainable, frozen = [(t.name, t.shape) for t in tensors], []
    else:
        trainable, frozen = lora_tensors(spec, setup.lora), list(zip(tensors, sizes))
    quantized = ({f"{lin.name}.weight" for lin in quantized_linears(spec, setup.stack)} if setup.method == "qlora"
                 else set())
    quantized_bytes = block_quantized = 0
    dense = []
    numels, own = [math.prod(shape) for _, shape in trainable], _trainable_bytes(trainable, p, setup)
    block_dense = sum(n * b for (name, _), n, b in zip(trainable, numels, own) if _in_first_block(name))
    for t, size in frozen:
        nf4 = _nf4_size(t, setup, quantized)
        if nf4 is None:
            dense.append((t.shape, size))
            block_dense += t.numel * size if _in_first_block(t.name) else 0
        else:
            quantized_bytes += nf4
            block_quantized += nf4 if _in_first_block(t.name) else 0
    offload, trained = setup.optimizer.startswith("offload"), sum(n * b for n, b in zip(numels, own))
    buffers = hf_buffer_bytes(spec, p) if setup.stack == "hf" else 0
    return ModelStates(
        weights=quantized_bytes + sum(math.prod(sh) * b for sh, b in dense) + trained + buffers,
        gradients=0 if offload else trained,
        master=0 if offload else sum(numels) * p.master,
        optimizer=_optimizer_state_bytes(numels, setup.optimizer,
                                         [p.optimizer_states if b == p.gradients else b for b in own]),
        optimizer_scalars=4 * len(numels) if setup.optimizer == "adamw" else 0,
        host=_offload_host_bytes(numels, p.master > 0, setup.optimizer == "offload8bit") if offload else 0,
        params=sum(t.numel for t in tensors), trainable=sum(numels),
        trainable_shapes=tuple(shape for _, shape in trainable), all_shapes=tuple(t.shape for t in tensors),
        all_bytes_per_el=tuple(sizes), dense_shapes=tuple(sh for sh, _ in dense),
        dense_bytes_per_el=tuple(b for _, b in dense), quantized_bytes=quantized_bytes, buffers=buffers,
        block_quantized_bytes=block_quantized, block_dense_bytes=block_dense, precision=p)
