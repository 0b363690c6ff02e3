"""Every parameter tensor and every linear layer of a ModelSpec, under transformers' names.

`parameter_tensors(spec)` lists what `AutoModelForCausalLM.from_config(config)` creates (tied
weights once), so `count_parameters(spec)` equals `sum(p.numel() for p in model.parameters())`
digit for digit; `linear_layers(spec)` lists the modules peft can wrap with LoRA (nn.Linear and
GPT-2's Conv1D), with the module names peft matches target_modules against.

Three layouts (families.Family.layout):
  decoder   model.embed_tokens, model.layers.i.{self_attn, mlp, <norms>}, model.norm, lm_head
            (llama, mistral, qwen2/3, gemma*, phi3, olmo2/3, mixtral: what differs is in the spec)
  gpt2      transformer.wte + wpe, transformer.h.i.{ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
            mlp.c_proj}, transformer.ln_f. transformers stores these as Conv1D (in, out), which peft
            wraps like linear layers; the shapes here are (out, in), the nn.Linear layout of
            reference_models/gpt.py, whose tensors the memory terms (and FSDP's dim-0 shards) describe
  gpt_neox  gpt_neox.embed_in, gpt_neox.layers.i.{input_layernorm, post_attention_layernorm,
            attention.query_key_value, attention.dense, mlp.dense_h_to_4h, mlp.dense_4h_to_h},
            gpt_neox.final_layer_norm, lm_head
A sparse layer's experts (mixtral, qwen2_moe, qwen3_moe, deepseek_v3) are 3-D parameters mlp.experts.
gate_up_proj (E, 2I, h) and down_proj (E, h, I) plus a router mlp.gate (E, h), not nn.Linear; the
shared expert (qwen2_moe mlp.shared_expert + mlp.shared_expert_gate, deepseek_v3 mlp.shared_experts)
and a dense layer's MLP are. DeepSeek-V3's attention is MLA (mla.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .families import FAMILIES
from .mla import mla_norms, mla_projections
from .spec import ModelSpec

__all__ = ["Tensor", "Linear", "parameter_tensors", "linear_layers", "layer_linears", "count_parameters"]

# layout -> (embedding module, layer list, final norm)
_MODULES = {"decoder": ("model.embed_tokens", "model.layers", "model.norm"),
            "gpt2": ("transformer.wte", "transformer.h", "transformer.ln_f"),
            "gpt_neox": ("gpt_neox.embed_in", "gpt_neox.layers", "gpt_neox.final_layer_norm")}
# norm_layout -> the norms of one decoder layer
_LAYER_NORMS = {"pre": ("input_layernorm", "post_attention_layernorm"),
                "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                             "post_feedforward_layernorm"),
                "post": ("post_attention_layernorm", "post_feedforward_layernorm")}


@dataclass(frozen=True)
class Tensor:
    name: str            # full parameter name, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple
    kind: str            # embedding | linear | bias | norm | router | experts | head

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Linear:
    name: str            # module name, e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int
    bias: bool


def _layout(spec: ModelSpec) -> str:
    return FAMILIES[spec.family].layout


def layer_linears(spec: ModelSpec, i: int) -> list[Linear]:
    """The linear layers of decoder layer i, in the order the model runs them."""
    h, inter, qkv = spec.hidden_size, spec.intermediate_size, spec.q_size + 2 * spec.kv_size
    layout = _layout(spec)
    p = f"{_MODULES[layout][1]}.{i}"
    if layout == "gpt2":
        return [Linear(f"{p}.attn.c_attn", h, qkv, spec.qkv_bias), Linear(f"{p}.attn.c_proj", h, h, spec.o_bias),
                Linear(f"{p}.mlp.c_fc", h, inter, spec.mlp_bias), Linear(f"{p}.mlp.c_proj", inter, h, spec.mlp_bias)]
    if layout == "gpt_neox":
        return [Linear(f"{p}.attention.query_key_value", h, qkv, spec.qkv_bias),
                Linear(f"{p}.attention.dense", h, h, spec.o_bias),
                Linear(f"{p}.mlp.dense_h_to_4h", h, inter, spec.mlp_bias),
                Linear(f"{p}.mlp.dense_4h_to_h", inter, h, spec.mlp_bias)]
    if spec.mla:
        out = [Linear(f"{p}.self_attn.{n}", n_in, n_out, bias) for n, n_in, n_out, bias in mla_projections(spec)]
    elif spec.fused_qkv:
        out = [Linear(f"{p}.self_attn.qkv_proj", h, qkv, spec.qkv_bias)]
    else:
        out = [Linear(f"{p}.self_attn.{n}_proj", h, size, spec.qkv_bias)
               for n, size in (("q", spec.q_size), ("k", spec.kv_size), ("v", spec.kv_size))]
    if not spec.mla:
        out.append(Linear(f"{p}.self_attn.o_proj", spec.q_size, h, spec.o_bias))
    if spec.is_sparse(i):  # the routed experts are 3-D parameters (parameter_tensors); a shared expert is an MLP
        if not spec.shared_expert_size:
            return out
        shared = "shared_expert" if spec.shared_expert_gate else "shared_experts"
        out += _gated_mlp(f"{p}.mlp.{shared}", h, spec.shared_expert_size, False)
        return out + ([Linear(f"{p}.mlp.shared_expert_gate", h, 1, False)] if spec.shared_expert_gate else [])
    if spec.fused_gate_up:
        return out + [Linear(f"{p}.mlp.gate_up_proj", h, 2 * inter, spec.mlp_bias),
                      Linear(f"{p}.mlp.down_proj", inter, h, spec.mlp_bias)]
    return out + _gated_mlp(f"{p}.mlp", h, inter, spec.mlp_bias)


def _gated_mlp(prefix: str, h: int, inter: int, bias: bool) -> list[Linear]:
    return [Linear(f"{prefix}.{n}_proj", i_, o_, bias) for n, i_, o_ in (("gate", h, inter), ("up", h, inter),
                                                                         ("down", inter, h))]


def linear_layers(spec: ModelSpec) -> list[Linear]:
    """Every module peft can wrap with LoRA (nn.Linear / Conv1D), in model order, lm_head last."""
    out = [lin for i in range(spec.num_layers) for lin in layer_linears(spec, i)]
    return out + [Linear("lm_head", spec.hidden_size, spec.vocab_size, False)]


def _layer_tensors(spec: ModelSpec, i: int) -> list[Tensor]:
    layout, h = _layout(spec), spec.hidden_size
    p = f"{_MODULES[layout][1]}.{i}"
    norms = ("ln_1", "ln_2") if layout == "gpt2" else _LAYER_NORMS[spec.norm_layout]
    tensors = [t for n in norms for t in _norm(spec, f"{p}.{n}", h)]
    for lin in layer_linears(spec, i):
        tensors.append(Tensor(f"{lin.name}.weight", (lin.out_features, lin.in_features), "linear"))
        if lin.bias:
            tensors.append(Tensor(f"{lin.name}.bias", (lin.out_features,), "bias"))
    if spec.qk_norm != "none":  # "head": one norm over head_dim shared by the heads; "projection": all heads
        q, k = (spec.head_dim, spec.head_dim) if spec.qk_norm == "head" else (spec.q_size, spec.kv_size)
        tensors += _norm(spec, f"{p}.self_attn.q_norm", q) + _norm(spec, f"{p}.self_attn.k_norm", k)
    if spec.mla:
        tensors += [t for name, dim in mla_norms(spec) for t in _norm(spec, f"{p}.self_attn.{name}", dim)]
    if spec.is_sparse(i):
        e, inter = spec.num_experts, spec.moe_intermediate_size
        tensors += [Tensor(f"{p}.mlp.gate.weight", (e, h), "router"),
                    Tensor(f"{p}.mlp.experts.gate_up_proj", (e, 2 * inter, h), "experts"),
                    Tensor(f"{p}.mlp.experts.down_proj", (e, h, inter), "experts")]
    return tensors


def _norm(spec: ModelSpec, name: str, dim: int) -> list[Tensor]:
    tensors = [Tensor(f"{name}.weight", (dim,), "norm")]
    if spec.norm == "layernorm":
        tensors.append(Tensor(f"{name}.bias", (dim,), "norm"))
    return tensors


def parameter_tensors(spec: ModelSpec) -> list[Tensor]:
    """Every parameter tensor (a tied lm_head is listed once, as the embedding)."""
    layout, h = _layout(spec), spec.hidden_size
    embedding, _, final_norm = _MODULES[layout]
    tensors = [Tensor(f"{embedding}.weight", (spec.vocab_size, h), "embedding")]
    if layout == "gpt2":  # learned positions
        tensors.append(Tensor("transformer.wpe.weight", (spec.max_positions, h), "embedding"))
    for i in range(spec.num_layers):
        tensors += _layer_tensors(spec, i)
    tensors += _norm(spec, final_norm, h)
    if not spec.tie_word_embeddings:
        tensors.append(Tensor("lm_head.weight", (spec.vocab_size, h), "head"))
    return tensors


def count_parameters(spec: ModelSpec) -> int:
    return sum(t.numel for t in parameter_tensors(spec))
