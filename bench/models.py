"""Reference models vs transformers: forward and forward+backward tokens/s, same shapes, same weights.

    .venv/bin/python -m bench.models            # 4 layers, width 384, vocab 8192, batch 4 x 256
    .venv/bin/python -m bench.models --quick    # small shapes, a few seconds

Each pair (ours, transformers) runs interleaved in one process, so machine load slows both
alike; `ratio` is ours / transformers in tokens/s (> 1 means ours is faster).
"""
from __future__ import annotations

import argparse
import tempfile

import torch

from bench._harness import report, timeit_interleaved


def hf_model(family: str, width: int, layers: int, vocab: int, seq: int):
    import transformers as tf

    if family == "gpt2":
        config = tf.GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=width, n_layer=layers,
                               n_head=width // 64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                               bos_token_id=0, eos_token_id=0)
    else:
        config = tf.LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=width * 8 // 3 // 64 * 64,
                                num_hidden_layers=layers, num_attention_heads=width // 64,
                                num_key_value_heads=max(1, width // 64 // 3), max_position_embeddings=seq)
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def bench_pair(family: str, args) -> list[dict]:
    from reference_models import load_pretrained

    hf = hf_model(family, args.width, args.layers, args.vocab, args.seq).train()
    with tempfile.TemporaryDirectory() as folder:
        hf.save_pretrained(folder)
        ours = load_pretrained(folder).train()  # identical weights
    x = torch.randint(0, args.vocab, (args.batch, args.seq))
    targets = torch.cat([x[:, 1:], torch.full((args.batch, 1), -100)], dim=1)  # what HF's shift makes of labels=x

    def fwd(model, is_hf):
        def run():
            with torch.no_grad():
                model(x).logits if is_hf else model(x)
        return run

    def fwd_bwd(model, is_hf):
        def run():
            loss = model(x, labels=x).loss if is_hf else model(x, targets)[1]
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    rows = []
    tokens = args.batch * args.seq
    for mode, make in (("forward", fwd), ("forward+backward", fwd_bwd)):
        t = timeit_interleaved({"ours": make(ours, False), "transformers": make(hf, True)},
                               repeats=args.repeats, warmup=1)
        rows.append({"model": family, "mode": mode, "ours tok/s": tokens / t["ours"],
                     "transformers tok/s": tokens / t["transformers"], "ratio": t["transformers"] / t["ours"]})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 layers, width 128, vocab 2048, batch 2 x 64")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--note", default="ours and transformers interleaved in one run; the load average at start is in machine.loadavg")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.layers, args.width, args.vocab, args.batch, args.seq, args.repeats = 2, 128, 2048, 2, 64, 3
    rows = bench_pair("gpt2", args) + bench_pair("llama", args)
    shapes = {k: getattr(args, k) for k in ("layers", "width", "vocab", "batch", "seq", "repeats")}
    shapes["llama"] = "intermediate 8/3 * width rounded to 64, heads width/64, kv heads heads/3"
    report("models" + ("-quick" if args.quick else ""), rows, extra={"shapes": shapes, "note": args.note,
                                                                     "dtype": "float32", "attn": "sdpa"})


if __name__ == "__main__":
    main()
