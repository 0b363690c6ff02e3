"""NF4 throughput, side by side: minilora vs bitsandbytes vs torchao's NF4Tensor, and LinearNF4
forward/backward vs a dense nn.Linear.

    .venv/bin/python -m bench.nf4            # 4096 x 4096 (a 7B-class projection)
    .venv/bin/python -m bench.nf4 --quick    # 1024 x 1024

Rows: quantize (NF4, block 64, double quantization) and dequantize (to fp32 and bf16) of one
weight; then LinearNF4 forward and forward+backward (input gradients only, as under LoRA) for
`tokens` rows, against nn.Linear in fp32/bf16 and bitsandbytes' Linear4bit forward. Every figure
is a median of interleaved repeats, so machine load hits all columns alike; ratios are the point.
On CUDA it also reports dequantize bandwidth as a fraction of the device's copy bandwidth, measured
in the same run (a 1 GiB device-to-device copy, bytes read plus written), or of --peak-gbs if given.
Goals on CUDA (issue 4): dequantize at >= 70% of that bandwidth; LinearNF4 forward within 1.3x of
bitsandbytes' Linear4bit.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from bench._harness import machine_info, report, timeit_interleaved
from minilora.quant.nf4 import dequantize_4bit, quantize_4bit
from minilora.quant.qlora import LinearNF4


def _torchao():
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    return to_nf4


def copy_bandwidth_gbs(nbytes: int = 2**30, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read plus bytes written), median of `repeats`."""
    src = torch.empty(nbytes // 4, device="cuda").normal_()
    dst = torch.empty_like(src)
    seconds = timeit_interleaved({"copy": lambda: dst.copy_(src)}, repeats=repeats, warmup=3)["copy"]
    return 2 * nbytes / seconds / 1e9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024 x 1024 weight, fewer repeats")
    parser.add_argument("--size", type=int, default=None, help="weight is size x size (default 4096, quick 1024)")
    parser.add_argument("--tokens", type=int, default=None, help="rows of x for the linear rows (default 256)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--bf16-linear", action="store_true", help="also time bf16 linears on CPU (slow)")
    parser.add_argument("--compile", action="store_true",
                        help="also time dequantize_4bit(backend='compiled'), torch.compile'd (CUDA)")
    parser.add_argument("--peak-gbs", type=float, default=None,
                        help="device memory bandwidth, GB/s (CUDA; default: a device-to-device copy, measured)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.size or (1024 if args.quick else 4096)
    tokens = args.tokens or (64 if args.quick else 256)
    repeats = args.repeats or 5
    device = "cuda" if torch.cuda.is_available() else "cpu"
    peak_gbs = args.peak_gbs or (copy_bandwidth_gbs() if device == "cuda" else None)

    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbF

    to_nf4 = _torchao()
    torch.manual_seed(0)
    w = torch.randn(size, size, device=device)
    ours = quantize_4bit(w, "nf4", 64, True)
    packed, qs = bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(ours.packed, packed), "minilora and bitsandbytes disagree: run the tests"
    ao = to_nf4(w, 64, 256)
    w_bf16 = w.to(torch.bfloat16)
    ours_bf16 = quantize_4bit(w_bf16, "nf4", 64, True)
    packed_bf16, qs_bf16 = bnbF.quantize_4bit(w_bf16, blocksize=64, quant_type="nf4", compress_statistics=True)
    ao_bf16 = to_nf4(w_bf16, 64, 256)

    ops = {
        ("quantize nf4+dq", "fp32"): {
            "minilora": lambda: quantize_4bit(w, "nf4", 64, True),
            "bitsandbytes": lambda: bnbF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True),
            "torchao": lambda: to_nf4(w, 64, 256),
        },
        ("dequantize", "fp32"): {
            "minilora": lambda: dequantize_4bit(ours),
            "bitsandbytes": lambda: bnbF.dequantize_4bit(packed, qs),
            "torchao": lambda: ao.get_original_weight(),
        },
        ("dequantize", "bf16"): {
            "minilora": lambda: dequantize_4bit(ours_bf16),
            "bitsandbytes": lambda: bnbF.dequantize_4bit(packed_bf16, qs_bf16),
            "torchao": lambda: ao_bf16.get_original_weight(),
        },
    }
    if args.compile and device == "cuda":  # backend="compiled": dequantize_nibbles through torch.compile
        ops[("dequantize", "fp32")]["minilora compiled"] = lambda: dequantize_4bit(ours, backend="compiled")
        ops[("dequantize", "bf16")]["minilora compiled"] = lambda: dequantize_4bit(ours_bf16, backend="compiled")
    rows = []
    for (op, dtype), fns in ops.items():
        t = timeit_interleaved(fns, repeats=repeats, warmup=1)
        row = {"op": op, "dtype": dtype, "shape": f"{size}x{size}"}
        row.update({f"{k} ms": 1e3 * v for k, v in t.items()})
        row["bnb / minilora"] = t["bitsandbytes"] / t["minilora"]
        row["torchao / minilora"] = t["torchao"] / t["minilora"]
        if op == "dequantize" and device == "cuda":
            out_bytes = size * size * (4 if dtype == "fp32" else 2)
            moved = ours.nbytes + out_bytes
            row["minilora GB/s"] = moved / t["minilora"] / 1e9
            row["fraction of copy bw"] = row["minilora GB/s"] / peak_gbs
        rows.append(row)

    # LinearNF4 vs dense nn.Linear vs bitsandbytes Linear4bit (forward)
    # bf16 matmuls on a CPU without AVX512-BF16 take seconds each (35 s per fwd+bwd at 4096): opt in
    computes = (torch.float32, torch.bfloat16) if device == "cuda" or args.bf16_linear else (torch.float32,)
    for compute in computes:
        dense = nn.Linear(size, size, bias=False, device=device, dtype=compute)
        dense.weight.data.copy_(w)
        dense.requires_grad_(False)
        layer = LinearNF4.from_linear(dense, "nf4", 64, True, compute)
        bnb_layer = bnb.nn.Linear4bit(size, size, bias=False, compute_dtype=compute, quant_type="nf4",
                                      compress_statistics=True)
        sd = layer.state_dict()  # bitsandbytes' format: load the same bytes into Linear4bit
        bnb_layer.weight = bnb.nn.Params4bit.from_prequantized(
            data=sd.pop("weight"), quantized_stats=sd, requires_grad=False, device=torch.device(device),
            module=bnb_layer)
        bnb_layer = bnb_layer.eval()
        x = torch.randn(tokens, size, device=device, dtype=compute)
        xg = x.clone().requires_grad_(True)

        def fwd_bwd(module):
            def run():
                y = module(xg)
                y.backward(torch.ones_like(y))
            return run

        with torch.no_grad():
            t_fwd = timeit_interleaved({"LinearNF4": lambda: layer(x), "nn.Linear": lambda: dense(x),
                                        "bnb Linear4bit": lambda: bnb_layer(x)}, repeats=repeats, warmup=1)
        t_bwd = timeit_interleaved({"LinearNF4": fwd_bwd(layer), "nn.Linear": fwd_bwd(dense)},
                                   repeats=repeats, warmup=1)
        name = str(compute).removeprefix("torch.")
        rows.append({"op": f"linear forward x({tokens},{size})", "dtype": name, "shape": f"{size}x{size}",
                     "minilora ms": 1e3 * t_fwd["LinearNF4"], "bitsandbytes ms": 1e3 * t_fwd["bnb Linear4bit"],
                     "nn.Linear ms": 1e3 * t_fwd["nn.Linear"],
                     "bnb / minilora": t_fwd["bnb Linear4bit"] / t_fwd["LinearNF4"],
                     "minilora / nn.Linear": t_fwd["LinearNF4"] / t_fwd["nn.Linear"]})
        rows.append({"op": f"linear fwd+bwd (input grad) x({tokens},{size})", "dtype": name,
                     "shape": f"{size}x{size}", "minilora ms": 1e3 * t_bwd["LinearNF4"],
                     "nn.Linear ms": 1e3 * t_bwd["nn.Linear"],
                     "minilora / nn.Linear": t_bwd["LinearNF4"] / t_bwd["nn.Linear"]})

    info = machine_info()
    note = ("ratios come from interleaved repeats; absolute times depend on the machine's load "
            "(machine.loadavg)" if device == "cpu" else "")
    extra = {"note": note, "device": device, "threads": info["threads"], "tokens": tokens}
    if device == "cuda":
        deq = [r["fraction of copy bw"] for r in rows if r["op"] == "dequantize"]
        fwd = [1 / r["bnb / minilora"] for r in rows if r["op"].startswith("linear forward")]
        extra.update(copy_bandwidth_gbs=peak_gbs,
                     goal="dequantize >= 70% of copy bandwidth; LinearNF4 forward <= 1.3x Linear4bit",
                     goal_met=bool(deq and fwd) and min(deq) >= 0.70 and max(fwd) <= 1.3,
                     worst_dequantize_fraction=min(deq), worst_forward_vs_bnb=max(fwd))
    report("nf4" + ("-quick" if args.quick else ""), rows, extra=extra)


if __name__ == "__main__":
    main()
