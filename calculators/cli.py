"""`python -m minilora.calc {params,vram,fit,cost,serve}`: the calculators on the command line.

The answer comes first, then how it was reached, then every setting with its value (defaults
included); --json prints one JSON object instead, and `serve` answers the same queries on a local
page. Every flag is declared once, in `build_parser`: --help's defaults, the printed settings and
the page's form all come from there, so a new flag shows up in all three (a flag with a fixed set
of values lists it in CHOICES; one whose default is None says in UNSET what unset means). Bad
input exits with status 2 and one line on stderr (the page shows the same line).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from dataclasses import replace

from . import report
from .cost import training_cost
from .distributed import parse_strategy
from .fit import context_limit, largest_fitting, methods_that_fit
from .gpus import GPUS, gpu_from_text
from .long_context import DEFAULT_LOSS_CHUNK
from .lora import DEFAULT_TARGETS, LoRASpec, lora_layers, lora_trainable_parameters, parse_targets
from .memory import CHECKPOINTING, DTYPE_BYTES, METHODS, OPTIMIZERS, TrainingSetup, inference_memory, training_memory
from .models import PRESETS, count_parameters, model_spec
from .moe import active_parameters
from .recipe_flags import RECIPE_CHOICES, RECIPE_FLAGS, add_recipe_flags, recipe_fields
from .training_setup import ATTENTION

__all__ = ["main", "build_parser", "parse", "run", "answer", "build_setup", "CalcError", "form_fields", "CHOICES",
           "UNSET"]

PROG = "python -m minilora.calc"

# flags whose values come from a fixed set: checked in one place (_check_choices), a menu on the page
CHOICES = {"method": METHODS, "grad_ckpt": CHECKPOINTING, "attn": ATTENTION, "dtype": tuple(DTYPE_BYTES),
           "optimizer": OPTIMIZERS, "master_weights": ("auto", "yes", "no"),
           "search": ("methods", "batch", "seq", "rank"), **RECIPE_CHOICES}
# free-text flags with well-known values: suggested on the page (a datalist), never enforced
SUGGESTIONS = {"model": tuple(PRESETS), "gpu": tuple(GPUS), "targets": ("q_proj,v_proj", "all-linear"),
               "zero": ("none", "0", "1", "2", "3", "full-shard", "grad-op")}
# what a flag left unset means, in --help and in the printed settings
UNSET = {"targets": "peft's default for the family", "gpu": "none: the answer names the GPUs it fits on",
         "price": "the GPU preset's price", "plot": "none: no picture",
         "loss_chunk": f"{DEFAULT_LOSS_CHUNK} with --loss chunked"}
OUTPUT = ("json", "explain", "plot")            # how to answer, not what: never a setting
_TRAINING_ONLY = ("gpus", "zero", "optimizer", "grad_ckpt", "grad_accum", "master_weights", "expert_imbalance",
                  *RECIPE_FLAGS)
_INFERENCE_ONLY = ("new_tokens",)


class CalcError(ValueError):
    """Bad input, as the one line the CLI prints on stderr and the page shows."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        self.flags = []      # every action, in declaration order (argparse keeps its list private)
        self.commands = {}   # subcommand -> its parser
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs):
        action = super().add_argument(*args, **kwargs)
        self.flags.append(action)
        return action

    def error(self, message):  # one line, exit 2 (argparse would print the usage too)
        raise CalcError(f"{self.prog}: error: {message}")


