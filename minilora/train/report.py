"""What a run prints and records: the opening line, a progress line per --log-every steps, and the
summary (summary.json and the closing lines). Nothing here touches tensors but to count them."""
from __future__ import annotations

import torch

__all__ = ["fmt_time", "headline", "progress_line", "summarize", "summary_text"]


def fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def headline(cfg, strategy, n_trainable: int, n_total: int, data, eval_set) -> str:
    line = (f"minilora.train: {cfg.method} | {n_trainable:,} trainable of {n_total:,} params "
            f"({100 * n_trainable / n_total:.2f}%) | {len(data):,} train examples"
            + (f", {len(eval_set):,} eval" if eval_set else "")
            + (f" ({data.dropped} records dropped: prompt longer than max_seq_len)" if data.dropped else "")
            + f" | device {strategy.device}")
    if strategy.env is not None:
        line += (f" | {strategy.name} on {strategy.world_size} x {strategy.device.type} ({strategy.env.backend}), "
                 f"{cfg.batch_size} x {strategy.world_size} x {cfg.grad_accum} sequences per step")
    return line


def progress_line(record: dict, steps: int, tokens_per_s: float, eta_s: float) -> str:
    grad_norm = record["grad_norm"]
    return (f"step {record['step']}/{steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e}"
            + (f" | grad norm {grad_norm:.3f}" if grad_norm is not None else "")
            + f" | {tokens_per_s:,.0f} tok/s | eta {fmt_time(eta_s)}")


def summarize(cfg, strategy, history, n_trainable, n_total, tokens, seconds, train_seconds, run_tokens) -> dict:
    """`tokens` and `seconds` cover the whole run (before a resume too); tokens/s is this session's
    tokens (every rank's) over its training time (`train_seconds`: eval and checkpoints excluded)."""
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    summary = {"method": cfg.method, "strategy": strategy.name, "world_size": strategy.world_size,
               "steps": cfg.steps, "trainable_params": n_trainable, "total_params": n_total,
               "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
               "tokens": tokens, "seconds": seconds,
               "tokens_per_s": run_tokens / train_seconds if train_seconds > 0 else None}
    if evals:
        summary.update(eval_loss_start=evals[0]["eval_loss"], eval_loss=evals[-1]["eval_loss"],
                       eval_ppl=evals[-1]["eval_ppl"])
    if torch.cuda.is_available():
        summary["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return summary


def summary_text(s: dict) -> str:
    lines = [f"done: {s['steps']} steps in {fmt_time(s['seconds'])} | {s['tokens']:,} tokens"
             + (f" | {s['tokens_per_s']:,.0f} tok/s" if s.get("tokens_per_s") else "")]
    if s["final_loss"] is not None:
        lines.append(f"train loss {s['first_loss']:.4f} -> {s['final_loss']:.4f}")
    if "eval_loss" in s:
        lines.append(f"eval loss {s['eval_loss_start']:.4f} -> {s['eval_loss']:.4f} | eval ppl {s['eval_ppl']:.3f}")
    lines.append(f"trainable {s['trainable_params']:,} of {s['total_params']:,} params ({s['method']})")
    if "peak_cuda_bytes" in s:
        lines.append(f"peak CUDA memory {s['peak_cuda_bytes'] / 2**20:,.0f} MiB")
    if s.get("saved"):
        lines.append(f"saved {s['saved']}")
    return "\n".join(lines)
