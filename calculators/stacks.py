"""What transformers + peft + bitsandbytes and minilora run differently in a training forward pass.

The block replays (blocks.py) are written once per model layout; where the two stacks' code differs
they ask the `Stack`. `Transformers` follows transformers, peft and bitsandbytes at the versions in
training_setup.STACK_VERSIONS; `Minilora` follows reference_models and minilora. What differs, and
why it changes the bytes saved for backward:

                     transformers + peft + bitsandbytes             minilora
  LoRA layer         peft: x cast to the adapters' dtype (fp32      LoRALinear: x cast to the adapters'
                     under autocast_adapter_dtype), lora_A keeps    dtype (the base's); LowRankAdd keeps
                     it, lora_B keeps A's output (under autocast    the same two, and 16-bit copies of A
                     its bnb layer skips the cast)                  and B under autocast
  4-bit layer        Linear4bit / LinearNF4: x cast to the compute dtype, the output back to x's; the
                     4-bit matmul keeps nothing (its state is held by attribute, not saved) - both
  prepare for k-bit  every weight that is not 4-bit is fp32, so     norms in fp32 on an upcast copy of
                     the residual stream and the logits are fp32    their input, the output cast back
  input gradients    gradient_checkpointing_enable (and prepare     prepare_for_kbit_training's hook
                     with checkpointing): the embedding output      (Gemma: on nn.Embedding, before the
                     requires grad (Gemma: after the scale)         scale, which is then kept)
  MLP activation     ACT2FN: gelu_new is eight ops keeping four     one fused op keeping its input
                     tensors, the others one op
  eager attention    a float mask is added (nothing kept); GPT-2    masked_fill keeps a bool (T, T)
                     runs softmax in the scores' dtype, the         mask; softmax in fp32
                     others in fp32
  SDPA, sliding      a (B, 1, T, T) boolean mask, kept by SDPA      a (T, T) boolean mask, the same
  window < seq       as an additive copy in q's dtype per layer
  K and V            config.use_cache: a DynamicCache concatenates  used as projected
                     copies of k and v (without checkpointing)
  checkpointing      keeps each layer's hidden_states (positional)  keeps x, cos and sin
                     and GPT-2's eager float mask; cos/sin go by
                     keyword and are not kept
  RoPE               one cos/sin pair (Gemma 3, OLMo 3: one per     one pair per layer type; the output
                     layer type) in the residual stream's dtype;    cast back to q's (Phi-3, GPT-NeoX:
                     the output takes the promoted dtype            the promoted dtype, as transformers)
  experts            grouped_mm_experts_forward over the routed     SparseMoE: each expert on its tokens,
                     copies sorted by expert; peft's ParamWrapper   index_add_ (moe_replay.py)
                     LoRA folds into a whole new expert tensor
"""
from __future__ import annotations

from .moe_replay import grouped_mm_experts, hf_router, index_add_experts
from .spec import SLIDING, ModelSpec
from .tape import AttentionShape, Sym, Tape

__all__ = ["Replay", "Stack", "Transformers", "Minilora", "STACK_OBJECTS"]


