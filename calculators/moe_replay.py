"""The router and the routed experts of a mixture-of-experts layer, replayed op by op as each stack
runs them (the routing arithmetic around them and Qwen2-MoE's shared expert are alike: blocks.py).

N tokens each routed to k experts make S = N * k (token, expert) pairs. What either stack keeps
grows with S and the experts' sizes, never with how the pairs spread over the experts: any routing
gives the same bytes (the tests measure a seeded one).

  index_add_experts   reference_models.moe.SparseMoE (minilora): each expert on the tokens routed to
                      it (x[token], a copy), gate_up -> act(gate) * up -> down (LoRA on an expert
                      tensor: LoRAExperts, through Stack.linear), times the routing weight,
                      index_add_ into the output. Under autocast each expert that gets a token keeps a
                      16-bit copy of its weights: every expert is assumed to get one
  grouped_mm_experts  transformers 5.24's default experts implementation, grouped_mm_experts_forward
                      (integrations/moe.py): the S copies sorted by expert, one F.grouped_mm per
                      projection over every expert, times the weights, unsorted, summed over the k
  hf_router           MixtralTopKRouter / Qwen*TopKRouter: F.linear(x, weight)
peft adapts a router's or an expert tensor's parameter with ParamWrapper (lora/layer.py): each
forward it folds the adapter into a whole new tensor, W + scaling * B @ A (baddbmm for the 3-D expert
tensors, keeping the factors cast to W's dtype), which the matmul then keeps. Its adapters are made in
W's dtype (fp32 after prepare_model_for_kbit_training), upcast to fp32 by autocast_adapter_dtype.
"""
from __future__ import annotations

from .tape import Sym, promote

__all__ = ["expert_rank", "index_add_experts", "grouped_mm_experts", "hf_router", "param_wrapper_dtype"]

# an expert tensor's adapter: named by its per-expert projections (peft's transformers-4 names, which the
# LoRA count uses); the gate and up pair is one adapter of twice the rank on gate_up_proj
_EXPERT_LORA = {"gate_up_proj": ("mlp.experts.w1", "mlp.experts.gate_proj", "mlp.experts.gate_up_proj"),
                "down_proj": ("mlp.experts.w2", "mlp.experts.down_proj")}


def expert_rank(r, tensor: str) -> int:
    """The LoRA rank on expert tensor `tensor` ("gate_up_proj" | "down_proj"), 0 when not adapted."""
    targets = r.s.lora_targets
    if r.full or not targets.intersection(_EXPERT_LORA[tensor]):
        return 0
    return r.s.lora_rank * (2 if tensor == "gate_up_proj" and "mlp.experts.gate_up_proj" not in targets else 1)


def index_add_experts(r, n: Sym, weights: Sym) -> Sym:
    """reference_models.moe.SparseMoE's expert loop; the N*k (token, expert) pairs as one batch."""
    t, spec = r.tape, r.spec
    C, inter = spec.hidden_size, spec.moe_intermediate_size
    N, d = n.numel // C, n.dtype
    nk = N * spec.experts_per_token
    xe = Sym(nk * C, d, n.grad)                                      # x[token]: the routed tokens, copied
    gu = r.stack.linear(r, xe, "mlp.experts.gate_up_proj", C, 2 * inter, expert_rank(r, "gate_up_proj"))
    act = r.act(gu.view(nk * inter))                                 # silu(gate) keeps gate_up's output
    prod = t.mul(act, gu.view(nk * inter))                           # act * up keeps act and up
    y = r.stack.linear(r, prod, "mlp.experts.down_proj", inter, C, expert_rank(r, "down_proj"))
    if t.autocast and n.grad and not r.s.quantized:
        # F.linear under autocast keeps a 16-bit copy of each expert's weights (and adapter slices) it
        # multiplies; Stack.linear counted one expert's: every expert is assumed to get a token
        for _ in range(min(spec.num_experts, nk) - 1):
            t.keep(_autocast_copies(r, "gate_up_proj", C, 2 * inter) + _autocast_copies(r, "down_proj", inter, C),
                   t.autocast)
    source = t.to(t.mul(y, Sym(nk, weights.dtype, weights.grad)), d)    # y * weights[token, slot]: keeps both
    if source.grad:
        t.save(source)                                               # index_add_ keeps its source
    if n.grad or weights.grad or source.grad:                        # each expert's (slot, token) int64 pairs,
        t.keep(2 * nk, "int64")                                      # kept by the gather, the lookup, index_add_
    return Sym(N * C, d, source.grad)


def param_wrapper_dtype(r, weight_dtype: str) -> str:
    """The dtype of peft's ParamWrapper adapters on a `weight_dtype` parameter."""
    return promote(r.p.adapter, weight_dtype)


def _autocast_copies(r, tensor: str, n_in: int, n_out: int) -> int:
    """Elements autocast copies for one expert's F.linear on `tensor`: its (n_out, n_in) weight slice and
    its adapter's A (rank, n_in) and B (n_out, rank) slices, each unless already in the autocast dtype."""
    rank, cast = expert_rank(r, tensor), r.tape.autocast
    return n_in * n_out * (r.p.linear != cast) + rank * (n_in + n_out) * (r.p.adapter != cast)


