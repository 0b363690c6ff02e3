"""One transformer block's forward pass, replayed op by op on a Tape (tape.py), per model layout.

Each function is the block's code (transformers' modeling_<family>.py and reference_models, which
run the same ops in the same order) with the tensors replaced by Syms; where the two stacks differ
(LoRA layer, norm under prepare-for-k-bit, activation, eager attention, RoPE, sliding-window masks,
the training KV cache, the experts) it asks the Replay's Stack (stacks.py). A family that changes
the block adds its step here, next to the layout it changes, reading its feature from the ModelSpec.

  gpt2      ln_1 -> c_attn (q, k, v views of one output) -> attention -> c_proj -> dropout -> add,
            ln_2 -> c_fc -> activation -> c_proj -> dropout -> add
  pre       x + drop(attn(norm(x))), x + drop(mlp(norm(x)))     Llama, Mistral, Qwen, Phi-3 (its resid_pdrop)
  sandwich  x + norm(attn(norm(x))), x + norm(mlp(norm(x)))     Gemma 2 / 3 (norms over the sublayer outputs)
  post      x + norm(attn(x)), x + norm(mlp(x))                 OLMo 2 (the projections read x itself)
  parallel  x + drop(attn(ln1(x))) + drop(mlp(ln2(x)))          GPT-NeoX (both LayerNorms keep the same x)
Inside attention: q, k, v projections (fused: phi3's qkv_proj, gpt_neox's query_key_value, views of one
output), q/k norms (per head: qwen3, qwen3_moe, gemma3; over the whole projection: olmo2), RoPE on the
first rotary_dim dims of each head (partial: phi3, gpt_neox), the core (soft-capped scores: gemma2,
eager; a sliding-window mask when the window is shorter than the sequence). Inside the MLP: gated
(fused gate_up_proj: phi3), ungated (gpt_neox, gpt2), or a router and experts (moe_replay.py).
Exact against saved_tensors_hooks on CPU in both stacks for every family with a reference model
(tests/test_calc_stack_hf.py, tests/test_calc_activations.py). DeepSeek-V3 has none: its multi-head
latent attention (_mla_attention) follows transformers' code unmeasured, and its sigmoid group-limited
routing is replayed as the softmax top-k router: estimates, as its activations term says.
A dense MLP runs through Replay.mlp, which replays it tiled when the setup says so (mlp_tile).
"""
from __future__ import annotations

from .stacks import Replay
from .tape import AttentionShape, Sym

__all__ = ["gpt2_block", "decoder_block", "run_block"]

# the projections' module names inside a block, per layout
_NAMES = {"decoder": dict(q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", qkv="self_attn.qkv_proj",
                          o="self_attn.o_proj", up="mlp.up_proj", down="mlp.down_proj"),
          "gpt_neox": dict(qkv="attention.query_key_value", o="attention.dense", up="mlp.dense_h_to_4h",
                           down="mlp.dense_4h_to_h")}


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


def _names(r: Replay) -> dict:
    return _NAMES["gpt_neox" if r.spec.family == "gpt_neox" else "decoder"]


def _projections(r: Replay, n: Sym) -> tuple:
    """q (B, T, H*D), k and v (B, T, H_kv*D); fused projections give views of one output."""
    spec, names, h = r.spec, _names(r), r.spec.hidden_size
    rows = n.numel // h
    if spec.fused_qkv:
        qkv = r.linear(n, names["qkv"], h, spec.q_size + 2 * spec.kv_size)
        return qkv.view(rows * spec.q_size), qkv.view(rows * spec.kv_size), qkv.view(rows * spec.kv_size)
    return (r.linear(n, names["q"], h, spec.q_size), r.linear(n, names["k"], h, spec.kv_size),
            r.linear(n, names["v"], h, spec.kv_size))


