"""Training throughput: minilora LoRA vs peft + transformers, same model shapes, weights and data.

    python -m bench.train_throughput [--quick] [--threads N] [--repeats 5]

For each family (GPT-2 and Llama shapes), one transformers model with random weights is saved and
loaded by both sides, so the two train identical networks: transformers + peft (LoraConfig) and
reference_models + minilora.inject, LoRA r=8 alpha=16 on the same modules, dropout 0, SDPA
attention, torch.optim.AdamW over the adapter parameters. CPU: fp32, 4 layers x 384, batch 4 x 256.
CUDA: pure bf16 on both sides (bf16 weights and adapters: peft's autocast_adapter_dtype=False;
fused AdamW), 8 layers x 2048, vocab 32000, batch 8 x 1024. One step = forward, loss, backward,
optimizer step, zero_grad; steps are timed interleaved (round robin) and we report the median.
Batches are windows of the shipped corpus (byte ids).
"""
from __future__ import annotations

import argparse
import gc
import tempfile
from pathlib import Path

import torch

from bench._harness import report, timeit_interleaved

DATA = Path(__file__).resolve().parent.parent / "minilora" / "data" / "corpus_train.txt"


def shapes(quick: bool, cuda: bool = False):
    if quick:
        return {"gpt2": dict(n_embd=128, n_layer=2, n_head=4, vocab=1024, batch=4, seq=128),
                "llama": dict(n_embd=128, n_layer=2, n_head=4, vocab=1024, batch=4, seq=128)}
    if cuda:   # ~0.5-0.7B parameters, 8k tokens a step
        return {"gpt2": dict(n_embd=2048, n_layer=8, n_head=32, vocab=32000, batch=8, seq=1024),
                "llama": dict(n_embd=2048, n_layer=8, n_head=32, vocab=32000, batch=8, seq=1024)}
    return {"gpt2": dict(n_embd=384, n_layer=4, n_head=6, vocab=8192, batch=4, seq=256),
            "llama": dict(n_embd=384, n_layer=4, n_head=6, vocab=8192, batch=4, seq=256)}


def hf_model(family: str, s: dict, dtype=torch.float32):
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
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype), targets


def batch(s: dict):
    ids = torch.tensor(list(DATA.read_bytes()[: s["batch"] * (s["seq"] + 1)]), dtype=torch.long)
    ids = ids.view(s["batch"], s["seq"] + 1)
    return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()  # (B, T) each


def step_fn(forward, params, fused=None):
    opt = torch.optim.AdamW(params, lr=1e-4, fused=fused)

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
    # hidden: run the CUDA set-up (bf16) on another device, to smoke-test that path without a GPU
    ap.add_argument("--device", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    fused = True if cuda else None   # CPU: torch's default AdamW, as before
    warmup = 2 if cuda else 1        # CUDA: the first steps pick cuBLAS / SDPA kernels
    from peft import LoraConfig, get_peft_model

    from minilora.lora.layer import LoRAConfig
    from minilora.lora.model import inject
    from reference_models import load_pretrained

    rows = []
    for family, s in shapes(args.quick, cuda).items():
        hf, targets = hf_model(family, s, dtype)   # built on the CPU in `dtype`, then moved
        with tempfile.TemporaryDirectory() as tmp:
            hf.save_pretrained(tmp, safe_serialization=True)
            ours = load_pretrained(tmp, dtype=dtype, device=device)
        hf = hf.to(device)
        ours.requires_grad_(False)
        inject(ours, LoRAConfig(r=8, alpha=16, target_modules=targets))
        # autocast_adapter_dtype=False: bf16 adapters stay bf16 (as ours); no effect on fp32
        theirs = get_peft_model(hf, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                               fan_in_fan_out=family == "gpt2"), autocast_adapter_dtype=False)
        ours.train(); theirs.train()
        x, y = (t.to(device) for t in batch(s))
        steps = {
            "minilora": step_fn(lambda m=ours: m(x, y)[1], [p for p in ours.parameters() if p.requires_grad], fused),
            "peft": step_fn(lambda m=theirs: m(input_ids=x, labels=x).loss,
                            [p for p in theirs.parameters() if p.requires_grad], fused),
        }
        t = timeit_interleaved(steps, repeats=args.repeats, warmup=warmup)
        tokens = s["batch"] * s["seq"]
        rows.append({"family": family, "shape": f"{s['n_layer']}L x {s['n_embd']}, vocab {s['vocab']}, "
                     f"batch {s['batch']}x{s['seq']}", "lora_targets": ",".join(targets),
                     "minilora_tok_s": round(tokens / t["minilora"]), "peft_tok_s": round(tokens / t["peft"]),
                     "speedup_minilora_vs_peft": round(t["peft"] / t["minilora"], 3)})
        print(rows[-1], flush=True)
        del steps, ours, theirs, hf
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    report("train_throughput", rows, extra={
        "note": "ratio measured interleaved in one run. Loss targets: "
                "minilora uses next-token targets y, transformers shifts labels=x internally (same tokens).",
        "repeats": args.repeats, "warmup": warmup, "quick": args.quick, "device": device.type,
        "dtype": str(dtype).removeprefix("torch."), "optimizer": "AdamW (fused)" if fused else "AdamW"})


if __name__ == "__main__":
    main()