class _Help(argparse.HelpFormatter):
    """Every flag's help ends with its default (or what leaving it unset means)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is argparse.SUPPRESS or action.nargs == 0 or "default" in text:
            return text
        if action.default is None:  # what unset means, or (a required flag) nothing to add
            return f"{text} (default: {UNSET[action.dest]})" if action.dest in UNSET else text
        return f"{text} (default: %(default)s)"


def _finite(text, kind=float):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def _positive(kind=int):
    def parse(text):
        value = _finite(text, kind)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return value
    return parse


def _port(text):
    value = _finite(text, int)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in 0..65535, got {text!r}")
    return value


def _one_of(dest):
    return " | ".join(CHOICES[dest])


def _common(p):
    p.add_argument("--model", default=None,
                   help=f"required: a preset ({', '.join(PRESETS)}), a config.json or a folder holding one")
    p.add_argument("--method", default="lora", help=_one_of("method"))
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=_finite, default=16.0, help="LoRA alpha (scaling = alpha / rank)")
    p.add_argument("--targets", default=None, help="q_proj,v_proj | all-linear | a regex")
    p.add_argument("--dropout", type=_finite, default=0.0, help="LoRA dropout")
    p.add_argument("--batch", type=_positive(), default=1, help="micro-batch per GPU")
    p.add_argument("--seq", type=_positive(), default=512, help="sequence length")
    p.add_argument("--grad-accum", type=_positive(), default=1, help="micro-batches per optimizer step")
    p.add_argument("--grad-ckpt", default="none", help=_one_of("grad_ckpt"))
    p.add_argument("--attn", default="sdpa", help="sdpa (flash) | eager")
    p.add_argument("--dtype", default="bf16", help="fp32 | bf16 | fp16")
    p.add_argument("--optimizer", default="adamw", help=_one_of("optimizer"))
    p.add_argument("--master-weights", default="auto", help="auto (fp32 master for full FT) | yes | no")
    p.add_argument("--no-double-quant", action="store_true", help="QLoRA without double quantization")
    p.add_argument("--gpus", type=_positive(), default=1, help="data-parallel GPUs")
    p.add_argument("--zero", default="none", help="none | 0 (ddp) | 1 | 2 | 3 | full-shard | grad-op")
    p.add_argument("--gpu", default=None, help=f"a size (24GB) or {', '.join(GPUS)}")
    p.add_argument("--expert-imbalance", type=_finite, default=1.0,
                   help="mixture of experts: the busiest expert gets this many times the balanced tokens")
    add_recipe_flags(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def build_parser() -> _Parser:
    parser = _Parser(prog=PROG, description="Parameter counts, GPU memory, what fits, and what a run costs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name, text):
        parser.commands[name] = sub.add_parser(name, help=text, description=text, formatter_class=_Help)
        return parser.commands[name]

    _common(command("params", "total parameters and LoRA trainable count"))
    v = command("vram", "memory breakdown for training or inference, the answer first")
    _common(v)
    v.add_argument("--inference", action="store_true", help="generation with a KV cache instead of training")
    v.add_argument("--new-tokens", type=int, default=256, help="inference: tokens generated after the --seq prompt")
    v.add_argument("--explain", action="store_true", help="print each term's formula with the numbers put in")
    v.add_argument("--plot", default=None, metavar="FILE", help="also draw the terms as a stacked bar "
                   "into FILE.png or FILE.svg (needs matplotlib: pip install 'minilora[plot]')")
    f = command("fit", "largest batch / seq / rank that fits, or which methods fit")
    _common(f)
    f.add_argument("--search", default="methods", help=_one_of("search"))
    f.set_defaults(gpu="24GB")
    c = command("cost", "time and money for a run")
    _common(c)
    c.add_argument("--tokens", type=_positive(), default=10_000_000, help="tokens per epoch")
    c.add_argument("--epochs", type=_positive(float), default=1.0, help="passes over the tokens")
    c.add_argument("--mfu", type=_positive(float), default=0.4, help="model FLOPs utilisation")
    c.add_argument("--price", type=_finite, default=None, help="USD per GPU-hour")
    c.set_defaults(gpu="24GB")
    s = command("serve", "a local page with the vram calculator and its stacked bar")
    s.add_argument("--port", type=_port, default=8000, help="TCP port (0: any free port)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    return parser


def parse(argv, parser=None) -> argparse.Namespace:
    """argv -> the namespace. A value that starts with '-' but is no plain number (`--gpu -5GB`)
    would read to argparse as an option ("expected one argument"); joined to its flag it reaches
    the flag's own check instead."""
    parser = parser or build_parser()
    takes_value = {o for p in parser.commands.values() for a in p.flags if a.nargs != 0 for o in a.option_strings}
    argv = list(sys.argv[1:] if argv is None else argv)
    joined = []
    for arg in argv:
        if joined and joined[-1] in takes_value and re.match(r"-[\d.]", arg):
            joined[-1] = f"{joined[-1]}={arg}"
        else:
            joined.append(arg)
    return parser.parse_args(joined)


def _check_choices(args):
    for dest, allowed in CHOICES.items():
        value = getattr(args, dest, allowed[0])
        if value not in allowed:
            raise ValueError(f"--{dest.replace('_', '-')} must be one of {', '.join(allowed)}, got {value!r}")
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    parse_strategy(args.zero, args.gpus)


