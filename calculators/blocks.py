"""One transformer block's forward pass, replayed op by op on a Tape (tape.py), per model layout.

Each function is the block's code (transformers' modeling_<family>.py and reference_models, which
run the same ops in the same order) with the tensors replaced by Syms; where the two stacks differ
(LoRA layer, norm under prepare-for-k-bit, activation, eager attention, RoPE's dtype, the training
KV cache) it asks the Replay's Stack (stacks.py). A family that changes the block adds its step
here, next to the layout it changes, reading its feature from the ModelSpec.

gpt2_block:     ln_1 -> c_attn (q, k, v views of one output) -> attention -> c_proj -> dropout -> add,
                ln_2 -> c_fc -> activation -> c_proj -> dropout -> add
decoder_block:  norm -> q, k, v projections (fused for phi3) -> RoPE -> attention -> o_proj -> add,
                norm -> gate, up -> act(gate) * up -> down -> add (qwen3's per-head q/k norms before
                RoPE; gemma2's extra norms); on a sparse layer the MLP is reference_models.moe.SparseMoE
Checked against saved_tensors_hooks on both stacks for gpt2, llama, mistral, qwen2 and qwen3
(tests/test_calc_stack_hf.py, tests/test_calc_activations.py), and for our mixtral and qwen2_moe
(tests/test_calc_moe.py: transformers' own MoE code is not replayed, the hf stack estimates it with
ours); the other families use decoder_block as an estimate until their steps are added (OLMo 2's
whole-projection q/k norms, sandwich norms, partial RoPE, parallel residual, latent attention).
A dense MLP runs through Replay.mlp, which replays it tiled when the setup says so (mlp_tile).
"""
from __future__ import annotations

from .stacks import Replay
from .tape import AttentionShape, Sym

__all__ = ["gpt2_block", "decoder_block", "run_block"]


