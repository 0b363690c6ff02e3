"""One point of the calculator's CPU grid: a small random model trained the way a stack trains it,
what it really saves for backward and holds after an optimizer step, and what the calculator says.

    case = Case("hf", "llama", "qlora-prepare", ckpt=True, attn="sdpa", precision="bf16", dropout=True)
    measure(case)   # {"saved_activation_bytes": ..., "states": {...}}
    predict(case)   # the same keys, from calculators

The "hf" stack is built as its users build it: AutoModelForCausalLM (from_config, or from_pretrained
with BitsAndBytesConfig(load_in_4bit=True, nf4, double quant, compute dtype) for QLoRA, from a
folder saved here), prepare_model_for_kbit_training (use_gradient_checkpointing = the case's),
otherwise gradient_checkpointing_enable(), get_peft_model(LoraConfig) with its default
autocast_adapter_dtype; the loss is transformers' own, from `labels=`. The "minilora" stack is
reference_models with minilora's quantize_model, prepare_for_kbit_training and inject. Saved bytes:
torch.autograd.graph.saved_tensors_hooks, each storage once (untyped_storage().data_ptr()),
parameters excluded. States: after forward, backward and one torch AdamW step, the unique storages
of the parameters, buffers and bitsandbytes' quantization state, the gradients and the optimizer's
state tensors. bench/stack_grid.py runs the whole grid; the tests sample it.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, replace

import torch

FAMILIES = ("llama", "qwen2", "mistral", "qwen3", "gpt2", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt_neox",
            "mixtral", "qwen2_moe", "qwen3_moe")
METHODS = ("full", "lora-qv", "lora-all", "qlora", "qlora-prepare")
PRECISIONS = ("fp32", "bf16", "fp32+autocast")   # weights; "fp32+autocast": Trainer(bf16=True)
SHAPES = ((2, 24, 64), (1, 40, 96))              # (batch, seq, width)
VOCAB, LAYERS, HEADS, KV_HEADS, DROPOUT, RANK, POSITIONS = 128, 2, 4, 2, 0.1, 4, 512
WINDOW = 32   # sliding windows: the first shape's sequence (24) fits in one, the second's (40) does not
_QV = {"gpt2": ["c_attn"], "gpt_neox": ["query_key_value"], "phi3": ["qkv_proj"]}
# what makes each family differ, switched on at the grid's sizes (the shared decoder sizes are in hf_config)
_FAMILY = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", dict(sliding_window=WINDOW)),
    "qwen2": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "qwen3": ("Qwen3Config", dict(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
    "gemma2": ("Gemma2Config", dict(sliding_window=WINDOW, query_pre_attn_scalar=24, pad_token_id=0)),
    "gemma3_text": ("Gemma3TextConfig", dict(sliding_window=WINDOW, sliding_window_pattern=2,
                                             rope_local_base_freq=100.0, pad_token_id=0)),
    "phi3": ("Phi3Config", dict(sliding_window=WINDOW, partial_rotary_factor=0.5,
                                original_max_position_embeddings=POSITIONS, pad_token_id=0)),
    "olmo2": ("Olmo2Config", dict(pad_token_id=0)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, shared_expert_intermediate_size=64)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=4, num_experts_per_tok=2, norm_topk_prob=True)),
}


@dataclass(frozen=True)
class Case:
    stack: str                    # "hf" | "minilora"
    family: str
    method: str                   # a METHODS name
    ckpt: bool = False
    attn: str = "sdpa"
    precision: str = "bf16"       # a PRECISIONS name
    dropout: bool = False         # config.json's dropouts (DROPOUT) or none
    batch: int = 2
    seq: int = 24
    width: int = 64
    rank: int = RANK
    lora_dropout: float = 0.0
    adapter_fp32: bool = True     # hf: get_peft_model(..., autocast_adapter_dtype=adapter_fp32)
    use_cache: bool = True        # config.json's use_cache (transformers fills a DynamicCache in training)

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.precision == "bf16" else torch.float32

    @property
    def targets(self):
        return "all-linear" if self.method in ("lora-all", "qlora", "qlora-prepare") or self.method == "full" \
            else _QV.get(self.family, ["q_proj", "v_proj"])


def hf_config(case: Case):
    import transformers as tf

    p = DROPOUT if case.dropout else 0.0
    if case.family == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=case.width, n_layer=LAYERS, n_head=HEADS,
                             resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, bos_token_id=0, eos_token_id=0,
                             use_cache=case.use_cache)
    if case.family == "gpt_neox":   # partial rotary (a quarter of each head), parallel residual, no GQA
        return tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=case.width, intermediate_size=3 * case.width // 2,
                                num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=POSITIONS,
                                rotary_pct=0.25, attention_dropout=p, hidden_dropout=p, bos_token_id=0, eos_token_id=0,
                                use_cache=case.use_cache)
    name, extra = _FAMILY[case.family]
    if case.family == "phi3" and case.stack == "hf":
        extra = dict(extra, resid_pdrop=p)   # reference_models' Phi-3 has no residual dropout (it refuses one)
    if case.family in ("qwen2_moe", "qwen3_moe"):
        extra = dict(extra, moe_intermediate_size=case.width // 2)
    sizes = dict(vocab_size=VOCAB, hidden_size=case.width, intermediate_size=3 * case.width // 2,
                 num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
                 head_dim=case.width // HEADS, max_position_embeddings=POSITIONS, attention_dropout=p, bos_token_id=0,
                 eos_token_id=0, pad_token_id=None, use_cache=case.use_cache)
    return getattr(tf, name)(**{**sizes, **extra})


_SAVED_FOLDERS: dict = {}


def _saved_folder(case: Case) -> str:
    """A saved fp32 checkpoint of the case's config (one per config), for from_pretrained."""
    key = (case.stack, case.family, case.width, case.dropout, case.use_cache)
    if key not in _SAVED_FOLDERS:
        import transformers as tf

        folder = tempfile.mkdtemp(prefix="stack-case-")
        torch.manual_seed(0)
        tf.AutoModelForCausalLM.from_config(hf_config(case)).save_pretrained(folder)
        _SAVED_FOLDERS[key] = folder
    return _SAVED_FOLDERS[key]