class Replay:
    """One training forward pass being replayed: the tape, the model, the setup and its precision, the stack."""

    def __init__(self, spec: ModelSpec, setup, precision, stack: "Stack"):
        self.spec, self.s, self.p, self.stack = spec, setup, precision, stack
        self.tape = Tape(setup.device, precision.autocast)
        self.full = setup.trainable == "all"
        self.mask = None          # transformers' float attention mask, made once per forward when eager
        self.rope = {}            # layer type -> (cos, sin), made once per forward
        self.tile_bytes = 0       # the most one MLP tile saves (setup.mlp_tile), alive while backward recomputes it

    def lora_rank(self, name: str, rank: int | None = None) -> int:
        """The rank of the adapter on layer `name` (0: none). `rank`: an expert tensor's own (moe)."""
        if self.full:
            return 0
        if rank is not None:
            return rank
        return self.s.lora_rank if name in self.s.lora_targets else 0

    def linear(self, x: Sym, name: str, n_in: int, n_out: int) -> Sym:
        return self.stack.linear(self, x, name, n_in, n_out)

    def norm(self, x: Sym, dim: int | None = None) -> Sym:
        """A norm over the last `dim` elements (the hidden size, or a head's for q/k norms)."""
        return self.stack.norm(self, x, dim or self.spec.hidden_size)

    def act(self, x: Sym) -> Sym:
        return self.stack.activation(self, x)

    def mlp(self, n: Sym, body, *args) -> Sym:
        """A block's dense MLP, body(self, n, *args) -> its (rows, hidden) output, on its input n.

        With setup.mlp_tile and more rows than a tile it runs as reference_models/tiled_mlp.py runs
        it: forward keeps only n (the tiles run without a graph); backward replays one tile at a time,
        whose saved bytes (its rows are a view of n, counted already) go to `tile_bytes`."""
        tile, hidden = self.s.mlp_tile, self.spec.hidden_size
        rows = n.numel // hidden
        if not tile or rows <= tile:
            return body(self, n, *args)
        main, self.tape = self.tape, Tape(self.tape.device, self.tape.autocast)
        out = body(self, n.view(tile * hidden), *args)   # (tile, hidden)
        self.tile_bytes = max(self.tile_bytes, self.tape.since(0, exclude={n.storage}))
        self.tape = main
        if out.grad:                                     # the tiled Function keeps its input
            main.save(n)
        return Sym(rows * hidden, out.dtype, out.grad)

    def layer_type(self, layer: int) -> str:
        types = self.spec.layer_types
        return types[layer] if types else "full_attention"

    def rope_of(self, layer: int) -> tuple:
        return self.rope.get(self.layer_type(layer), ())

    def attention(self, q: Sym, k: Sym, v: Sym, shape: AttentionShape, p: float, v_contiguous: bool,
                  layer: int = 0) -> Sym:
        """The attention core -> (B, T, H*D), o_proj's input. Soft-capped scores (Gemma 2) have no SDPA
        path: transformers runs them eager (its default for the family), and so does reference_models."""
        spec, s = self.spec, self.s
        if s.attn == "eager" or (s.attn == "sdpa" and spec.attn_softcap):
            return self.stack.eager_attention(self, q, k, v, shape, p)
        window = spec.sliding_window if self.layer_type(layer) == SLIDING else None
        # a sliding window shorter than the sequence needs a mask (flash_attention_2 takes the window itself)
        mask = self.stack.sdpa_mask(self) if window and s.seq > window and s.attn == "sdpa" else 0
        y = self.tape.sdpa(q, k, v, shape, p, v_is_view=v_contiguous or shape.batch == 1, mask=mask)
        # CPU's flash kernel lays its output out as q is: (B, T, H, D) in memory after a RoPE on the
        # transposed projection, so transpose(1, 2).contiguous() is free; a concatenated q is (B, H, T, D)
        # and the output is copied (CUDA's kernels always write (B, T, H, D))
        return Sym(y.numel, y.dtype, y.grad) if self.tape.device == "cpu" and rope_concatenates(spec) else y


def rope_concatenates(spec: ModelSpec) -> bool:
    """Phi-3 and GPT-NeoX (transformers' and reference_models') rotate the first rotary_dim dims and
    torch.cat the rest back, even when nothing is left: a new, contiguous (B, H, T, D) tensor."""
    return spec.family in ("phi3", "gpt_neox")


