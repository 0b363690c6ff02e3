"""The benchmark suite: every benchmark this machine supports, one summary per machine.

    .venv/bin/python -m bench                 # all of them, default shapes
    .venv/bin/python -m bench --quick         # each with --quick (small shapes)
    .venv/bin/python -m bench --only nf4 --only offload   # re-runs those; the summary keeps the others
    .venv/bin/python -m bench --list          # names, and whether this machine runs each

Each benchmark runs in its own process (`python -m bench.<name> [--quick]`, from the repository root), so one crash or
one benchmark's allocations cannot disturb the next, and CUDA peak-memory counters start clean.
Each writes its own bench/results/<name>-<machine>.json; the suite gathers those into
bench/results/suite-<machine>.json and a markdown page suite-<machine>.md (one table per
benchmark, with the date, device and library versions on top), which the README quotes.
Benchmarks a machine cannot run (GPU-only ones on a CPU) are skipped with the reason printed.
With --only, the summary keeps the other benchmarks' runs from the existing summary of this machine
(each run carries its own date), so a re-run of one benchmark does not drop the rest.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

from bench._harness import RESULTS, machine_info, machine_name

# name -> (module run as `python -m`, what the machine needs); run in this order, cheap ones first
SUITE = {
    "models": ("bench.models", None),
    "lora_step": ("bench.lora_step", None),
    "lora_profile": ("bench.lora_profile", None),   # torch.profiler: where the LoRA step's time goes
    "nf4": ("bench.nf4", None),
    "quant_error": ("bench.quant_error", None),
    "offload": ("bench.offload", None),
    "train_throughput": ("bench.train_throughput", None),
    "long_context": ("bench.long_context", None),   # chunked loss and activation offload, step ratios
    "memory_validation": ("bench.memory_validation", "cuda"),  # torch.cuda.max_memory_allocated
    "long_context_gpu": ("bench.long_context_gpu", "cuda"),    # the 8B shape at its predicted longest
    "nf4_cuda_parity": ("bench.nf4_cuda_parity", "cuda"),      # bytes vs bitsandbytes' CUDA kernel
}


def _unsupported(name: str) -> str | None:
    """Why this machine cannot run benchmark `name`, or None when it can."""
    module, needs = SUITE[name]
    if importlib.util.find_spec(module) is None:
        return f"{module} is not in this checkout"
    if needs == "cuda":
        import torch

        if not torch.cuda.is_available():
            hint = (f" (python -m bench.{name} --dry-run exercises it on CPU)"
                    if name in ("memory_validation", "long_context_gpu") else "")
            return "needs a CUDA device; torch.cuda.is_available() is False" + hint
    return None


def _results_snapshot() -> dict[Path, float]:
    return {p: p.stat().st_mtime for p in RESULTS.glob("*.json")}


def _run_one(name: str, quick: bool, timeout: float | None) -> dict:
    """Run bench.<name> in a child process; return its status and the result files it wrote."""
    before = _results_snapshot()
    cmd = [sys.executable, "-m", SUITE[name][0]] + (["--quick"] if quick else [])
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, timeout=timeout, cwd=Path(__file__).resolve().parent.parent)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        status = f"failed (timed out after {timeout:.0f} s)"
    seconds = time.perf_counter() - t0
    written = sorted(p for p, m in _results_snapshot().items()
                     if before.get(p) != m and not p.name.startswith("suite-"))
    results = []
    for path in written:
        payload = json.loads(path.read_text())
        payload.pop("machine", None)  # the suite file states the machine once
        results.append({"file": f"bench/results/{path.name}", **payload})
    if status == "ok" and not results:
        status = "ok (wrote no results file)"
    return {"name": name, "status": status, "seconds": round(seconds, 1), "date": _now(), "results": results}


def _now() -> str:
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _merge(previous: Path, runs: list[dict]) -> list[dict]:
    """Runs of this invocation, plus those of the existing summary for benchmarks not run now, in
    the suite's order."""
    if not previous.exists():
        return runs
    try:
        old = {r["name"]: r for r in json.loads(previous.read_text()).get("runs", [])}
    except (ValueError, KeyError, TypeError):
        return runs   # an unreadable summary is replaced, not merged
    new = {r["name"]: r for r in runs}
    order = list(SUITE) + [n for n in old if n not in SUITE]
    return [new.get(n) or old[n] for n in order if n in new or n in old]


def _markdown(info: dict, runs: list[dict], quick: bool) -> str:
    from tabulate import tabulate

    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "transformers", "peft", "bitsandbytes", "torchao")
                         if info.get(k))
    lines = [f"# minilora benchmark suite: {info['device']}", "",
             f"{info['date']} | {info['platform']} | {info['cpu_count']} CPUs, {info['threads']} torch threads | "
             f"python {info['python']} | {versions}" + (" | --quick shapes" if quick else ""), "",
             tabulate([{"benchmark": r["name"], "status": r["status"], "seconds": r["seconds"],
                        "date": r.get("date", info["date"])} for r in runs],
                      headers="keys", tablefmt="github"), ""]
    for run in runs:
        for result in run["results"]:
            lines += [f"## {result.get('benchmark', run['name'])}", ""]
            if result.get("note"):
                lines += [f"_{result['note']}_", ""]
            if "goal" in result:  # benchmarks that state their issue's goal say whether it was met
                met = {True: "met", False: "not met"}.get(result.get("goal_met"), "not judged")
                lines += [f"Goal: {result['goal']} ({met})", ""]
            rows = result.get("results") or []
            if rows and isinstance(rows, list) and isinstance(rows[0], dict):
                lines += [tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4g"), ""]
            lines += [f"(from `{result['file']}`)", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="pass --quick to every benchmark (small shapes)")
    p.add_argument("--only", action="append", metavar="NAME",
                   help=f"run only this benchmark (repeatable); one of: {', '.join(SUITE)}")
    p.add_argument("--list", action="store_true", help="list the benchmarks and whether this machine runs them")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per benchmark (default: none)")
    args = p.parse_args(argv)
    unknown = [n for n in args.only or [] if n not in SUITE]
    if unknown:
        p.error(f"unknown benchmark {unknown[0]!r}; choose from {', '.join(SUITE)}")
    names = list(dict.fromkeys(args.only)) if args.only else list(SUITE)
    if args.list:
        for name in SUITE:
            reason = _unsupported(name)
            print(f"{name:20s} {'runs here' if reason is None else 'skipped: ' + reason}")
        return 0
    runs = []
    for name in names:
        reason = _unsupported(name)
        if reason is not None:
            print(f"\n=== {name}: skipped: {reason}", flush=True)
            runs.append({"name": name, "status": f"skipped: {reason}", "seconds": 0.0, "date": _now(), "results": []})
            continue
        runs.append(_run_one(name, args.quick, args.timeout))
    from reference_models.files import write_json_atomic, write_text_atomic

    info = machine_info()
    machine = machine_name()
    json_path, md_path = RESULTS / f"suite-{machine}.json", RESULTS / f"suite-{machine}.md"
    kept = _merge(json_path, runs) if args.only else runs
    summary = {"suite": [r["name"] for r in kept], "quick": args.quick, "machine": info, "runs": kept}
    write_json_atomic(json_path, summary)
    write_text_atomic(md_path, _markdown(info, kept, args.quick))
    print("\n" + "\n".join(f"{r['name']:20s} {r['status']} ({r['seconds']} s)" for r in runs))
    print(f"wrote {json_path} and {md_path.name}" + (f" (kept {len(kept) - len(runs)} earlier runs)"
                                                     if len(kept) > len(runs) else ""))
    return 1 if any(r["status"].startswith("failed") for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
