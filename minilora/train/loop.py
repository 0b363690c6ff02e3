"""Fine-tune a reference model: full, LoRA or QLoRA, on one process or under DDP / FSDP2, with exact
resume. `python -m minilora.train --help`.

One step, as written out in `train_step()`:

    lr = schedule(step)                        linear warmup, then cosine down to lr * min_lr_ratio
    for each of grad_accum micro-batches:      (this rank's slice of the global batch)
        loss_i = CE(model(x_i), y_i)           mean over the micro-batch's learned tokens (fp32)
        (loss_i * n_i / N).backward()          token-weighted: the step's loss is the mean over all
                                               N learned tokens (of every rank), however they split
    clip_grad_norm_(trainable, clip)
    optimizer.step(); zero_grad()

What differs between one process, DDP and FSDP2 is behind a Strategy (strategy.py); the checkpoint
format is checkpoint.py's. Resuming restores the trainable tensors, the optimizer state, the RNG
states, the data position and the step, so an interrupted run ends bit-identical to an
uninterrupted one (CPU, or CUDA with deterministic kernels), on one process or several.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from minilora import distributed as D
from reference_models.files import write_json_atomic

from .build import autocast, build_model, make_optimizer
from .checkpoint import read_checkpoint, restore_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import IGNORE_INDEX, BatchSampler, Dataset, collate, eval_batches, load_dataset
from .offload_activations import ActivationOffload
from .report import headline, progress_line, summarize, summary_text
from .resume import check_fresh_out, check_resume_settings, latest_checkpoint, prune_checkpoints
from .strategy import Strategy

__all__ = ["TrainResult", "train", "train_distributed", "train_step", "compute_loss", "evaluate", "lr_at"]


@dataclass
class TrainResult:
    model: torch.nn.Module
    tokenizer: object
    summary: dict
    history: list = field(default_factory=list)


@dataclass
class Run:
    """Everything one run holds between steps."""

    cfg: TrainConfig
    strategy: Strategy
    model: torch.nn.Module        # wrapped for the strategy
    tokenizer: object
    data: Dataset
    eval_set: Dataset | None
    params: list
    optimizer: torch.optim.Optimizer
    sampler: BatchSampler
    history: list = field(default_factory=list)
    start: int = 0                # the first step this process runs (after a resume: the checkpoint's)
    tokens_before: int = 0        # tokens and seconds of the steps before the resume
    elapsed_before: float = 0.0
    tokens: int = 0               # tokens (every rank's) trained on by this process's steps
    train_seconds: float = 0.0    # time in train_step only: eval and checkpoints excluded
    t0: float = field(default_factory=time.perf_counter)

    @property
    def checkpoints(self) -> Path:
        return Path(self.cfg.out) / "checkpoints"

    def autocast(self):
        return autocast(self.cfg, self.strategy.device)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps - 1)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def compute_loss(model, x: torch.Tensor, y: torch.Tensor, autocast_context) -> torch.Tensor:
    """Mean cross-entropy over the learned tokens (targets != -100) of one batch, in fp32: the one
    place where training and evaluation compute the loss (full or chunked: the model's set_loss)."""
    with autocast_context:
        _, loss = model(x, y)  # x, y: (B, T); the model returns (logits, loss), or (None, loss) when chunked
    return loss


@torch.no_grad()
def evaluate(model, dataset: Dataset, batch_size: int, pad_id: int, device=None,
             max_batches: int | None = None, autocast=None) -> dict:
    """Token-weighted mean cross-entropy over the set, and its perplexity exp(loss)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y in eval_batches(dataset, batch_size, pad_id, max_batches):
            x, y = x.to(device), y.to(device)
            loss = compute_loss(model, x, y, autocast if autocast is not None else
                                torch.autocast(device.type, enabled=False))
            n = int((y != IGNORE_INDEX).sum())
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


def train_step(run: Run, step: int) -> tuple[dict, int]:
    """One optimizer step (see the module docstring); returns its record and the tokens it trained on."""
    cfg, strategy = run.cfg, run.strategy
    lr = lr_at(step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    mine = slice(strategy.rank * cfg.batch_size, (strategy.rank + 1) * cfg.batch_size)
    micro = [collate([run.data.examples[i] for i in run.sampler.next_indices()[mine]], run.tokenizer.pad_id)
             for _ in range(cfg.grad_accum)]
    n_learned, n_tokens = strategy.sum_over_ranks([sum(int((y != IGNORE_INDEX).sum()) for _, y in micro),
                                                   sum(int((x != run.tokenizer.pad_id).sum()) for x, _ in micro)])
    step_loss = 0.0
    for i, (x, y) in enumerate(micro):
        share = int((y != IGNORE_INDEX).sum()) / max(n_learned, 1)
        with strategy.no_sync(run.model, skip=i < len(micro) - 1):
            x, y = x.to(strategy.device, non_blocking=True), y.to(strategy.device, non_blocking=True)
            loss = compute_loss(run.model, x, y, run.autocast())
            # DDP and FSDP2 AVERAGE gradients over ranks; times world_size makes the step's gradient
            # that of the mean loss over all n_learned tokens of every rank (1 on one process).
            (loss * share * strategy.world_size).backward()
        step_loss += float(loss.detach()) * share
    grad_norm = strategy.clip_grad_norm_(run.optimizer, run.params, cfg.clip) if cfg.clip > 0 else None
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    (step_loss,) = strategy.sum_over_ranks([step_loss])
    return {"step": step + 1, "loss": step_loss, "lr": lr, "grad_norm": grad_norm}, int(n_tokens)


def prepare(cfg: TrainConfig, strategy: Strategy, model=None, say=print) -> Run:
    """Seed, build and wrap the model, load the data, make the optimizer; resume when cfg.resume."""
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    model, tokenizer = build_model(cfg, model, strategy.device)
    max_len = getattr(model, "max_len", None)
    if max_len is not None and cfg.max_seq_len > max_len:
        raise ValueError(f"max_seq_len={cfg.max_seq_len} exceeds the {max_len} positions this model has")
    data, eval_set = _datasets(cfg, tokenizer)
    _set_memory_switches(cfg, model, strategy.device)
    wrapped = strategy.wrap(model)  # FSDP2 shards every rank's own copy: all copies must be equal (one seed)
    if strategy.world_size > 1:
        torch.manual_seed(cfg.seed + strategy.rank)  # from here on (dropout) each rank draws its own numbers
    params = [p for p in wrapped.parameters() if p.requires_grad]
    if not params:
        raise ValueError("nothing to train: no parameter requires grad (check --lora-targets)")
    optimizer = make_optimizer(cfg, params, strategy.device)
    sampler = BatchSampler(len(data), cfg.batch_size * strategy.world_size, seed=cfg.seed)
    run = Run(cfg, strategy, wrapped, tokenizer, data, eval_set, params, optimizer, sampler)
    if cfg.resume:
        _resume(run, say)
    return run


def _set_memory_switches(cfg: TrainConfig, model, device: torch.device) -> None:
    """Gradient checkpointing (with the activation offload), the loss and the MLP tiling, as cfg says."""
    if hasattr(model, "set_gradient_checkpointing"):
        offload = ActivationOffload(device) if cfg.offload_activations else None
        model.set_gradient_checkpointing(cfg.grad_checkpointing, offload=offload)
    elif cfg.offload_activations:
        raise ValueError(f"offload_activations needs a reference model; {type(model).__name__} has no "
                         "set_gradient_checkpointing")
    if hasattr(model, "set_loss"):
        model.set_loss(cfg.loss, cfg.loss_chunk)
    elif cfg.loss != "full":
        raise ValueError(f"loss {cfg.loss!r} needs a reference model; {type(model).__name__} has no set_loss")
    if hasattr(model, "set_mlp_tiling"):
        model.set_mlp_tiling(cfg.mlp_tile or None)
    elif cfg.mlp_tile:
        raise ValueError(f"mlp_tile needs a reference model; {type(model).__name__} has no set_mlp_tiling")


def _datasets(cfg: TrainConfig, tokenizer) -> tuple[Dataset, Dataset | None]:
    """(train, eval): --eval-data, or the last --eval-fraction of --data held out (None: no eval)."""
    data = load_dataset(cfg.data, tokenizer, cfg.max_seq_len, cfg.tasks)
    if cfg.eval_data:
        return data, load_dataset(cfg.eval_data, tokenizer, cfg.max_seq_len, cfg.tasks)
    n_eval = math.ceil(len(data) * cfg.eval_fraction) if cfg.eval_fraction > 0 else 0
    if n_eval == 0 or n_eval >= len(data):
        return data, None
    head = Dataset(data.examples[:-n_eval], data.path, data.kind, data.dropped)
    return head, Dataset(data.examples[-n_eval:], data.path + " (held out)", data.kind)


def _resume(run: Run, say) -> None:
    folder = latest_checkpoint(run.checkpoints)
    checkpoint = read_checkpoint(folder, run.model, run.optimizer)
    state = checkpoint.state
    check_resume_settings(state, run.cfg, run.strategy.world_size)
    restore_checkpoint(checkpoint, run.model, run.optimizer)
    # the position is counted in examples, so it holds for any split of the global batch over ranks
    run.sampler.load_state_dict({**state["sampler"], "batch_size": run.sampler.batch_size})
    run.start, run.history = state["step"], state["history"]
    run.tokens_before, run.elapsed_before = state.get("tokens_seen", 0), state.get("elapsed", 0.0)
    moved = state["world_size"] != run.strategy.world_size
    say(f"resumed from {folder} at step {run.start}"
        + (f" (saved by {state['world_size']} ranks, now {run.strategy.world_size}: the RNG streams restart "
           "from the seed)" if moved else ""))


def _eval(run: Run, record: dict, say) -> None:
    # under FSDP2 every rank runs the whole eval set: its forward is collective
    cfg = run.cfg
    ev = evaluate(run.model, run.eval_set, cfg.batch_size, run.tokenizer.pad_id, run.strategy.device,
                  cfg.eval_batches, run.autocast())
    record.update(eval_loss=ev["loss"], eval_ppl=ev["ppl"])
    say(f"eval step {record['step']} | loss {ev['loss']:.4f} | ppl {ev['ppl']:.3f}")


def _after_step(run: Run, record: dict, say) -> None:
    """Log, evaluate and checkpoint on their cadences (each also at the last step)."""
    cfg, done = run.cfg, record["step"]
    last = done == cfg.steps
    if done % cfg.log_every == 0 or last:
        eta = (time.perf_counter() - run.t0) / (done - run.start) * (cfg.steps - done)
        say(progress_line(record, cfg.steps, run.tokens / max(run.train_seconds, 1e-9), eta))
    if run.eval_set is not None and cfg.eval_every and (done % cfg.eval_every == 0 or last):
        _eval(run, record, say)
    if cfg.save_every and (done % cfg.save_every == 0 or last):
        state = {"step": done, "global_batch": run.sampler.batch_size, "strategy": run.strategy.name,
                 "config": asdict(cfg), "sampler": run.sampler.state_dict(), "history": run.history,
                 "tokens_seen": run.tokens_before + run.tokens,
                 "elapsed": run.elapsed_before + time.perf_counter() - run.t0}
        save_checkpoint(run.checkpoints / f"step-{done:06d}", run.model, run.optimizer, state)
        if run.strategy.is_main:
            prune_checkpoints(run.checkpoints, cfg.keep_checkpoints, done)
        run.strategy.barrier()


def train(cfg: TrainConfig, model=None, on_step=None, env: D.DistEnv | None = None) -> TrainResult:
    """Run cfg.steps optimizer steps (resuming from cfg.out/checkpoints when cfg.resume).

    `model`: an already built reference model to use instead of loading cfg.model.
    `on_step(record)`: called after each step's logging, eval and checkpoint, with the step's record.
    `env`: the process group to run cfg.strategy on (default: joined from torchrun's variables).
    """
    cfg.validate()
    check_fresh_out(cfg)
    strategy = Strategy.start(cfg, env)
    say = (lambda line: print(line, flush=True)) if strategy.is_main and not cfg.quiet else (lambda line: None)
    run = prepare(cfg, strategy, model, say)
    n_trainable = sum(p.numel() for p in run.params)
    n_total = sum(p.numel() for p in D.unwrap(run.model).parameters())
    say(headline(cfg, strategy, n_trainable, n_total, run.data, run.eval_set))
    if run.eval_set is not None and run.start == 0 and cfg.eval_every:
        run.history.append({"step": 0})
        _eval(run, run.history[-1], say)
    run.model.train()
    run.t0 = time.perf_counter()
    for step in range(run.start, cfg.steps):
        t_step = time.perf_counter()
        record, tokens = train_step(run, step)
        run.train_seconds += time.perf_counter() - t_step
        run.tokens += tokens
        run.history.append(record)
        _after_step(run, record, say)
        if on_step is not None:
            on_step(record)
    wall = time.perf_counter() - run.t0
    run.model.eval()
    summary = summarize(cfg, strategy, run.history, n_trainable, n_total, run.tokens_before + run.tokens,
                        run.elapsed_before + wall, run.train_seconds, run.tokens)
    if cfg.save_final:
        summary["saved"] = _save_final(cfg, run.model)
        if strategy.is_main:
            write_json_atomic(Path(cfg.out) / "summary.json", {**summary, "config": asdict(cfg), "history": run.history})
    say(summary_text(summary))
    return TrainResult(D.unwrap(run.model), run.tokenizer, summary, run.history)


def _save_final(cfg: TrainConfig, model) -> str:
    """LoRA/QLoRA: the adapter in peft's format (out/adapter); full: the whole model (out/model)."""
    if cfg.method == "full":
        D.save_pretrained_sharded(model, Path(cfg.out) / "model")
        return str(Path(cfg.out) / "model")
    D.save_adapter_sharded(model, Path(cfg.out) / "adapter")
    return str(Path(cfg.out) / "adapter")


def train_distributed(cfg: TrainConfig, strategy: str = "full_shard", model=None,
                      env: D.DistEnv | None = None) -> dict:
    """train() with cfg.strategy = `strategy` on every rank of a torchrun job; returns the summary
    (the same on every rank). cfg.batch_size is PER RANK: one step sees batch_size * world_size *
    grad_accum sequences, the ones a 1-rank run with batch_size * world_size sees."""
    return train(replace(cfg, strategy=strategy), model, env=env).summary
