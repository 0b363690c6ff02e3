"""One transformer block's forward pass, replayed op by op on a Tape (tape.py), per model layout.

Each function is the block's code (transformers' modeling_<family>.py and reference_models, which
run the same ops in the same order) with the tensors replaced by Syms; where the two stacks differ
(LoRA layer, norm under prepare-for-k-bit, activation, eager attention, RoPE's dtype, the training
KV cache) it asks the Replay's Stack (stacks.py). A family that changes the block adds its step
here, next to the layout it changes, reading its feature from the ModelSpec.

gpt2_block:     ln_1 -> c_attn (q, k, v views of one output) -> attention -> c_proj -> dropout -> add,
                ln_2 -> c_fc -> activation -> c_proj -> dropout -> add
decoder_block:  norm -> q, k, v projections (fused for phi3) -> RoPE -> attention -> o_proj -> add,
                norm -> gate, up -> act(gate) * up -> down -> add (gemma2's extra norms; mixtral
                runs the MLP for each of experts_per_token experts)
Checked against saved_tensors_hooks on both stacks for gpt2, llama, mistral and qwen2
(tests/test_calc_stack_hf.py, tests/test_calc_activations.py); the other families use
decoder_block as an estimate until their steps are added (qk norms, sandwich norms, partial RoPE,
parallel residual).
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
    f = r.act(r.linear(r.norm(x), "mlp.c_fc", h, spec.intermediate_size))
    m = t.dropout(r.linear(f, "mlp.c_proj", spec.intermediate_size, h), s.resid_pdrop)
    return t.add(x, m)


def _attention_projections(r: Replay, n: Sym, h: int) -> tuple:
    spec = r.spec
    if spec.fused_qkv:                                               # phi3 qkv_proj: views of one output
        qkv = r.linear(n, "self_attn.qkv_proj", h, spec.q_size + 2 * spec.kv_size)
        rows = n.numel // h
        return qkv.view(rows * spec.q_size), qkv.view(rows * spec.kv_size), qkv.view(rows * spec.kv_size)
    return (r.linear(n, "self_attn.q_proj", h, spec.q_size), r.linear(n, "self_attn.k_proj", h, spec.kv_size),
            r.linear(n, "self_attn.v_proj", h, spec.kv_size))


def _gated_mlp(r: Replay, n: Sym, h: int) -> Sym:
    t, inter = r.tape, r.spec.intermediate_size
    if r.spec.fused_gate_up:                                         # phi3 gate_up_proj, chunked in two views
        gu = r.linear(n, "mlp.gate_up_proj", h, 2 * inter)
        gate, up = gu.view(gu.numel // 2), gu.view(gu.numel // 2)
    else:
        gate, up = r.linear(n, "mlp.gate_proj", h, inter), r.linear(n, "mlp.up_proj", h, inter)
    return r.linear(t.mul(r.act(gate), up), "mlp.down_proj", inter, h)   # act keeps gate, * keeps both


def decoder_block(r: Replay, x: Sym) -> Sym:
    t, s, spec = r.tape, r.s, r.spec
    h = spec.hidden_size
    shape = AttentionShape(s.batch, spec.num_heads, spec.num_kv_heads, s.seq, spec.head_dim)
    q, k, v = _attention_projections(r, r.norm(x), h)
    q, k = r.stack.rope(r, q), r.stack.rope(r, k)                    # (B, H, T, D), (B, H_kv, T, D)
    k, v2 = r.stack.training_kv(r, k, v)
    y = r.attention(q, k, v2, shape, s.attn_pdrop, v_contiguous=v2 is not v)
    x = t.add(x, r.linear(y, "self_attn.o_proj", spec.q_size, h))
    n = r.norm(x)
    if spec.family == "gemma2":                                      # post-attention + pre-feed-forward norms
        n = r.norm(n)
    for _ in range(spec.experts_per_token if spec.num_experts else 1):
        m = _gated_mlp(r, n, h)
    if spec.family == "gemma2":
        m = r.norm(m)
    return t.add(x, m)


def run_block(r: Replay, x: Sym) -> Sym:
    return gpt2_block(r, x) if r.spec.family == "gpt2" else decoder_block(r, x)
