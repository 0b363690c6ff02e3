"""Where the time of a training step goes, and what LoRA does not save: a torch.profiler profile of
the full fine-tuning step and of the LoRA step (ours, the reference models), on the lora_step
benchmark's shapes and set-up (bench/lora_step.py: CUDA pure bf16 with fused AdamW, CPU fp32).

    .venv/bin/python -m bench.lora_profile             # CUDA: device (kernel) time per op; CPU: CPU time per op
    .venv/bin/python -m bench.lora_profile --quick     # lora_step's --quick shapes
    .venv/bin/python -m bench.lora_profile --dry-run   # tiny shapes, one profiled step; the same code, nothing written

Each op's self time, per step (summed over the profiled steps after warm-up): on CUDA the time of the
kernels the op launched, on a CPU its own CPU time. Ops are grouped by phase (forward; backward, i.e.
run by the autograd engine; optimizer, i.e. under Optimizer.step / zero_grad) and, within forward and
backward, by category of their aten name (`CATEGORIES`). The first table reads, per group: ms per
step in the full step and in the LoRA step, LoRA / full, and the group's share of the LoRA step. What
LoRA saves shows up as groups whose time drops (backward matmuls: no weight gradients for frozen
weights; the optimizer), what it does not as those that stay (the forward, attention, the loss).
The second table is the top ops.
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

NOTE = {True: "kernel (device) time per op, attributed to the op that launched the kernel",
        False: "CPU: each op's own wall-clock time on a machine that may be shared with other jobs (machine.loadavg); "
               "compare shares and ratios. The table this benchmark exists for is CUDA's kernel times"}
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


def phase(event) -> str:
    """forward, backward or optimizer: what the op ran under (the autograd engine, Optimizer.step/zero_grad)."""
    while event is not None:
        if event.name.startswith("Optimizer."):
            return "optimizer"
        if event.name.startswith("autograd::engine"):
            return "backward"
        event = event.cpu_parent
    return "forward"


def profile_step(step, steps: int, warmup: int, cuda: bool) -> dict[tuple[str, str], float]:
    """ms per step of each (phase, op)'s self time (device time on CUDA, CPU time otherwise)."""
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
    times: dict[tuple[str, str], float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue  # a kernel: counted under the op that launched it
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us > 0:
            key = (phase(event), event.name)
            times[key] = times.get(key, 0.0) + us / steps / 1e3
    return times


def group(phase_name: str, op: str) -> str:
    """The first table's row: the optimizer as one, forward and backward by category."""
    return "optimizer" if phase_name == "optimizer" else f"{phase_name}: {category(op)}"


def tables(full: dict, lora: dict, top: int) -> tuple[list[dict], list[dict]]:
    """(per phase and category, top ops by LoRA-step time) rows."""
    lora_total, full_total = sum(lora.values()), sum(full.values())
    by_group: dict[str, list[float]] = {}
    for key in set(full) | set(lora):
        sums = by_group.setdefault(group(*key), [0.0, 0.0])
        sums[0] += full.get(key, 0.0)
        sums[1] += lora.get(key, 0.0)
    rows = [{"phase: category": name, "full ms": f, "LoRA ms": l_, "LoRA / full": l_ / f if f else None,
             "share of LoRA step": l_ / lora_total} for name, (f, l_) in by_group.items()]
    rows.sort(key=lambda r: -r["LoRA ms"])
    rows.append({"phase: category": "total", "full ms": full_total, "LoRA ms": lora_total,
                 "LoRA / full": lora_total / full_total, "share of LoRA step": 1.0})
    keys = sorted(set(full) | set(lora), key=lambda k: -lora.get(k, 0.0))[:top]
    op_rows = [{"op": op, "phase": ph, "category": category(op), "full ms": full.get((ph, op), 0.0),
                "LoRA ms": lora.get((ph, op), 0.0), "share of LoRA step": lora.get((ph, op), 0.0) / lora_total}
               for ph, op in keys]
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
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (CPU; 1 keeps a shared machine's other jobs from stalling each op)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
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
                              "steps": args.steps, "warmup": args.warmup, "note": NOTE[args.device.type == "cuda"],
                              "unit": "ms per step of each op's self " + ("device" if args.device.type == "cuda"
                                                                          else "CPU") + " time"})
    from reference_models.files import write_text_atomic

    write_text_atomic(RESULTS / f"{name}-{machine_name()}.md", payload.markdown)
    return vars(payload)


if __name__ == "__main__":
    main()
