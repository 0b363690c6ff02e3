"""The calculator's whole CPU grid against the real stacks: saved-for-backward bytes and model states.

    .venv/bin/python -m bench.stack_grid                 # both stacks, every case (about 15 minutes, 1 thread)
    .venv/bin/python -m bench.stack_grid --stack hf      # one stack
    .venv/bin/python -m bench.stack_grid --quick         # the first shape only, no dropout variants

For each stack ("hf": transformers + peft + bitsandbytes; "minilora": reference_models + minilora),
family (every one of bench/stack_cases.FAMILIES: llama, qwen2, mistral, qwen3, gpt2, gemma2, gemma3_text,
phi3, olmo2, gpt_neox, mixtral, qwen2_moe, qwen3_moe; sliding windows of 32 under the second shape's
40 tokens), method (full, LoRA q,v, LoRA all-linear, QLoRA without and
with prepare-for-k-bit), precision (fp32, bf16, fp32 weights under bf16 autocast; QLoRA in fp32 and
bf16), checkpointing off / on, sdpa / eager, dropout 0 / config (0.1), two shapes, and for "hf" LoRA
peft's autocast_adapter_dtype on and off: the bytes saved for backward by forward + loss and the
model states after one AdamW step, measured (bench/stack_cases.py) beside the calculator's. Goal:
equal on every case. The tests run a sample of this grid; this is the whole of it. Writes
bench/results/stack_grid-<machine>.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, replace

import torch

from bench._harness import report
from bench.stack_cases import SHAPES, grid, measure, predict


def cases(stack: str, quick: bool):
    for case in grid(stack):
        if quick and (case.dropout or (case.batch, case.seq, case.width) != SHAPES[0]):
            continue
        yield case
        if stack == "hf" and case.method != "full":
            yield replace(case, adapter_fp32=False)


def run(stacks, quick: bool) -> list[dict]:
    rows = []
    for stack in stacks:
        for case in cases(stack, quick):
            t0 = time.perf_counter()
            real, pred = measure(case), predict(case)
            row = {**asdict(case), "measured": real, "predicted": pred, "exact": real == pred,
                   "seconds": round(time.perf_counter() - t0, 3)}
            rows.append(row)
            if not row["exact"]:
                print("MISMATCH", row, flush=True)
        done = [r for r in rows if r["stack"] == stack]
        print(f"{stack}: {sum(r['exact'] for r in done)} of {len(done)} cases exact", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.stack_grid", description=__doc__.splitlines()[0])
    p.add_argument("--stack", choices=("hf", "minilora"), action="append", help="default: both")
    p.add_argument("--quick", action="store_true", help="one shape, no dropout variants")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = run(args.stack or ["hf", "minilora"], args.quick)
    exact = sum(r["exact"] for r in rows)
    table = [{"stack": s, "cases": sum(r["stack"] == s for r in rows),
              "exact": sum(r["exact"] for r in rows if r["stack"] == s)} for s in dict.fromkeys(r["stack"] for r in rows)]
    report("stack_grid" + ("-quick" if args.quick else ""), table, extra={
        "goal": "saved_activation_bytes and model states equal to the measured ones on every case",
        "goal_met": exact == len(rows), "cases": rows})
    return 0 if exact == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
