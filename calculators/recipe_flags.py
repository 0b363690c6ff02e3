"""The command-line flags that say how a training run trains: which stack and precision recipe
(training_setup.py says what each is and which combinations the libraries refuse), where its
loss and checkpoints are held and whether its MLPs run over tiles (long_context.py), and the
TrainingSetup fields they set (calculators/cli.py adds them to every command)."""
from __future__ import annotations

from .long_context import LOSSES
from .training_setup import AUTOCAST, STACKS

__all__ = ["RECIPE_CHOICES", "RECIPE_FLAGS", "add_recipe_flags", "recipe_fields"]

# flags whose values come from a fixed set (cli.CHOICES checks them in one place)
RECIPE_CHOICES = {"loss": LOSSES, "stack": STACKS, "autocast": AUTOCAST, "prepare_kbit": ("auto", "yes", "no"),
                  "autocast_adapter_dtype": ("auto", "yes", "no"), "device": ("cuda", "cpu")}
RECIPE_FLAGS = ("loss", "loss_chunk", "offload_activations", "mlp_tile", "stack", "autocast", "prepare_kbit",
                "autocast_adapter_dtype", "model_dropout", "device")
_YES_NO = {"auto": None, "yes": True, "no": False}


def add_recipe_flags(p) -> None:
    p.add_argument("--loss", default="full", help="full: the (B, T, V) logits | chunked: head and loss per chunk")
    p.add_argument("--loss-chunk", type=int, default=None, help="tokens per chunk of --loss chunked")
    p.add_argument("--offload-activations", action="store_true",
                   help="with --grad-ckpt full: checkpointed block inputs wait in pinned host memory")
    p.add_argument("--mlp-tile", type=int, default=0,
                   help="tokens per tile of every block's MLP, recomputed one tile at a time in backward (0: off)")
    p.add_argument("--stack", default="hf", help="hf (transformers + peft + bitsandbytes as shipped) | "
                   "minilora (reference_models + minilora)")
    p.add_argument("--autocast", default="none", help="none | bf16 | fp16: torch.autocast, as Trainer(bf16=True)")
    p.add_argument("--prepare-kbit", default="auto",
                   help="QLoRA: prepare_model_for_kbit_training, auto (yes) | yes | no")
    p.add_argument("--autocast-adapter-dtype", default="auto",
                   help="hf LoRA: peft's fp32 adapters on a 16-bit base, auto (yes) | yes | no")
    p.add_argument("--model-dropout", default="config",
                   help="config (config.json's attention / residual / embedding dropouts) | one probability for all")
    p.add_argument("--device", default="cuda", help="cuda | cpu (dropout masks, kernels and autocast differ)")


def recipe_fields(args) -> dict:
    """The TrainingSetup fields the recipe flags set (their values already checked against RECIPE_CHOICES)."""
    return dict(loss=args.loss, loss_chunk=args.loss_chunk, offload_activations=args.offload_activations,
                mlp_tile=args.mlp_tile, stack=args.stack, autocast=args.autocast,
                prepare_kbit=_YES_NO[args.prepare_kbit],
                autocast_adapter_dtype=_YES_NO[args.autocast_adapter_dtype],
                model_dropout=_model_dropout(args.model_dropout), device=args.device)


def _model_dropout(text: str) -> float | None:
    """--model-dropout: "config" (None: config.json's dropouts) or one probability for all of them."""
    if text == "config":
        return None
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not 0 <= value < 1:
        raise ValueError(f"--model-dropout must be config or a probability in [0, 1), got {text!r}")
    return value
