"""Byte parity on CUDA: minilora's quantizers vs bitsandbytes' CUDA kernel, and that kernel vs
bitsandbytes' own CPU path.

    python -m bench.nf4_cuda_parity          # needs CUDA and bitsandbytes

For each case (shape, dtype, quant type, block size, double quantization) it counts the bytes
that differ: packed 4-bit codes, 8-bit absmax codes, absmax2 and offset; the dequantized weight of
bitsandbytes' state, by minilora's eager path and its Triton kernel; for minilora once per
reciprocal mode ("ieee" = kernel="cuda-ieee", a correctly rounded 1/absmax; "approx" = kernel="cuda",
the GPU's rcp.approx, what bitsandbytes' --use_fast_math build computes), and for bitsandbytes'
CPU path on the same values. A row of zeros is bit-identity. Also the plain 8-bit blockwise
quantizer (bitsandbytes.functional.quantize_blockwise, dynamic map, block 256).
"""
from __future__ import annotations

import sys

import torch

from bench._harness import report

# the column prefix of each rounding minilora reproduces: its 1/absmax, and the `kernel` that asks for it
RECIPROCAL_KERNELS = {"ieee": "cuda-ieee", "approx": "cuda"}


def _count(a, b) -> int:
    if a is None or b is None:
        return 0 if a is None and b is None else -1
    a, b = a.reshape(-1), b.reshape(-1).to(a.device)
    if a.shape != b.shape:
        return -1
    return int((a.view(torch.uint8) != b.view(torch.uint8)).sum()) if a.dtype == b.dtype else -1


def _bnb_parts(packed, qs):
    if qs.nested:
        return packed, qs.absmax, qs.state2.absmax, qs.offset.reshape(-1)
    return packed, qs.absmax, None, None


def _ours_parts(state):
    offset = None if state.offset is None else state.offset.reshape(-1)
    return state.packed, state.absmax, state.absmax2, offset


