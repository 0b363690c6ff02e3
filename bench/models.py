"""Reference models vs transformers: forward and forward+backward tokens/s, same shapes, same weights
(GPT-2, Llama and Qwen3).

    .venv/bin/python -m bench.models            # CPU: 4 layers, width 384, vocab 8192, batch 4 x 256, fp32
                                                # CUDA: 8 layers, width 2048, vocab 32000, batch 8 x 1024, bf16
    .venv/bin/python -m bench.models --quick    # small shapes, a few seconds
    .venv/bin/python -m bench.models --clock cpu  # 1 thread, CPU time: for a machine shared with others

Each pair (ours, transformers) runs interleaved in one process, so machine load slows both
alike; `ratio` is ours / transformers in tokens/s (> 1 means ours is faster). Both sides load the
same saved folder in the same dtype (fp32 on CPU, bf16 on CUDA) with SDPA attention.
"""
from __future__ import annotations

import argparse
import functools
import gc
import tempfile
import time

import torch

from bench._harness import report, timeit_interleaved

CPU_SHAPES = dict(layers=4, width=384, vocab=8192, batch=4, seq=256)
CUDA_SHAPES = dict(layers=8, width=2048, vocab=32000, batch=8, seq=1024)   # ~0.5B parameters, 8k tokens a step
QUICK_SHAPES = dict(layers=2, width=128, vocab=2048, batch=2, seq=64)
FAMILIES = ("gpt2", "llama", "qwen3")  # GPT-2 and LLaMA, and Qwen3 for the families of issue 14


def kv_heads(heads: int) -> int:
    """About a third of the query heads (grouped-query attention), and a divisor of them."""
    return max(d for d in range(1, max(1, heads // 3) + 1) if heads % d == 0)


def hf_model(family: str, width: int, layers: int, vocab: int, seq: int, dtype: torch.dtype):
    import transformers as tf

    if family == "gpt2":
        config = tf.GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=width, n_layer=layers,
                               n_head=width // 64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                               bos_token_id=0, eos_token_id=0)
    else:  # Llama, or Qwen3 (the same shapes plus its per-head q/k RMSNorms)
        cls = {"llama": tf.LlamaConfig, "qwen3": tf.Qwen3Config}[family]
        config = cls(vocab_size=vocab, hidden_size=width, intermediate_size=width * 8 // 3 // 64 * 64,
                     num_hidden_layers=layers, num_attention_heads=width // 64, head_dim=64,
                     num_key_value_heads=kv_heads(width // 64), max_position_embeddings=seq)
    torch.manual_seed(0)
    # built (randomly initialised) on the CPU in the benchmark's dtype, saved, then loaded by both sides
    return tf.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)


def bench_pair(family: str, args) -> list[dict]:
    import transformers as tf

    from reference_models import load_pretrained

    with tempfile.TemporaryDirectory() as folder:
        hf_model(family, args.width, args.layers, args.vocab, args.seq, args.dtype).save_pretrained(folder)
        # identical weights on both sides: the same files, the same dtype, the same device
        ours = load_pretrained(folder, dtype=args.dtype, device=args.device).train()
        hf = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=args.dtype,
                                                     attn_implementation="sdpa").to(args.device).train()
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    x = x.to(args.device)
    targets = torch.cat([x[:, 1:], torch.full((args.batch, 1), -100, device=x.device)], dim=1)  # HF's shift of labels=x

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
        # warm-up >= 2 on CUDA: the first calls pick cuBLAS / SDPA kernels and grow the caching allocator
        t = args.timer({"ours": make(ours, False), "transformers": make(hf, True)},
                       repeats=args.repeats, warmup=args.warmup)
        rows.append({"model": family, "mode": mode, "ours tok/s": tokens / t["ours"],
                     "transformers tok/s": tokens / t["transformers"], "ratio": t["transformers"] / t["ours"]})
        print(rows[-1], flush=True)
    del ours, hf
    gc.collect()
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2 layers, width 128, vocab 2048, batch 2 x 64")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5; 3 with --quick)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: wall-clock; cpu: process CPU time on 1 thread (robust on a shared machine; CPU only)")
    p.add_argument("--note", default="ours and transformers interleaved in one run; the load average at start is in machine.loadavg")
    # hidden: run the CUDA set-up (bf16) on another device, to smoke-test that path without a GPU
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.timer = timeit_interleaved
    if args.clock == "cpu":
        args.threads = 1
        args.timer = functools.partial(timeit_interleaved, clock=time.process_time)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = args.device.type == "cuda"
    if cuda and args.clock == "cpu":
        p.error("--clock cpu measures host CPU time, which says nothing about CUDA kernels; use --clock wall")
    args.dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    defaults = QUICK_SHAPES if args.quick else CUDA_SHAPES if cuda else CPU_SHAPES
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.warmup = 2 if cuda else 1
    rows = [row for family in args.families for row in bench_pair(family, args)]
    shapes = {k: getattr(args, k) for k in ("layers", "width", "vocab", "batch", "seq", "repeats")}
    shapes["llama"] = shapes["qwen3"] = ("intermediate 8/3 * width rounded to 64, heads width/64 (head_dim 64), "
                                         "kv heads: a divisor of heads near heads/3")
    report("models" + ("-quick" if args.quick else ""), rows, extra={
        "shapes": shapes, "note": args.note, "dtype": str(args.dtype).removeprefix("torch."),
        "device": args.device.type, "warmup": args.warmup, "attn": "sdpa", "clock": args.clock})


if __name__ == "__main__":
    main()
