"""Long context on one GPU: the chunked (fused linear) cross-entropy, activation offload and the tiled
MLP, side by side.

    .venv/bin/python -m bench.long_context [--quick]        # CPU: training-step ratios, chunk sizes
    .venv/bin/python -m bench.long_context --tiled [--quick]   # CPU: the tiled MLP's step time
    .venv/bin/python -m bench.long_context_gpu              # CUDA: the 8B shape at its predicted longest

CPU (issue 16's measured goals): a LoRA training step (r=8 all-linear, AdamW, built as
minilora.train builds it) of two small Llamas (MODELS: one whose head dominates, one with Llama 3
8B's proportions), each pair of variants timed interleaved in one run, one thread, CPU seconds:
  chunked / full loss   on text (every target learned, batch 4 x 256) and on the shipped instruction
                        data (prompts and padding ignored: 8% of the targets learned in the first 4
                        records); goal no slower (<= 1.0), which decides minilora.train's default
  offload / none        gradient checkpointing with and without ActivationOffload (host to host
                        on a CPU), head-heavy model; goal <= 1.1
  chunk sizes           the head and the loss alone (1024 tokens x width 256 -> 32,000), forward and
                        backward, per chunk size, over the full loss's time
  tiled / whole MLP     (--tiled, its own results file) every block's MLP over tiles of 128, 256 and
                        512 tokens over the MLP run whole, 8B proportions, batch 1 x 1024 tokens, the
                        chunked loss, with checkpointing and without; no goal: the recompute costs one
                        more MLP forward per step, the ratio says how much time that is

The GPU goals (the 8B shape at its predicted longest sequence, peak vs prediction, tokens/s) are
bench/long_context_gpu.py's.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench._harness import report, timeit_interleaved
from reference_models import Llama, LlamaConfig
from reference_models.loss import DEFAULT_LOSS_CHUNK, chunked_cross_entropy, lm_loss

# Two shapes: one whose head dominates (vocabulary / width 125: the head is 3/4 of the forward's
# FLOPs), the chunked loss's worst case; and Llama 3 8B's proportions at width 256 (vocabulary /
# width 31, 32 layers, MLP 3.5x: the head is 7% of the forward's FLOPs, as in the 8B).
MODELS = {
    "head-heavy": dict(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    "8B proportions": dict(vocab_size=8016, hidden_size=256, intermediate_size=896, num_hidden_layers=32,
                           num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=1024),
}
QUICK = {"head-heavy": dict(MODELS["head-heavy"], vocab_size=8000, hidden_size=128, intermediate_size=344,
                            num_hidden_layers=2)}
# One thread, timed in process CPU seconds: on this shared 2-core machine a 2-thread parallel region
# can stall for tens of milliseconds per op when others run, which punishes whichever variant has
# more ops (smaller chunks) by chance; one thread's CPU time barely depends on the other jobs.
CLOCK = time.process_time
INSTRUCTIONS = Path(__file__).resolve().parent.parent / "minilora" / "data" / "instruct_train.jsonl"


def build(model_kw: dict):
    """A LoRA model and its optimizer, as minilora.train builds them (CPU, fp32)."""
    from minilora.train import TrainConfig, build_model, make_optimizer

    cfg = TrainConfig(data="(bench)", method="lora", lora_r=8, lora_targets="all-linear", lr=1e-4, device="cpu")
    torch.manual_seed(0)
    model, _ = build_model(cfg, Llama(LlamaConfig(**model_kw)), torch.device("cpu"))
    return model, make_optimizer(cfg, [p for p in model.parameters() if p.requires_grad], torch.device("cpu"))


def text_batch(vocab: int, batch: int, seq: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def instruction_batch(batch: int, max_seq: int):
    """The first `batch` records of the shipped instruction data, byte-tokenized and collated as
    minilora.train does (the loss covers only the responses)."""
    from minilora.train.data import collate, load_dataset
    from minilora.train.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("byte")
    data = load_dataset(str(INSTRUCTIONS), tokenizer, max_seq, None)
    return collate(data.examples[:batch], tokenizer.pad_id)


def step_fn(model, optimizer, x, y, loss: str, offload=None, checkpointing: bool = False, mlp_tile=None):
    def step():
        model.set_loss(loss)
        model.set_gradient_checkpointing(checkpointing or offload is not None, offload=offload)
        model.set_mlp_tiling(mlp_tile)
        optimizer.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        optimizer.step()
    return step


def loss_ratios(name: str, model_kw: dict, batch: int, seq: int, repeats: int) -> list[dict]:
    """chunked / full loss on text (every target learned) and on the shipped instruction data."""
    model, optimizer = build(model_kw)
    rows = []
    batches = {"text": text_batch(model_kw["vocab_size"], batch, seq), "instructions": instruction_batch(batch, 512)}
    for data, (x, y) in batches.items():
        t = timeit_interleaved({"full": step_fn(model, optimizer, x, y, "full"),
                                "chunked": step_fn(model, optimizer, x, y, "chunked")}, repeats=repeats, clock=CLOCK)
        rows.append({"pair": "chunked / full loss", "model": name, "data": data,
                     "tokens": f"{x.shape[0]} x {x.shape[1]}", "learned": round(float((y != -100).float().mean()), 3),
                     "a_s": t["chunked"], "b_s": t["full"], "ratio": t["chunked"] / t["full"], "goal": "<= 1.0"})
    return rows


def offload_ratio(name: str, model_kw: dict, batch: int, seq: int, repeats: int) -> dict:
    """Checkpointing with ActivationOffload (host to host here) over checkpointing alone."""
    from minilora.train import ActivationOffload

    model, optimizer = build(model_kw)
    x, y = text_batch(model_kw["vocab_size"], batch, seq)
    offload = ActivationOffload("cpu")
    t = timeit_interleaved({"none": step_fn(model, optimizer, x, y, "full", checkpointing=True),
                            "offload": step_fn(model, optimizer, x, y, "full", offload=offload)}, repeats=repeats,
                           clock=CLOCK)
    return {"pair": "offload / checkpointing alone", "model": name, "data": "text",
            "tokens": f"{x.shape[0]} x {x.shape[1]}", "learned": 1.0, "a_s": t["offload"], "b_s": t["none"],
            "ratio": t["offload"] / t["none"], "goal": "<= 1.1"}


def tile_ratios(name: str, model_kw: dict, batch: int, seq: int, tiles: tuple, repeats: int) -> list[dict]:
    """Every block's MLP over tiles of each size, over the MLP run whole: with checkpointing (the MLP's
    forward runs three times instead of two) and without (twice instead of once)."""
    model, optimizer = build(model_kw)
    x, y = text_batch(model_kw["vocab_size"], batch, seq)
    rows = []
    for checkpointing in (True, False):
        t = timeit_interleaved({tile: step_fn(model, optimizer, x, y, "chunked", checkpointing=checkpointing,
                                              mlp_tile=tile) for tile in (None, *tiles)}, repeats=repeats, clock=CLOCK)
        rows += [{"pair": "tiled / whole MLP", "model": name, "checkpointing": checkpointing,
                  "tokens": f"{batch} x {seq}", "tile": tile, "a_s": t[tile], "b_s": t[None],
                  "ratio": t[tile] / t[None], "goal": "report"} for tile in tiles]
    return rows


def chunk_sizes(vocab: int, width: int, tokens: int, repeats: int) -> list[dict]:
    """Head + loss alone, forward and backward, per chunk size, over the full loss's time."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, tokens, width, generator=g)
    weight = torch.randn(vocab, width, generator=g) * width ** -0.5  # frozen, as under LoRA
    targets = torch.randint(0, vocab, (1, tokens), generator=g)

    def run(chunk):
        def fn():
            h = hidden.detach().requires_grad_()
            loss = (lm_loss(h @ weight.t(), targets) if chunk is None
                    else chunked_cross_entropy(h, weight, targets, chunk))
            loss.backward()
        return fn

    sizes = [c for c in (128, 256, 512, 1024, 2048) if c <= tokens]
    t = timeit_interleaved({"full": run(None), **{c: run(c) for c in sizes}}, repeats=repeats, clock=CLOCK)
    return [{"chunk": c, "seconds": t[c], "vs full": t[c] / t["full"],
             "fp32 chunk buffer MiB": c * vocab * 4 / 2 ** 20} for c in sizes]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller model and fewer repeats")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="torch threads (CPU seconds are meaningful with 1)")
    p.add_argument("--tiled", action="store_true", help="only the tiled MLP's ratios (long_context-tiled-*.json)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = QUICK if args.quick else MODELS
    repeats = args.repeats or (3 if args.quick else 7)
    if args.tiled:
        name, kw = ("head-heavy", QUICK["head-heavy"]) if args.quick else ("8B proportions", MODELS["8B proportions"])
        tiles = (64, 128) if args.quick else (128, 256, 512)
        rows = tile_ratios(name, kw, 1, 256 if args.quick else 1024, tiles, repeats)
        report("long_context-tiled" + ("-quick" if args.quick else ""), rows, extra={"model": kw})
        return 0
    seq = 128 if args.quick else 256
    rows = [row for name, kw in models.items() for row in loss_ratios(name, kw, 4, seq, repeats)]
    first = next(iter(models))
    rows.append(offload_ratio(first, models[first], 4, seq, repeats))
    head = models[first]
    sweep = chunk_sizes(head["vocab_size"], head["hidden_size"], 512 if args.quick else 1024, repeats)
    print(json.dumps(sweep, indent=1))
    report("long_context" + ("-quick" if args.quick else ""), rows,
           extra={"models": models, "default_loss_chunk": DEFAULT_LOSS_CHUNK, "chunk_sizes": sweep})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
