"""What a training run is (TrainingSetup), the recipes it allows, and the dtype of each tensor group.

Two software stacks are modelled (`stack`): "hf", transformers + peft + bitsandbytes with their
defaults (the versions in STACK_VERSIONS, what pyproject's interop extra installs and the tests
check against), and "minilora", reference_models with minilora's LoRA, QLoRA and training loop.
A precision recipe is named the way people write it:
  - a model loaded in bf16 / fp16 (`dtype`) and trained with plain torch AdamW: weights, gradients
    and AdamW's m and v all in that dtype, no fp32 copy (hf; minilora keeps an fp32 master copy for
    full fine-tuning unless master_weights=False);
  - a model loaded in fp32 and trained under autocast (`autocast="bf16"`, what Trainer(bf16=True)
    does): fp32 weights, gradients and states, 16-bit matmuls;
  - QLoRA: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=dtype), from_pretrained(dtype=dtype),
    then prepare_model_for_kbit_training (`prepare_kbit`, on by default: peft's QLoRA recipe and the
    README's), which makes every weight that is not 4-bit fp32 (hf) or the norms fp32 (minilora);
  - peft's get_peft_model(..., autocast_adapter_dtype=True), its default: fp32 adapters on a 16-bit base.
Precision is the one place that turns a recipe into bytes per element of each tensor group
(weights by kind, adapters, gradients, master copy, optimizer states, activations, logits). Every
memory term and the activation replay read it; none re-derives a dtype from the setup.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .long_context import check_long_context
from .lora import LoRASpec

__all__ = ["TrainingSetup", "Precision", "check_setup", "DTYPE_BYTES", "METHODS", "OPTIMIZERS",
           "CHECKPOINTING", "ATTENTION", "STACKS", "AUTOCAST", "STACK_VERSIONS", "dtype_name", "describe_recipe"]

DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd", "sgd-momentum", "offload", "offload8bit")
CHECKPOINTING = ("none", "full", "selective")
ATTENTION = ("sdpa", "flash", "eager")
STACKS = ("hf", "minilora")
AUTOCAST = ("none", "bf16", "fp16")
# The library versions the "hf" stack follows, op for op (tests/test_calc_stack_hf.py checks the
# installed ones against this; a new version is re-measured before it is listed here).
STACK_VERSIONS = {"transformers": "5.24", "peft": "0.21", "bitsandbytes": "0.50"}


def dtype_name(dtype: str) -> str:
    """fp32 | bf16 | fp16, from any spelling DTYPE_BYTES accepts."""
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)


@dataclass(frozen=True)
class TrainingSetup:
    method: str = "lora"          # full | lora | qlora
    batch: int = 1                # micro-batch per GPU
    seq: int = 512
    grad_accum: int = 1
    grad_ckpt: str = "none"       # none | full | selective (minilora only)
    attn: str = "sdpa"            # sdpa (= flash) | eager
    dtype: str = "bf16"           # the dtype the model is loaded in (QLoRA: also the 4-bit layers' compute dtype)
    master_weights: bool | None = None  # minilora: fp32 copy of trainable 16-bit weights; None: yes for full FT
    optimizer: str = "adamw"
    lora: LoRASpec = field(default_factory=LoRASpec)
    double_quant: bool = True     # QLoRA: quantize the absmax constants too (bitsandbytes' compress_statistics)
    block_size: int = 64          # NF4 block
    gpus: int = 1
    zero: str = "none"            # none | ddp | zero1 | zero2 | zero3 | fsdp-full | fsdp-grad-op
    device: str = "cuda"          # cuda | cpu (dropout masks, norm statistics, SDPA kernels and autocast differ)
    offload_page_size: int = 2 ** 20
    offload_gpu_pages: int = 2
    stack: str = "hf"             # hf: transformers + peft + bitsandbytes | minilora
    autocast: str = "none"        # none | bf16 | fp16: torch.autocast around forward and loss (Trainer(bf16=True))
    prepare_kbit: bool | None = None    # QLoRA: prepare_model_for_kbit_training; None: yes
    autocast_adapter_dtype: bool | None = None  # hf LoRA: peft's flag; None: its default, yes
    model_dropout: float | None = None  # every dropout of config.json set to this; None: the config's own
    expert_imbalance: float = 1.0  # MoE: the busiest expert gets this many times the balanced N * k / E tokens
    loss: str = "full"            # full | chunked: head and loss over chunks of tokens (long_context.py)
    loss_chunk: int | None = None  # tokens per chunk of the chunked loss; None: DEFAULT_LOSS_CHUNK
    offload_activations: bool = False  # full checkpointing's block inputs wait on the host (long_context.py)
    mlp_tile: int = 0             # tokens per tile of every block's MLP (long_context.py); 0: the whole sequence


def check_setup(setup: TrainingSetup) -> None:
    """Raise ValueError naming the first setting that is out of range and what is allowed, or the
    recipe the libraries do not run, in one line naming the settings (and their CLI flags)."""
    for name in ("batch", "seq", "grad_accum", "gpus"):
        value = getattr(setup, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    imbalance = setup.expert_imbalance
    if isinstance(imbalance, bool) or not isinstance(imbalance, (int, float)) or not imbalance >= 1:
        raise ValueError(f"expert_imbalance must be a number >= 1 (1: balanced routing), got {imbalance!r}")
    choices = dict(method=METHODS, grad_ckpt=CHECKPOINTING, attn=ATTENTION, dtype=tuple(DTYPE_BYTES),
                   optimizer=OPTIMIZERS, device=("cuda", "cpu"), stack=STACKS, autocast=AUTOCAST)
    for name, allowed in choices.items():
        if getattr(setup, name) not in allowed:
            raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {getattr(setup, name)!r}")
    dropout = setup.model_dropout
    if dropout is not None and (isinstance(dropout, bool) or not isinstance(dropout, (int, float))
                                or not 0 <= dropout < 1):
        raise ValueError(f"model_dropout must be a number in [0, 1) or None (config.json's), got {dropout!r}")
    check_long_context(setup)
    message = _refused_recipe(setup)
    if message:
        raise ValueError(message)


def _refused_recipe(s: TrainingSetup) -> str | None:
    """Why the libraries do not run this combination, or None."""
    hf, d = s.stack == "hf", dtype_name(s.dtype)
    if s.prepare_kbit and s.method != "qlora":
        return (f"prepare_kbit=True (--prepare-kbit yes) is prepare_model_for_kbit_training, for 4-bit models: "
                f"it needs method='qlora' (--method qlora), got {s.method!r}")
    if s.autocast_adapter_dtype is not None and s.method == "full":
        return ("autocast_adapter_dtype (--autocast-adapter-dtype) is about LoRA adapters: it needs --method lora "
                "or qlora")
    if s.autocast_adapter_dtype is not None and not hf:
        return ("autocast_adapter_dtype (--autocast-adapter-dtype) is peft's option (--stack hf); minilora keeps "
                "adapters in the base dtype")
    if hf and s.master_weights:
        return ("master_weights=True (--master-weights yes) with --stack hf: torch AdamW keeps no fp32 copy; fp32 "
                "weights with 16-bit compute is --dtype fp32 --autocast bf16 (Trainer(bf16=True))")
    if hf and s.grad_ckpt == "selective":
        return ("grad_ckpt='selective' (--grad-ckpt selective) with --stack hf: transformers checkpoints whole "
                "decoder layers (gradient_checkpointing_enable); use --grad-ckpt full")
    if hf and d == "fp16" and s.autocast == "fp16":
        return ("--dtype fp16 --autocast fp16: Trainer(fp16=True) refuses fp16 weights (its GradScaler cannot "
                "unscale fp16 gradients); load in fp32 (--dtype fp32 --autocast fp16) or train in bf16")
    if not hf and s.autocast == "fp16":
        return "--stack minilora --autocast fp16: minilora.train autocasts to bf16 only (--precision bf16)"
    if hf and (s.loss == "chunked" or s.offload_activations):
        flag = "--loss chunked" if s.loss == "chunked" else "--offload-activations"
        return (f"{flag} is minilora.train's (reference_models/loss.py, ActivationOffload): add --stack minilora; "
                "transformers + peft has no chunked loss, and its activation_checkpointing_enable(offload=True) is "
                "not modelled")
    if hf and s.mlp_tile:
        return ("--mlp-tile is minilora.train's (reference_models/tiled_mlp.py): add --stack minilora; transformers "
                "has no tiled MLP (Arctic's and Unsloth's replace its MLP modules' forward: not modelled)")
    if hf and s.attn == "flash" and (s.device == "cpu" or (d == "fp32" and s.autocast == "none")):
        return (f"--attn flash (attn_implementation='flash_attention_2') runs on CUDA in 16-bit only, got "
                f"--device {s.device} --dtype {d} --autocast {s.autocast}")
    return None


@dataclass(frozen=True)
class Precision:
    """The dtype of each tensor group of one training run, as transformers / torch name dtypes'
    short forms (fp32, bf16, fp16), and the bytes per trainable element of gradients and states."""
    name: str                     # the recipe's dtype in words, quoted in the assumptions
    linear: str                   # dense linear weights (frozen, or trained in full fine-tuning)
    embedding: str                # embeddings and an untied lm_head
    norm: str                     # norm weights and biases
    adapter: str                  # LoRA A and B
    compute: str                  # what 4-bit layers compute in (bnb_4bit_compute_dtype / compute_dtype)
    autocast: str | None          # torch.autocast's dtype, None without autocast
    gradients: int                # bytes of one gradient element (a trainable tensor's own dtype)
    master: int                   # fp32 master copy per trainable element; 0: none
    optimizer_states: int         # each moment (AdamW's m and v, SGD's momentum) per trainable element

    @property
    def weights(self) -> int:
        return DTYPE_BYTES[self.linear]

    @property
    def adapters(self) -> int:
        return DTYPE_BYTES[self.adapter]

    @property
    def activations(self) -> int:
        """The block's intermediates: the autocast dtype, else the residual stream's."""
        return DTYPE_BYTES[self.autocast or self.embedding]

    @property
    def logits(self) -> int:
        """lm_head's output: the autocast dtype, else the head's weight dtype."""
        return DTYPE_BYTES[self.autocast or self.embedding]

    @classmethod
    def uniform(cls, dtype: str) -> "Precision":
        """Every tensor in `dtype`, no autocast, no master copy."""
        d = dtype_name(dtype)
        return cls(name=d, linear=d, embedding=d, norm=d, adapter=d, compute=d, autocast=None,
                   gradients=DTYPE_BYTES[d], master=0, optimizer_states=DTYPE_BYTES[d])

    @classmethod
    def of(cls, setup: TrainingSetup) -> "Precision":
        """The recipe of `setup` (see the module docstring)."""
        d, hf = dtype_name(setup.dtype), setup.stack == "hf"
        autocast = None if setup.autocast == "none" else setup.autocast
        prepare = setup.method == "qlora" and setup.prepare_kbit is not False
        embedding = "fp32" if hf and prepare else d          # peft: every weight that is not 4-bit
        norm = "fp32" if prepare else d                      # minilora: the norms only
        adapter = d
        if hf and setup.method != "full" and setup.autocast_adapter_dtype is not False:
            adapter = "fp32"                                 # peft upcasts fp16 / bf16 adapters
        trainable = DTYPE_BYTES[d if setup.method == "full" else adapter]
        master = False if hf else setup.master_weights
        master = (setup.method == "full" if master is None else master) and trainable != 4
        name = d + (f" weights, {autocast} autocast" if autocast else "")
        return cls(name=name, linear=d, embedding=embedding, norm=norm, adapter=adapter, compute=d, autocast=autocast,
                   gradients=trainable, master=4 if master else 0, optimizer_states=4 if master else trainable)


def describe_recipe(setup: TrainingSetup) -> str:
    """The code the setup stands for, in the words people write it (printed with every answer)."""
    s, p = setup, Precision.of(setup)
    torch_dtype = {"fp32": "torch.float32", "bf16": "torch.bfloat16", "fp16": "torch.float16"}[p.linear]
    targets = s.lora.targets if s.lora.targets is not None else "peft's default"
    lora = f"r={s.lora.rank}, alpha={s.lora.alpha:g}, targets {targets}, dropout {s.lora.dropout:g}"
    prepare = s.method == "qlora" and s.prepare_kbit is not False
    ckpt = s.grad_ckpt != "none"
    autocast = f"; forward and loss under torch.autocast({p.autocast})" if p.autocast else ""
    optimizer = {"adamw": "torch AdamW", "adamw8bit": "bitsandbytes AdamW8bit", "sgd": "SGD", "sgd-momentum":
                 "SGD with momentum", "offload": "CPUOffloadAdamW", "offload8bit": "CPUOffloadAdamW(state_bits=8)"}
    step = optimizer[s.optimizer] + (" with an fp32 master copy" if p.master else "")
    if s.stack == "hf":
        load = f"AutoModelForCausalLM.from_pretrained(dtype={torch_dtype}"
        if s.method == "qlora":
            load += (f", quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type='nf4', "
                     f"bnb_4bit_use_double_quant={s.double_quant}, bnb_4bit_compute_dtype={torch_dtype})")
        attn = {"flash": "flash_attention_2"}.get(s.attn, s.attn)
        steps = [load + f", attn_implementation='{attn}')"]
        if prepare:
            steps.append(f"prepare_model_for_kbit_training(model, use_gradient_checkpointing={ckpt})")
        elif ckpt:
            steps.append("model.gradient_checkpointing_enable()")
        if s.method != "full":
            steps.append(f"get_peft_model(model, LoraConfig({lora}), autocast_adapter_dtype="
                         f"{s.autocast_adapter_dtype is not False})")
        return "; ".join(steps) + f"; loss from labels=; {step}{autocast}"
    steps = [f"reference_models in {p.linear}"]
    if s.method == "qlora":
        steps.append(f"quantize_model(model, compute_dtype={torch_dtype}, double_quant={s.double_quant})")
        if prepare:
            steps.append(f"prepare_for_kbit_training(model, use_gradient_checkpointing={ckpt})")
    if s.method != "full":
        steps.append(f"inject(model, LoRAConfig({lora}))")
    if ckpt:
        steps.append("model.set_gradient_checkpointing(True)")
    if s.mlp_tile:
        steps.append(f"model.set_mlp_tiling({s.mlp_tile})")
    return "; ".join(steps) + f"; loss from model(idx, targets); {step}{autocast}"
