"""Training throughput: minilora LoRA vs peft + transformers, same model shapes, weights and data.

    python -m bench.train_throughput [--quick] [--threads N] [--repeats 5]

For each family (GPT-2 and Llama shapes), one transformers model with random weights is saved and
loaded by both sides, so the two train identical networks: transformers + peft (LoraConfig) and
reference_models + minilora.inject, LoRA r=8 alpha=16 on the same modules, dropout 0, fp32, SDPA
attention, torch.optim.AdamW over the adapter parameters. One step = forward, loss, backward,
optimizer step, zero_grad; steps are timed interleaved (round robin) and we report the median.
Batches are windows of the shipped corpus (byte ids).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from bench._harness import report, timeit_interleaved

DATA = Path(__file__).resolve().parent.parent / "minilora" / "data" / "corpus_train.txt"


def shapes(quick: bool):
    if quick:
        return {"gpt2": dict(n_embd=128, n_layer=2, n_head=4, vocab=1024, batch=4, seq=128),
                "llama": dict(n_embd=128, n_layer=2, n_head=4, vocab=1024, batch=4, seq=128)}
    return {"gpt2": dict(n_embd=384, n_layer=4, n_head=6, vocab=8192, batch=4, seq=256),
            "llama": dict(n_embd=384, n_layer=4, n_head=6, vocab=8192, batch=4, seq=256)}


def hf_model(family: str, s: dict):
    import transformers as tf

    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=s["vocab"], n_positions=s["seq"], n_embd=s["n_embd"], n_layer=s["n_layer"],
                            n_head=s["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        targets = ["c_attn", "c_proj"]
    else:
        cfg = tf.LlamaConfig(vocab_size=s["vocab"], hidden_size=s["n_embd"], intermediate_size=4 * s["n_embd"],
                             num_hidden_layers=s["n_layer"], num_attention_heads=s["n_head"],
                             num_key_value_heads=s["n_head"], max_position_embeddings=s["seq"], tie_word_embeddings=False)
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    torch.manual_seed(0)
    cfg._attn_implementation = "sdpa"
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32), targets


def batch(s: dict):
    ids = torch.tensor(list(DATA.read_bytes()[: s["batch"] * (s["seq"] + 1)]), dtype=torch.long)
    ids = ids.view(s["batch"], s["seq"] + 1)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()  # (B, T) each


def step_fn(forward, params):
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        loss = forward()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--repeats", type=int, default=5, help="timed steps per side (median reported)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from peft import LoraConfig, get_peft_model

    from minilora.lora import LoRAConfig
    from minilora.lora_model import inject
    from reference_models import load_pretrained

    rows = []
    for family, s in shapes(args.quick).items():
        hf, targets = hf_model(family, s)
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp, safe_serialization=True)
            ours = load_pretrained(tmp)
        ours.requires_grad_(False)
        inject(ours, LoRAConfig(r=8, alpha=16, target_modules=targets))
        theirs = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                               fan_in_fan_out=family == "gpt2"))
        ours.train(); theirs.train()
        x, y = batch(s)
        steps = {
            "minilora": step_fn(lambda: ours(x, y)[1], [p for p in ours.parameters() if p.requires_grad]),
            "peft": step_fn(lambda: theirs(input_ids=x, labels=x).loss, [p for p in theirs.parameters() if p.requires_grad]),
        }
        t = timeit_interleaved(steps, repeats=args.repeats, warmup=1)
        tokens = s["batch"] * s["seq"]
        rows.append({"family": family, "shape": f"{s['n_layer']}L x {s['n_embd']}, vocab {s['vocab']}, "
                     f"batch {s['batch']}x{s['seq']}", "lora_targets": ",".join(targets),
                     "minilora_tok_s": round(tokens / t["minilora"]), "peft_tok_s": round(tokens / t["peft"]),
                     "speedup_minilora_vs_peft": round(t["peft"] / t["minilora"], 3)})
        print(rows[-1], flush=True)
    report("train_throughput", rows, extra={
        "note": "ratio measured interleaved in one run. Loss targets: "
                "minilora uses next-token targets y, transformers shifts labels=x internally (same tokens).",
        "repeats": args.repeats, "quick": args.quick})


if __name__ == "__main__":
    main()