def build_hf(case: Case):
    import peft
    import transformers as tf

    # sdpa is transformers' default; Gemma 2, whose soft-capped attention has no SDPA path, gets eager
    attn = {"attn_implementation": "eager"} if case.attn == "eager" else {}
    torch.manual_seed(0)
    if case.method.startswith("qlora"):
        q = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=case.dtype)
        with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # the loading progress bar
            model = tf.AutoModelForCausalLM.from_pretrained(_saved_folder(case), quantization_config=q, dtype=case.dtype,
                                                            device_map="cpu", **attn)
    else:
        model = tf.AutoModelForCausalLM.from_config(hf_config(case), dtype=case.dtype, **attn)
    if case.method == "qlora-prepare":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=case.ckpt)
    elif case.ckpt:
        model.gradient_checkpointing_enable()
    if case.method != "full":
        config = peft.LoraConfig(r=case.rank, lora_alpha=2 * case.rank, target_modules=case.targets,
                                 lora_dropout=case.lora_dropout, task_type="CAUSAL_LM")
        model = peft.get_peft_model(model, config, autocast_adapter_dtype=case.adapter_fp32)
    return model.train()


def build_minilora(case: Case):
    from minilora.lora.layer import LoRAConfig
    from minilora.lora.model import inject
    from minilora.quant.qlora import prepare_for_kbit_training, quantize_model
    from reference_models import from_hf_config

    torch.manual_seed(0)
    model = from_hf_config(hf_config(case).to_dict(), attn_impl=case.attn)
    model = model.to(case.dtype)
    if case.method == "full":
        model.set_gradient_checkpointing(case.ckpt)
        return model.train()
    model.requires_grad_(False)
    if case.method.startswith("qlora"):
        quantize_model(model, compute_dtype=case.dtype)
        if case.method == "qlora-prepare":
            prepare_for_kbit_training(model, use_gradient_checkpointing=case.ckpt)
    from calculators import lora_layers, model_spec

    names = [lin.name for lin in lora_layers(model_spec(model.config.to_hf_dict()), case.targets)]
    inject(model, LoRAConfig(r=case.rank, alpha=2 * case.rank, dropout=case.lora_dropout, target_modules=names))
    model.set_gradient_checkpointing(case.ckpt)
    return model.train()


def _loss(case: Case, model, ids):
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.precision == "fp32+autocast")
    with autocast:
        if case.stack == "hf":
            return model(input_ids=ids, labels=ids).loss
        return model(ids, ids.roll(-1, dims=1))[1]   # targets: the next tokens, a tensor of their own


def _storages(tensors) -> dict:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t is not None}


def _quant_state_tensors(model) -> list:
    """bitsandbytes keeps a 4-bit weight's absmax, codebook, offset and nested state on the parameter."""
    out = []
    for p in model.parameters():
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            out += [qs.absmax, qs.code, qs.offset]
            if qs.state2 is not None:
                out += [qs.state2.absmax, qs.state2.code]
    return [t for t in out if torch.is_tensor(t)]


