"""Where the peak of a training step goes: the live CUDA allocations at the peak, by source line.

    python -m bench.memory_explain                       # lora and qlora points of memory_validation
    python -m bench.memory_explain --point qlora 1 512   # method, checkpointing (0/1), sequence length

For each point it builds the model exactly as bench.memory_validation does, takes one step, then
records the allocator's history through a second step (torch.cuda.memory._record_memory_history),
replays the trace to find the moment of the peak and groups the blocks alive then, that the second
step allocated, by the innermost frame in minilora / reference_models / torch.nn. Memory held
before the step (weights, optimizer states) is one line, "resting". This is the tool that says
which calculator term is missing or too small when memory_validation misses its 5% goal.
"""
from __future__ import annotations

import argparse
import collections
import gc
import sys

import torch

from bench.memory_validation import MODEL_1B, MODEL_QUICK, build_point, predict, train_step

OURS = ("/minilora/", "/reference_models/", "/bench/")


def _site(frames: list[dict]) -> str:
    """The innermost frame in our code, with the torch frame it called, as 'file:line fn'."""
    inner = None
    for frame in frames:  # innermost first
        name = frame.get("filename", "")
        if any(part in name for part in OURS):
            tail = name.split("/")[-2] + "/" + name.split("/")[-1]
            here = f"{tail}:{frame.get('line')} {frame.get('name')}"
            return here + (f" -> {inner}" if inner else "")
        if inner is None and "torch/" in name and "/_ops" not in name and "/profiler" not in name:
            inner = f"{name.split('/')[-1]}:{frame.get('line')} {frame.get('name')}"
    return inner or "(no python frame: autograd engine / C++)"


def peak_breakdown(trace: list[dict], resting: int, start: int = 0) -> tuple[int, dict, int]:
    """Replay allocator events: (peak bytes after event `start`, {site: bytes alive at that peak},
    bytes freed before it that were allocated before the trace began)."""
    live: dict[int, tuple[int, str]] = {}
    total = peak = resting
    freed_old = peak_freed_old = 0
    at_peak: dict[int, tuple[int, str]] = {}
    for index, event in enumerate(trace):
        action, addr, size = event["action"], event["addr"], event["size"]
        if index == start:
            peak = total
        if action == "alloc":
            live[addr] = (size, _site(event.get("frames", [])))
            total += size
            if total > peak and index >= start:
                peak, at_peak, peak_freed_old = total, dict(live), freed_old
        elif action == "free_completed":
            if addr in live:
                live.pop(addr)
            else:
                freed_old += size
            total -= size
    sites: dict[str, int] = collections.Counter()
    for size, site in at_peak.values():
        sites[site] += size
    return peak, dict(sites), peak_freed_old


def explain(model_kw: dict, method: str, grad_ckpt: bool, seq: int, top: int, from_start: bool = False) -> None:
    """from_start: record from before the model is built, so that memory held between steps is
    attributed too (run it first in a fresh process: cuBLAS allocates its workspaces once)."""
    gc.collect()
    torch.cuda.empty_cache()
    device = torch.device("cuda")
    record = dict(enabled="all", context="alloc", stacks="python", max_entries=2_000_000)
    if from_start:
        torch.cuda.memory._record_memory_history(**record)
    cfg, model, optimizer = build_point(model_kw, method, grad_ckpt, device)
    ids = torch.randint(0, model_kw["vocab_size"], (1, seq + 1), generator=torch.Generator().manual_seed(1)).to(device)
    train_step(cfg, model, optimizer, ids)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    resting = 0 if from_start else torch.cuda.memory_allocated()
    start = 0
    if from_start:  # the second step's events begin here
        start = sum(len(dev) for dev in torch.cuda.memory._snapshot()["device_traces"])
    else:
        torch.cuda.memory._record_memory_history(**record)
    train_step(cfg, model, optimizer, ids)
    torch.cuda.synchronize()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    measured = torch.cuda.max_memory_allocated()
    trace = [e for dev in snapshot["device_traces"] for e in dev]
    peak, sites, freed_old = peak_breakdown(trace, resting, start)
    pred = predict(model_kw, method, grad_ckpt, seq, 1, "cuda")
    mib = 2**20
    print(f"\n=== {method} grad_ckpt={grad_ckpt} seq={seq}: measured peak {measured / mib:.1f} MiB, "
          f"replayed peak {peak / mib:.1f} MiB, predicted {pred['total'] / mib:.1f} MiB", flush=True)
    print(f"  resting (before the step) {resting / mib:10.1f} MiB   of it freed before the peak {freed_old / mib:.1f} MiB")
    for site, size in sorted(sites.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {size / mib:10.1f} MiB  {site}")
    rest = sum(sorted(sites.values(), reverse=True)[top:])
    print(f"  {rest / mib:10.1f} MiB  (the other {max(len(sites) - top, 0)} sites)")
    print("  calculator terms: " + ", ".join(f"{k} {v / mib:.1f}" for k, v in pred.items() if k != "total"), flush=True)
    del model, optimizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory_explain", description=__doc__.splitlines()[0])
    p.add_argument("--point", nargs=3, action="append", metavar=("METHOD", "CKPT", "SEQ"),
                   help="a point to explain (repeatable); default: lora 0 512, qlora 0 512, qlora 1 512, qlora 1 2048")
    p.add_argument("--quick", action="store_true", help="memory_validation's --quick model")
    p.add_argument("--top", type=int, default=14, help="sites to list per point")
    p.add_argument("--from-start", action="store_true",
                   help="record from before the model is built (attributes the memory held between steps too)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.memory_explain needs CUDA (it reads the CUDA caching allocator's history)")
        return 0
    points = args.point or [("lora", "0", "512"), ("qlora", "0", "512"), ("qlora", "1", "512"), ("qlora", "1", "2048")]
    for method, ckpt, seq in points:
        explain(MODEL_QUICK if args.quick else MODEL_1B, method, ckpt == "1", int(seq), args.top, args.from_start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
