"""Activation memory: the bytes autograd saves for backward in one training forward pass plus the
loss, derived op by op from the code that runs, for the stack that runs it.

Rather than a closed formula with fitted constants (Korthikanti et al.'s s*b*h*(34 + 5*a*s/h)
describes Megatron's layer), this module replays the forward pass on a symbolic tape (tape.py):
the embedding, each block (blocks.py), the final norm, lm_head and the loss, applying autograd's
own rule for what each op keeps. Which inputs an op saves depends on which need a gradient:
`mm(x, W)` keeps x only when W trains, so LoRA saves far less than full fine-tuning in the same
model. Where transformers + peft + bitsandbytes and minilora run different code (stacks.py), the
replay follows the chosen stack; the dtype of every tensor group comes from `Precision`.

Each saved tensor is counted once per storage (views share one), parameters excluded: the quantity
torch.autograd.graph.saved_tensors_hooks counts when keyed by untyped_storage().data_ptr(). The
loss is the one each stack computes: transformers' ForCausalLMLoss from `labels=` (the logits
upcast to fp32, cross_entropy), reference_models' lm_loss; both keep the fp32 log-softmax and the
int64 targets. On CPU the replay equals the measured bytes (tests/test_calc_stack_hf.py,
tests/test_calc_activations.py); the CUDA rules (bool dropout masks, fp32 LayerNorm statistics,
flash attention with dropout, autocast's CUDA fp32 list) follow torch's documented behaviour.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .blocks import run_block
from .families import FAMILIES
from .lora import lora_layers
from .models import ModelSpec
from .stacks import STACK_OBJECTS, Replay
from .tape import Sym, Tape
from .training_setup import Precision, TrainingSetup

__all__ = ["ActivationSetup", "activation_bytes", "block_targets"]


@dataclass(frozen=True)
class ActivationSetup:
    batch: int
    seq: int
    dtype: str = "bf16"                  # every tensor group's dtype, unless `precision` says otherwise
    precision: Precision | None = None   # per-group dtypes and autocast (Precision.of a TrainingSetup)
    stack: str = "hf"                    # "hf" (transformers + peft + bitsandbytes) | "minilora"
    attn: str = "sdpa"                   # "sdpa" (flash / memory-efficient) | "flash" (hf: flash_attention_2,
                                         # windows and soft-capping in the kernel) | "eager"
    grad_ckpt: str = "none"              # "none" | "full" (per block) | "selective" (minilora)
    device: str = "cuda"                 # "cuda" | "cpu" (see tape.py)
    trainable: str = "all"               # "all" (full fine-tuning) | "lora" (only adapters train)
    quantized: bool = False              # QLoRA: every linear layer but lm_head in 4 bits
    prepare_kbit: bool = False           # prepare_model_for_kbit_training / prepare_for_kbit_training
    lora_targets: frozenset = field(default_factory=frozenset)  # in-block names, e.g. "self_attn.q_proj"
    lora_rank: int = 8
    lora_dropout: float = 0.0
    mlp_tile: int = 0                    # tokens per tile of every dense MLP (reference_models/tiled_mlp.py); 0: off
    embd_pdrop: float = 0.0              # embedding, residual and attention dropout (spec's, or overridden)
    resid_pdrop: float = 0.0
    attn_pdrop: float = 0.0

    @property
    def resolved_precision(self) -> Precision:
        return self.precision or Precision.uniform(self.dtype)

    @classmethod
    def of(cls, spec: ModelSpec, setup: TrainingSetup) -> "ActivationSetup":
        """What a training run's forward pass replays: the setup's recipe (Precision.of), its LoRA
        targets as in-block names, and config.json's dropouts unless setup.model_dropout overrides them."""
        targets = frozenset()
        if setup.method != "full":
            targets = block_targets(lin.name for lin in lora_layers(spec, setup.lora.targets))
        # config.json's dropouts, or setup.model_dropout for each of them the family has (FAMILIES' dropout_keys)
        drop, kinds = setup.model_dropout, FAMILIES[spec.family].dropout_keys
        attn, resid, embd = ((spec.attention_dropout, spec.residual_dropout, spec.embedding_dropout) if drop is None
                             else tuple(drop * (kind in kinds) for kind in ("attention", "residual", "embedding")))
        _check_stack_runs(spec, setup, targets, resid)
        qlora = setup.method == "qlora"
        return cls(batch=setup.batch, seq=setup.seq, precision=Precision.of(setup), stack=setup.stack,
                   attn=setup.attn if setup.stack == "hf" or setup.attn == "eager" else "sdpa",
                   grad_ckpt=setup.grad_ckpt, device=setup.device,
                   trainable="all" if setup.method == "full" else "lora", quantized=qlora,
                   prepare_kbit=qlora and setup.prepare_kbit is not False, lora_targets=targets,
                   lora_rank=setup.lora.rank, lora_dropout=setup.lora.dropout, mlp_tile=setup.mlp_tile,
                   embd_pdrop=embd, resid_pdrop=resid, attn_pdrop=attn)