def saved_bytes(model, forward) -> int:
    """Bytes `forward()` saves for backward: each storage once, parameters excluded. The packed
    tensors are held until the end, so a freed storage's address cannot be reused and miscounted,
    and the parameters are read after the forward: bitsandbytes' Linear4bit replaces a bias's
    storage during its first forward (bias.data = bias.data.to(compute dtype))."""
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    params = _storages(model.parameters())
    saved = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in packed}
    return out, sum(n for ptr, n in saved.items() if ptr not in params)


def measure(case: Case) -> dict:
    """What the real stack saves for backward in one forward + loss, and holds after one AdamW step."""
    model = build_hf(case) if case.stack == "hf" else build_minilora(case)
    ids = torch.randint(0, VOCAB, (case.batch, case.seq), generator=torch.Generator().manual_seed(1))
    loss, saved = saved_bytes(model, lambda: _loss(case, model, ids))
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    optimizer.step()
    weights = _storages([*model.parameters(), *model.buffers(), *_quant_state_tensors(model)])
    states = [v for p in trainable for v in optimizer.state[p].values() if torch.is_tensor(v)]
    return {"saved_activation_bytes": saved,
            "states": {"weights": sum(weights.values()), "gradients": sum(_storages(p.grad for p in trainable).values()),
                       "optimizer": sum(_storages(states).values())}}


def training_setup(case: Case):
    """The calculator's TrainingSetup for the case (the CLI's flags, as the Python API takes them)."""
    from calculators import LoRASpec, TrainingSetup

    method = {"full": "full", "lora-qv": "lora", "lora-all": "lora"}.get(case.method, "qlora")
    targets = None if method == "full" else (case.targets if isinstance(case.targets, str) else list(case.targets))
    return TrainingSetup(method=method, batch=case.batch, seq=case.seq, grad_ckpt="full" if case.ckpt else "none",
                         attn=case.attn, dtype="bf16" if case.precision == "bf16" else "fp32",
                         autocast="bf16" if case.precision == "fp32+autocast" else "none",
                         lora=LoRASpec(rank=case.rank, alpha=2 * case.rank, targets=targets, dropout=case.lora_dropout),
                         device="cpu", stack=case.stack, loss="full",   # the grid's models compute the full loss
                         prepare_kbit=(case.method == "qlora-prepare") if method == "qlora" else None,
                         master_weights=False if case.stack == "minilora" else None,
                         autocast_adapter_dtype=None if case.stack == "minilora" or case.adapter_fp32 else False)


def predict(case: Case) -> dict:
    from calculators import model_spec, model_state_bytes
    from calculators.activations import ActivationSetup, activation_bytes

    spec = model_spec(hf_config(case).to_dict())
    setup = training_setup(case)
    states = model_state_bytes(spec, setup)
    return {"saved_activation_bytes": activation_bytes(spec, ActivationSetup.of(spec, setup))["total"],
            "states": {"weights": states.weights, "gradients": states.gradients,
                       "optimizer": states.optimizer + states.master}}


def grid(stack: str):
    """Every case of the grid for one stack (bench/stack_grid.py runs them all)."""
    for family in FAMILIES:
        for method in METHODS:
            for precision in PRECISIONS:
                if method.startswith("qlora") and precision == "fp32+autocast":
                    continue   # QLoRA computes in its compute dtype; the grid keeps to bf16 / fp32
                for ckpt in (False, True):
                    for attn in ("sdpa", "eager"):
                        for dropout in (False, True):
                            for batch, seq, width in SHAPES:
                                yield as_accepted(Case(stack, family, method, ckpt, attn, precision, dropout,
                                                       batch, seq, width))


def as_accepted(case: Case) -> Case:
    """The case as the libraries accept it: Qwen2-MoE's all-linear reaches shared_expert_gate (h -> 1),
    where the calculator and minilora allow rank 1 only; LoRA on Mixtral's and Qwen3-MoE's router and
    experts (peft's ParamWrapper, minilora's expert LoRA) takes no dropout."""
    all_linear = case.method != "full" and case.targets == "all-linear"
    if all_linear and case.family == "qwen2_moe":
        case = replace(case, rank=1)
    if all_linear and case.family in ("mixtral", "qwen3_moe"):
        case = replace(case, lora_dropout=0.0)
    return case


def with_shape(case: Case, shape) -> Case:
    batch, seq, width = shape
    return replace(case, batch=batch, seq=seq, width=width)
