"""4-bit quantization error: NF4 vs FP4 vs INT4 at block sizes 32..256, on Gaussian weights and on
weights of a small reference GPT trained here for a few hundred steps (byte-level, on the bundled
corpus), with minilora.quant.nf4.quantization_error.

    .venv/bin/python -m bench.quant_error            # 300 training steps
    .venv/bin/python -m bench.quant_error --quick    # 60 steps

Columns: mse, max_abs, mean_abs error, correlation of w with its round trip, bits per parameter
(no double quantization), and rel_mean_abs = mean |error| / mean |w| so that sources of different
scale compare. NF4 is built for normally distributed weights (equal-probability bins), so it
should beat FP4 and INT4 on the Gaussian source; trained weights show how much of that survives.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench._harness import report
from minilora.quant.nf4 import quantization_error

CORPUS = Path(__file__).resolve().parent.parent / "minilora" / "data" / "corpus_train.txt"


def trained_gpt_weights(steps: int, seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Train a 2-layer, 128-wide GPT on bytes of the bundled corpus; return its block linear
    weights flattened end to end (each has a multiple of 256 elements, so blocks never straddle
    two matrices), and how the training went."""
    from reference_models import GPT, GPTConfig

    torch.manual_seed(seed)
    data = torch.frombuffer(bytearray(CORPUS.read_bytes()), dtype=torch.uint8).long()
    config = GPTConfig(vocab_size=256, n_positions=128, n_embd=128, n_layer=2, n_head=4,
                       embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)
    model = GPT(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    t0, losses = time.perf_counter(), []
    for _ in range(steps):
        starts = torch.randint(0, data.numel() - 129, (16,))
        batch = torch.stack([data[s:s + 129] for s in starts])
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    weights = [m.weight.detach().reshape(-1) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("transformer.h.")]
    info = {"steps": steps, "loss_first": losses[0], "loss_last": sum(losses[-10:]) / min(10, len(losses)),
            "train_seconds": time.perf_counter() - t0, "params_quantized": sum(w.numel() for w in weights)}
    return torch.cat(weights), info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    steps = args.steps or (60 if args.quick else 300)
    torch.manual_seed(0)
    sources = {"gaussian randn(1024,1024)": torch.randn(1024, 1024),
               "student-t(df=4) 1024x1024 (heavy tails)": torch.distributions.StudentT(4.0).sample((1024, 1024))}
    trained, info = trained_gpt_weights(steps)
    sources[f"trained GPT block linears ({steps} steps)"] = trained
    rows = []
    for source, w in sources.items():
        scale = w.abs().mean().item()
        for row in quantization_error(w, ("nf4", "fp4", "int4"), (32, 64, 128, 256)):
            rows.append({"source": source, **row, "rel_mean_abs": row["mean_abs"] / scale})
    report("quant_error" + ("-quick" if args.quick else ""), rows, floatfmt=".5g",
           extra={"note": "error figures are deterministic (seeded); only train_seconds depends on the "
                          "machine (a shared, loaded 2-core CPU)", "training": info})


if __name__ == "__main__":
    main()
