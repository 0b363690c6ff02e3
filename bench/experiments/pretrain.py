"""Pretrain the small byte-level Llama every experiment starts from, on the shipped corpus.

    python -m bench.experiments.pretrain [--steps 300] [--threads 1] [--out DIR]

The model: vocab 259 (bytes + BOS/EOS/PAD), width 128, 2 layers, 4 heads, SwiGLU 384, ~0.46M
parameters. Full training with minilora.train on minilora/data/corpus_train.txt, evaluated on
corpus_eval.txt; the result goes to build/experiments/pretrain/model (git-ignored) and the curve
(exp-pretrain-<machine>.json/.md) next to it, so the README's example leaves the checkout as it
was; `--out bench/results` replaces the committed curve.
"""
from __future__ import annotations

import torch

from bench.experiments._common import DATA, WORK, fmt, parse, write

CONFIG = dict(vocab_size=259, hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=4, max_position_embeddings=512, bos_token_id=256, eos_token_id=257)


def run(steps: int = 300, seed: int = 0, out: str = "pretrain"):
    from minilora.train import TrainConfig, train
    from reference_models import Llama, LlamaConfig, save_pretrained

    torch.manual_seed(seed)
    init = WORK / "init"
    save_pretrained(Llama(LlamaConfig(**CONFIG)), init)
    cfg = TrainConfig(model=str(init), data=str(DATA / "corpus_train.txt"), eval_data=str(DATA / "corpus_eval.txt"),
                      out=str(WORK / out), method="full", max_seq_len=256, batch_size=16, steps=steps,
                      lr=3e-3, warmup_steps=max(1, steps // 10), weight_decay=0.01, eval_every=max(1, steps // 5),
                      log_every=max(1, steps // 20), seed=seed)
    return train(cfg)


def main():
    args = parse(__doc__.splitlines()[0], extra=lambda ap: ap.add_argument(
        "--out", default=None, help="folder for the curve's JSON/MD/PNG (default: next to the model, under build/, "
                                    "git-ignored; bench/results replaces the committed one)"))
    steps = args.steps or (30 if args.quick else 300)
    # A quick run keeps its model apart, so it never replaces the base the experiments use.
    name = "pretrain-quick" if args.quick else "pretrain"
    result = run(steps, out=name)
    rows = [{"step": h["step"], "eval_loss": fmt(h["eval_loss"]), "eval_ppl": fmt(h["eval_ppl"])}
            for h in result.history if "eval_loss" in h]
    s = result.summary
    conclusion = (f"Pretrained {s['total_params']:,} parameters for {steps} steps ({s['tokens']:,} tokens, "
                  f"{s['seconds']:.0f} s): held-out byte perplexity {rows[0]['eval_ppl']} -> {rows[-1]['eval_ppl']} "
                  f"(a uniform guess over 259 ids is 259).")
    write("pretrain", rows, conclusion, meta={"model": CONFIG, "steps": steps, "tokens_per_s": s["tokens_per_s"]},
          plot=lambda plt: _plot(plt, result.history), results=args.out or WORK / name)


def _plot(plt, history):
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([h["step"] for h in history if "loss" in h], [h["loss"] for h in history if "loss" in h], label="train")
    ax.plot([h["step"] for h in history if "eval_loss" in h], [h["eval_loss"] for h in history if "eval_loss" in h],
            "o-", label="eval")
    ax.set_xlabel("step"); ax.set_ylabel("loss (nats/byte)"); ax.legend()
    return fig


if __name__ == "__main__":
    main()