def _rmsnorm(r: Replay, x: Sym, weight_dtype: str, dim: int) -> Sym:
    """transformers' LlamaRMSNorm, Olmo2RMSNorm and Gemma2RMSNorm (q/k norms too) and
    reference_models/norms.py, op for op: the same fp32 normalisation, three ways to apply the weight."""
    t = r.tape
    x32 = t.to(x, "fp32")
    t.saves_input(x32, fp32_list=True)                               # x32.pow(2) keeps x32
    inv = t.saves_output(Sym(x.numel // dim, "fp32", x.grad), fp32_list=True)   # rsqrt(mean + eps): (.., 1)
    normed = t.mul(x32, inv)                                         # keeps x32 and inv
    if r.spec.norm == "rmsnorm_gemma":   # normed * (1 + weight.float()): 1 + w is an fp32 (dim,) tensor of its own
        return t.to(t.mul(normed, Sym(dim, "fp32", r.full)), x.dtype)
    if r.spec.norm == "rmsnorm_olmo":    # (weight * normed).to(dtype): the fp32 normed is kept for the weight
        return t.to(t.mul(t.param(dim, weight_dtype, r.full), normed), x.dtype)
    return t.mul(t.param(dim, weight_dtype, r.full), t.to(normed, x.dtype))   # keeps the cast when the weight trains


def _norm_body(r: Replay, x: Sym, weight_dtype: str, dim: int) -> Sym:
    if r.spec.norm == "layernorm":
        return r.tape.layer_norm(x, x.numel // dim, r.full)
    return _rmsnorm(r, x, weight_dtype, dim)


def _eager_core(r: Replay, q: Sym, k: Sym, v: Sym, shape: AttentionShape, p: float, *, mask_kept: bool,
               mask: Sym | None, softmax_dtype: str | None, probs_dtype: str) -> Sym:
    """softmax(q k^T * scale [soft-capped] [+ mask]) @ v as batched matmuls -> (B, T, H*D), o_proj's
    input. matmul reshapes q, k^T and v (B, H, T, D) to (B*H, T, D): a copy of the transposed views,
    except with batch 1, where the reshape is a view of the tensor's own storage (GPT-2's q: the whole
    c_attn output); repeat_kv's GQA expansion of k and v is a new (B, H, T, D) tensor either way."""
    t = r.tape

    def operand(x: Sym, kv: bool = False) -> Sym:
        x = t.lower(x)                                               # matmul's autocast cast
        own = shape.batch == 1 and not (kv and shape.kv_heads < shape.heads)
        return x if own else Sym(shape.bhtd, x.dtype, x.grad)

    att = t.bmm(operand(q), operand(k, kv=True), shape.bhtt)
    att = t.scalar(att)                                              # * scale
    if r.spec.attn_softcap:                                          # Gemma 2: cap * tanh(scores / cap)
        att = t.scalar(t.saves_output(t.scalar(att)))                # tanh keeps its output
    if mask_kept and att.grad:
        t.keep(shape.seq * shape.seq, "bool")                        # masked_fill(~mask) keeps ~mask
    if mask is not None:
        att = t.add(att, mask)                                       # + a float mask: nothing kept
    probs = t.dropout(t.to(t.softmax(att, softmax_dtype), probs_dtype), p)
    out = t.bmm(t.lower(probs), operand(v, kv=True), shape.bhtd)
    return Sym(shape.bhtd, out.dtype, out.grad)                      # transpose(1, 2) copied contiguous


class Stack:
    """The steps of a forward pass that a stack runs its own way (the table in the module docstring);
    what both run alike is written once here or in blocks.py."""
    name = ""
    hooks_before_embedding_scale = False    # where the input-gradient hook sits on a scaled embedding

    def input_requires_grad(self, r: Replay) -> bool:
        raise NotImplementedError

    def checkpoint_inputs(self, r: Replay, x: Sym, layer: int) -> list:
        raise NotImplementedError

    def rope_types(self, spec: ModelSpec) -> bool:
        """Does each layer type get a cos/sin pair of its own (else one pair serves every layer)?"""
        raise NotImplementedError

    def sdpa_mask(self, r: Replay) -> int:
        """Elements of the boolean sliding-window mask handed to SDPA."""
        raise NotImplementedError

    def router(self, r: Replay, n: Sym) -> Sym:
        """A sparse layer's router: (N, C) tokens -> (N, E) logits."""
        return r.linear(n, "mlp.gate", r.spec.hidden_size, r.spec.num_experts)

    def experts(self, r: Replay, n: Sym, weights: Sym) -> Sym:
        """The routed experts of a sparse layer: (N, C) tokens and their (N, k) routing weights -> (N, C)."""
        raise NotImplementedError

    def training_kv(self, r: Replay, k: Sym, v: Sym) -> tuple:
        return k, v

    def loss_targets(self, r: Replay) -> int:
        """Elements in the storage of the targets the loss keeps: (B, T) token ids."""
        return r.s.batch * r.s.seq

    def linear(self, r: Replay, x: Sym, name: str, n_in: int, n_out: int, rank: int | None = None) -> Sym:
        """A linear layer as the stack runs it: the base layer, and the LoRA adapter on it if any."""
        y = self.base_linear(r, x, name, n_in, n_out)
        rank = r.lora_rank(name, rank)
        return self.adapter(r, x, y, n_in, n_out, rank) if rank else y

    def adapter(self, r: Replay, x: Sym, y: Sym, n_in: int, n_out: int, rank: int) -> Sym:
        """base output y + the rank-`rank` adapter's, on the layer's input x."""
        raise NotImplementedError

    def base_linear(self, r: Replay, x: Sym, name: str, n_in: int, n_out: int) -> Sym:
        """The layer under any adapter: a 4-bit layer (QLoRA, lm_head excepted) or nn.Linear / Conv1D."""
        t, p = r.tape, r.p
        if r.s.quantized and name != "lm_head":
            xc = t.to(x, p.compute)
            out = Sym(xc.numel // n_in * n_out, t.autocast or xc.dtype, xc.grad)   # keeps nothing
            return t.to(out, x.dtype)
        return t.linear(x, n_in, n_out, r.full, p.embedding if name == "lm_head" else p.linear)

    def rope(self, r: Replay, x: Sym, layer: int) -> Sym:
        """(x * cos) + (rotate_half(x) * sin), on the first rotary_dim dims of each head (the rest
        concatenated back): cos and sin are kept for x's gradient. OLMo casts the result back to x's dtype."""
        t = r.tape
        cos, sin = r.rope_of(layer)
        out = t.add(t.mul(x, cos), t.mul(t.scalar(x), sin))
        return t.to(out, x.dtype) if r.spec.rope_in_fp32 else out


class Transformers(Stack):
    name = "hf"

    def input_requires_grad(self, r: Replay) -> bool:
        return r.s.grad_ckpt != "none"      # enable_input_require_grads, from checkpointing or prepare

    def checkpoint_inputs(self, r: Replay, x: Sym, layer: int) -> list:
        # GradientCheckpointingLayer checkpoints forward(*args): GPT-2 passes its attention mask positionally
        return [x] + ([r.mask] if r.mask is not None and r.spec.family == "gpt2" else [])

    def rope_types(self, spec: ModelSpec) -> bool:
        return spec.local_rope_theta is not None   # Gemma 3 and OLMo 3's rotary_emb runs per layer type

    def sdpa_mask(self, r: Replay) -> int:
        return r.s.batch * r.s.seq * r.s.seq  # create_sliding_window_causal_mask: (B, 1, T, T)

    def router(self, r: Replay, n: Sym) -> Sym:
        return hf_router(r, n)

    def experts(self, r: Replay, n: Sym, weights: Sym) -> Sym:
        return grouped_mm_experts(r, n, weights)

    def loss_targets(self, r: Replay) -> int:
        # ForCausalLMLoss pads labels to (B, T + 1) and takes [..., 1:].contiguous(): with batch 1
        # that slice is already contiguous, a view of the padded storage
        return r.s.seq + 1 if r.s.batch == 1 else r.s.batch * r.s.seq

    def training_kv(self, r: Replay, k: Sym, v: Sym) -> tuple:
        # config.use_cache is on while training: DynamicCache.update returns torch.cat copies (a sliding
        # layer's too: it returns the whole concatenation); checkpointed layers run without a cache
        if r.s.grad_ckpt != "none" or not r.spec.use_cache:
            return k, v
        return Sym(k.numel, k.dtype, k.grad), Sym(v.numel, v.dtype, v.grad)

    def adapter(self, r: Replay, x: Sym, y: Sym, n_in: int, n_out: int, rank: int) -> Sym:
        t, p, s = r.tape, r.p, r.s
        # peft's lora.Linear / lora.bnb.Linear4bit: result = base(x) (cloned for 4-bit), then
        # result + lora_B(lora_A(dropout(x cast to the adapters' dtype))) * scaling, cast back
        h = x if s.quantized and t.autocast else t.to(x, p.adapter)
        h = t.dropout(h, s.lora_dropout)
        t.linear(t.linear(h, n_in, rank, True, p.adapter), rank, n_out, True, p.adapter)
        return Sym(y.numel, y.dtype, True)

    def norm(self, r: Replay, x: Sym, dim: int) -> Sym:
        return _norm_body(r, x, r.p.norm, dim)

    def activation(self, r: Replay, x: Sym) -> Sym:
        t, name = r.tape, r.spec.activation
        if name == "gelu_new":
            # NewGELUActivation: 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * pow(x, 3))))
            cube = t.saves_input(x, fp32_list=True)                   # pow keeps x
            th = t.saves_output(t.scalar(t.add(x, t.scalar(cube))))   # tanh keeps its output
            return t.mul(t.scalar(x), t.scalar(th))                   # keeps 0.5 * x and 1 + tanh
        return t.saves_output(x) if name == "relu" else t.saves_input(x)

    def eager_attention(self, r: Replay, q: Sym, k: Sym, v: Sym, shape: AttentionShape, p: float) -> Sym:
        gpt2 = r.spec.family == "gpt2"
        # Llama-family eager_attention_forward: softmax(dtype=fp32).to(q.dtype); GPT-2's in the scores' dtype
        return _eager_core(r, q, k, v, shape, p, mask_kept=False, mask=r.mask,
                          softmax_dtype=None if gpt2 else "fp32", probs_dtype=v.dtype if gpt2 else q.dtype)


class Minilora(Stack):
    name = "minilora"
    hooks_before_embedding_scale = True   # prepare_for_kbit_training hooks the nn.Embedding itself

    def input_requires_grad(self, r: Replay) -> bool:
        return bool(r.s.prepare_kbit)       # prepare_for_kbit_training's forward hook on the embedding

    def checkpoint_inputs(self, r: Replay, x: Sym, layer: int) -> list:
        return [x, *r.rope_of(layer)]

    def rope_types(self, spec: ModelSpec) -> bool:
        return True                         # Llama keeps a Rope per layer type (one type: one pair)

    def sdpa_mask(self, r: Replay) -> int:
        return r.s.seq * r.s.seq            # reference_models._common.causal_mask: (T, T)

    def experts(self, r: Replay, n: Sym, weights: Sym) -> Sym:
        return index_add_experts(r, n, weights)

    def adapter(self, r: Replay, x: Sym, y: Sym, n_in: int, n_out: int, rank: int) -> Sym:
        t, p, s = r.tape, r.p, r.s
        h = t.dropout(t.to(x, p.adapter), s.lora_dropout)
        if y.dtype != p.adapter:           # LoRALinear's unfused path
            t.linear(t.linear(h, n_in, rank, True, p.adapter), rank, n_out, True, p.adapter)
            return Sym(y.numel, y.dtype, True)
        if t.autocast:                     # LowRankAdd casts h, A and B to the autocast dtype and keeps them
            h = t.to(h, t.autocast)
            if p.adapter != t.autocast:
                t.keep(rank * n_in, t.autocast)
                t.keep(n_out * rank, t.autocast)
        t.save(h)
        t.keep(h.numel // n_in * rank, h.dtype)                      # h @ A^T, (rows, r)
        return Sym(y.numel, h.dtype, True)

    def norm(self, r: Replay, x: Sym, dim: int) -> Sym:
        if not r.s.prepare_kbit:
            return _norm_body(r, x, r.p.norm, dim)
        # prepare_for_kbit_training: fp32 norm on an upcast copy of the input, the output cast back
        return r.tape.to(_norm_body(r, r.tape.to(x, "fp32"), r.p.norm, dim), x.dtype)

    def activation(self, r: Replay, x: Sym) -> Sym:
        return r.tape.saves_output(x) if r.spec.activation == "relu" else r.tape.saves_input(x)

    def eager_attention(self, r: Replay, q: Sym, k: Sym, v: Sym, shape: AttentionShape, p: float) -> Sym:
        return _eager_core(r, q, k, v, shape, p, mask_kept=True, mask=None, softmax_dtype="fp32", probs_dtype=q.dtype)

    def rope(self, r: Replay, x: Sym, layer: int) -> Sym:
        # apply_rotary casts back to x's dtype, except when it cuts the rotated part off and concatenates the
        # rest back (Phi-3 and GPT-NeoX's split=True): the concatenation takes the promoted dtype
        out = super().rope(r, x, layer)
        return out if rope_concatenates(r.spec) else r.tape.to(out, x.dtype)


STACK_OBJECTS = {"hf": Transformers(), "minilora": Minilora()}