def build_setup(args, spec) -> TrainingSetup:
    """The TrainingSetup a parsed command line stands for (each training flag is a field)."""
    master = {"auto": None, "yes": True, "no": False}[args.master_weights]
    targets = parse_targets(args.targets)
    lora = LoRASpec(rank=args.rank, alpha=args.alpha, targets=targets, dropout=args.dropout)
    if args.method != "full":
        lora_trainable_parameters(spec, args.rank, targets)  # validates rank and targets
    if args.expert_imbalance != 1.0 and not spec.num_experts:
        raise ValueError(f"--expert-imbalance applies to mixture-of-experts models; {spec.name} ({spec.family}) "
                         "has no experts")
    return TrainingSetup(method=args.method, batch=args.batch, seq=args.seq, grad_accum=args.grad_accum,
                         grad_ckpt=args.grad_ckpt, attn=args.attn, dtype=args.dtype, master_weights=master,
                         optimizer=args.optimizer, lora=lora, double_quant=not args.no_double_quant,
                         gpus=args.gpus, zero=args.zero, expert_imbalance=args.expert_imbalance,
                         **recipe_fields(args))


def _check_mode_flags(args):
    """`vram --inference` refuses training-only flags, and training refuses inference-only ones,
    rather than print them unused."""
    defaults = vars(build_parser().commands["vram"].parse_args([]))
    inference = args.inference
    changed = [k for k in (_TRAINING_ONLY if inference else _INFERENCE_ONLY) if getattr(args, k) != defaults[k]]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        where = ("training only, not to --inference (generation on one GPU)" if inference else
                 "--inference only")
        one = len(changed) == 1
        raise ValueError(f"{flags} {'applies' if one else 'apply'} to {where}: drop {'it' if one else 'them'}")


def _settings(args, spec, gpu) -> dict:
    """Every setting of the command with its value, defaults included, in declaration order;
    an unset one says what it means (the GPU preset's price, peft's default targets)."""
    skip = {"command", *OUTPUT, getattr(args, "search", None)}  # a searched value is the answer
    if not spec.num_experts:
        skip.add("expert_imbalance")
    if args.command == "vram":
        skip.update(_TRAINING_ONLY if args.inference else _INFERENCE_ONLY)
    resolved = {"model": f"{args.model} ({spec.family}, {spec.num_layers} layers, hidden {spec.hidden_size}, "
                         f"vocab {spec.vocab_size})",
                "targets": args.targets or ",".join(DEFAULT_TARGETS[spec.family]) + " (peft default)",
                "gpu": args.gpu if gpu else UNSET["gpu"]}
    if args.command == "cost" and args.price is None:
        resolved["price"] = f"{gpu.price_per_hour} ({gpu.name}'s preset price)"
    return {dest.replace("_", "-"): resolved.get(dest, value) for dest, value in vars(args).items()
            if dest not in skip}


def run(args) -> dict:
    """The answer to a parsed command line: what --json prints and the page's /api returns."""
    _check_choices(args)  # the flags' own values first, then the model they apply to
    gpu = _gpu(args.gpu)
    if args.model is None:
        raise ValueError(f"--model is required: a preset ({', '.join(PRESETS)}), a config.json or a folder "
                         "holding one")
    spec = model_spec(args.model)
    setup = build_setup(args, spec)
    out = {"settings": _settings(args, spec, gpu)}
    out.update({"params": _params, "vram": _vram, "fit": _fit, "cost": _cost}[args.command](args, spec, setup, gpu))
    out["answer"] = report.answer_line(args.command, out)
    return out


def _gpu(text):
    try:
        return gpu_from_text(text) if text is not None else None
    except ValueError as exc:
        raise ValueError(f"--gpu: {exc}") from None


def _params(args, spec, setup, gpu) -> dict:
    total = count_parameters(spec)
    out = {"params": total}
    if spec.num_experts:
        out["active_params"] = active_parameters(spec)
    if args.method != "full":
        trainable = lora_trainable_parameters(spec, args.rank, setup.lora.targets)
        out.update(lora_trainable=trainable, lora_percent=100.0 * trainable / (total + trainable),
                   lora_layers=len(lora_layers(spec, setup.lora.targets)))
    return out


def _vram(args, spec, setup, gpu) -> dict:
    _check_mode_flags(args)
    if args.inference:
        b = inference_memory(spec, batch=args.batch, prompt=args.seq, new_tokens=args.new_tokens,
                             dtype=args.dtype, quant="nf4" if args.method == "qlora" else "none",
                             attn=args.attn, double_quant=not args.no_double_quant)
    else:
        b = training_memory(spec, setup)
    out = b.as_dict()
    out["gpu"] = {"name": gpu.name, "memory": gpu.memory, "fits": b.total_gpu <= gpu.memory} if gpu else None
    out["fits_on"] = [{"name": g.name, "memory": g.memory} for g in sorted(GPUS.values(), key=lambda g: g.memory)
                      if b.total_gpu <= g.memory]
    out["bar"] = report.bar_segments(out)
    out["peak_explained"] = report.peak_explained(out)
    return out


