"""Shared set-up for the experiments: the pretrained base, fine-tuning runs and evaluation, results.

Threads: on a CPU shared with other jobs, PyTorch's default of one OpenMP thread per core spins
against the other jobs; measured here under load, 1 thread ran a 4-layer step 16x faster than 2.
The experiments therefore default to --threads 1 (their results do not depend on speed, except
merged_vs_unmerged, which reports ratios measured side by side).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "minilora" / "data"
WORK = ROOT / "build" / "experiments"          # models and runs (git-ignored)
BASE = WORK / "pretrain" / "model"             # the pretrained base every experiment starts from
RESULTS = ROOT / "bench" / "results"

# The instruction eval is cut to a fixed number of records so every run evaluates the same tokens.
INSTRUCT_SEQ = 320   # the Alpaca prompt alone is ~190 bytes; responses are up to ~50
TEXT_SEQ = 256


def parse(description: str, extra=None):
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see bench/experiments/_common.py)")
    ap.add_argument("--quick", action="store_true", help="fewer steps and points: a smoke run, not the results")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps per run (default per experiment)")
    if extra:
        extra(ap)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global QUICK
    QUICK = args.quick
    return args


QUICK = False  # --quick runs write exp-<name>-quick-<machine>.* so they never overwrite the results


def ensure_base():
    if not (BASE / "config.json").is_file():
        from bench.experiments import pretrain

        print(f"no pretrained base at {BASE}: running the pretraining script first")
        pretrain.run()
    return BASE


def finetune(name: str, method: str = "lora", lr: float = 1e-3, steps: int = 60, tasks=None, r: int = 8,
             alpha: float | None = None, targets: str = "all-linear", seed: int = 0, batch_size: int = 8):
    """One fine-tuning run of the base on the shipped instruction data; returns the TrainResult."""
    from minilora.train import TrainConfig, train

    cfg = TrainConfig(model=str(ensure_base()), data=str(DATA / "instruct_train.jsonl"), out=str(WORK / "runs" / name),
                      method=method, tasks=tasks, max_seq_len=INSTRUCT_SEQ, batch_size=batch_size, steps=steps,
                      lr=lr, warmup_steps=max(1, steps // 10), lora_r=r, lora_alpha=alpha if alpha else 2.0 * r,
                      lora_targets=targets, eval_every=0, eval_fraction=0, save_final=False, quiet=True,
                      seed=seed, log_every=10**9)
    return train(cfg)


_EVAL_CACHE: dict = {}


def eval_sets(n_instruct: int = 100):
    """(general text eval, instruction eval) datasets, byte tokenized."""
    from minilora.train.data import Dataset, load_dataset
    from minilora.train.tokenizer import ByteTokenizer

    key = n_instruct
    if key not in _EVAL_CACHE:
        tok = ByteTokenizer()
        text = load_dataset(DATA / "corpus_eval.txt", tok, TEXT_SEQ)
        inst = load_dataset(DATA / "instruct_eval.jsonl", tok, INSTRUCT_SEQ)
        inst = Dataset(inst.examples[:n_instruct], inst.path, inst.kind)
        _EVAL_CACHE[key] = (text, inst)
    return _EVAL_CACHE[key]


def task_set(task: str, n: int = 40):
    from minilora.train.data import Dataset, load_dataset
    from minilora.train.tokenizer import ByteTokenizer

    ds = load_dataset(DATA / "instruct_eval.jsonl", ByteTokenizer(), INSTRUCT_SEQ, tasks={task})
    return Dataset(ds.examples[:n], ds.path, ds.kind)


def ppl(model, dataset) -> float:
    from minilora.train import evaluate

    return evaluate(model, dataset, batch_size=16, pad_id=258)["ppl"]


def load_base():
    from reference_models import load_pretrained

    return load_pretrained(str(ensure_base()))


def write(name: str, rows: list[dict], conclusion: str, meta: dict | None = None, plot=None, results=None) -> None:
    """<results>/exp-<name>-<machine>.json (via the bench harness; default bench/results) + .md with the
    table and conclusion."""
    from tabulate import tabulate

    from bench._harness import machine_name, report
    from reference_models.files import write_text_atomic

    extra = {"conclusion": conclusion, "note": "numbers are losses/perplexities (load-independent) "
             "unless a column says seconds; the experiments ran while other jobs shared the 2-core CPU"}
    extra.update(meta or {})
    path = report(f"exp-{name}" + ("-quick" if QUICK else ""), rows, extra=extra, results=results)
    md = [f"# Experiment: {name}", "", f"Machine: {machine_name()} (see the JSON for versions).", ""]
    if meta:
        md += ["Settings: `" + json.dumps(meta, sort_keys=True) + "`", ""]
    md += [tabulate(rows, headers="keys", tablefmt="github", floatfmt=".4g"), "", "## Conclusion", "", conclusion, ""]
    write_text_atomic(path.with_suffix(".md"), "\n".join(md))
    print(f"wrote {path.with_suffix('.md')}")
    if plot is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib not installed: no PNG")
            return
        fig = plot(plt)
        fig.savefig(path.with_suffix(".png"), dpi=110, bbox_inches="tight")
        print(f"wrote {path.with_suffix('.png')}")


def fmt(x: float) -> float:
    return float(f"{x:.5g}") if math.isfinite(x) else x


@torch.no_grad()
def greedy_answer(model, record: dict, max_new_tokens: int = 48) -> str:
    """Greedy completion of an Alpaca prompt, cut at the first EOS."""
    from minilora.train.data import format_alpaca_prompt
    from minilora.train.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    idx = torch.tensor([tok.encode(format_alpaca_prompt(record), add_bos=True)])
    out = model.generate(idx, max_new_tokens, temperature=0)[0, idx.shape[1]:].tolist()
    if tok.eos_id in out:
        out = out[: out.index(tok.eos_id)]
    return tok.decode(out)


def eval_records(task: str, n: int) -> list[dict]:
    from minilora.train.data import read_alpaca_jsonl

    return read_alpaca_jsonl(DATA / "instruct_eval.jsonl", tasks={task})[:n]
