"""Full fine-tuning step with the optimizer on the device vs offloaded to the CPU, and the stages
the offload step pipelines.

    .venv/bin/python -m bench.offload [--quick] [--steps N]

CUDA (a ~1.1B reference Llama, TinyLlama's shape, batch 4 x 1024): step time (forward + backward +
optimizer) and peak GPU memory, one contender at a time, in this order:
  torch AdamW(fused)           fp32 weights, bf16 autocast, everything on the GPU (the baseline)
  ours, fp32 params            same numerics; m, v, gradients on the CPU (the fused CPU kernel)
  ours, ..., fused=False       the single-tensor kernel
  ours, bf16 + fp32 master     bf16 weights on the GPU; fp32 master, m, v, gradients on the CPU
  torchao CPUOffloadOptimizer  fp32 weights, autocast, offload_gradients=True, fused CPU AdamW
  ours, bf16 + master, 8-bit   bf16 + fp32 master with 8-bit m and v (the slowest CPU update: last)
Then the stages, each measured alone in the same run ("stages"): D2H (every fp32 gradient into
ours' pinned pages), CPU update (the update of every page of ours, no copies), H2D (every fp32 step
out of the pinned pages) and GPU compute (the baseline's forward + backward). The offload step
pipelines the first three page by page, so it approaches the slowest stage.
Goals (issue 18, judged on CUDA only): ours (fp32 params) step <= 1.15x max(D2H, CPU update, H2D,
GPU compute), and <= torchao's step.
Each model is built on the GPU directly; each contender prints its row when done. 1 warm-up step,
then up to 3 timed steps, fewer when the warm-up shows they would pass --budget-s; contenders not
started by --deadline-s are recorded as skipped, and one that raises is recorded with its error.

CPU (no device): a small reference Llama; the same step with torch AdamW (single-tensor and
fused) and ours, to show the cost of the hooks and the paged update (torchao's optimizer needs a
GPU and is skipped).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time

import torch

from bench._harness import _sync, report, timeit, timeit_interleaved
from minilora.optim.offload import CPUOffloadAdamW
from minilora.optim.transfer import HostLink
from minilora.optim.update import AdamWHyper, update_segment
from reference_models import Llama, LlamaConfig

CUDA_CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                   num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
CPU_CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
QUICK = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2)
BASELINE, OURS, TORCHAO = "torch AdamW (fused), all on GPU", "ours, fp32 params", "torchao CPUOffloadOptimizer"


def build(config: dict, dtype, device):
    torch.manual_seed(0)
    with torch.device(device):   # built in place: a 1B model never passes through host memory
        return Llama(LlamaConfig(**config)).to(dtype)


def contenders(cuda: bool, page_size: int):
    """name -> (parameter dtype, autocast?, optimizer factory)."""
    out = {}
    if cuda:
        out[BASELINE] = (torch.float32, True, lambda p: torch.optim.AdamW(p, lr=1e-5, fused=True))
        out[OURS] = (torch.float32, True, lambda p: CPUOffloadAdamW(p, lr=1e-5, page_size=page_size))
        out["ours, fp32 params, fused=False"] = (torch.float32, True, lambda p: CPUOffloadAdamW(
            p, lr=1e-5, page_size=page_size, fused=False))
        out["ours, bf16 + fp32 master"] = (torch.bfloat16, False, lambda p: CPUOffloadAdamW(
            p, lr=1e-5, page_size=page_size, master_weights="fp32"))

        def torchao(p):
            from torchao.optim import CPUOffloadOptimizer
            return CPUOffloadOptimizer(p, torch.optim.AdamW, offload_gradients=True, lr=1e-5)
        out[TORCHAO] = (torch.float32, True, torchao)
        out["ours, bf16 + master, 8-bit states"] = (torch.bfloat16, False, lambda p: CPUOffloadAdamW(
            p, lr=1e-5, page_size=page_size, master_weights="fp32", state_bits=8))
        out["ours, bf16 + master, 8-bit states, fused=False"] = (torch.bfloat16, False, lambda p: CPUOffloadAdamW(
            p, lr=1e-5, page_size=page_size, master_weights="fp32", state_bits=8, fused=False))
    else:
        out["torch AdamW (single-tensor)"] = (torch.float32, False, lambda p: torch.optim.AdamW(p, lr=1e-5, foreach=False))
        out["torch AdamW (fused)"] = (torch.float32, False, lambda p: torch.optim.AdamW(p, lr=1e-5, fused=True))
        out["ours"] = (torch.float32, False, lambda p: CPUOffloadAdamW(p, lr=1e-5, page_size=page_size))
        out["ours, fused=False"] = (torch.float32, False, lambda p: CPUOffloadAdamW(
            p, lr=1e-5, page_size=page_size, fused=False))
        out["ours, 8-bit states"] = (torch.float32, False, lambda p: CPUOffloadAdamW(
            p, lr=1e-5, page_size=page_size, state_bits=8))
        out["ours, 8-bit states, fused=False"] = (torch.float32, False, lambda p: CPUOffloadAdamW(
            p, lr=1e-5, page_size=page_size, state_bits=8, fused=False))
    return out


class Contender:
    """One model + optimizer; `step()` runs forward, backward and the optimizer step."""

    def __init__(self, name, dtype, autocast, make_opt, config, batch, seq, device):
        self.name, self.dtype, self.device = name, dtype, device
        self.model = build(config, dtype, device)
        self.opt = make_opt(self.model.parameters())
        g = torch.Generator().manual_seed(0)
        self.idx = torch.randint(0, config["vocab_size"], (batch, seq + 1), generator=g).to(device)
        cuda = device.type == "cuda"
        self.amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if autocast and cuda else contextlib.nullcontext
        self.loss = None

    def step(self):
        self.forward_backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def forward_backward(self):
        with self.amp():
            _, loss = self.model(self.idx[:, :-1], self.idx[:, 1:])
        loss.backward()
        self.loss = loss.detach()

    def row(self, seconds):
        row = {"optimizer": self.name, "param dtype": str(self.dtype).removeprefix("torch."),
               "step s": seconds, "loss": self.loss.item()}
        if isinstance(self.opt, CPUOffloadAdamW):
            mem = self.opt.memory_bytes()
            row["optimizer CPU GiB"], row["optimizer device GiB"] = mem["cpu"] / 2**30, mem["device"] / 2**30
        return row


def measure_alone(contender: Contender, steps: int, budget_s: float) -> dict:
    """Median step time after 1 warm-up step (it picks the kernels and allocates the states), and
    the peak GPU memory of the timed steps. At most `steps` timed steps, fewer when the warm-up
    says they would take longer than `budget_s` (at least 1)."""
    cuda = contender.device.type == "cuda"
    t0 = time.perf_counter()
    contender.step()
    _sync()
    warm = time.perf_counter() - t0
    steps = max(1, min(steps, int(budget_s // warm)))
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        contender.step()
        _sync()
        times.append(time.perf_counter() - t0)
    row = contender.row(statistics.median(times))
    row["timed steps"], row["warm-up s"] = steps, warm
    if cuda:
        row["peak GPU GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return row


class NoCopies(HostLink):
    """The CPU update alone: the device path's targets (a zeroed step buffer or the master copy),
    no copies to the device."""

    def __init__(self, pinned: bool):
        self.pinned = pinned

    def updates_in_place(self, param):
        return False

    def write_back(self, param, src, decay):
        pass


def stage_times(contender: Contender, repeats: int) -> dict:
    """D2H, CPU update and H2D of one step of an offload contender, each alone, on its own host
    pages (median of `repeats`): the three stages its step pipelines page by page."""
    opt, device = contender.opt, contender.device
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    staging = torch.empty(opt.page_size, device=device)
    grads = [page.buffers["grad"] for page in opt.pages]

    def copies(to_host: bool):
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for grad in grads:
                on_device = staging[:grad.numel()]
                grad.copy_(on_device, non_blocking=True) if to_host else on_device.copy_(grad, non_blocking=True)
        if stream is not None:
            stream.synchronize()

    link = NoCopies(pinned=stream is not None)

    def update():   # the states it leaves are not used again: the contender is done
        for page in opt.pages:
            for seg in page.segments:
                if seg.param.step is not None:
                    update_segment(seg, opt.kernel, AdamWHyper.of(seg.param.group), opt.states, link)

    return {"D2H s": timeit(lambda: copies(True), repeats), "CPU update s": timeit(update, repeats),
            "H2D s": timeit(lambda: copies(False), repeats)}


def forward_backward_time(contender: Contender, repeats: int) -> float:
    def compute():
        contender.forward_backward()
        contender.model.zero_grad(set_to_none=True)
    return timeit(compute, repeats)


def run_alone(name, spec, config, batch, seq, device, steps, budget_s) -> dict:
    """Build, measure and free one contender; an exception becomes its row's `error`. The baseline
    also times its forward + backward alone, ours its three offload stages."""
    contender = None
    try:
        contender = Contender(name, *spec, config, batch, seq, device)
        row = measure_alone(contender, steps, budget_s)
        if name == BASELINE:
            row["fwd+bwd s"] = forward_backward_time(contender, row["timed steps"])
        if name == OURS:
            row.update(stage_times(contender, row["timed steps"]))
        return row
    except Exception as exc:   # e.g. torchao's optimizer on a torch it does not support, or out of memory
        return {"optimizer": name, "param dtype": str(spec[0]).removeprefix("torch."),
                "error": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        if contender is not None and isinstance(contender.opt, CPUOffloadAdamW):
            contender.opt.close()
        del contender
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def optimizer_only(n_params: int = 24, numel: int = 2**20, repeats: int = 3) -> list[dict]:
    """Steps where the update dominates, as in a large model: n_params fp32 tensors of `numel`
    elements (whole pages), gradients from a linear loss, so backward is one cheap pass (ours adds its
    gradient copies to the host there); interleaved medians."""
    weight = torch.randn(numel)
    factories = {
        "torch AdamW (single-tensor)": lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=False),
        "torch AdamW (fused)": lambda p: torch.optim.AdamW(p, lr=1e-3, fused=True),
        "ours": lambda p: CPUOffloadAdamW(p, lr=1e-3),
        "ours, fused=False": lambda p: CPUOffloadAdamW(p, lr=1e-3, fused=False),
        "ours, 8-bit states": lambda p: CPUOffloadAdamW(p, lr=1e-3, state_bits=8),
        "ours, 8-bit states, fused=False": lambda p: CPUOffloadAdamW(p, lr=1e-3, state_bits=8, fused=False),
    }

    def stepper(make):
        params = [torch.nn.Parameter(torch.randn(numel)) for _ in range(n_params)]
        opt = make(params)

        def step():
            sum((p * weight).sum() for p in params).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    seconds = timeit_interleaved({name: stepper(make) for name, make in factories.items()}, repeats=repeats,
                                 warmup=2)
    fused = seconds["torch AdamW (fused)"]
    return [{"optimizer": name, "step ms": 1e3 * t, "x torch fused": t / fused} for name, t in seconds.items()]


def judge(rows: list[dict], cuda: bool) -> dict:
    """Issue 18's goals: ours' step against the slowest stage it pipelines, and against torchao's."""
    by_name = {r["optimizer"]: r for r in rows}
    ours, base, torchao = (by_name.get(name, {}) for name in (OURS, BASELINE, TORCHAO))
    stages = {k: ours[k] for k in ("D2H s", "CPU update s", "H2D s") if k in ours}
    if "fwd+bwd s" in base:
        stages["GPU compute s"] = base["fwd+bwd s"]
    step = ours.get("step s")
    limit = max(stages.values()) if len(stages) == 4 else None
    x_limit = step / limit if step and limit else None
    x_torchao = step / torchao["step s"] if step and torchao.get("step s") else None
    met = None if not cuda or x_limit is None or x_torchao is None else x_limit <= 1.15 and x_torchao <= 1.0
    return {"stages": stages, "slowest stage s": limit, "ours x slowest stage": x_limit, "ours x torchao": x_torchao,
            "goal": "ours (fp32 params) step <= 1.15x max(D2H, CPU update, H2D, GPU compute) and <= torchao's step "
                    "(judged on CUDA only)", "goal_met": met}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model and batch")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per contender (default: 3 on CUDA after 1 warm-up; 5 on CPU)")
    parser.add_argument("--page-size", type=int, default=2**20)
    parser.add_argument("--budget-s", type=float, default=8.0,
                        help="CUDA: seconds of timed steps per contender, judged from its warm-up step")
    parser.add_argument("--deadline-s", type=float, default=40.0,
                        help="CUDA: contenders not started this many seconds into the run are skipped")
    # hidden: run the CUDA contenders, one at a time, on the CPU: a smoke test of that path without a GPU
    parser.add_argument("--cuda-path", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    one_at_a_time = cuda or args.cuda_path
    config = dict(CUDA_CONFIG if cuda else CPU_CONFIG)
    if args.quick:
        config.update(QUICK if not cuda else dict(num_hidden_layers=4))
    batch, seq = (4, 1024) if cuda else (4, 128 if not args.quick else 64)
    steps = args.steps or (3 if one_at_a_time else 5)
    params = sum(p.numel() for p in build(config, torch.float32, "meta").parameters())
    table = contenders(one_at_a_time, args.page_size)
    if one_at_a_time:   # five 1B-parameter set-ups do not fit on the GPU together
        rows = []
        for name, spec in table.items():
            elapsed = time.perf_counter() - start
            if elapsed > args.deadline_s:
                row = {"optimizer": name, "param dtype": str(spec[0]).removeprefix("torch."),
                       "error": f"skipped: {elapsed:.0f} s into the run, past --deadline-s {args.deadline_s:g}"}
            else:
                row = run_alone(name, spec, config, batch, seq, device, steps, args.budget_s)
            rows.append(row)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    else:      # interleaved step by step, so a busy machine slows all alike
        built = [Contender(name, *spec, config, batch, seq, device) for name, spec in table.items()]
        seconds = timeit_interleaved({c.name: c.step for c in built}, repeats=steps, warmup=2)
        rows = [c.row(seconds[c.name]) for c in built]
    base = rows[0].get("step s")
    for row in rows:
        row["x baseline"] = row["step s"] / base if base and "step s" in row else None
    extra = {"params": params, "batch": batch, "seq": seq, "page_size": args.page_size, "model": config,
             "device": device.type}
    if one_at_a_time:
        extra.update(
            note="one contender at a time: 1 warm-up step, then up to --steps timed steps (column 'timed steps'); "
                 "'x baseline' is each step time / the all-GPU fused AdamW step; rows with 'error' did not run; "
                 "stages: each measured alone in this run (D2H, CPU update, H2D on ours' pages; GPU compute: "
                 "the baseline's forward + backward)",
            steps=steps, budget_s=args.budget_s, deadline_s=args.deadline_s, **judge(rows, cuda))
        print("stages:", {k: round(v, 4) for k, v in extra["stages"].items()}, "| ours x slowest stage:",
              extra["ours x slowest stage"], "| ours x torchao:", extra["ours x torchao"])
    else:
        extra["note"] = ("CPU only: ratios of full training steps (forward + backward + optimizer); "
                         "torchao's CPUOffloadOptimizer needs a GPU. optimizer_only: steps of 24 x 1M-element fp32 "
                         "parameters (whole pages) with a linear loss, where the update dominates.")
        extra["optimizer_only"] = optimizer_only(numel=2**16 if args.quick else 2**20)
        from tabulate import tabulate

        print(tabulate(extra["optimizer_only"], headers="keys", floatfmt=".4g"), end="\n\n")
    report("offload", rows, extra=extra)


if __name__ == "__main__":
    main()