def _fit(args, spec, setup, gpu) -> dict:
    out = {"gpu": {"name": gpu.name, "memory": gpu.memory}}
    if args.search == "methods":
        out["methods"] = methods_that_fit(spec, setup, gpu.memory)
        return out
    if args.search == "rank" and args.method == "full":
        raise ValueError("--search rank needs --method lora or qlora")
    best = largest_fitting(spec, setup, gpu.memory, args.search)
    out.update(search=args.search, largest=best, **context_limit(spec, setup, gpu.memory, args.search, best))
    if best == 0:
        alt = methods_that_fit(spec, replace(setup, batch=1), gpu.memory)
        out["alternatives"] = [r for r in alt if r["fits"]]
    return out


def _cost(args, spec, setup, gpu) -> dict:
    total = count_parameters(spec)
    trainable = total if args.method == "full" else lora_trainable_parameters(spec, args.rank, setup.lora.targets)
    price = gpu.price_per_hour if args.price is None else args.price
    if price < 0:
        raise ValueError(f"--price must be >= 0, got {price}")
    est = training_cost(active_parameters(spec), trainable, args.tokens, args.epochs, args.method, spec.num_layers, args.seq,
                        spec.hidden_size, args.grad_ckpt, args.gpus, gpu.tflops(args.dtype), args.mfu, price)
    est.assumptions["peak TFLOPS per GPU"] = gpu.tflops(args.dtype)
    if spec.num_experts:  # a token's FLOPs run through the experts it is routed to only
        est.assumptions["N"] = f"{active_parameters(spec):,} parameters active per token (of {total:,})"
    est.assumptions["dtype"] = (f"{args.dtype}: plain FP32 peak (torch's default, TF32 off)"
                                if DTYPE_BYTES[args.dtype] == 4 else f"{args.dtype}: tensor-core peak")
    return {"cost": est.__dict__, "gpu": {"name": gpu.name, "memory": gpu.memory}}


def _one_line(exc: Exception) -> str:
    message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return message if message.startswith(PROG) else f"{PROG}: error: {message}"


def answer(argv) -> dict:
    """Answer a command line given as a list (`["vram", "--model", "gpt2"]`): --json's object,
    or CalcError with the line the CLI would print. The page's /api calls this."""
    try:
        return run(parse(argv))
    except (ValueError, TypeError, OSError, RecursionError) as exc:
        raise CalcError(_one_line(exc)) from None


def form_fields(command: str = "vram") -> list[dict]:
    """The page's form: one field per setting of `command`, from the same declarations as --help."""
    fields = []
    for a in build_parser().commands[command].flags:
        if not a.option_strings or a.dest in ("help", *OUTPUT):
            continue
        kind = "bool" if a.nargs == 0 else "choice" if a.dest in CHOICES else "text"
        fields.append({"name": a.option_strings[0][2:], "kind": kind, "default": a.default, "help": a.help,
                       "unset": UNSET.get(a.dest), "choices": list(CHOICES.get(a.dest, ())),
                       "suggestions": list(SUGGESTIONS.get(a.dest, ()))})
    return fields


def _print(text: str) -> int:
    """Print to stdout; a reader that stopped reading (`| head`) ends the output quietly."""
    try:
        print(text)
        sys.stdout.flush()
    except BrokenPipeError:
        # the interpreter flushes stdout again at exit: point it at /dev/null so that flush is quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parse(argv, parser)
        if args.command == "serve":
            from .serve import serve
            return serve(answer, form_fields(), host=args.host, port=args.port)
        if getattr(args, "plot", None):
            _check_plot(args.plot)
        out = run(args)
        if getattr(args, "plot", None):
            from .plot import save_bar
            save_bar(out, args.plot)
    except (ValueError, TypeError, OSError, RecursionError) as exc:
        print(_one_line(exc), file=sys.stderr)
        return 2
    if args.json:
        return _print(json.dumps(out, indent=2, default=str))
    text = report.render(args.command, out, getattr(args, "explain", False))
    return _print(text + (f"\n\nwrote the stacked bar to {args.plot}" if getattr(args, "plot", None) else ""))


def _check_plot(path: str):
    if not path.lower().endswith((".png", ".svg")):
        raise ValueError(f"--plot must name a .png or .svg file, got {path!r}")
    try:
        import matplotlib.figure  # noqa: F401 (an optional extra: checked before any work is done)
    except ImportError:
        raise ValueError("--plot needs matplotlib, which is not installed: pip install 'minilora[plot]' "
                         "(or pip install matplotlib)") from None
