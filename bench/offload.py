"""Full fine-tuning step with the optimizer on the device vs offloaded to the CPU.

    .venv/bin/python -m bench.offload [--quick] [--steps N]

CUDA (a ~1.1B reference Llama, TinyLlama's shape): step time (forward + backward + optimizer) and
peak GPU memory, side by side, for
  torch AdamW(fused)           fp32 weights, bf16 autocast, everything on the GPU (the baseline)
  ours, fp32 params            same numerics; m, v, gradients on the CPU
  ours, bf16 + fp32 master     bf16 weights on the GPU; fp32 master, m, v, gradients on the CPU
  ours, bf16 + master, 8-bit   the same with 8-bit m and v
  torchao CPUOffloadOptimizer  fp32 weights, autocast, offload_gradients=True, fused CPU AdamW
Goal: ours <= 1.2x the all-GPU step while GPU memory drops by the states and master weights.

CPU (no device): a small reference Llama; the same step with torch AdamW (single-tensor and
fused) and ours, to show the cost of the hooks and the paged update (torchao's optimizer needs a
GPU and is skipped).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from bench._harness import report, timeit_interleaved
from minilora.offload import CPUOffloadAdamW
from reference_models import Llama, LlamaConfig

CUDA_CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                   num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048)
CPU_CONFIG = dict(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
QUICK = dict(hidden_size=128, intermediate_size=344, num_hidden_layers=2)


def build(config: dict, dtype, device):
    torch.manual_seed(0)
    return Llama(LlamaConfig(**config)).to(device=device, dtype=dtype)


def contenders(cuda: bool, page_size: int):
    """name -> (parameter dtype, autocast?, optimizer factory)."""
    out = {}
    if cuda:
        out["torch AdamW (fused), all on GPU"] = (torch.float32, True, lambda p: torch.optim.AdamW(p, lr=1e-5, fused=True))
        out["ours, fp32 params"] = (torch.float32, True, lambda p: CPUOffloadAdamW(p, lr=1e-5, page_size=page_size))
        out["ours, bf16 + fp32 master"] = (torch.bfloat16, False, lambda p: CPUOffloadAdamW(
            p, lr=1e-5, page_size=page_size, master_weights="fp32"))
        out["ours, bf16 + master, 8-bit states"] = (torch.bfloat16, False, lambda p: CPUOffloadAdamW(
            p, lr=1e-5, page_size=page_size, master_weights="fp32", state_bits=8))

        def torchao(p):
            from torchao.optim import CPUOffloadOptimizer
            return CPUOffloadOptimizer(p, torch.optim.AdamW, offload_gradients=True, lr=1e-5)
        out["torchao CPUOffloadOptimizer"] = (torch.float32, True, torchao)
    else:
        out["torch AdamW (single-tensor)"] = (torch.float32, False, lambda p: torch.optim.AdamW(p, lr=1e-5, foreach=False))
        out["torch AdamW (fused)"] = (torch.float32, False, lambda p: torch.optim.AdamW(p, lr=1e-5, fused=True))
        out["ours"] = (torch.float32, False, lambda p: CPUOffloadAdamW(p, lr=1e-5, page_size=page_size))
        out["ours, 8-bit states"] = (torch.float32, False, lambda p: CPUOffloadAdamW(
            p, lr=1e-5, page_size=page_size, state_bits=8))
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
        with self.amp():
            _, loss = self.model(self.idx[:, :-1], self.idx[:, 1:])
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.loss = loss.detach()

    def row(self, seconds):
        row = {"optimizer": self.name, "param dtype": str(self.dtype).removeprefix("torch."),
               "step s": seconds, "loss": self.loss.item()}
        if isinstance(self.opt, CPUOffloadAdamW):
            mem = self.opt.memory_bytes()
            row["optimizer CPU GiB"], row["optimizer device GiB"] = mem["cpu"] / 2**30, mem["device"] / 2**30
        return row


def measure_cuda(contender: Contender, steps: int) -> dict:
    """Median step time after 2 warm-up steps, and peak GPU memory, one contender at a time."""
    contender.step(), contender.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        contender.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    row = contender.row(statistics.median(times))
    row["peak GPU GiB"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model and batch")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per contender")
    parser.add_argument("--page-size", type=int, default=2**20)
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    config = dict(CUDA_CONFIG if cuda else CPU_CONFIG)
    if args.quick:
        config.update(QUICK if not cuda else dict(num_hidden_layers=4))
    batch, seq = (4, 1024) if cuda else (4, 128 if not args.quick else 64)
    steps = args.steps or (5 if cuda else 5)
    params = sum(p.numel() for p in build(config, torch.float32, "meta").parameters())
    table = contenders(cuda, args.page_size)
    if cuda:   # one at a time: five 1B-parameter set-ups do not fit on the GPU together
        rows = []
        for name, spec in table.items():
            contender = Contender(name, *spec, config, batch, seq, device)
            rows.append(measure_cuda(contender, steps))
            del contender
            torch.cuda.empty_cache()
    else:      # interleaved step by step, so a busy machine slows all alike
        built = [Contender(name, *spec, config, batch, seq, device) for name, spec in table.items()]
        seconds = timeit_interleaved({c.name: c.step for c in built}, repeats=steps, warmup=2)
        rows = [c.row(seconds[c.name]) for c in built]
    base = rows[0]["step s"]
    for row in rows:
        row["x baseline"] = row["step s"] / base
    note = ("CUDA: goal ours <= 1.2x the all-GPU step." if cuda else
            "CPU only: ratios of full training "
            "steps (forward + backward + optimizer); torchao's CPUOffloadOptimizer needs a GPU.")
    report("offload", rows, extra={"note": note, "params": params, "batch": batch, "seq": seq,
                                   "page_size": args.page_size, "model": config})


if __name__ == "__main__":
    main()
