"""QLoRA's frozen 4-bit base: LinearNF4, ExpertsNF4, quantize_model and prepare_for_kbit_training.

    x (..., in) --cast--> compute_dtype --@ dequantize(W_4bit).T (+ bias)--> (..., out) --cast--> x.dtype

The dequantized weight is a temporary: the autograd function keeps only the 4-bit state and
dequantizes again in backward (QLoRA, Dettmers et al. 2023, section 3), so a frozen 4-bit layer
costs 4.127 bits per weight in memory during training, and still passes input gradients through
to LoRA adapters and earlier layers.

A mixture-of-experts layer's experts (reference_models.moe.Experts) become ExpertsNF4: every
expert's matrix quantized as its own (out, in) weight, one LinearNF4 per expert and tensor
(gate_up_proj (E, 2I, C) -> E layers C -> 2I; down_proj (E, C, I) -> E layers I -> C), as
bitsandbytes quantized each expert when experts were nn.Linear modules; a token's pass through
expert e dequantizes only e's matrices. The router (reference_models.moe.Gate) stays in the compute
dtype: a 4-bit router would change which experts tokens go to. transformers 5.24 + bitsandbytes
keeps experts dense (it quantizes nn.Linear modules only), so ExpertsNF4 has no transformers
checkpoint format: save_pretrained refuses a model holding it (unload first, or quantize_model
with experts=False for a folder transformers reads).

LinearNF4's state dict is bitsandbytes' Linear4bit one (what transformers saves for a model loaded
with BitsAndBytesConfig(load_in_4bit=True)); the format, and the folders that hold it, are
bnb_format.py. Importing this module registers that format with reference_models, so that
load_pretrained reads 4-bit folders into LinearNF4 layers and save_pretrained writes them.
"""
from __future__ import annotations

import torch
from torch import nn

from reference_models.moe import Experts
from reference_models.quantized_formats import register_quantized_format

from .backends import BACKENDS
from .bnb_format import STORABLE, Bnb4bitFormat, quant_state_from_dict, quant_state_to_dict
from .matmul_4bit import linear_4bit
from .nf4 import QuantState4bit, dequantize_4bit, quantize_4bit

__all__ = ["LinearNF4", "ExpertsNF4", "quantize_model", "prepare_for_kbit_training"]


def _check_storable(quant_type: str) -> None:
    if quant_type not in STORABLE:
        raise ValueError(f"LinearNF4 supports quant_type nf4 or fp4 (bitsandbytes' state-dict format stores only "
                         f"those), got {quant_type!r}; int4 is available in minilora.quant.nf4.quantize_4bit for comparison")


