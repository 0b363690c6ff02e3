"""NF4 throughput, side by side: minilora (each backend) vs bitsandbytes vs torchao's NF4Tensor, and
LinearNF4 forward vs bitsandbytes' Linear4bit and a dense nn.Linear.

    .venv/bin/python -m bench.nf4            # CUDA: 4096 x 4096 and 8192 x 28672; CPU: 4096 x 4096
    .venv/bin/python -m bench.nf4 --quick    # 1024 x 1024
    .venv/bin/python -m bench.nf4 --clock cpu  # CPU: 1 thread, process CPU time (for a machine shared with others)
    .venv/bin/python -m bench.nf4 --dry-run  # CPU, tiny shapes, Triton's interpreter: every row's code, nothing written

Rows: quantize (NF4, block 64, double quantization) of the first weight; dequantize to fp32 and bf16
of each weight, by minilora's backends ("eager", "triton" where it runs, "compiled" with --compile),
bitsandbytes and torchao; on CUDA also bytes moved (codes, scales and output) per second as a
fraction of the device's copy bandwidth, measured in the same run (a 1 GiB device-to-device copy,
bytes read plus written) or --peak-gbs. On CPU, dequantize into a new tensor vs into a reused one
(why LinearNF4 reuses a buffer). Then LinearNF4 forward at 1, 16, 64 and 256 tokens (bf16 on CUDA,
fp32 on CPU): the layer per backend, and the two paths of backend="triton" forced (the fused kernel,
and dequantize into the buffer + matmul), so the fused range (matmul_4bit.FUSED_MAX_TOKENS) can be
read off; beside it Linear4bit and nn.Linear; and forward + backward (input gradient) at 256 tokens.
Every figure is a median of interleaved repeats, so machine load hits all columns alike.

Goals on CUDA (issue 18), judged on backend="triton": dequantize <= 1.0x bitsandbytes' time and
>= 60% of the copy bandwidth at 4096 x 4096 and 8192 x 28672; LinearNF4 forward <= 1.0x Linear4bit
at 1, 16 and 256 tokens. The JSON also says which backend was faster in every row ("faster_backend":
what minilora.quant.backends.AUTO_BACKEND["cuda"] should be) and up to how many tokens the fused
kernel beat the buffer path ("fused_wins_up_to_tokens").
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch import nn

from bench._harness import machine_info, report, timeit_interleaved

CUDA_SHAPES, CPU_SHAPES, QUICK_SHAPES, DRY_SHAPES = [(4096, 4096), (8192, 28672)], [(4096, 4096)], [(1024, 1024)], [(256, 192)]
TOKENS, DRY_TOKENS = (1, 16, 64, 256), (1, 16, 80)
GOAL_SHAPES, GOAL_TOKENS = ("4096x4096", "8192x28672"), (1, 16, 256)
GOAL = ("backend='triton': dequantize <= 1.0x bitsandbytes' time and >= 60% of copy bandwidth at 4096x4096 and "
        "8192x28672; LinearNF4 forward <= 1.0x Linear4bit at 1, 16 and 256 tokens (bf16)")


def copy_bandwidth_gbs(nbytes: int = 2**30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read plus bytes written), median of `repeats`."""
    src = torch.empty(nbytes // 4, device="cuda").normal_()
    dst = torch.empty_like(src)
    seconds = timeit_interleaved({"copy": lambda: dst.copy_(src)}, repeats=repeats, warmup=3)["copy"]
    return 2 * nbytes / seconds / 1e9


def minilora_backends(args) -> list[str]:
    from minilora.quant.backends import triton_unavailable

    names = ["eager"] + (["triton"] if triton_unavailable(args.device) is None else [])
    return names + (["compiled"] if args.compile else [])


def quantize_rows(w, args) -> list[dict]:
    import bitsandbytes.functional as bnbF
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    from minilora.quant.nf4 import quantize_4bit

    t = args.timer({"minilora": lambda: quantize_4bit(w, "nf4", 64, True),
                    "bitsandbytes": lambda: bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
                    "torchao": lambda: to_nf4(w, 64, 256)})
    return [{"op": "quantize nf4+dq", "dtype": "fp32", "shape": shape_name(w), **ms(t),
             "bnb / minilora": t["bitsandbytes"] / t["minilora"]}]


def dequantize_rows(w, args) -> list[dict]:
    import bitsandbytes.functional as bnbF
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    from minilora.quant.nf4 import dequantize_4bit, quantize_4bit

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        weight = w.to(dtype)
        ours = quantize_4bit(weight, "nf4", 64, True)
        packed, qs = bnbF.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        assert torch.equal(ours.packed, packed), "minilora and bitsandbytes disagree: run the tests"
        ao = to_nf4(weight, 64, 256) if weight.numel() % 16384 == 0 else None  # torchao's size rule
        fns = {f"minilora {b}": (lambda b=b: dequantize_4bit(ours, backend=b)) for b in minilora_backends(args)}
        fns["bitsandbytes"] = lambda: bnbF.dequantize_4bit(packed, qs)
        if ao is not None:
            fns["torchao"] = ao.get_original_weight
        if args.device.type == "cpu":  # what LinearNF4's reused buffer saves: a new tensor's first-touch page faults
            buffer = torch.empty(weight.numel(), dtype=dtype)
            fns["minilora eager into a reused buffer"] = lambda: dequantize_4bit(ours, out=buffer)
        t = args.timer(fns)
        row = {"op": "dequantize", "dtype": short(dtype), "shape": shape_name(w), **ms(t)}
        for name in fns:
            if name.startswith("minilora"):
                row[f"{name} / bnb"] = t[name] / t["bitsandbytes"]
                if args.peak_gbs:  # bytes moved: codes and scales read, the weight written
                    moved = ours.nbytes + weight.numel() * weight.element_size()
                    row[f"{name} fraction of copy bw"] = moved / t[name] / 1e9 / args.peak_gbs
        rows.append(row)
    return rows


def linear_layers(w, dtype, args):
    """LinearNF4 per backend, bitsandbytes' Linear4bit on the same bytes, and the dense nn.Linear."""
    import bitsandbytes as bnb

    from minilora.quant.qlora import LinearNF4

    rows, cols = w.shape
    dense = nn.Linear(cols, rows, bias=False, device=args.device, dtype=dtype).requires_grad_(False)
    dense.weight.data.copy_(w)
    ours = {}
    for backend in minilora_backends(args):
        ours[backend] = LinearNF4.from_linear(dense, "nf4", 64, True, dtype)
        ours[backend].backend = backend
    theirs = bnb.nn.Linear4bit(cols, rows, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    sd = ours["eager"].state_dict()  # bitsandbytes' format: load the same bytes into Linear4bit
    theirs.weight = bnb.nn.Params4bit.from_prequantized(data=sd.pop("weight"), quantized_stats=sd,
                                                        requires_grad=False, device=args.device, module=theirs)
    return ours, theirs.eval(), dense


def linear_rows(w, args) -> list[dict]:
    from minilora.quant.matmul_4bit import matmul_dequantized
    from minilora.quant.nf4 import packed_weight

    dtype = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    ours, theirs, dense = linear_layers(w, dtype, args)
    rows = []
    for tokens in args.tokens:
        x = torch.randn(tokens, w.shape[1], device=args.device, dtype=dtype)
        fns = {f"LinearNF4 {b}": (lambda layer=layer: layer(x)) for b, layer in ours.items()}
        if "triton" in ours:  # the two paths of backend="triton", each forced
            from minilora.quant.triton_matmul import fused_matmul

            state = ours["triton"].quant_state
            fns["triton fused kernel"] = lambda: fused_matmul(x, packed_weight(state), transposed=True)
            fns["triton dequantize + matmul"] = lambda: matmul_dequantized(x, state, dtype, "triton", True)
        fns["bnb Linear4bit"] = lambda: theirs(x)
        fns["nn.Linear"] = lambda: dense(x)
        with torch.no_grad():
            t = args.timer(fns)
        row = {"op": f"linear forward x({tokens},{w.shape[1]})", "dtype": short(dtype), "shape": shape_name(w),
               "tokens": tokens, **ms(t)}
        row.update({f"{name} / bnb": t[name] / t["bnb Linear4bit"] for name in fns if name.startswith(("Linear", "triton"))})
        rows.append(row)
    x = torch.randn(args.tokens[-1], w.shape[1], device=args.device, dtype=dtype, requires_grad=True)
    t = args.timer({f"LinearNF4 {b}": fwd_bwd(layer, x) for b, layer in ours.items()} | {"nn.Linear": fwd_bwd(dense, x)})
    rows.append({"op": f"linear fwd+bwd (input grad) x({args.tokens[-1]},{w.shape[1]})", "dtype": short(dtype),
                 "shape": shape_name(w), **ms(t)} | {f"{n} / nn.Linear": t[n] / t["nn.Linear"] for n in t if n != "nn.Linear"})
    return rows


def fwd_bwd(module, x):
    def run():
        y = module(x)
        y.backward(torch.ones_like(y))
    return run


def judge(rows: list[dict]) -> dict:
    """The goal on CUDA (module docstring), which backend was faster in every row, and the fused range."""
    deq = [r for r in rows if r["op"] == "dequantize"]
    fwd = [r for r in rows if r["op"].startswith("linear forward")]
    if not any("minilora triton ms" in r for r in deq):
        return {"goal": GOAL, "goal_met": None, "faster_backend": None}
    timed = [(r["minilora triton ms"], r["minilora eager ms"]) for r in deq]
    timed += [(r["LinearNF4 triton ms"], r["LinearNF4 eager ms"]) for r in rows if r["op"].startswith("linear")]
    verdict = {"goal": GOAL, "goal_met": None,
               "faster_backend": "triton" if all(tri <= eager for tri, eager in timed) else "eager",
               "fused_wins_up_to_tokens": max((r["tokens"] for r in fwd
                                               if r["triton fused kernel ms"] <= r["triton dequantize + matmul ms"]),
                                              default=0)}
    deq = [r for r in deq if r["shape"] in GOAL_SHAPES]
    fwd = [r for r in fwd if r["tokens"] in GOAL_TOKENS]
    if {r["shape"] for r in deq} != set(GOAL_SHAPES) or len(fwd) != len(GOAL_TOKENS):
        return verdict  # not the goal's shapes (--quick, --size): nothing to judge
    verdict.update(worst_dequantize_vs_bnb=max(r["minilora triton / bnb"] for r in deq),
                   worst_dequantize_fraction_of_copy_bw=min(r.get("minilora triton fraction of copy bw", 0.0)
                                                            for r in deq),
                   worst_forward_vs_bnb=max(r["LinearNF4 triton / bnb"] for r in fwd))
    verdict["goal_met"] = (verdict["worst_dequantize_vs_bnb"] <= 1.0 and verdict["worst_forward_vs_bnb"] <= 1.0
                           and verdict["worst_dequantize_fraction_of_copy_bw"] >= 0.60)
    return verdict


def shape_name(w) -> str:
    return "x".join(map(str, w.shape))


def short(dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def ms(times: dict) -> dict:
    return {f"{k} ms": 1e3 * v for k, v in times.items()}


def parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024 x 1024 weight")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU, tiny shapes, one repeat, Triton's interpreter: runs every row's code, writes nothing")
    parser.add_argument("--size", type=int, nargs=2, action="append", metavar=("ROWS", "COLS"),
                        help="a weight shape (repeatable; default: see the docstring)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: wall-clock; cpu: process CPU time on 1 thread (robust on a shared machine; CPU only)")
    parser.add_argument("--compile", action="store_true", help="also time backend='compiled' (torch.compile)")
    parser.add_argument("--peak-gbs", type=float, default=None,
                        help="device memory bandwidth, GB/s (CUDA; default: a device-to-device copy, measured)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.dry_run and "triton" not in sys.modules:  # the interpreter is chosen when triton is first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    args.device = torch.device("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda")
    cuda = args.device.type == "cuda"
    if cuda and args.clock == "cpu":
        raise SystemExit("--clock cpu measures host CPU time, which says nothing about CUDA kernels; use --clock wall")
    if args.threads or args.clock == "cpu":
        torch.set_num_threads(1 if args.clock == "cpu" else args.threads)
    shapes = [tuple(s) for s in args.size] if args.size else (
        DRY_SHAPES if args.dry_run else QUICK_SHAPES if args.quick else CUDA_SHAPES if cuda else CPU_SHAPES)
    args.tokens = DRY_TOKENS if args.dry_run else TOKENS
    repeats, warmup = (1, 0) if args.dry_run else (args.repeats or 5, 2 if cuda else 1)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    args.timer = lambda fns: timeit_interleaved(fns, repeats=repeats, warmup=warmup, clock=clock)
    args.peak_gbs = args.peak_gbs or (copy_bandwidth_gbs() if cuda else None)
    torch.manual_seed(0)
    weights = [torch.randn(*shape, device=args.device) for shape in shapes]
    rows = quantize_rows(weights[0], args)
    for w in weights:
        rows += dequantize_rows(w, args)
    rows += linear_rows(weights[0], args)
    info = machine_info()
    extra = {"device": args.device.type, "threads": info["threads"], "clock": args.clock, "tokens": list(args.tokens),
             "copy_bandwidth_gbs": args.peak_gbs, **judge(rows)}
    if not cuda:
        extra["goal_met"] = None
        extra["note"] = ("CPU: the goals are CUDA's (not judged here); ratios come from interleaved repeats, absolute "
                         "times depend on the machine's load (machine.loadavg)")
    if args.dry_run:
        from tabulate import tabulate

        print(tabulate(rows, headers="keys", floatfmt=".4g"))
        print("dry run: every row's code ran on the CPU (nothing measured, nothing written)")
        return {"results": rows, **extra}
    report("nf4" + ("-quick" if args.quick else ""), rows, extra=extra)
    return {"results": rows, **extra}


if __name__ == "__main__":
    main()