def cases():
    g = torch.Generator(device="cuda").manual_seed(0)
    big = torch.randn(4096, 4096, device="cuda", generator=g)
    odd = torch.randn(1001, 4097, device="cuda", generator=g) * 0.02
    zeros = torch.randn(64, 100, device="cuda", generator=g)
    zeros[3:5] = 0  # whole zero blocks (block 64 divides 3*100..5*100 only partly: also partial ones)
    heavy = torch.distributions.StudentT(2.0).sample((2048, 2048)).to("cuda")
    for name, w in (("randn 4096x4096", big), ("0.02*randn 1001x4097", odd), ("zero rows 64x100", zeros),
                    ("student-t 2048x2048", heavy)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            for quant_type in ("nf4", "fp4"):
                for block_size, dq in ((64, True), (64, False), (128, True), (4096, True)):
                    if name != "randn 4096x4096" and (block_size, dq) != (64, True):
                        continue
                    if dtype == torch.float16 and quant_type == "fp4":
                        continue
                    yield name, w.to(dtype), quant_type, block_size, dq


def _unpack(packed: torch.Tensor, n: int) -> torch.Tensor:
    packed = packed.reshape(-1)
    return torch.stack([packed >> 4, packed & 15], dim=1).reshape(-1)[:n]


def dump(w: torch.Tensor, quant_type: str, block_size: int = 64, limit: int = 12) -> None:
    """Print the elements whose code differs from bitsandbytes' CUDA kernel, with what led to it."""
    import bitsandbytes.functional as F

    from minilora.quant import bnb_cuda, nf4

    packed, _ = F.quantize_4bit(w, blocksize=block_size, quant_type=quant_type, compress_statistics=False)
    ours = nf4.quantize_4bit(w, quant_type, block_size, False, kernel="cuda")
    theirs, mine = _unpack(packed, w.numel()), _unpack(ours.packed, w.numel())
    bad = torch.nonzero(theirs != mine).view(-1)[:limit]
    flat = w.reshape(-1).float()
    absmax = ours.absmax
    print(f"{quant_type} {w.dtype}: {int((theirs != mine).sum())} codes differ; first {len(bad)}:")
    for i in bad.tolist():
        a = absmax[i // block_size:i // block_size + 1]
        r_ieee, r_apx = (1.0 / a), bnb_cuda.reciprocal(a, "approx")
        x = flat[i:i + 1]
        print(f"  i={i} x={x.item()!r} ({x.item().hex()}) absmax={a.item()!r} rcp ieee={r_ieee.item().hex()} "
              f"approx={r_apx.item().hex()} x*rcp ieee={(x * r_ieee).item()!r} approx={(x * r_apx).item()!r} "
              f"x/absmax={(x / a).item()!r} ours={int(mine[i])} bnb={int(theirs[i])}")


def _dequantize_counts(packed, qs, w, quant_type: str, block_size: int, dq: bool) -> dict:
    """Differing bytes of minilora's dequantize of bitsandbytes' own state, per backend, vs its CUDA dequantize."""
    import bitsandbytes.functional as F

    from minilora.quant import nf4
    from minilora.quant.backends import triton_unavailable

    state = nf4.QuantState4bit(packed, qs.absmax, w.shape, w.dtype, block_size, quant_type,
                               qs.state2.absmax if dq else None, qs.offset if dq else None)
    theirs = F.dequantize_4bit(packed, qs)
    backends = ["eager"] + (["triton"] if triton_unavailable(w.device) is None else [])
    return {f"dequantize {b}": _count(nf4.dequantize_4bit(state, backend=b), theirs) for b in backends}


def main(argv=None) -> int:
    if "--dump" in (argv if argv is not None else sys.argv[1:]):
        g = torch.Generator(device="cuda").manual_seed(0)
        big = torch.randn(4096, 4096, device="cuda", generator=g)
        dump(big, "nf4")
        dump(big.to(torch.bfloat16), "fp4")
        return 0
    if not torch.cuda.is_available():
        print("bench.nf4_cuda_parity needs CUDA")
        return 0
    import bitsandbytes.functional as F

    from minilora.quant import nf4

    rows = []
    for name, w, quant_type, block_size, dq in cases():
        packed, qs = F.quantize_4bit(w, blocksize=block_size, quant_type=quant_type, compress_statistics=dq)
        theirs = _bnb_parts(packed, qs)
        row = {"case": name, "dtype": str(w.dtype).removeprefix("torch."), "type": quant_type,
               "block": block_size, "dq": dq, "elements": w.numel()}
        for mode, kernel in RECIPROCAL_KERNELS.items():
            ours = _ours_parts(nf4.quantize_4bit(w, quant_type, block_size, dq, kernel=kernel))
            for part, a, b in zip(("packed", "absmax", "absmax2", "offset"), ours, theirs):
                row[f"{mode}:{part}"] = _count(a, b)
        row.update(_dequantize_counts(packed, qs, w, quant_type, block_size, dq))
        cpu_packed, cpu_qs = F.quantize_4bit(w.cpu(), blocksize=block_size, quant_type=quant_type,
                                             compress_statistics=dq)
        for part, a, b in zip(("packed", "absmax"), _bnb_parts(cpu_packed, cpu_qs), theirs):
            row[f"bnb cpu:{part}"] = _count(a, b)
        print(row, flush=True)
        rows.append(row)
    g = torch.Generator(device="cuda").manual_seed(1)
    for name, x in (("randn 1M", torch.randn(2**20, device="cuda", generator=g)),
                    ("absmax-like 50k", torch.rand(50_001, device="cuda", generator=g) * 0.3 - 0.1)):
        codes, absmax = F.quantize_blockwise(x, blocksize=256)
        row = {"case": f"8-bit {name}", "dtype": "float32", "type": "dynamic", "block": 256, "dq": False,
               "elements": x.numel()}
        for mode, kernel in RECIPROCAL_KERNELS.items():
            ours_codes, ours_absmax = nf4.quantize_blockwise_8bit(x, block_size=256, kernel=kernel)
            row[f"{mode}:packed"] = _count(ours_codes, codes)
            row[f"{mode}:absmax"] = _count(ours_absmax, absmax.absmax if hasattr(absmax, "absmax") else absmax)
        print(row, flush=True)
        rows.append(row)
    report("nf4_cuda_parity", rows, extra={
        "note": "counts of differing bytes vs bitsandbytes' CUDA kernel (-1: shapes or dtypes differ); "
                "ieee/approx: minilora with that reciprocal; dequantize eager/triton: minilora's dequantize of "
                "bitsandbytes' state by that backend vs bitsandbytes' CUDA dequantize; bnb cpu: bitsandbytes' "
                "CPU path on the same values"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
