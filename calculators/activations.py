"""Activation memory: the bytes autograd saves for backward, derived op by op from OUR models' code.

Rather than a closed formula with fitted constants (Korthikanti et al.'s s*b*h*(34 + 5*a*s/h)
describes Megatron's layer, not ours), this module replays the forward pass of
reference_models/gpt.py and reference_models/llama.py as a list of ops, applying autograd's own
rule for each: which inputs an op saves depends on which inputs require grad. For example
`mm(x, W)` saves x only when W is trainable (it is needed for W's gradient), and `weight * y`
in RMSNorm saves y only when the norm weight is trainable. That is why LoRA saves far less than
full fine-tuning in the same model: frozen projections keep no inputs.

Each saved tensor is counted once per storage (views such as q/k/v split out of GPT-2's fused
c_attn output share one storage), parameters excluded: the same bookkeeping the tests do with
torch.autograd.graph.saved_tensors_hooks on the real models.

Device differences we model (the CPU numbers are measured in tests/test_calc_activations.py):
  - dropout masks: bool (1 byte) on CUDA, the input's dtype on CPU;
  - LayerNorm mean/rstd: fp32 on CUDA, the input's dtype on CPU;
  - SDPA with attention dropout: flash attention on CUDA (q, k, v, out, logsumexp); on CPU it
    falls back to the math path in fp32, which keeps the (B, H, T, T) matrices.
Other families (gemma, gemma2, phi3) are estimated with the Llama block (gemma2 adds its two extra
norms); only GPT-2 and the Llama family (llama, mistral, qwen2) are checked against measurements. A
mixture-of-experts layer replays reference_models.moe.SparseMoE (router, the N*k routed token copies
through their experts, the shared expert): exact against measurements for mixtral and qwen2_moe
(qwen3_moe's q/k norms and deepseek_v3's latent attention are estimated like the others).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .models import ModelSpec

__all__ = ["ActivationSetup", "activation_bytes", "block_targets"]

_IDX = 8  # int64 token ids


@dataclass(frozen=True)
class ActivationSetup:
    batch: int
    seq: int
    dtype_bytes: int = 2                 # compute dtype of activations (the model's dtype)
    attn: str = "sdpa"                   # "sdpa" (flash / memory-efficient) | "eager"
    grad_ckpt: str = "none"              # "none" | "full" (per block, as the reference models) | "selective"
    device: str = "cuda"                 # "cuda" | "cpu" (see module docstring)
    trainable: str = "all"               # "all" (full fine-tuning) | "lora" (only adapters train)
    lora_targets: frozenset = field(default_factory=frozenset)  # in-block names, e.g. "self_attn.q_proj"
    lora_rank: int = 8
    lora_dropout: float = 0.0
    lora_dtype_bytes: int | None = None  # adapters' dtype (None = compute dtype)
    embd_pdrop: float = 0.0              # GPT-2 dropouts (0.1 in GPT-2's config)
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0


def block_targets(layer_names) -> frozenset:
    """Module names of adapted layers -> their names inside a block ("self_attn.q_proj")."""
    out = set()
    for name in layer_names:
        parts = name.split(".")
        if len(parts) > 3 and parts[0] in ("transformer", "model") and parts[2].isdigit():
            out.add(".".join(parts[3:]))
    return frozenset(out)


class _T:
    """A symbolic tensor: its storage (shared by views), size in bytes, and whether it needs grad."""
    __slots__ = ("sid", "nbytes", "grad")

    def __init__(self, sid, nbytes, grad):
        self.sid, self.nbytes, self.grad = sid, nbytes, grad


class _Tape:
    def __init__(self, s: ActivationSetup):
        self.s, self.saved, self._next = s, {}, 0

    def new(self, nbytes, grad):
        self._next += 1
        return _T(self._next, nbytes, grad)

    def view(self, t):  # same storage (view / split / transpose / contiguous reshape)
        return t

    def save(self, *ts):
        for t in ts:
            self.saved[t.sid] = t.nbytes

    # --- ops, each with autograd's saving rule ---------------------------------------------
    def linear(self, x, out_bytes, trainable_weight):
        """F.linear(x, W): saves x iff W needs grad (W itself is a parameter: not counted)."""
        if trainable_weight:
            self.save(x)
        return self.new(out_bytes, x.grad or trainable_weight)

    def cast(self, x, nbytes):  # .to(dtype) / .float(): a new storage unless the dtype is unchanged
        return x if nbytes == x.nbytes else self.new(nbytes, x.grad)

    def unary_saving_input(self, x, out_bytes=None):  # gelu, silu, pow(2)
        if x.grad:
            self.save(x)
        return self.new(x.nbytes if out_bytes is None else out_bytes, x.grad)

    def mul(self, a, b):  # saves b if a needs grad, a if b needs grad
        if a.grad:
            self.save(b)
        if b.grad:
            self.save(a)
        return self.new(max(a.nbytes, b.nbytes), a.grad or b.grad)

    def dropout(self, x, p):
        if p <= 0:
            return x
        mask_bytes = x.nbytes if self.s.device == "cpu" else x.nbytes // self.s.dtype_bytes
        if x.grad:
            self.saved[("mask", self._next + 1)] = mask_bytes
        return self.new(x.nbytes, x.grad)


def _lora_linear(tape: _Tape, x, name: str, n_in: int, n_out: int, trainable_all: bool, rank: int | None = None):
    """A (maybe LoRA-wrapped) nn.Linear as the reference models / minilora.LoRALinear run it. `rank`:
    an expert tensor's adapter (adapted when given), else the setup's rank on a layer it targets."""
    s = tape.s
    rows = x.nbytes // (s.dtype_bytes * n_in)  # B * T
    out = tape.linear(x, rows * n_out * s.dtype_bytes, trainable_all)
    if trainable_all or (rank is None and name not in s.lora_targets) or rank == 0:
        return out
    lb = s.lora_dtype_bytes or s.dtype_bytes
    h = tape.cast(x, rows * n_in * lb)                 # x.to(A.dtype)
    h = tape.dropout(h, s.lora_dropout) if s.lora_dropout > 0 else h
    a = tape.linear(h, rows * (rank or s.lora_rank) * lb, True)  # (B, T, r), saves h
    tape.linear(a, rows * n_out * lb, True)            # (B, T, out), saves a
    return tape.new(out.nbytes, True)                  # base + (b * scaling).to(dtype)


def _rmsnorm(tape: _Tape, x, weight_trainable: bool):
    """RMSNorm.forward of reference_models/llama.py, op by op."""
    s = tape.s
    tokens = x.nbytes // (s.dtype_bytes * tape.hidden)
    x32 = tape.cast(x, tokens * tape.hidden * 4)       # x.float()
    tape.unary_saving_input(x32)                       # x32.pow(2) saves x32
    r = tape.new(tokens * 4, x.grad)                   # rsqrt(mean + eps) saves its output
    if x.grad:
        tape.save(r)
    z = tape.mul(x32, r)                               # saves x32 and r
    y = tape.cast(z, tokens * tape.hidden * s.dtype_bytes)  # .to(x.dtype)
    if weight_trainable:                               # weight * y saves y for the weight's grad
        tape.save(y)
    return tape.new(y.nbytes, y.grad or weight_trainable)


def _layernorm(tape: _Tape, x, weight_trainable: bool):
    s = tape.s
    rows = x.nbytes // (s.dtype_bytes * tape.hidden)
    stat = 4 if s.device == "cuda" else s.dtype_bytes
    if x.grad or weight_trainable:
        tape.save(x)
        tape.saved[("ln", tape._next + 1)] = 2 * rows * stat  # mean and rstd, (B, T, 1) each
    return tape.new(x.nbytes, x.grad or weight_trainable)


def _attention(tape: _Tape, q, k, v, B, T, H, D, p):
    """causal_attention() of reference_models/_common.py -> the (B, T, H*D) input of o_proj."""
    s, d = tape.s, tape.s.dtype_bytes
    grad = q.grad or k.grad or v.grad
    bhtt, bhtd = B * H * T * T, B * H * T * D
    selective = s.grad_ckpt == "selective"  # Megatron's selective recomputation of the core
    if s.attn == "sdpa" and not (p > 0 and s.device == "cpu"):
        # flash / memory-efficient kernels save q, k, v, out and the fp32 logsumexp (B, H, T);
        # they write out as (B, T, H, D), so o_proj's input is a view of it
        out = tape.new(bhtd * d, grad)
        if grad:
            tape.save(q, k, v, out)
            tape.saved[("lse", out.sid)] = B * H * T * 4
        return out
    if not grad:
        return tape.new(bhtd * d, False)
    if selective:  # keep the core's inputs, recompute the (B, H, T, T) part in backward
        tape.save(q, k, v)
    elif s.attn == "sdpa":
        # CPU, dropout > 0: SDPA's math fallback upcasts to fp32 and keeps q, k, v (fp32),
        # softmax, dropout mask and dropped probabilities (B, H, T, T), all fp32
        # (in fp32 there is no upcast; with batch 1, v's (B*H, T, D) reshape is a view of v)
        v_is_view = d == 4 and B == 1
        tape.saved[("sdpa_math", tape._next)] = (2 if v_is_view else 3) * bhtd * 4 + 3 * bhtt * 4
        if v_is_view:
            tape.save(v)
    else:
        # eager: the batched matmuls keep q, k^T and v as (B*H, T, D) tensors (copies of the
        # projections' views: GPT-2's split, RoPE's output, repeat_kv's GQA expansion); each
        # operand is kept only when the OTHER one needs grad (frozen k_proj in LoRA: q is not)
        qg, kg, vg, ag = q.grad, k.grad, v.grad, q.grad or k.grad
        tape.saved[("qk_eager", tape._next)] = (bhtd * d if kg else 0) + (bhtd * d if qg else 0)
        if ag:
            tape.saved[("mask", tape._next)] = T * T      # masked_fill keeps ~mask (bool)
        if ag or (vg and d == 4 and p == 0):
            tape.saved[("softmax", tape._next)] = bhtt * 4  # softmax(dtype=fp32) output
        if p > 0 and ag:                                  # dropout mask
            tape.saved[("attmask", tape._next)] = bhtt * (d if s.device == "cpu" else 1)
        if vg and (p > 0 or d != 4):                      # probabilities feeding att @ v
            tape.saved[("att", tape._next)] = bhtt * d
        if ag:
            tape.saved[("v_eager", tape._next)] = bhtd * d
    return tape.new(bhtd * d, grad)  # y.transpose(1, 2).reshape(B, T, H*D) copies


def _gpt_block(tape, x, spec, full):
    s = tape.s
    B, T, h, H = s.batch, s.seq, spec.hidden_size, spec.num_heads
    n = _layernorm(tape, x, full)
    qkv = _lora_linear(tape, n, "attn.c_attn", h, 3 * h, full)       # q, k, v: views of one storage
    y = _attention(tape, qkv, qkv, qkv, B, T, H, h // H, s.attn_pdrop)
    a = tape.dropout(_lora_linear(tape, y, "attn.c_proj", h, h, full), s.resid_pdrop)
    x = tape.new(x.nbytes, x.grad or a.grad)                    # residual add saves nothing
    n = _layernorm(tape, x, full)
    f = _lora_linear(tape, n, "mlp.c_fc", h, spec.intermediate_size, full)
    g = tape.unary_saving_input(f)                              # gelu(tanh) saves its input
    m = tape.dropout(_lora_linear(tape, g, "mlp.c_proj", spec.intermediate_size, h, full), s.resid_pdrop)
    return tape.new(x.nbytes, x.grad or m.grad)


def _llama_block(tape, x, spec, full, rope, layer=0):
    s = tape.s
    B, T, h, d = s.batch, s.seq, spec.hidden_size, s.dtype_bytes
    H, Hkv, D, inter = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.intermediate_size
    n = _rmsnorm(tape, x, full)
    if spec.family == "phi3":
        qkv = _lora_linear(tape, n, "self_attn.qkv_proj", h, spec.q_size + 2 * spec.kv_size, full)
        q, k, v = qkv, qkv, qkv
    else:
        q = _lora_linear(tape, n, "self_attn.q_proj", h, spec.q_size, full)
        k = _lora_linear(tape, n, "self_attn.k_proj", h, spec.kv_size, full)
        v = _lora_linear(tape, n, "self_attn.v_proj", h, spec.kv_size, full)
    if q.grad or k.grad:
        tape.save(*rope)                                        # q * cos, rotate_half(q) * sin
    q = tape.new(B * H * T * D * d, q.grad)                     # q * cos + rotate_half(q) * sin
    k = tape.new(B * Hkv * T * D * d, k.grad)
    y = _attention(tape, q, k, v, B, T, H, D, 0.0)
    a = _lora_linear(tape, y, "self_attn.o_proj", spec.q_size, h, full)
    x = tape.new(x.nbytes, x.grad or a.grad)
    n = _rmsnorm(tape, x, full)
    if spec.family == "gemma2":                                 # post-attention + pre-feed-forward norms
        n = _rmsnorm(tape, n, full)
    if spec.is_sparse(layer):
        m = _moe_mlp(tape, n, spec, full)
    else:
        m = _gated_mlp(tape, n, "mlp", h, inter, full, fused=spec.family == "phi3")
    if spec.family == "gemma2":
        m = _rmsnorm(tape, m, full)
    return tape.new(x.nbytes, x.grad or m.grad)


def _gated_mlp(tape, n, prefix: str, h: int, inter: int, full: bool, fused: bool = False):
    """act(gate_proj(n)) * up_proj(n) -> down_proj (phi3: one fused gate_up_proj)."""
    if fused:
        gu = _lora_linear(tape, n, f"{prefix}.gate_up_proj", h, 2 * inter, full)
        g, u = gu, gu
    else:
        g = _lora_linear(tape, n, f"{prefix}.gate_proj", h, inter, full)
        u = _lora_linear(tape, n, f"{prefix}.up_proj", h, inter, full)
    act = tape.unary_saving_input(g)                            # silu saves its input
    prod = tape.mul(act, u)
    return _lora_linear(tape, prod, f"{prefix}.down_proj", inter, h, full)


# an expert tensor's adapter: named by its per-expert projections (peft's transformers-4 names, which the
# LoRA count uses); the gate and up pair is one adapter of twice the rank on gate_up_proj
_EXPERT_LORA = {"gate_up_proj": ("mlp.experts.w1", "mlp.experts.gate_proj", "mlp.experts.gate_up_proj"),
                "down_proj": ("mlp.experts.w2", "mlp.experts.down_proj")}


def _expert_rank(s: ActivationSetup, tensor: str) -> int:
    if not s.lora_targets.intersection(_EXPERT_LORA[tensor]):
        return 0
    return s.lora_rank * (2 if tensor == "gate_up_proj" and "mlp.experts.gate_up_proj" not in s.lora_targets else 1)


def _moe_mlp(tape, n, spec, full):
    """reference_models.moe.SparseMoE, op by op. Each expert's saved tensors grow linearly with the
    tokens routed to it, so the N*k (token, expert) pairs are replayed as one batch: the same bytes
    whatever the routing (calculators/moe.py)."""
    s = tape.s
    N, C, k, d = s.batch * s.seq, spec.hidden_size, spec.experts_per_token, s.dtype_bytes
    inter, nk = spec.moe_intermediate_size, N * k
    logits = tape.linear(n, N * spec.num_experts * d, full)      # the router saves n when it trains
    probs = tape.new(N * spec.num_experts * 4, logits.grad)     # softmax in fp32 keeps its output
    weights = tape.new(nk * 4, logits.grad)                      # top-k values
    if logits.grad:
        tape.save(probs, tape.new(nk * 8, False))                # and top-k keeps its int64 indices
    if spec.norm_topk_prob and weights.grad:                     # weights / weights.sum(): both kept
        tape.save(weights, tape.new(N * 4, True))
        weights = tape.new(nk * 4, True)
    wb = 4 if spec.family == "mixtral" else d                    # Qwen casts the weights to the compute dtype
    weights = tape.cast(weights, nk * wb)
    xe = tape.new(nk * C * d, n.grad)                            # x[token]: the routed tokens, copied
    gu = _lora_linear(tape, xe, "mlp.experts.gate_up_proj", C, 2 * inter, full, _expert_rank(s, "gate_up_proj"))
    act = tape.unary_saving_input(gu, nk * inter * d)            # silu(gate) keeps gate_up's output
    tape.mul(act, gu)                                            # act * up keeps act and up (gate_up's output)
    prod = tape.new(nk * inter * d, act.grad)
    y = _lora_linear(tape, prod, "mlp.experts.down_proj", inter, C, full, _expert_rank(s, "down_proj"))
    scaled = tape.mul(y, tape.new(nk * wb, weights.grad))        # y * weights[token, slot]: keeps both
    source = tape.cast(scaled, nk * C * d)                       # (Mixtral: fp32 products back to the dtype)
    if source.grad:
        tape.save(source)                                        # index_add_ keeps its source
    if n.grad or weights.grad or source.grad:                    # each expert's (slot, token) int64 pairs,
        tape.save(tape.new(nk * 16, False))                      # kept by the gather, the lookup, index_add_
    out = tape.new(N * C * d, source.grad)
    if not spec.shared_expert_size:
        return out
    shared = _gated_mlp(tape, n, "mlp.shared_expert" if spec.shared_expert_gate else "mlp.shared_experts", C,
                        spec.shared_expert_size, full)
    if spec.shared_expert_gate:                                  # Qwen2-MoE: sigmoid(Linear(h -> 1)) * shared
        gate = tape.linear(n, N * d, full)
        sig = tape.new(N * d, gate.grad)
        if gate.grad:
            tape.save(sig)                                       # sigmoid keeps its output
        shared = tape.mul(sig, shared)
    return tape.new(out.nbytes, out.grad or shared.grad)


def activation_bytes(spec: ModelSpec, setup: ActivationSetup) -> dict:
    """Bytes autograd keeps from the forward pass for backward, split into parts.

    Returns {"embedding": ..., "layers": [per-layer bytes], "head": final norm + lm_head input,
    "loss": fp32 log-softmax + targets, "shared": RoPE cos/sin, "total": sum,
    "layer_full": one layer's bytes without checkpointing (what backward recomputes at once)}.
    """
    s = setup
    if s.batch <= 0 or s.seq <= 0:
        raise ValueError(f"batch and seq must be >= 1, got batch={s.batch}, seq={s.seq}")
    full = s.trainable == "all"
    tape = _Tape(s)
    tape.hidden = spec.hidden_size
    B, T, h, d = s.batch, s.seq, spec.hidden_size, s.dtype_bytes
    gpt = spec.family == "gpt2"
    # embeddings: the lookup saves the indices when the table is trained
    idx = tape.new(B * T * _IDX, False)
    if full:
        tape.save(idx)
        if gpt:
            tape.saved["positions"] = T * _IDX
    x = tape.new(B * T * h * d, full)
    if gpt:
        x = tape.dropout(x, s.embd_pdrop)
    emb = sum(tape.saved.values())
    rope = ()
    if not gpt:
        rope = (tape.new(T * spec.head_dim * d, False), tape.new(T * spec.head_dim * d, False))
    layers = []
    for i in range(spec.num_layers):
        before = dict(tape.saved)
        if s.grad_ckpt == "full":
            sub = _Tape(s)
            sub.hidden, sub._next = spec.hidden_size, tape._next
            x_in = x
            x = _gpt_block(sub, x, spec, full) if gpt else _llama_block(sub, x, spec, full, rope, i)
            tape._next = sub._next
            if sub.saved:  # checkpoint keeps the block's inputs (x, and cos/sin) for recomputation
                tape.save(x_in, *rope)
        else:
            x = _gpt_block(tape, x, spec, full) if gpt else _llama_block(tape, x, spec, full, rope, i)
        layers.append(sum(v for k, v in tape.saved.items() if k not in before))
    shared = sum(r.nbytes for r in rope if r.sid in tape.saved)
    layers = [n - (shared if i == _first_rope_layer(layers, tape, rope) else 0) for i, n in enumerate(layers)]
    before = dict(tape.saved)
    n = _layernorm(tape, x, full) if gpt else _rmsnorm(tape, x, full)
    tape.linear(n, B * T * spec.vocab_size * d, full)           # lm_head: saves its input when trained
    head = sum(v for k, v in tape.saved.items() if k not in before)
    logits_grad = x.grad or full
    loss = (B * T * spec.vocab_size * 4 + B * T * _IDX + 4) if logits_grad else 0  # log_softmax out, targets
    one = _Tape(s)
    one.hidden = spec.hidden_size
    x1 = _T(0, B * T * h * d, True)
    widest = next((i for i in range(spec.num_layers) if spec.is_sparse(i)), 0)  # an MoE layer keeps the most
    _gpt_block(one, x1, spec, full) if gpt else _llama_block(one, x1, spec, full, rope, widest)
    total = emb + sum(layers) + shared + head + loss
    return {"embedding": emb, "layers": layers, "shared": shared, "head": head, "loss": loss,
            "total": total, "layer_full": sum(one.saved.values())}


def _first_rope_layer(layers, tape, rope):
    # cos/sin are saved by the first layer that needs them; report them once under "shared"
    if not rope or rope[0].sid not in tape.saved:
        return -1
    return next(i for i, n in enumerate(layers) if n > 0)
