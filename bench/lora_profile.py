"""Where the time of a training step goes, and what LoRA does not save: a torch.profiler profile of
the full fine-tuning step and of the LoRA step (ours, the reference models), on the lora_step
benchmark's shapes and set-up (bench/lora_step.py: CUDA pure bf16 with fused AdamW, CPU fp32).

    .venv/bin/python -m bench.lora_profile             # CUDA: device (kernel) time per op; CPU: CPU time per op
    .venv/bin/python -m bench.lora_profile --quick     # lora_step's --quick shapes
    .venv/bin/python -m bench.lora_profile --dry-run   # tiny shapes, one profiled step; the same code, nothing written

Each op's self time, per step (summed over the profiled steps after warm-up): on CUDA the time of the
kernels the op launched, on a CPU its own CPU time. Ops fall into categories by their aten name
(`CATEGORIES`), so the first table reads: per category, ms per step in the full step and in the LoRA
step, LoRA / full, and the category's share of the LoRA step; what LoRA saves shows up as
categories whose time drops (weight gradients, optimizer), what it does not as those that stay
(the forward, the input gradients, attention, norms, the loss). The second table is the top ops.
Output: bench/results/lora_profile-<machine>.json (both tables) and lora_profile-<machine>.md.
"""
from __future__ import annotations

import argparse
import re
import types
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

from bench._harness import RESULTS, machine_name, report
from bench.lora_step import CPU_SHAPES, CUDA_SHAPES, QUICK_SHAPES, TARGETS, build, train_step
from minilora.lora.layer import LoRAConfig
from minilora.lora.model import inject

DRY_SHAPES = dict(layers=1, width=64, vocab=256, batch=1, seq=16)
RANK = 8
# first match wins; aten names, lower-cased
CATEGORIES = (
    ("attention", r"scaled_dot_product|flash|efficient_attention|cudnn_attention"),
    ("matmul", r"aten::(mm|addmm|bmm|baddbmm|addmv|mv|matmul|linear)$"),
    ("optimizer", r"foreach|fused_adam|adamw?|lerp|addcdiv|addcmul"),
    ("loss", r"cross_entropy|nll_loss|log_softmax"),
    ("norm", r"norm|rsqrt"),
    ("embedding", r"embedding"),
    ("copy / layout", r"copy|_to_copy|clone|contiguous|cat|stack|index|gather|scatter|fill|zero"),
    ("elementwise", r"aten::(mul|add|sub|div|neg|pow|silu|gelu|sigmoid|tanh|cos|sin|exp|where|sum|mean|threshold)"),
)


def category(op: str) -> str:
    name = op.lower()
    return next((cat for cat, pattern in CATEGORIES if re.search(pattern, name)), "other")


def profile_step(step, steps: int, warmup: int, cuda: bool) -> dict[str, float]:
    """ms per step of each op's self time (device time on CUDA, CPU time otherwise)."""
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
    times = {}
    for event in prof.key_averages():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue  # a kernel: counted under the op that launched it
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            times[event.key] = us / steps / 1e3
    return times


def tables(full: dict, lora: dict, top: int) -> tuple[list[dict], list[dict]]:
    """(per category, top ops by LoRA-step time) rows."""
    lora_total = sum(lora.values())
    by_category = {}
    for op in set(full) | set(lora):
        f, l_ = by_category.setdefault(category(op), [0.0, 0.0])
        by_category[category(op)] = [f + full.get(op, 0.0), l_ + lora.get(op, 0.0)]
    rows = [{"category": cat, "full ms": f, "LoRA ms": l_, "LoRA / full": l_ / f if f else None,
             "share of LoRA step": l_ / lora_total} for cat, (f, l_) in by_category.items()]
    rows.sort(key=lambda r: -r["LoRA ms"])
    rows.append({"category": "total", "full ms": sum(full.values()), "LoRA ms": lora_total,
                 "LoRA / full": lora_total / sum(full.values()), "share of LoRA step": 1.0})
    ops = sorted(set(full) | set(lora), key=lambda op: -lora.get(op, 0.0))[:top]
    op_rows = [{"op": op, "category": category(op), "full ms": full.get(op, 0.0), "LoRA ms": lora.get(op, 0.0),
                "share of LoRA step": lora.get(op, 0.0) / lora_total} for op in ops]
    return rows, op_rows


def run(args) -> tuple[list[dict], list[dict]]:
    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    cuda = args.device.type == "cuda"
    fused = True if cuda else None  # as bench.lora_step: fused AdamW on CUDA, torch's default on a CPU
    full = build(args.family, args).train()
    full_times = profile_step(train_step(full, ids, hf=False, fused=fused), args.steps, args.warmup, cuda)
    del full
    lora = build(args.family, args).train()
    inject(lora, LoRAConfig(r=RANK, alpha=2 * RANK, target_modules=TARGETS[args.family]))
    lora_times = profile_step(train_step(lora, ids, hf=False, fused=fused), args.steps, args.warmup, cuda)
    return tables(full_times, lora_times, args.top)


def markdown(args, rows: list[dict], op_rows: list[dict]) -> str:
    from tabulate import tabulate

    unit = "device (kernel) time" if args.device.type == "cuda" else "CPU time"
    return "\n".join([
        f"# Where a training step's time goes: full vs LoRA r={RANK} ({args.family}, {args.device.type})", "",
        f"Self {unit} per op, ms per step, mean of {args.steps} profiled steps after {args.warmup} warm-up; "
        f"shapes {args.shapes}, {str(args.dtype).removeprefix('torch.')}. See bench/lora_profile.py.", "",
        tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4g"), "",
        f"Top {len(op_rows)} ops by LoRA-step time:", "",
        tabulate(op_rows, headers="keys", tablefmt="github", floatfmt=".4g"), ""])


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="lora_step's --quick shapes")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, one step: nothing written")
    parser.add_argument("--family", choices=sorted(TARGETS), default="llama")
    parser.add_argument("--steps", type=int, default=None, help="profiled steps (default: 5 on CUDA, 2 on a CPU)")
    parser.add_argument("--top", type=int, default=25, help="rows of the per-op table")
    args = parser.parse_args(argv)
    args.device = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    cuda = args.device.type == "cuda"
    args.dtype = torch.bfloat16 if cuda else torch.float32
    args.shapes = DRY_SHAPES if args.dry_run else QUICK_SHAPES if args.quick else CUDA_SHAPES if cuda else CPU_SHAPES
    for k, v in args.shapes.items():
        setattr(args, k, v)
    args.steps = 1 if args.dry_run else args.steps or (5 if cuda else 2)
    args.warmup = 0 if args.dry_run else 3 if cuda else 1
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    warnings.filterwarnings("ignore")
    rows, op_rows = run(args)
    payload = types.SimpleNamespace(rows=rows, ops=op_rows, markdown=markdown(args, rows, op_rows))
    if args.dry_run:
        print(payload.markdown)
        print("dry run: the profiled steps ran on the CPU (nothing written)")
        return vars(payload)
    name = "lora_profile" + ("-quick" if args.quick else "")
    report(name, rows, extra={"ops": op_rows, "family": args.family, "rank": RANK, "shapes": args.shapes,
                              "device": args.device.type, "dtype": str(args.dtype).removeprefix("torch."),
                              "steps": args.steps, "warmup": args.warmup,
                              "unit": "ms per step of each op's self " + ("device" if args.device.type == "cuda"
                                                                          else "CPU") + " time"})
    from reference_models.files import write_text_atomic

    write_text_atomic(RESULTS / f"{name}-{machine_name()}.md", payload.markdown)
    return vars(payload)


if __name__ == "__main__":
    main()