def gpt2_block(r: Replay, x: Sym) -> Sym:
    t, s, spec = r.tape, r.s, r.spec
    h, heads = spec.hidden_size, spec.num_heads
    shape = AttentionShape(s.batch, heads, heads, s.seq, h // heads)
    qkv = r.linear(r.norm(x), "attn.c_attn", h, 3 * h)              # (B, T, 3h): q, k, v are views
    q = qkv.view(shape.bhtd)
    k, v = r.stack.training_kv(r, qkv.view(shape.bhtd), qkv.view(shape.bhtd))
    y = r.attention(q, k, v, shape, s.attn_pdrop, v_contiguous=v.storage is not qkv.storage)
    x = t.add(x, t.dropout(r.linear(y, "attn.c_proj", h, h), s.resid_pdrop))
    return t.add(x, r.mlp(r.norm(x), _gpt2_mlp))


def _gpt2_mlp(r: Replay, n: Sym) -> Sym:
    h, inter = r.spec.hidden_size, r.spec.intermediate_size
    f = r.act(r.linear(n, "mlp.c_fc", h, inter))
    return r.tape.dropout(r.linear(f, "mlp.c_proj", inter, h), r.s.resid_pdrop)


def _attention_projections(r: Replay, n: Sym, h: int) -> tuple:
    spec = r.spec
    if spec.fused_qkv:                                               # phi3 qkv_proj: views of one output
        qkv = r.linear(n, "self_attn.qkv_proj", h, spec.q_size + 2 * spec.kv_size)
        rows = n.numel // h
        return qkv.view(rows * spec.q_size), qkv.view(rows * spec.kv_size), qkv.view(rows * spec.kv_size)
    return (r.linear(n, "self_attn.q_proj", h, spec.q_size), r.linear(n, "self_attn.k_proj", h, spec.kv_size),
            r.linear(n, "self_attn.v_proj", h, spec.kv_size))


def _gated_mlp(r: Replay, n: Sym, h: int, prefix: str = "mlp", inter: int | None = None) -> Sym:
    t, inter = r.tape, inter or r.spec.intermediate_size
    if r.spec.fused_gate_up:                                         # phi3 gate_up_proj, chunked in two views
        gu = r.linear(n, f"{prefix}.gate_up_proj", h, 2 * inter)
        gate, up = gu.view(gu.numel // 2), gu.view(gu.numel // 2)
    else:
        gate, up = r.linear(n, f"{prefix}.gate_proj", h, inter), r.linear(n, f"{prefix}.up_proj", h, inter)
    return r.linear(t.mul(r.act(gate), up), f"{prefix}.down_proj", inter, h)   # act keeps gate, * keeps both


# an expert tensor's adapter: named by its per-expert projections (peft's transformers-4 names, which the
# LoRA count uses); the gate and up pair is one adapter of twice the rank on gate_up_proj
_EXPERT_LORA = {"gate_up_proj": ("mlp.experts.w1", "mlp.experts.gate_proj", "mlp.experts.gate_up_proj"),
                "down_proj": ("mlp.experts.w2", "mlp.experts.down_proj")}


def _expert_rank(r: Replay, tensor: str) -> int:
    targets = r.s.lora_targets
    if r.full or not targets.intersection(_EXPERT_LORA[tensor]):
        return 0
    return r.s.lora_rank * (2 if tensor == "gate_up_proj" and "mlp.experts.gate_up_proj" not in targets else 1)


def _moe_mlp(r: Replay, n: Sym) -> Sym:
    """reference_models.moe.SparseMoE, op by op. Each expert's saved tensors grow linearly with the
    tokens routed to it, so the N*k (token, expert) pairs are replayed as one batch: the same bytes
    whatever the routing (calculators/moe.py)."""
    t, spec = r.tape, r.spec
    N, C, E, k = n.numel // spec.hidden_size, spec.hidden_size, spec.num_experts, spec.experts_per_token
    inter, nk, d = spec.moe_intermediate_size, N * spec.experts_per_token, n.dtype
    logits = t.linear(n, C, E, r.full, r.p.linear)                   # the router keeps n when it trains
    probs, weights = Sym(N * E, "fp32", logits.grad), Sym(nk, "fp32", logits.grad)   # softmax(fp32), top-k values
    if logits.grad:
        t.save(probs)                                                # softmax keeps its output
        t.keep(nk, "int64")                                          # top-k its indices
    if spec.norm_topk_prob and weights.grad:                         # weights / weights.sum(): both kept
        t.save(weights, Sym(N, "fp32", True))
        weights = Sym(nk, "fp32", True)
    weights = t.to(weights, "fp32" if spec.family == "mixtral" else d)   # Qwen casts them to the compute dtype
    xe = Sym(nk * C, d, n.grad)                                      # x[token]: the routed tokens, copied
    gu = r.stack.linear(r, xe, "mlp.experts.gate_up_proj", C, 2 * inter, _expert_rank(r, "gate_up_proj"))
    act = r.act(gu.view(nk * inter))                                 # silu(gate) keeps gate_up's output
    prod = t.mul(act, gu.view(nk * inter))                           # act * up keeps act and up
    y = r.stack.linear(r, prod, "mlp.experts.down_proj", inter, C, _expert_rank(r, "down_proj"))
    source = t.to(t.mul(y, Sym(nk, weights.dtype, weights.grad)), d)    # y * weights[token, slot]: keeps both
    if source.grad:
        t.save(source)                                               # index_add_ keeps its source
    if n.grad or weights.grad or source.grad:                        # each expert's (slot, token) int64 pairs,
        t.keep(2 * nk, "int64")                                      # kept by the gather, the lookup, index_add_
    out = Sym(N * C, d, source.grad)
    if not spec.shared_expert_size:
        return out
    prefix = "mlp.shared_expert" if spec.shared_expert_gate else "mlp.shared_experts"
    shared = _gated_mlp(r, n, C, prefix, spec.shared_expert_size)
    if spec.shared_expert_gate:                                      # Qwen2-MoE: sigmoid(Linear(h -> 1)) * shared
        gate = t.linear(n, C, 1, r.full, r.p.linear)
        shared = t.mul(t.saves_output(gate), shared)                 # sigmoid keeps its output
    return Sym(out.numel, d, out.grad or shared.grad)


def decoder_block(r: Replay, x: Sym, layer: int = 0) -> Sym:
    t, s, spec = r.tape, r.s, r.spec
    h = spec.hidden_size
    shape = AttentionShape(s.batch, spec.num_heads, spec.num_kv_heads, s.seq, spec.head_dim)
    q, k, v = _attention_projections(r, r.norm(x), h)
    if spec.qk_norm == "head":                                       # qwen3: RMSNorm over each head of q and k
        q, k = r.norm(q, spec.head_dim), r.norm(k, spec.head_dim)
    q, k = r.stack.rope(r, q), r.stack.rope(r, k)                    # (B, H, T, D), (B, H_kv, T, D)
    k, v2 = r.stack.training_kv(r, k, v)
    y = r.attention(q, k, v2, shape, s.attn_pdrop, v_contiguous=v2 is not v)
    x = t.add(x, r.linear(y, "self_attn.o_proj", spec.q_size, h))
    n = r.norm(x)
    if spec.family == "gemma2":                                      # post-attention + pre-feed-forward norms
        n = r.norm(n)
    m = _moe_mlp(r, n) if spec.is_sparse(layer) else r.mlp(n, _gated_mlp, h)
    if spec.family == "gemma2":
        m = r.norm(m)
    return t.add(x, m)


def run_block(r: Replay, x: Sym, layer: int = 0) -> Sym:
    return gpt2_block(r, x) if r.spec.family == "gpt2" else decoder_block(r, x, layer)