def _attention(r: Replay, n: Sym, layer: int) -> Sym:
    """The attention sublayer on its input n (B, T, h) -> the output projection's (B, T, h)."""
    s, spec = r.s, r.spec
    if spec.mla:
        return _mla_attention(r, n, layer)
    shape = AttentionShape(s.batch, spec.num_heads, spec.num_kv_heads, s.seq, spec.head_dim)
    q, k, v = _projections(r, n)
    if spec.qk_norm == "projection":                                 # olmo2: over all heads, before the split
        q, k = r.norm(q, spec.q_size), r.norm(k, spec.kv_size)
    elif spec.qk_norm == "head":                                     # qwen3, gemma3: over each head's D
        q, k = r.norm(q, spec.head_dim), r.norm(k, spec.head_dim)
    q, k = r.stack.rope(r, q, layer), r.stack.rope(r, k, layer)      # (B, H, T, D), (B, H_kv, T, D)
    k, v2 = r.stack.training_kv(r, k, v)
    y = r.attention(q, k, v2, shape, s.attn_pdrop, v_contiguous=v2 is not v, layer=layer)
    return r.linear(y, _names(r)["o"], spec.q_size, spec.hidden_size)


def _mla_attention(r: Replay, n: Sym, layer: int) -> Sym:
    """DeepSeek-V3's multi-head latent attention (mla.py) as transformers' DeepseekV3Attention runs it.
    An estimate, as there is no reference model to measure: the latent's split and norm, the per-head
    key built by new_empty + copy_, and SDPA's output counted at the query's head width (not v_head_dim)."""
    spec, h, heads, rope = r.spec, r.spec.hidden_size, r.spec.num_heads, r.spec.qk_rope_head_dim
    rows, qk, latent = n.numel // h, spec.qk_nope_head_dim + rope, spec.kv_lora_rank
    if spec.q_lora_rank is None:
        q = r.linear(n, "self_attn.q_proj", h, heads * qk)                                  # (B, T, H*qk)
    else:
        q_a = r.norm(r.linear(n, "self_attn.q_a_proj", h, spec.q_lora_rank), spec.q_lora_rank)
        q = r.linear(q_a, "self_attn.q_b_proj", spec.q_lora_rank, heads * qk)
    compressed = r.linear(n, "self_attn.kv_a_proj_with_mqa", h, latent + rope)          # (B, T, latent + rope)
    kv = r.norm(compressed.view(rows * latent), latent)
    q_rot = r.stack.rope(r, q.view(rows * heads * rope), layer)                         # the rotated parts
    k_rot = r.stack.rope(r, compressed.view(rows * rope), layer)
    k_rot, kv = r.stack.training_kv(r, k_rot, kv)                                       # the cache holds the latent
    query = Sym(rows * heads * qk, q.dtype, q.grad or q_rot.grad)                       # torch.cat: nothing kept
    kv = r.linear(kv, "self_attn.kv_b_proj", latent, heads * (spec.qk_nope_head_dim + spec.v_head_dim))
    key = Sym(rows * heads * qk, kv.dtype, kv.grad or k_rot.grad)                       # (B, H, T, qk), copied in
    shape = AttentionShape(r.s.batch, heads, heads, r.s.seq, qk)
    y = r.attention(query, key, kv.view(rows * heads * spec.v_head_dim), shape, r.s.attn_pdrop, v_contiguous=False,
                    layer=layer)
    y = Sym(rows * heads * spec.v_head_dim, y.dtype, y.grad)                             # (B, T, H*v)
    return r.linear(y, "self_attn.o_proj", heads * spec.v_head_dim, h)