def _check_stack_runs(spec: ModelSpec, setup: TrainingSetup, targets: frozenset, resid: float) -> None:
    """Refuse, in one line, what the chosen stack itself refuses to train (so there is nothing to replay)."""
    if setup.lora.dropout and any(t == "mlp.gate" or t.startswith("mlp.experts.") for t in targets):
        if setup.stack == "hf" or any(t.startswith("mlp.experts.") for t in targets):   # minilora's router: LoRALinear
            raise ValueError(f"LoRA dropout {setup.lora.dropout:g} with targets on the router or experts of "
                             f"{spec.name}: peft's ParamWrapper (and minilora's expert LoRA) refuse dropout there; "
                             "use --dropout 0 or other targets")
    if setup.stack == "minilora" and spec.family == "phi3" and resid:
        raise ValueError(f"residual dropout {resid:g} (resid_pdrop) on phi3 with --stack minilora: reference_models' "
                         "Phi-3 has none; use --model-dropout 0 or --stack hf")


def block_targets(layer_names) -> frozenset:
    """Module names of adapted layers -> their names inside a block ("self_attn.q_proj")."""
    out = set()
    for name in layer_names:
        parts = name.split(".")
        if len(parts) > 3 and parts[0] in ("transformer", "model", "gpt_neox") and parts[2].isdigit():
            out.add(".".join(parts[3:]))
    return frozenset(out)


def _embedding(r: Replay) -> Sym:
    """Token (and GPT-2's position) embeddings -> the residual stream, (B, T, h)."""
    t, s, spec = r.tape, r.s, r.spec
    rows, h = s.batch * s.seq, spec.hidden_size
    x = t.embedding(Sym(rows, "int64", False), r.full, rows * h, r.p.embedding)
    hooked = r.stack.input_requires_grad(r)   # a forward hook: output.requires_grad_(True)
    if spec.scaled_embeddings:                # Gemma: * sqrt(hidden) as a 0-d tensor in x's dtype, kept for x
        x.grad = x.grad or (hooked and r.stack.hooks_before_embedding_scale)
        x = t.mul(x, Sym(1, x.dtype, False))
    x.grad = x.grad or hooked
    if spec.family == "gpt2":
        x = t.add(x, t.embedding(Sym(s.seq, "int64", False), r.full, s.seq * h, r.p.embedding))   # + positions
    return t.dropout(x, s.embd_pdrop)


def _shared_inputs(r: Replay, x: Sym) -> None:
    """What the model makes once per forward for every layer: RoPE's cos and sin (in the residual
    stream's dtype, OLMo's in fp32), one pair per layer type or one for all (Stack.rope_types), and,
    for transformers' eager attention, the float causal mask (B, 1, T, T)."""
    s, spec = r.s, r.spec
    if spec.family != "gpt2":   # (T, rotated dims) each, the rotated part of a head (partial RoPE: less)
        rotated, dtype = spec.rotary_dim or spec.head_dim, "fp32" if spec.rope_in_fp32 else x.dtype
        types = sorted(set(spec.layer_types or ("full_attention",)))
        pairs = {kind: (Sym(s.seq * rotated, dtype, False), Sym(s.seq * rotated, dtype, False)) for kind in types}
        r.rope = pairs if r.stack.rope_types(spec) else dict.fromkeys(types, pairs[types[0]])
    if r.stack.name == "hf" and s.attn == "eager":
        r.mask = Sym(s.batch * s.seq * s.seq, x.dtype, False)


