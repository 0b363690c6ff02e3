"""LoRA training step vs full fine-tuning step, ours (reference models) and peft (transformers twin).

For each family (GPT-2, Llama) one run times, interleaved: a full fine-tuning step, LoRA steps at
r=8 and r=64 (ours), the same three for transformers + peft on the same weights, and inference:
base model, LoRA unmerged, LoRA merged. Reported: each time and the ratios LoRA / full of the same
stack. The FLOP floor for LoRA / full is about 2/3 (backward skips the frozen weights' gradients).
Goal (the issue's): LoRA step <= 0.75 x the full step, ours faster than peft's LoRA step, merged
inference as fast as the base model (within 5%).

CPU: fp32 weights, torch.optim.AdamW. CUDA: pure bf16 on both sides (bf16 weights, bf16 adapters:
peft's autocast_adapter_dtype=False, bf16 AdamW states, fused AdamW), models built on the GPU.

    .venv/bin/python -m bench.lora_step            # CPU: 4 layers, width 384, vocab 8192, batch 4 x 256
                                                   # CUDA: 8 layers, width 2048, vocab 32000, batch 8 x 1024
    .venv/bin/python -m bench.lora_step --quick    # smaller shapes, for a smoke run
    .venv/bin/python -m bench.lora_step --clock cpu  # 1 thread, CPU time: for a machine shared with others
"""
from __future__ import annotations

import argparse
import functools
import gc
import tempfile
import time
import warnings

import torch

from bench._harness import report, timeit_interleaved
from minilora.lora.layer import LoRAConfig
from minilora.lora.model import inject, merge
from reference_models import GPT, GPTConfig, Llama, LlamaConfig, save_pretrained

TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}


CPU_SHAPES = dict(layers=4, width=384, vocab=8192, batch=4, seq=256)
CUDA_SHAPES = dict(layers=8, width=2048, vocab=32000, batch=8, seq=1024)  # ~0.5B parameters, 8k tokens a step
QUICK_SHAPES = dict(layers=2, width=128, vocab=2048, batch=2, seq=128)