class LinearNF4(nn.Module):
    """A frozen 4-bit linear layer (NF4 or FP4, bitsandbytes' layout), computing in compute_dtype.

    Buffers: `weight` (packed uint8), `absmax`, and with double quantization `absmax2`, `offset`.
    `weight_dtype` is the dtype the weight had before quantization (what dequantize returns).

    Dtype casts (`.to(dtype)`, `.half()`, `.bfloat16()`, `model.to(dtype)`) change the bias only:
    the quantization state (`absmax` without double quant, `absmax2`, `offset`) stays fp32 and
    only ever changes device, so the dequantized weight and the state dict are unchanged.
    `compute_dtype` is kept too, as bitsandbytes' Linear4bit keeps its `compute_dtype` under
    `.to(dtype)`; set `layer.compute_dtype` (or pass compute_dtype to quantize_model /
    from_linear) to compute in another dtype. The output is always cast back to the input's dtype.

    `backend` ("auto" | "eager" | "compiled" | "triton", minilora/quant/backends.py) is how the
    weight is decoded for each forward and backward (minilora/quant/matmul_4bit.py): "triton" also
    runs few-token calls through fused dequantize-matmul kernels. Set it on the layer; it is not
    part of the state dict.
    """

    lora_compatible = True
    is_quantized_4bit = True

    def __init__(self, in_features: int, out_features: int, bias: bool = True, compute_dtype=torch.float32,
                 quant_type: str = "nf4", block_size: int = 64, double_quant: bool = True,
                 weight_dtype=torch.float32, backend: str = "auto"):
        super().__init__()
        _check_storable(quant_type)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend = backend
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.quant_type, self.block_size, self.double_quant = quant_type, block_size, double_quant
        self.weight_dtype, self.dq_block_size = weight_dtype, 256
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype), requires_grad=False) if bias else None
        for name in ("weight", "absmax", "absmax2", "offset"):
            self.register_buffer(name, None)

    # ----------------------------------------------------------------------------- construction

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = True,
                    compute_dtype=None) -> "LinearNF4":
        """Quantize an nn.Linear (its weight is not modified)."""
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    compute_dtype or weight.dtype, quant_type, block_size, double_quant, weight.dtype)
        layer.set_state(quantize_4bit(weight, quant_type, block_size, double_quant))
        if linear.bias is not None:
            layer.bias.data = linear.bias.detach().to(layer.compute_dtype).clone()
        return layer.to(weight.device)

    @classmethod
    def from_state(cls, state: QuantState4bit, bias: torch.Tensor | None = None, compute_dtype=None) -> "LinearNF4":
        if len(state.shape) != 2:
            raise ValueError(f"a linear weight must be 2-D (out, in), got shape {tuple(state.shape)}")
        out_features, in_features = state.shape
        layer = cls(in_features, out_features, bias is not None, compute_dtype or state.dtype, state.quant_type,
                    state.block_size, state.double_quant, state.dtype)
        layer.set_state(state)
        if bias is not None:
            if tuple(bias.shape) != (out_features,):
                raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({out_features},)")
            layer.bias.data = bias.detach().to(layer.compute_dtype).clone()
        return layer

    def set_state(self, state: QuantState4bit) -> None:
        _check_storable(state.quant_type)
        if tuple(state.shape) != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight has shape {tuple(state.shape)}, the layer is "
                             f"({self.out_features}, {self.in_features})")
        self.weight, self.absmax, self.absmax2, self.offset = state.packed, state.absmax, state.absmax2, state.offset
        self.quant_type, self.block_size, self.double_quant = state.quant_type, state.block_size, state.double_quant
        self.weight_dtype, self.dq_block_size = state.dtype, state.dq_block_size

    _FP32_STATE = ("absmax", "absmax2", "offset")

    def _apply(self, fn, recurse=True):
        # nn.Module.to/half/bfloat16/cuda/... all go through _apply(fn): let fn move the fp32
        # quantization buffers but not cast them (a cast changes the dequantized weight and makes
        # the state dict unloadable). Integer buffers (codes, 8-bit absmax) are never cast anyway.
        held = {n: self._buffers[n] for n in self._FP32_STATE
                if self._buffers.get(n) is not None and self._buffers[n].is_floating_point()}
        for n in held:
            self._buffers[n] = None
        try:
            super()._apply(fn, recurse)
            moved = {}
            for n, t in held.items():
                new = fn(t)
                moved[n] = new if new.dtype == t.dtype else t.to(new.device)
            held = moved
        finally:
            self._buffers.update(held)
        return self

    def _device(self) -> torch.device | None:
        for t in (self.weight, self.bias):
            if t is not None:
                return t.device
        return None

    @property
    def quant_state(self) -> QuantState4bit:
        if self.weight is None:
            raise RuntimeError("LinearNF4 holds no weight yet: build it with from_linear/from_state or requantize_")
        return QuantState4bit(self.weight, self.absmax, torch.Size((self.out_features, self.in_features)),
                              self.weight_dtype, self.block_size, self.quant_type, self.absmax2, self.offset,
                              self.dq_block_size)

    # ------------------------------------------------------------------------ the LoRA protocol

    def dequantize_weight(self, dtype=None) -> torch.Tensor:
        """The dense (out, in) weight, in the original weight dtype unless `dtype` is given."""
        return dequantize_4bit(self.quant_state, dtype or self.weight_dtype)

    @torch.no_grad()
    def requantize_(self, weight: torch.Tensor) -> "LinearNF4":
        """Replace the stored weight by `weight` (out, in) quantized with this layer's settings."""
        self.set_state(quantize_4bit(weight.detach().to(self.weight_dtype), self.quant_type, self.block_size,
                                     self.double_quant, self.dq_block_size))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return linear_4bit(x.to(self.compute_dtype), self.quant_state, bias, self.backend).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"quant_type={self.quant_type}, block_size={self.block_size}, double_quant={self.double_quant}, "
                f"compute_dtype={self.compute_dtype}" + ("" if self.backend == "auto" else f", backend={self.backend}"))

    # ------------------------------------------------------------- bitsandbytes state-dict format

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, value in quant_state_to_dict(self.quant_state).items():
            destination[prefix + key] = value
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        mine = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and
                (k[len(prefix):] == "weight" or k[len(prefix):].startswith("weight."))}
        if not mine:
            missing_keys.append(prefix + "weight")
        else:
            try:
                state = quant_state_from_dict(mine, prefix)
                if tuple(state.shape) != (self.out_features, self.in_features):
                    raise ValueError(f"{prefix}weight has shape {tuple(state.shape)}, the layer is "
                                     f"({self.out_features}, {self.in_features})")
                # copied onto this module's device, as torch's load_state_dict copies into parameters
                device = self._device()
                if device is None or device.type == "meta":  # nothing to copy into: keep the source's device
                    device = state.packed.device
                copy = lambda t: None if t is None else t.detach().to(device, copy=True)  # noqa: E731
                self.set_state(QuantState4bit(copy(state.packed), copy(state.absmax), state.shape, state.dtype,
                                              state.block_size, state.quant_type, copy(state.absmax2),
                                              copy(state.offset), state.dq_block_size))
            except ValueError as exc:
                error_msgs.append(str(exc))
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                bias = state_dict[prefix + "bias"].detach()
                if tuple(bias.shape) != tuple(self.bias.shape):
                    error_msgs.append(f"{prefix}bias has shape {tuple(bias.shape)}, expected {tuple(self.bias.shape)}")
                elif self.bias.is_meta:
                    self.bias = nn.Parameter(bias.to(dtype=self.bias.dtype, copy=True), self.bias.requires_grad)
                else:
                    self.bias.data = bias.to(self.bias.device, self.bias.dtype, copy=True)
            else:
                missing_keys.append(prefix + "bias")