def _shared_storages(r: Replay) -> set:
    return {c.storage for pair in r.rope.values() for c in pair} | ({r.mask.storage} if r.mask else set())


def _layers(r: Replay, x: Sym) -> tuple:
    """Every block, checkpointed or not -> (output, per-layer bytes). What the model made once for
    every layer (cos, sin, a mask) is not counted in the layer that kept it first: it is `shared`."""
    layers, main = [], r.tape
    shared = _shared_storages(r)
    for i in range(r.spec.num_layers):
        mark = main.mark()
        if r.s.grad_ckpt == "full":
            # torch.utils.checkpoint keeps the block's tensor inputs; nothing inside is kept
            r.tape = Tape(main.device, main.autocast)
            out = run_block(r, x, i)
            r.tape = main
            main.save(*r.stack.checkpoint_inputs(r, x, i))
            x = out
        else:
            x = run_block(r, x, i)
        layers.append(main.since(mark, exclude=shared))
    return x, layers


def _one_layer_bytes(spec: ModelSpec, setup: ActivationSetup) -> tuple[int, int]:
    """One block's saved bytes without checkpointing, its input requiring grad: what backward rebuilds,
    for the block that keeps the most (one of each kind replayed: dense or sparse, full or sliding
    attention, whose mask a sliding layer keeps past its window); and what one tile of its MLP saves
    when it runs tiled (0 otherwise)."""
    kinds = {}
    for i in range(spec.num_layers):
        kinds.setdefault((spec.is_sparse(i), spec.layer_types[i] if spec.layer_types else None), i)
    block = tile = 0
    for i in kinds.values():
        r = Replay(spec, setup, setup.resolved_precision, STACK_OBJECTS[setup.stack])
        x = Sym(setup.batch * setup.seq * spec.hidden_size, r.p.embedding, True)
        _shared_inputs(r, x)
        run_block(r, x, i)
        block, tile = max(block, r.tape.total()), max(tile, r.tile_bytes)
    return block, tile


def activation_bytes(spec: ModelSpec, setup: ActivationSetup) -> dict:
    """Bytes autograd keeps from the forward pass and the loss for backward, split into parts.

    Returns {"embedding": ..., "layers": [per-layer bytes], "shared": RoPE cos/sin and transformers'
    eager mask (made once, kept by the first layer that needs them, reported here), "head": final
    norm + lm_head input ("final_norm": the norm's share; "hidden_bytes": its output's bytes), "loss":
    fp32 log-softmax + targets, "total": their sum, "layer_full": one
    layer's bytes without checkpointing, "mlp_tile": what one tile of a tiled MLP saves while
    backward recomputes it (0 without mlp_tile)}.
    """
    s = setup
    if s.batch <= 0 or s.seq <= 0:
        raise ValueError(f"batch and seq must be >= 1, got batch={s.batch}, seq={s.seq}")
    if s.stack not in STACK_OBJECTS:
        raise ValueError(f"stack must be one of {', '.join(STACK_OBJECTS)}, got {s.stack!r}")
    r = Replay(spec, s, s.resolved_precision, STACK_OBJECTS[s.stack])
    t = r.tape
    x = _embedding(r)
    embedding = t.total()
    _shared_inputs(r, x)
    x, layers = _layers(r, x)
    shared = sum(t.saved.get(storage, 0) for storage in _shared_storages(r))
    mark = t.mark()
    hidden = r.norm(x)                                               # (B, T, C): the head's input
    final_norm = t.since(mark)
    logits = r.linear(hidden, "lm_head", spec.hidden_size, spec.vocab_size)
    if spec.final_softcap:                    # Gemma: cap * tanh(logits / cap), tanh keeps its output
        logits = t.scalar(t.saves_output(t.scalar(logits)))
    head = t.since(mark)
    mark = t.mark()
    t.cross_entropy(t.to(logits, "fp32"), r.stack.loss_targets(r))   # logits.float(), then cross_entropy
    loss = t.since(mark)
    total = t.total()
    layer_full, tile = _one_layer_bytes(spec, s)
    return {"embedding": embedding, "layers": layers, "shared": shared, "head": head, "loss": loss,
            "final_norm": final_norm, "hidden_bytes": hidden.nbytes, "total": total, "layer_full": layer_full, "mlp_tile": max(r.tile_bytes, tile)}
