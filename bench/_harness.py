"""The benchmark convention: every benchmark is a script that prints a tabulate table and writes
`bench/results/<name>-<machine>.json` with the machine, the versions and the figures.

Ratios are what we report: two things measured side by side in one run, interleaved, each the
median of several repeats, so that a busy machine slows both alike.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _shown(path: Path) -> str:
    """A path relative to the checkout when it is inside it."""
    try:
        return str(path.resolve().relative_to(RESULTS.parent.parent))
    except ValueError:
        return str(path)


def machine_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0).lower().replace(" ", "-")
    return f"cpu{torch.get_num_threads()}t"


def machine_info() -> dict:
    import torch

    info = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        # other work on the machine slows everything alike in interleaved ratios, but not absolute times
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    # the installed versions, from the packages' metadata: importing them only to read __version__
    # would run their import-time work (torchao tries to load its CUDA .so files and logs a
    # "Failed to load ..." warning per file on a CPU build of torch)
    for lib in ("transformers", "peft", "bitsandbytes", "torchao", "numpy"):
        try:
            info[lib] = importlib.metadata.version(lib)
        except importlib.metadata.PackageNotFoundError:
            info[lib] = None
    return info


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timeit(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    _sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def timeit_interleaved(fns: dict, repeats: int = 5, warmup: int = 1, clock=time.perf_counter) -> dict:
    """Median seconds for each named callable, run round-robin so load affects all alike.

    `clock=time.process_time` measures process CPU seconds instead of wall time: on a shared machine
    a single-threaded run's CPU time barely depends on what else runs (with more than one thread,
    OpenMP's spin-waiting makes CPU time meaningless)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            _sync()
            times[k].append(clock() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def report(name: str, rows: list[dict], extra: dict | None = None, floatfmt: str = ".4g",
           results: Path | None = None) -> Path:
    """Print rows as a table and write <results>/<name>-<machine>.json atomically (default
    bench/results, the committed figures)."""
    from tabulate import tabulate

    from reference_models.files import write_json_atomic

    print(tabulate(rows, headers="keys", floatfmt=floatfmt))
    payload = {"benchmark": name, "machine": machine_info(), "results": rows}
    if extra:
        payload.update(extra)
    path = Path(results or RESULTS) / f"{name}-{machine_name()}.json"
    write_json_atomic(path, payload)
    print(f"wrote {_shown(path)}")
    return path