class ExpertsNF4(Experts):
    """Experts (reference_models.moe) whose tensors are held as one LinearNF4 per expert: state-dict
    keys `<tensor>.<e>.weight` (+ bitsandbytes' quant-state entries). The same forward as Experts; only
    `project` differs. Computes in compute_dtype and returns the input's dtype, as LinearNF4."""

    def __init__(self, experts: Experts, quant_type: str = "nf4", block_size: int = 64, double_quant: bool = True,
                 compute_dtype: torch.dtype | None = None):
        nn.Module.__init__(self)  # not Experts.__init__: no dense tensors to allocate
        self.num_experts, self.hidden_size = experts.num_experts, experts.hidden_size
        self.intermediate_size, self.act = experts.intermediate_size, experts.act
        for name in self.TENSORS:
            weight = getattr(experts, name).detach()  # (E, out, in)
            setattr(self, name, nn.ModuleList(
                LinearNF4.from_state(quantize_4bit(weight[e], quant_type, block_size, double_quant),
                                     compute_dtype=compute_dtype or weight.dtype) for e in range(self.num_experts)))

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.gate_up_proj[0].compute_dtype

    def reset_parameters(self) -> None:
        raise RuntimeError("ExpertsNF4 holds quantized experts; there is nothing to initialise")

    def tensor_shape(self, name: str) -> tuple[int, int, int]:
        first = getattr(self, name)[0]
        return self.num_experts, first.out_features, first.in_features

    def project(self, name: str, x: torch.Tensor, expert: int) -> torch.Tensor:
        return getattr(self, name)[expert](x)  # (n, in) -> (n, out), dequantizing expert `expert`'s matrix only

    # ------------------------------------------------ what LoRA on experts needs to merge (lora/experts.py)
    def dequantize_weight(self, name: str) -> torch.Tensor:
        """The dense (E, out, in) tensor, in the dtype the weights had before quantization."""
        return torch.stack([layer.dequantize_weight() for layer in getattr(self, name)])

    @torch.no_grad()
    def requantize_(self, name: str, weight: torch.Tensor) -> None:
        for e, layer in enumerate(getattr(self, name)):
            layer.requantize_(weight[e])

    def quant_states(self) -> dict:
        """Every expert's quantized state, to put back exactly with set_quant_states (requantize_ replaces
        a layer's tensors, it never writes into them)."""
        return {name: [layer.quant_state for layer in getattr(self, name)] for name in self.TENSORS}

    def set_quant_states(self, states: dict) -> None:
        for name, per_expert in states.items():
            for layer, state in zip(getattr(self, name), per_expert, strict=True):
                layer.set_state(state)

    def dequantized(self) -> Experts:
        """A dense Experts with the dequantized tensors (what unload returns)."""
        dense = Experts(self.num_experts, self.hidden_size, self.intermediate_size, self.act, device="meta")
        for name in self.TENSORS:
            setattr(dense, name, nn.Parameter(self.dequantize_weight(name), requires_grad=False))
        return dense

    def extra_repr(self) -> str:
        first = self.gate_up_proj[0]
        return f"{super().extra_repr()}, quant_type={first.quant_type}, compute_dtype={first.compute_dtype}"


