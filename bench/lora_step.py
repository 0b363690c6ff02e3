"""LoRA training step vs full fine-tuning step, ours (reference models) and peft (transformers twin).

For each family (GPT-2, Llama) one run times, interleaved: a full fine-tuning step, LoRA steps at
r=8 and r=64 (ours), the same three for transformers + peft on the same weights, and inference:
base model, LoRA unmerged, LoRA merged. Reported: each time and the ratios LoRA / full of the same
stack. The FLOP floor for LoRA / full is about 2/3 (backward skips the frozen weights' gradients).

    .venv/bin/python -m bench.lora_step            # 4 layers, width 384, vocab 8192, batch 4 x 256
    .venv/bin/python -m bench.lora_step --quick    # smaller shapes, for a smoke run
    .venv/bin/python -m bench.lora_step --clock cpu  # 1 thread, CPU time: for a machine shared with others
"""
from __future__ import annotations

import argparse
import functools
import tempfile
import time
import warnings

import torch

from bench._harness import report, timeit_interleaved
from minilora.lora import LoRAConfig
from minilora.lora_model import inject, merge
from reference_models import GPT, GPTConfig, Llama, LlamaConfig, save_pretrained

TARGETS = {"gpt2": ["c_attn", "c_proj"], "llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def build(family: str, layers: int, width: int, vocab: int, seq: int):
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT(GPTConfig(vocab_size=vocab, n_positions=seq, n_embd=width, n_layer=layers, n_head=width // 64,
                             embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0))
    return Llama(LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=width * 8 // 3 // 64 * 64,
                             num_hidden_layers=layers, num_attention_heads=width // 64,
                             num_key_value_heads=width // 64, max_position_embeddings=seq))


def hf_twin(model, folder):
    import transformers

    save_pretrained(model, folder)
    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa")


def train_step(model, ids, hf: bool):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)

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

    base = build(family, args.layers, args.width, args.vocab, args.seq)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        hf = hf_twin(base, tmp)
        fns = {}
        clone = lambda: build(family, args.layers, args.width, args.vocab, args.seq).train()  # noqa: E731
        fns["ours full"] = train_step(clone(), ids, hf=False)
        fns["peft full"] = train_step(hf_twin(base, tmp).train(), ids, hf=True)
        for r in args.ranks:
            ours = clone()
            inject(ours, LoRAConfig(r=r, alpha=2 * r, target_modules=TARGETS[family]))
            fns[f"ours r={r}"] = train_step(ours, ids, hf=False)
            theirs = get_peft_model(hf_twin(base, tmp), LoraConfig(r=r, lora_alpha=2 * r,
                                                                   target_modules=TARGETS[family])).train()
            fns[f"peft r={r}"] = train_step(theirs, ids, hf=True)
        times = args.timer(fns, repeats=args.repeats, warmup=1)
        del fns
        lora = clone().eval()
        inject(lora, LoRAConfig(r=args.ranks[0], alpha=2 * args.ranks[0], target_modules=TARGETS[family]))
        merged = clone().eval()
        inject(merged, LoRAConfig(r=args.ranks[0], alpha=2 * args.ranks[0], target_modules=TARGETS[family]))
        merge(merged)
        inf = args.timer({"base": infer(base.eval(), ids, False), "lora": infer(lora, ids, False),
                                  "merged": infer(merged, ids, False), "hf": infer(hf.eval(), ids, True)},
                                 repeats=args.repeats, warmup=1)
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
                 "transformers base ms": 1e3 * inf["hf"]}
    return rows, infer_row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 layers, width 128, vocab 2048, batch 2 x 128")
    parser.add_argument("--families", nargs="+", default=["gpt2", "llama"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: wall-clock, torch's thread count; cpu: process CPU time on 1 thread "
                             "(robust on a shared machine)")
    args = parser.parse_args(argv)
    args.timer = timeit_interleaved
    if args.clock == "cpu":
        torch.set_num_threads(1)
        args.timer = functools.partial(timeit_interleaved, clock=time.process_time)
    if args.quick:
        args.layers, args.width, args.vocab, args.batch, args.seq, args.ranks = 2, 128, 2048, 2, 128, [8, 64]
    else:
        args.layers, args.width, args.vocab, args.batch, args.seq, args.ranks = 4, 384, 8192, 4, 256, [8, 64]
    warnings.filterwarnings("ignore")
    rows, infer_rows = [], []
    for family in args.families:
        r, i = bench_family(family, args)
        rows += r
        infer_rows.append(i)
    shapes = dict(layers=args.layers, width=args.width, vocab=args.vocab, batch=args.batch, seq=args.seq,
                  targets=TARGETS, optimizer="AdamW", dropout=0.0)
    from tabulate import tabulate

    print(tabulate(infer_rows, headers="keys", floatfmt=".4g"), end="\n\n")
    report("lora_step-quick" if args.quick else "lora_step", rows, extra={
        "inference": infer_rows, "shapes": shapes, "repeats": args.repeats, "clock": args.clock,
        "note": "medians of interleaved repeats; ratios are measured side by side in one run. The machine may be "
                "shared with other jobs: compare ratios, not absolute times."})


if __name__ == "__main__":
    main()