def build(family: str, args):
    """A reference model with seed-0 weights, built on args.device (a 0.5B model never visits the host)."""
    torch.manual_seed(0)
    with torch.device(args.device):
        if family == "gpt2":
            model = GPT(GPTConfig(vocab_size=args.vocab, n_positions=args.seq, n_embd=args.width, n_layer=args.layers,
                                  n_head=args.width // 64, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0))
        else:
            model = Llama(LlamaConfig(vocab_size=args.vocab, hidden_size=args.width,
                                      intermediate_size=args.width * 8 // 3 // 64 * 64, num_hidden_layers=args.layers,
                                      num_attention_heads=args.width // 64, num_key_value_heads=args.width // 64,
                                      max_position_embeddings=args.seq))
    return model.to(args.dtype)


def hf_load(folder, args):
    """transformers' twin of the model saved in `folder`: same weights, dtype and device."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa",
                                                             dtype=args.dtype).to(args.device)


def train_step(model, ids, hf: bool, fused: bool | None = None):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)

    def step():
        loss = model(input_ids=ids, labels=ids).loss if hf else model(ids, ids)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def infer(model, ids, hf: bool):
    @torch.no_grad()
    def run():
        return model(input_ids=ids).logits if hf else model(ids)
    return run


def bench_family(family, args):
    from peft import LoraConfig, get_peft_model

    base = build(family, args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    fused = True if args.device.type == "cuda" else None   # CPU: torch's default AdamW, as before
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(base, tmp)
        hf = hf_load(tmp, args)
        fns = {}
        clone = lambda: build(family, args).train()  # noqa: E731
        fns["ours full"] = train_step(clone(), ids, hf=False, fused=fused)
        fns["peft full"] = train_step(hf_load(tmp, args).train(), ids, hf=True, fused=fused)
        for r in args.ranks:
            ours = clone()
            inject(ours, LoRAConfig(r=r, alpha=2 * r, target_modules=TARGETS[family]))
            fns[f"ours r={r}"] = train_step(ours, ids, hf=False, fused=fused)
            # autocast_adapter_dtype=False: peft keeps bf16 adapters in bf16 (as ours) instead of fp32
            theirs = get_peft_model(hf_load(tmp, args), LoraConfig(r=r, lora_alpha=2 * r,
                                                                   target_modules=TARGETS[family]),
                                    autocast_adapter_dtype=False).train()
            fns[f"peft r={r}"] = train_step(theirs, ids, hf=True, fused=fused)
        # interleaved: every model and AdamW state above is alive at once (CUDA, bf16: ~13 GB + one step's
        # activations); warm-up >= 2 on CUDA so kernel selection and the caching allocator settle first
        times = args.timer(fns, repeats=args.repeats, warmup=args.warmup)
        del fns, ours, theirs
        gc.collect()
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
        lora = clone().eval()
        inject(lora, LoRAConfig(r=args.ranks[0], alpha=2 * args.ranks[0], target_modules=TARGETS[family]))
        merged = clone().eval()
        inject(merged, LoRAConfig(r=args.ranks[0], alpha=2 * args.ranks[0], target_modules=TARGETS[family]))
        merge(merged)
        inf = args.timer({"base": infer(base.eval(), ids, False), "lora": infer(lora, ids, False),
                                  "merged": infer(merged, ids, False), "hf": infer(hf.eval(), ids, True)},
                                 repeats=args.repeats, warmup=args.warmup)
    rows = []
    for r in args.ranks:
        rows.append({"family": family, "r": r, "full ms (ours)": 1e3 * times["ours full"],
                     "LoRA ms (ours)": 1e3 * times[f"ours r={r}"],
                     "ratio ours": times[f"ours r={r}"] / times["ours full"],
                     "full ms (peft)": 1e3 * times["peft full"], "LoRA ms (peft)": 1e3 * times[f"peft r={r}"],
                     "ratio peft": times[f"peft r={r}"] / times["peft full"],
                     "ours / peft LoRA": times[f"ours r={r}"] / times[f"peft r={r}"]})
    infer_row = {"family": family, "base ms": 1e3 * inf["base"], "LoRA unmerged ms": 1e3 * inf["lora"],
                 "merged ms": 1e3 * inf["merged"], "merged / base": inf["merged"] / inf["base"],
                 "unmerged / base": inf["lora"] / inf["base"], "transformers base ms": 1e3 * inf["hf"]}
    return rows, infer_row


GOAL = "LoRA step <= 0.75 x full step (ours), ours faster than peft's LoRA step, merged inference <= 1.05 x base"


def goal_met(rows: list[dict], infer_rows: list[dict]) -> bool:
    return (all(r["ratio ours"] <= 0.75 and r["ours / peft LoRA"] < 1.0 for r in rows)
            and all(r["merged / base"] <= 1.05 for r in infer_rows))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers, width 128, vocab 2048, batch 2 x 128")
    parser.add_argument("--families", nargs="+", default=["gpt2", "llama"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: wall-clock, torch's thread count; cpu: process CPU time on 1 thread "
                             "(robust on a shared machine; CPU only)")
    # hidden: run the CUDA set-up (bf16, fused AdamW) on another device, to smoke-test it without a GPU
    parser.add_argument("--device", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = args.device.type == "cuda"
    args.dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    if cuda and args.clock == "cpu":
        parser.error("--clock cpu measures host CPU time, which says nothing about CUDA kernels; use --clock wall")
    args.timer = timeit_interleaved
    args.warmup = 2 if cuda else 1
    if args.clock == "cpu":
        torch.set_num_threads(1)
        args.timer = functools.partial(timeit_interleaved, clock=time.process_time)
    for k, v in (QUICK_SHAPES if args.quick else CUDA_SHAPES if cuda else CPU_SHAPES).items():
        setattr(args, k, v)
    args.ranks = [8, 64]
    warnings.filterwarnings("ignore")
    rows, infer_rows = [], []
    for family in args.families:
        r, i = bench_family(family, args)
        rows += r
        infer_rows.append(i)
    shapes = dict(layers=args.layers, width=args.width, vocab=args.vocab, batch=args.batch, seq=args.seq,
                  targets=TARGETS, optimizer="AdamW (fused)" if cuda else "AdamW", dropout=0.0)
    from tabulate import tabulate

    print(tabulate(infer_rows, headers="keys", floatfmt=".4g"), end="\n\n")
    report("lora_step-quick" if args.quick else "lora_step", rows, extra={
        "inference": infer_rows, "shapes": shapes, "repeats": args.repeats, "warmup": args.warmup,
        "clock": args.clock, "device": args.device.type, "dtype": str(args.dtype).removeprefix("torch."),
        "precision": "pure bf16: bf16 weights, adapters and AdamW states, no autocast" if args.dtype == torch.bfloat16
                     else "fp32", "goal": GOAL, "goal_met": goal_met(rows, infer_rows),
        "note": "medians of interleaved repeats; ratios are measured side by side in one run. The machine may be "
                "shared with other jobs: compare ratios, not absolute times."})


if __name__ == "__main__":
    main()