# -------------------------------------------------------------------------------- model level

def quantize_model(model: nn.Module, skip=("lm_head",), quant_type: str = "nf4", double_quant: bool = True,
                   block_size: int = 64, compute_dtype=None, experts: bool = True) -> nn.Module:
    """Swap every nn.Linear (except names in `skip`, matched in full or as a `.`-suffix) for a
    LinearNF4 and, with experts=True, every mixture-of-experts Experts for an ExpertsNF4, in place.
    Routers (reference_models.moe.Gate), embeddings, norms and skipped layers stay dense, cast to
    `compute_dtype` if given."""
    if isinstance(skip, str):
        skip = (skip,)
    _check_storable(quant_type)
    from ..lora.experts import LoRAExperts
    from ..lora.layer import LoRALinear

    adapted = [n for n, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))]
    if adapted:
        raise ValueError(f"quantize_model got a model that already has LoRA adapters ({adapted[:3]}...): its "
                         f"nn.Linear adapters would be quantized and frozen; quantize first, then inject")
    from ..lora.layer import suffix_match  # peft's list rule, shared with target_modules

    targets = [n for n, m in model.named_modules()
               if type(m) is nn.Linear and not any(suffix_match(n, p) for p in skip)]
    if not targets:
        raise ValueError(f"quantize_model found no nn.Linear to quantize in {type(model).__name__} (skip={skip})")
    for name in targets:
        layer = LinearNF4.from_linear(model.get_submodule(name), quant_type, block_size, double_quant, compute_dtype)
        model.set_submodule(name, layer)
    moe = [n for n, m in model.named_modules() if type(m) is Experts and not any(suffix_match(n, p) for p in skip)]
    for name in moe if experts else ():
        model.set_submodule(name, ExpertsNF4(model.get_submodule(name), quant_type, block_size, double_quant,
                                             compute_dtype))
    if compute_dtype is not None:
        for m in model.modules():
            if not isinstance(m, LinearNF4):
                for p in m.parameters(recurse=False):
                    p.data = p.data.to(compute_dtype)
    return model


def _upcast_input(module, args):
    module._kbit_input_dtype = args[0].dtype if args and torch.is_tensor(args[0]) else None
    return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _cast_back(module, args, output):
    dtype = getattr(module, "_kbit_input_dtype", None)
    return output.to(dtype) if dtype is not None and torch.is_tensor(output) else output


def prepare_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True) -> nn.Module:
    """peft's prepare_model_for_kbit_training: freeze everything, keep norms in fp32 (computed in
    fp32 from a 16-bit input), and make the embedding output require grad so checkpointed blocks
    see an input that needs gradients even though every weight before the adapters is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm) or "Norm" in type(m).__name__:
            if any(p.dtype != torch.float32 for p in m.parameters(recurse=False)):
                m.float()
                m.register_forward_pre_hook(_upcast_input)
                m.register_forward_hook(_cast_back)
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is not None:
        embedding.register_forward_hook(lambda module, args, output: output.requires_grad_(True))
    if use_gradient_checkpointing and hasattr(model, "set_gradient_checkpointing"):
        model.set_gradient_checkpointing(True)
    return model


# reference_models.load_pretrained / save_pretrained read and write 4-bit folders through this
register_quantized_format(Bnb4bitFormat(LinearNF4))
