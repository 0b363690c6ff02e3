"""`python -m minilora.calc {params,vram,fit,cost}`: the calculators on the command line.

Every setting is printed with its value (defaults included) above the answer; --json prints one
JSON object instead. Bad input exits with status 2 and one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import replace

from .cost import training_cost
from .distributed import parse_strategy
from .fit import largest_fitting, methods_that_fit
from .gpus import GPUS, GiB, gpu_from_text
from .lora import DEFAULT_TARGETS, LoRASpec, lora_layers, lora_trainable_parameters, parse_targets
from .memory import CHECKPOINTING, DTYPE_BYTES, METHODS, OPTIMIZERS, TrainingSetup, inference_memory, training_memory
from .models import PRESETS, count_parameters, model_spec
from .moe import active_parameters

__all__ = ["main", "build_parser"]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the usage too)
        raise _Exit(f"{self.prog}: error: {message}")


class _Exit(Exception):
    pass


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


def _common(p):
    p.add_argument("--model", default="llama-2-7b",
                   help=f"preset ({', '.join(PRESETS)}), a config.json or a folder holding one")
    p.add_argument("--method", default="lora", help="full | lora | qlora")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank")
    p.add_argument("--alpha", type=_finite, default=16.0, help="LoRA alpha (scaling = alpha / rank)")
    p.add_argument("--targets", default=None,
                   help="q_proj,v_proj | all-linear | a regex (default: peft's default for the family)")
    p.add_argument("--dropout", type=_finite, default=0.0, help="LoRA dropout")
    p.add_argument("--batch", type=_positive(), default=1, help="micro-batch per GPU")
    p.add_argument("--seq", type=_positive(), default=512, help="sequence length")
    p.add_argument("--grad-accum", type=_positive(), default=1)
    p.add_argument("--grad-ckpt", default="none", help="none | full | selective")
    p.add_argument("--attn", default="sdpa", help="sdpa (flash) | eager")
    p.add_argument("--dtype", default="bf16", help="fp32 | bf16 | fp16")
    p.add_argument("--optimizer", default="adamw", help=" | ".join(OPTIMIZERS))
    p.add_argument("--master-weights", default="auto", help="auto (fp32 master for full FT) | yes | no")
    p.add_argument("--no-double-quant", action="store_true", help="QLoRA without double quantization")
    p.add_argument("--gpus", type=_positive(), default=1)
    p.add_argument("--zero", default="none", help="none | 0 (ddp) | 1 | 2 | 3 | full-shard | grad-op")
    p.add_argument("--gpu", default="24GB", help=f"a size (24GB) or {', '.join(GPUS)}")
    p.add_argument("--expert-imbalance", type=_finite, default=1.0,
                   help="mixture of experts: the busiest expert gets this many times the balanced tokens")
    p.add_argument("--json", action="store_true", help="print JSON")


def build_parser():
    parser = _Parser(prog="python -m minilora.calc",
                     description="Parameter counts, GPU memory, what fits, and what a run costs.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _common(sub.add_parser("params", help="total parameters and LoRA trainable count"))
    v = sub.add_parser("vram", help="memory breakdown for training or inference")
    _common(v)
    v.add_argument("--inference", action="store_true", help="generation with a KV cache instead of training")
    v.add_argument("--new-tokens", type=int, default=256, help="inference: tokens generated after --seq prompt")
    f = sub.add_parser("fit", help="largest batch / seq / rank that fits, or which methods fit")
    _common(f)
    f.add_argument("--search", default="methods", help="methods | batch | seq | rank")
    c = sub.add_parser("cost", help="time and money for a run")
    _common(c)
    c.add_argument("--tokens", type=_positive(), default=10_000_000, help="tokens per epoch")
    c.add_argument("--epochs", type=_positive(float), default=1.0)
    c.add_argument("--mfu", type=_positive(float), default=0.4, help="model FLOPs utilisation")
    c.add_argument("--price", type=_finite, default=None, help="USD per GPU-hour (default: the GPU preset's)")
    return parser


_DEFAULTS = {k: v for k, v in vars(build_parser().parse_args(["vram"])).items()}


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _setup(args, spec):
    _choice("--method", args.method, METHODS)
    _choice("--grad-ckpt", args.grad_ckpt, CHECKPOINTING)
    _choice("--attn", args.attn, ("sdpa", "flash", "eager"))
    _choice("--dtype", args.dtype, tuple(DTYPE_BYTES))
    _choice("--optimizer", args.optimizer, OPTIMIZERS)
    master = {"auto": None, "yes": True, "no": False}.get(args.master_weights, "bad")
    if master == "bad":
        raise ValueError(f"--master-weights must be auto, yes or no, got {args.master_weights!r}")
    if not 0 <= args.dropout < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    targets = parse_targets(args.targets)
    lora = LoRASpec(rank=args.rank, alpha=args.alpha, targets=targets, dropout=args.dropout)
    parse_strategy(args.zero, args.gpus)
    if args.expert_imbalance != 1.0 and not spec.num_experts:
        raise ValueError(f"--expert-imbalance applies to mixture-of-experts models; {spec.name} ({spec.family}) "
                         "has no experts")
    if args.method != "full":
        lora_trainable_parameters(spec, args.rank, targets)  # validates rank and targets
    return TrainingSetup(method=args.method, batch=args.batch, seq=args.seq, grad_accum=args.grad_accum,
                         grad_ckpt=args.grad_ckpt, attn=args.attn, dtype=args.dtype, master_weights=master,
                         optimizer=args.optimizer, lora=lora, double_quant=not args.no_double_quant,
                         gpus=args.gpus, zero=args.zero, expert_imbalance=args.expert_imbalance)


# settings that only training reads: `vram --inference` refuses them rather than print them unused
_TRAINING_ONLY = ("gpus", "zero", "optimizer", "grad_ckpt", "grad_accum", "master_weights", "expert_imbalance")


def _inference(args) -> bool:
    return getattr(args, "inference", False)


def _check_inference_flags(args, parser_defaults):
    changed = [k for k in _TRAINING_ONLY if getattr(args, k) != parser_defaults[k]]
    if changed:
        flags = ", ".join("--" + k.replace("_", "-") for k in changed)
        raise ValueError(f"{flags} apply to training only, not to --inference (generation on one GPU): drop "
                         f"{'it' if len(changed) == 1 else 'them'}")


def _settings(args, spec):
    targets = args.targets or ",".join(DEFAULT_TARGETS[spec.family]) + " (peft default)"
    rows = [("model", f"{args.model} ({spec.family}, {spec.num_layers} layers, hidden {spec.hidden_size}, "
                      f"vocab {spec.vocab_size})")]
    keys = ["method", "rank", "alpha", "dropout", "batch", "seq", "grad_accum", "grad_ckpt", "attn", "dtype",
            "optimizer", "master_weights", "no_double_quant", "gpus", "zero", "gpu"]
    if spec.num_experts:
        keys.append("expert_imbalance")
    rows.append(("targets", targets))
    if _inference(args):
        keys = [k for k in keys if k not in _TRAINING_ONLY]
    rows += [(k.replace("_", "-"), getattr(args, k)) for k in keys]
    for extra in ("inference", "new_tokens", "search", "tokens", "epochs", "mfu", "price"):
        if hasattr(args, extra):
            rows.append((extra.replace("_", "-"), getattr(args, extra)))
    return rows


def _gb(n):
    return f"{n / GiB:,.2f} GiB"


def _table(rows, headers):
    from tabulate import tabulate
    return tabulate(rows, headers=headers, disable_numparse=True)


def run(args) -> dict:
    spec = model_spec(args.model)
    gpu = gpu_from_text(args.gpu)
    setup = _setup(args, spec)
    out = {"settings": {k: v for k, v in _settings(args, spec)}}
    total = count_parameters(spec)
    if args.command == "params":
        out["params"] = total
        if spec.num_experts:
            out["active_params"] = active_parameters(spec)
        if args.method != "full":
            trainable = lora_trainable_parameters(spec, args.rank, setup.lora.targets)
            out["lora_trainable"] = trainable
            out["lora_percent"] = 100.0 * trainable / (total + trainable)
            out["lora_layers"] = len(lora_layers(spec, setup.lora.targets))
        return out
    if args.command == "vram":
        if args.inference:
            _check_inference_flags(args, _DEFAULTS)
            b = inference_memory(spec, batch=args.batch, prompt=args.seq, new_tokens=args.new_tokens,
                                 dtype=args.dtype, quant="nf4" if args.method == "qlora" else "none",
                                 attn=args.attn, double_quant=not args.no_double_quant)
        else:
            b = training_memory(spec, setup)
        out.update(b.as_dict())
        out["gpu"] = {"name": gpu.name, "memory": gpu.memory, "fits": b.total_gpu <= gpu.memory}
        return out
    if args.command == "fit":
        _choice("--search", args.search, ("methods", "batch", "seq", "rank"))
        out["gpu"] = {"name": gpu.name, "memory": gpu.memory}
        if args.search == "methods":
            out["methods"] = methods_that_fit(spec, setup, gpu.memory)
        else:
            if args.search == "rank" and args.method == "full":
                raise ValueError("--search rank needs --method lora or qlora")
            best = largest_fitting(spec, setup, gpu.memory, args.search)
            out["search"] = args.search
            out["largest"] = best
            if best == 0:
                alt = methods_that_fit(spec, replace(setup, batch=1), gpu.memory)
                out["alternatives"] = [r for r in alt if r["fits"]]
        return out
    # cost
    trainable = total if args.method == "full" else lora_trainable_parameters(spec, args.rank, setup.lora.targets)
    price = gpu.price_per_hour if args.price is None else args.price
    if price < 0:
        raise ValueError(f"--price must be >= 0, got {price}")
    est = training_cost(active_parameters(spec), trainable, args.tokens, args.epochs, args.method, spec.num_layers, args.seq,
                        spec.hidden_size, args.grad_ckpt, args.gpus, gpu.tflops(args.dtype), args.mfu, price)
    est.assumptions["peak TFLOPS per GPU"] = gpu.tflops(args.dtype)
    if spec.num_experts:
        est.assumptions["N"] = f"{active_parameters(spec):,} parameters active per token (of {total:,})"
    est.assumptions["dtype"] = (f"{args.dtype}: plain FP32 peak (torch's default, TF32 off)"
                                if DTYPE_BYTES[args.dtype] == 4 else f"{args.dtype}: tensor-core peak")
    out["cost"] = est.__dict__
    return out


def render(args, out) -> str:
    lines = [_table(_settings_rows(out), ["setting", "value"]), ""]
    if args.command == "params":
        rows = [("total parameters", f"{out['params']:,}")]
        if "active_params" in out:
            rows.append(("active per token", f"{out['active_params']:,}"))
        if "lora_trainable" in out:
            rows += [("LoRA trainable", f"{out['lora_trainable']:,}"),
                     ("trainable %", f"{out['lora_percent']:.4f}"), ("adapted layers", out["lora_layers"])]
        lines.append(_table(rows, ["", "count"]))
    elif args.command == "vram":
        rows = [(t["name"], _gb(t["gpu"]), _gb(t["cpu"]) if t["cpu"] else "", t["assumption"]) for t in out["terms"]]
        lines.append(_table(rows, ["term", "GPU", "CPU", "assumption"]))
        lines.append("")
        verdict = "fits" if out["gpu"]["fits"] else "does not fit"
        lines.append(f"peak allocated {_gb(out['peak_bytes'])}; with CUDA context {_gb(out['total_gpu_bytes'])}"
                     + (f"; host {_gb(out['cpu_bytes'])}" if out["cpu_bytes"] else "")
                     + f" -> {verdict} on {out['gpu']['name']} ({_gb(out['gpu']['memory'])})")
        lines += out.get("notes", [])
    elif args.command == "fit":
        if "methods" in out:
            rows = [(r["method"], r["grad_ckpt"], _gb(r["total_gpu"]), "fits" if r["fits"] else "does not fit")
                    for r in out["methods"]]
            lines.append(_table(rows, ["method", "grad-ckpt", "GPU total", f"on {out['gpu']['name']}"]))
        elif out["largest"]:
            lines.append(f"largest {out['search']} that fits on {out['gpu']['name']}: {out['largest']}")
        else:
            alt = ", ".join(f"{r['method']} (grad-ckpt {r['grad_ckpt']}, {_gb(r['total_gpu'])})"
                            for r in out.get("alternatives", [])) or "nothing at batch 1: more GPUs (--gpus/--zero) or a larger GPU"
            lines.append(f"does not fit on {out['gpu']['name']} even at {out['search']} 1; what would: {alt}")
    else:
        c = out["cost"]
        rows = [("FLOPs per token", f"{c['flops_per_token']:.3e}"), ("total FLOPs", f"{c['total_flops']:.3e}"),
                ("wall-clock hours", f"{c['hours']:,.2f}"), ("GPU-hours", f"{c['gpu_hours']:,.2f}"),
                ("cost (USD)", f"{c['dollars']:,.2f}")]
        rows += [(k, v) for k, v in c["assumptions"].items()]
        lines.append(_table(rows, ["", "value"]))
    return "\n".join(lines)


def _settings_rows(out):
    return [(k, v) for k, v in out["settings"].items()]


def main(argv=None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        out = run(args)
    except (_Exit, ValueError, TypeError, OSError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if not message.startswith("python -m minilora.calc"):
            message = f"python -m minilora.calc: error: {message}"
        print(message, file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        print(render(args, out))
    return 0