def _gated_mlp(r: Replay, n: Sym, h: int, prefix: str = "mlp", inter: int | None = None) -> Sym:
    t, inter = r.tape, inter or r.spec.intermediate_size
    if r.spec.fused_gate_up:                                         # phi3 gate_up_proj, chunked in two views
        gu = r.linear(n, f"{prefix}.gate_up_proj", h, 2 * inter)
        gate, up = gu.view(gu.numel // 2), gu.view(gu.numel // 2)
    else:
        gate, up = r.linear(n, f"{prefix}.gate_proj", h, inter), r.linear(n, f"{prefix}.up_proj", h, inter)
    return r.linear(t.mul(r.act(gate), up), f"{prefix}.down_proj", inter, h)   # act keeps gate, * keeps both


def _moe_mlp(r: Replay, n: Sym) -> Sym:
    """A sparse layer: the router, its top-k routing weights, the experts (the stack's: moe_replay.py),
    and Qwen2-MoE's gated shared expert."""
    t, spec = r.tape, r.spec
    N, k = n.numel // spec.hidden_size, spec.experts_per_token
    logits = r.stack.router(r, n)                                    # (N, E)
    probs, weights = Sym(N * spec.num_experts, "fp32", logits.grad), Sym(N * k, "fp32", logits.grad)
    if logits.grad:                                                  # softmax(dtype=fp32), top-k values
        t.save(probs)                                                # softmax keeps its output
        t.keep(N * k, "int64")                                       # top-k its indices
    if spec.norm_topk_prob and weights.grad:                         # weights / weights.sum(): both kept
        t.save(weights, Sym(N, "fp32", True))
        weights = Sym(N * k, "fp32", True)
    weights = t.to(weights, "fp32" if spec.family == "mixtral" else logits.dtype)   # Qwen: the logits' dtype
    out = r.stack.experts(r, n, weights)
    if not spec.shared_expert_size:
        return out
    prefix = "mlp.shared_expert" if spec.shared_expert_gate else "mlp.shared_experts"
    shared = _gated_mlp(r, n, spec.hidden_size, prefix, spec.shared_expert_size)
    if spec.shared_expert_gate:                                      # Qwen2-MoE: sigmoid(Linear(h -> 1)) * shared
        shared = t.mul(t.saves_output(r.linear(n, "mlp.shared_expert_gate", spec.hidden_size, 1)), shared)
    return Sym(out.numel, out.dtype, out.grad or shared.grad)


def _ungated_mlp(r: Replay, n: Sym) -> Sym:
    names, h, inter = _names(r), r.spec.hidden_size, r.spec.intermediate_size   # gpt_neox: up, act, down
    return r.linear(r.act(r.linear(n, names["up"], h, inter)), names["down"], inter, h)


def _mlp(r: Replay, n: Sym, layer: int) -> Sym:
    """The MLP sublayer; a dense one through Replay.mlp (tiled when the setup says so)."""
    spec = r.spec
    if spec.is_sparse(layer):
        return _moe_mlp(r, n)
    if spec.gated_mlp:
        return r.mlp(n, _gated_mlp, spec.hidden_size)
    return r.mlp(n, _ungated_mlp)


def decoder_block(r: Replay, x: Sym, layer: int = 0) -> Sym:
    t, spec, p = r.tape, r.spec, r.s.resid_pdrop
    if spec.parallel_residual:                                       # gpt_neox: both read x (one saved copy)
        a = t.dropout(_attention(r, r.norm(x), layer), p)
        m = t.dropout(_mlp(r, r.norm(x), layer), p)
        return t.add(t.add(m, a), x)
    if spec.norm_layout == "post":
        x = t.add(x, r.norm(_attention(r, x, layer)))
        return t.add(x, r.norm(_mlp(r, x, layer)))
    if spec.norm_layout == "sandwich":
        x = t.add(x, r.norm(_attention(r, r.norm(x), layer)))
        return t.add(x, r.norm(_mlp(r, r.norm(x), layer)))
    x = t.add(x, t.dropout(_attention(r, r.norm(x), layer), p))
    return t.add(x, t.dropout(_mlp(r, r.norm(x), layer), p))


def run_block(r: Replay, x: Sym, layer: int = 0) -> Sym:
    return gpt2_block(r, x) if r.spec.family == "gpt2" else decoder_block(r, x, layer)