def _folded_expert_tensor(r, numel: int, factors: tuple, dtype: str) -> Sym:
    """peft's ParamWrapper on a 3-D expert tensor: baddbmm(W, B, A, alpha=scaling), a new tensor of W's
    `numel` elements in W's `dtype`, keeping B and A (`factors`: their elements) cast to W's dtype: copies
    unless the adapters already are in it (autocast is off there)."""
    if param_wrapper_dtype(r, dtype) != dtype:
        for elements in factors:
            r.tape.keep(elements, dtype)
    return Sym(numel, dtype, True)


def _folded_router_weight(r, dtype: str) -> Sym:
    """peft's ParamWrapper on a router's 2-D (E, C) weight: W + (B @ A * scaling).to(W.dtype). The matmul
    keeps B and A: the parameters themselves, but for the fp32 copies peft makes of 16-bit ones on CPU,
    and autocast's copies in its dtype."""
    t, spec, adapter = r.tape, r.spec, param_wrapper_dtype(r, dtype)
    b = Sym(spec.num_experts * r.s.lora_rank, adapter, True, param=True)
    a = Sym(r.s.lora_rank * spec.hidden_size, adapter, True, param=True)
    if t.device == "cpu" and adapter != "fp32":                      # get_delta_weight's cast_to_fp32
        b, a = t.to(b, "fp32"), t.to(a, "fp32")
    t.bmm(t.lower(b), t.lower(a), spec.num_experts * spec.hidden_size)
    return Sym(spec.num_experts * spec.hidden_size, dtype, True)


def hf_router(r, n: Sym) -> Sym:
    """MixtralTopKRouter / Qwen*TopKRouter: F.linear(x, weight) -> (N, E) logits. The weight is a bare
    parameter (peft's all-linear reaches it only through its transformers-4 name, "gate")."""
    t, spec = r.tape, r.spec
    C, E, wdtype = spec.hidden_size, spec.num_experts, r.p.embedding   # not 4-bit: fp32 after prepare
    if r.full or "mlp.gate" not in r.s.lora_targets:
        return t.linear(n, C, E, r.full, wdtype)
    w = _folded_router_weight(r, wdtype)
    x = t.lower(n)
    t.save(x)                                                        # for the folded weight's gradient
    if x.grad:
        t.save(t.lower(w))                                           # the folded weight (its autocast copy)
    return Sym(n.numel // C * E, x.dtype, True)


def _grouped_linear(r, x: Sym, tensor: str, n_in: int, n_out: int, offsets: Sym) -> Sym:
    """F.grouped_mm(x.to(W.dtype), W^T, offs) over an (E, n_out, n_in) expert tensor: keeps x when W
    needs a gradient, W when x does (the parameter, or peft's folded copy), and the offsets. grouped_mm
    is not autocast-enabled: it runs in W's dtype."""
    t, spec = r.tape, r.spec
    E, wdtype = spec.num_experts, r.p.embedding                      # not 4-bit: fp32 after prepare
    x = t.to(x, wdtype)
    rank = expert_rank(r, tensor)
    w_grad = r.full or bool(rank)
    if rank:       # baddbmm(W, lhs (E, out, rank), rhs (E, rank, in))
        w = _folded_expert_tensor(r, E * n_in * n_out, (E * n_out * rank, E * rank * n_in), wdtype)
        if x.grad:
            t.save(w)
    if w_grad:
        t.save(x)
    if x.grad or w_grad:
        t.save(offsets)
    return Sym(x.numel // n_in * n_out, wdtype, x.grad or w_grad)


def grouped_mm_experts(r, n: Sym, weights: Sym) -> Sym:
    """transformers' grouped_mm_experts_forward, op by op: (N, C) tokens, (N, k) weights -> (N, C)."""
    t, spec = r.tape, r.spec
    C, inter = spec.hidden_size, spec.moe_intermediate_size
    N, d = n.numel // C, n.dtype
    S = N * spec.experts_per_token
    if n.grad:
        t.keep(S, "int64")                                           # hidden_states[perm // k] keeps its index
    if weights.grad:
        t.keep(S, "int64")                                           # sample_weights[perm] keeps perm
    xs = Sym(S * C, d, n.grad)                                       # (S, C): the routed copies, by expert
    w_sorted = Sym(S, weights.dtype, weights.grad)                   # (S,) their weights
    offsets = Sym(spec.num_experts, "int32", False)                  # cumsum of tokens per expert, (E,)
    gu = _grouped_linear(r, xs, "gate_up_proj", C, 2 * inter, offsets)   # (S, 2I)
    act = r.act(gu.view(S * inter))                                  # act(gate) keeps gate_up's output
    prod = t.mul(act, gu.view(S * inter))                            # act * up keeps act and up
    y = _grouped_linear(r, prod, "down_proj", inter, C, offsets)     # (S, C)
    weighted = t.mul(y, w_sorted)                                    # y * weights[:, None]: keeps both
    if weighted.grad:
        t.keep(S, "int64")                                           # weighted[inv_perm] keeps inv_perm
    return Sym(N * C, d, weighted.grad)                              # .view(N, k, C).sum(1).to(d)
