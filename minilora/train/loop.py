"""Fine-tune a reference model: full, LoRA or QLoRA, with exact resume. `python -m minilora.train --help`.

One step, as written out in `train()`:

    lr = schedule(step)                        linear warmup, then cosine down to lr * min_lr_ratio
    for each of grad_accum micro-batches:
        loss_i = CE(model(x_i), y_i)           mean over the micro-batch's learned tokens (fp32)
        (loss_i * n_i / N).backward()          token-weighted: the step's loss is the mean over all
                                               N learned tokens, however they split into micro-batches
    clip_grad_norm_(trainable, clip)
    optimizer.step(); zero_grad()

Checkpoints hold only what changes: the trainable tensors (the adapter for LoRA/QLoRA, every
weight for full fine-tuning), the optimizer state, the RNG states, the data position and the step.
All of it is safetensors + JSON (never pickle), each file written atomically, and `latest.json`
is written last, so a crash mid-save leaves the previous checkpoint valid. Resuming restores all
of it, so an interrupted run ends bit-identical to an uninterrupted one (CPU, or CUDA with
deterministic kernels).
"""
from __future__ import annotations

import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from reference_models.files import save_safetensors_atomic, write_json_atomic
from minilora.train.data import BatchSampler, Dataset, collate, eval_batches, load_dataset
from minilora.train.tokenizer import load_tokenizer

__all__ = ["TrainConfig", "TrainResult", "train", "build_model", "evaluate", "lr_at", "main"]

METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "offload")
PRECISIONS = ("auto", "fp32", "bf16")
# Settings a checkpoint must share with the run that resumes it (others, e.g. logging, may change):
# everything that shapes the token stream (data, tasks, tokenizer, max_seq_len, eval_fraction, seed)
# or the update (lr schedule, clip, ...). check_resume_settings also refuses adding or dropping
# --eval-data when eval_fraction > 0 (without it, the eval split is carved out of --data).
_RESUME_KEYS = ("model", "data", "tokenizer", "method", "tasks", "max_seq_len", "batch_size",
                "grad_accum", "steps", "lr", "clip",
                "min_lr_ratio", "warmup_steps", "weight_decay", "optimizer", "offload_state_bits", "lora_r",
                "lora_alpha", "lora_dropout", "lora_targets", "quant_type", "quant_block_size",
                "double_quant", "seed", "eval_fraction")


@dataclass
class TrainConfig:
    """Every field is also a CLI flag (`lora_r` -> `--lora-r`); the help text lives in `_HELP`."""

    model: str = ""
    data: str = ""
    out: str = "runs/minilora"
    method: str = "lora"
    eval_data: str | None = None
    eval_fraction: float = 0.05
    tasks: list | None = None
    tokenizer: str | None = None
    max_seq_len: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    steps: int = 100
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.0
    clip: float = 1.0
    optimizer: str = "adamw"
    offload_state_bits: int = 32
    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    quant_type: str = "nf4"
    quant_block_size: int = 64
    double_quant: bool = True
    precision: str = "auto"
    grad_checkpointing: bool = False
    eval_every: int = 50
    eval_batches: int | None = None
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    save_final: bool = True
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    quiet: bool = False

    def validate(self) -> None:
        def need(ok, what):
            if not ok:
                raise ValueError(what)

        need(self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        need(self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        for name in ("max_seq_len", "batch_size", "grad_accum", "steps", "lora_r", "log_every"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1,
                 f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "keep_checkpoints"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)!r}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        need(0 <= self.eval_fraction < 1, f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        need(0 <= self.lora_dropout < 1, f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        need(self.clip >= 0, f"clip must be >= 0 (0 disables clipping), got {self.clip}")
        need(self.offload_state_bits in (8, 32), f"offload_state_bits must be 8 or 32, got {self.offload_state_bits}")
        need(self.eval_batches is None or (isinstance(self.eval_batches, int) and self.eval_batches >= 1),
             f"eval_batches must be an integer >= 1 (or unset for the whole eval set), got {self.eval_batches!r}")
        need(self.quant_type in ("nf4", "fp4"), f"quant_type must be nf4 or fp4, got {self.quant_type!r}")
        need(bool(self.data), "data is required (a .jsonl Alpaca file or a .txt corpus)")


@dataclass
class TrainResult:
    model: torch.nn.Module
    tokenizer: object
    summary: dict
    history: list = field(default_factory=list)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup over warmup_steps, then cosine from lr to lr * min_lr_ratio at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps - 1)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def _device(cfg: TrainConfig) -> torch.device:
    """auto, cpu, cuda or cuda:N only; a CUDA device must exist here (ValueError otherwise)."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(cfg.device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}") from exc
    if device.type == "cpu" and device.index is None:
        return device
    if device.type != "cuda":
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if not torch.cuda.is_available():
        raise ValueError(f"device {cfg.device!r} asked for, but CUDA is not available on this machine")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ValueError(f"device {cfg.device!r} asked for, but this machine has {count} CUDA device(s) "
                         f"(cuda:0 to cuda:{count - 1})")
    return device


def _autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on CUDA by default ("auto"); fp32 on CPU unless --precision bf16 asks for it."""
    use = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use)


def lora_config(cfg: TrainConfig):
    from minilora.lora.layer import LoRAConfig

    targets = cfg.lora_targets
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoRAConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, target_modules=targets)


def build_model(cfg: TrainConfig, model=None, device=None):
    """Load (or take) the base model and prepare it for cfg.method; returns (model, tokenizer).

    full: every parameter trains. lora: the base is frozen and adapters are injected.
    qlora: linear layers (not lm_head) become frozen 4-bit NF4/FP4, then adapters are injected.
    """
    device = device or _device(cfg)
    if model is None:
        import minilora.quant.qlora  # noqa: F401 (registers bitsandbytes' 4-bit format: 4-bit folders load too)
        from reference_models import load_pretrained

        if not cfg.model:
            raise ValueError("model is required: a folder with config.json and model.safetensors")
        if not (Path(cfg.model) / "config.json").is_file():
            raise ValueError(f"model must be a folder with config.json and *.safetensors, got {cfg.model!r}")
        model = load_pretrained(cfg.model, device=device)
    model.to(device)
    tok_spec = cfg.tokenizer
    if tok_spec is None:
        tok_spec = Path(cfg.model) if cfg.model and (Path(cfg.model) / "tokenizer.json").is_file() else "byte"
    tokenizer = load_tokenizer(tok_spec)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                         f"{model.config.vocab_size}; use a matching --tokenizer")
    if cfg.method == "full":
        model.requires_grad_(True)
        return model, tokenizer
    model.requires_grad_(False)
    if cfg.method == "qlora":
        from minilora.quant.qlora import prepare_for_kbit_training, quantize_model

        quantize_model(model, quant_type=cfg.quant_type, block_size=cfg.quant_block_size,
                       double_quant=cfg.double_quant)
        prepare_for_kbit_training(model, use_gradient_checkpointing=cfg.grad_checkpointing)
    from minilora.lora.model import inject

    inject(model, lora_config(cfg))
    return model, tokenizer


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
            with autocast if autocast is not None else torch.autocast(device.type, enabled=False):
                _, loss = model(x, y)
            n = int((y != -100).sum())
            total += float(loss) * n
            count += n
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


def _trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _make_optimizer(cfg: TrainConfig, params: list, device: torch.device):
    if cfg.optimizer == "offload":
        from minilora.optim.offload import CPUOffloadAdamW

        return CPUOffloadAdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, state_bits=cfg.offload_state_bits)
    # fused AdamW on CUDA (one kernel for all tensors); the default foreach path on CPU.
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type == "cuda" or None)


# --- checkpoints: nested state -> (tensors for safetensors, a JSON skeleton) --------------------

def _flatten(obj, prefix: str, tensors: dict):
    """Tensors go to `tensors` under a path key; the rest becomes JSON that marks where each went.
    Dicts keep non-string keys (optimizer state is keyed by int) and tuples stay tuples."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[k, _flatten(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        kind = "__tuple__" if isinstance(obj, tuple) else "__list__"
        return {kind: [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {prefix}")


def _unflatten(obj, tensors: dict):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: _unflatten(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_unflatten(v, tensors) for v in obj["__tuple__"])
        if "__list__" in obj:
            return [_unflatten(v, tensors) for v in obj["__list__"]]
    return obj


def _rng_state() -> object:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder: Path, model, optimizer, sampler: BatchSampler, cfg: TrainConfig, meta: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(_trainable(model), folder / "trainable.safetensors")
    tensors: dict = {}
    skeleton = _flatten({"optimizer": optimizer.state_dict(), "rng": _rng_state()}, "s", tensors)
    save_safetensors_atomic(tensors, folder / "state.safetensors")
    write_json_atomic(folder / "state.json", {"format": "minilora-train-checkpoint-1", "config": asdict(cfg),
                                              "sampler": sampler.state_dict(), "skeleton": skeleton, **meta})
    # The pointer goes last: until it is replaced, resume uses the previous complete checkpoint.
    write_json_atomic(folder.parent / "latest.json", {"step": meta["step"], "path": folder.name})
    return folder


def load_checkpoint(checkpoints: Path, model, optimizer, sampler: BatchSampler, cfg: TrainConfig) -> dict:
    from safetensors.torch import load_file

    folder = latest_checkpoint(checkpoints)
    try:
        state = json.loads((folder / "state.json").read_text())
        weights = load_file(str(folder / "trainable.safetensors"))
        tensors = load_file(str(folder / "state.safetensors"))
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"--resume: checkpoint in {checkpoints} is unreadable: {exc}") from exc
    check_resume_settings(state["config"], cfg)
    params = _trainable(model)
    if set(weights) != set(params):
        raise ValueError(f"--resume: checkpoint tensors {sorted(set(weights) ^ set(params))[:4]} do not match "
                         "this model's trainable parameters")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    restored = _unflatten(state["skeleton"], tensors)
    optimizer.load_state_dict(restored["optimizer"])
    sampler.load_state_dict(state["sampler"])
    _set_rng_state(restored["rng"])
    return state


def latest_checkpoint(checkpoints: Path) -> Path:
    """The checkpoint folder checkpoints/latest.json names (ValueError if there is none)."""
    pointer = checkpoints / "latest.json"
    if not pointer.is_file():
        raise ValueError(f"--resume: no checkpoint in {checkpoints} (latest.json is missing)")
    try:
        name = json.loads(pointer.read_text())["path"]
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"--resume: {pointer} is unreadable: {exc}") from exc
    return checkpoints / name


def check_resume_settings(saved: dict, cfg: TrainConfig, skip: tuple = ()) -> None:
    """Refuse to resume with any _RESUME_KEYS setting (but those in `skip`) changed from `saved`."""
    for key in _RESUME_KEYS:
        if key not in skip and saved.get(key) != getattr(cfg, key):
            raise ValueError(f"--resume: checkpoint was trained with {key}={saved.get(key)!r}, "
                             f"this run has {getattr(cfg, key)!r}")
    if bool(saved.get("eval_data")) != bool(cfg.eval_data) and cfg.eval_fraction > 0:
        raise ValueError(f"--resume: checkpoint was trained with eval_data={saved.get('eval_data')!r}, this run has "
                         f"{cfg.eval_data!r}: with eval_fraction={cfg.eval_fraction} that changes the training "
                         "examples (the eval split comes out of --data only without --eval-data)")


def check_fresh_out(cfg: TrainConfig) -> None:
    """A run without --resume that writes checkpoints refuses an OUT whose checkpoints/ already holds
    some (an earlier run's): it would mix, then prune, them. Resume, or pick a new or emptied --out."""
    checkpoints = Path(cfg.out) / "checkpoints"
    if cfg.resume or not cfg.save_every or not checkpoints.is_dir():
        return
    if (checkpoints / "latest.json").exists() or any(checkpoints.glob("step-*")):
        raise ValueError(f"{checkpoints} already holds checkpoints of an earlier run: continue it with "
                         "--resume, or use another --out (or delete that folder)")


def _step_number(folder: Path) -> int | None:
    try:
        return int(folder.name[len("step-"):])
    except ValueError:
        return None


def _prune_checkpoints(checkpoints: Path, keep: int, current: int | None = None) -> None:
    """Keep the newest `keep` checkpoints up to step `current` (0 keeps all).

    Only folders of lower step numbers are deleted, never the one latest.json names, and never
    later steps (a run resumed from an earlier checkpoint overwrites those as it reaches them)."""
    if keep <= 0:
        return
    try:
        protected = latest_checkpoint(checkpoints).name
    except ValueError:
        protected = None
    steps = sorted((n, f) for f in checkpoints.glob("step-*") if f.is_dir() and (n := _step_number(f)) is not None)
    if current is None:
        current = steps[-1][0] if steps else 0
    older = [(n, f) for n, f in steps if n <= current]
    for n, old in older[:-keep]:
        if n < current and old.name != protected:
            shutil.rmtree(old, ignore_errors=True)


# --- the loop ------------------------------------------------------------------------------------

def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _split_eval(cfg: TrainConfig, data: Dataset, tokenizer) -> tuple[Dataset, Dataset | None]:
    if cfg.eval_data:
        return data, load_dataset(cfg.eval_data, tokenizer, cfg.max_seq_len, cfg.tasks)
    n_eval = math.ceil(len(data) * cfg.eval_fraction) if cfg.eval_fraction > 0 else 0
    if n_eval == 0 or n_eval >= len(data):
        return data, None
    head = Dataset(data.examples[:-n_eval], data.path, data.kind, data.dropped)
    return head, Dataset(data.examples[-n_eval:], data.path + " (held out)", data.kind)


def train(cfg: TrainConfig, model=None, on_step=None) -> TrainResult:
    """Run cfg.steps optimizer steps (resuming from cfg.out/checkpoints when cfg.resume).

    `model`: an already built reference model to use instead of loading cfg.model.
    `on_step(record)`: called after each step's logging, eval and checkpoint, with the step's record.
    """
    cfg.validate()
    check_fresh_out(cfg)
    say = (lambda *a: None) if cfg.quiet else (lambda *a: print(*a, flush=True))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    device = _device(cfg)
    model, tokenizer = build_model(cfg, model, device)
    max_len = getattr(model, "max_len", None)
    if max_len is not None and cfg.max_seq_len > max_len:
        raise ValueError(f"max_seq_len={cfg.max_seq_len} exceeds the {max_len} positions this model has")
    data, eval_set = _split_eval(cfg, load_dataset(cfg.data, tokenizer, cfg.max_seq_len, cfg.tasks), tokenizer)
    if hasattr(model, "set_gradient_checkpointing"):
        model.set_gradient_checkpointing(cfg.grad_checkpointing)
    params = _trainable(model)
    if not params:
        raise ValueError("nothing to train: no parameter requires grad (check --lora-targets)")
    optimizer = _make_optimizer(cfg, list(params.values()), device)
    sampler = BatchSampler(len(data), cfg.batch_size, seed=cfg.seed)
    out = Path(cfg.out)
    checkpoints = out / "checkpoints"
    autocast = _autocast(cfg, device)
    history, start, tokens_seen, elapsed_before = [], 0, 0, 0.0
    if cfg.resume:
        state = load_checkpoint(checkpoints, model, optimizer, sampler, cfg)
        start, history = state["step"], state["history"]
        tokens_seen, elapsed_before = state["tokens_seen"], state["elapsed"]
        say(f"resumed from {checkpoints / ('step-%06d' % start)} at step {start}")
    n_trainable = sum(p.numel() for p in params.values())
    n_total = sum(p.numel() for p in model.parameters())
    say(f"minilora.train: {cfg.method} | {n_trainable:,} trainable of {n_total:,} params "
        f"({100 * n_trainable / n_total:.2f}%) | {len(data):,} train examples"
        + (f", {len(eval_set):,} eval" if eval_set else "")
        + (f" ({data.dropped} records dropped: prompt longer than max_seq_len)" if data.dropped else "")
        + f" | device {device}")
    first_eval = None
    if eval_set is not None and start == 0 and cfg.eval_every:
        first_eval = evaluate(model, eval_set, cfg.batch_size, tokenizer.pad_id, device, cfg.eval_batches, autocast)
        history.append({"step": 0, "eval_loss": first_eval["loss"], "eval_ppl": first_eval["ppl"]})
        say(f"eval step 0 | loss {first_eval['loss']:.4f} | ppl {first_eval['ppl']:.3f}")
    model.train()
    # tokens/s counts training compute only (eval and checkpoint time excluded); ETA uses wall time.
    t0, run_tokens, train_seconds = time.perf_counter(), 0, 0.0
    for step in range(start, cfg.steps):
        t_step = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [collate([data.examples[i] for i in sampler.next_indices()], tokenizer.pad_id)
                 for _ in range(cfg.grad_accum)]
        n_learned = sum(int((y != -100).sum()) for _, y in micro)
        step_loss = 0.0
        for x, y in micro:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                _, loss = model(x, y)
            weight = int((y != -100).sum()) / max(n_learned, 1)
            (loss * weight).backward()
            step_loss += float(loss.detach()) * weight
            run_tokens += int((x != tokenizer.pad_id).sum())
        grad_norm = None
        if cfg.clip > 0:
            clip = getattr(optimizer, "clip_grad_norm_", None)
            grad_norm = float(clip(cfg.clip) if clip else torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_seconds += time.perf_counter() - t_step
        done = step + 1
        elapsed = time.perf_counter() - t0
        record = {"step": done, "loss": step_loss, "lr": lr, "grad_norm": grad_norm}
        history.append(record)
        if done % cfg.log_every == 0 or done == cfg.steps:
            tok_s = run_tokens / max(train_seconds, 1e-9)
            eta = elapsed / (done - start) * (cfg.steps - done)
            say(f"step {done}/{cfg.steps} | loss {step_loss:.4f} | lr {lr:.2e}"
                + (f" | grad norm {grad_norm:.3f}" if grad_norm is not None else "")
                + f" | {tok_s:,.0f} tok/s | eta {_fmt_time(eta)}")
        if eval_set is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.steps):
            ev = evaluate(model, eval_set, cfg.batch_size, tokenizer.pad_id, device, cfg.eval_batches, autocast)
            record.update(eval_loss=ev["loss"], eval_ppl=ev["ppl"])
            say(f"eval step {done} | loss {ev['loss']:.4f} | ppl {ev['ppl']:.3f}")
        if cfg.save_every and (done % cfg.save_every == 0 or done == cfg.steps):
            meta = {"step": done, "history": history, "tokens_seen": tokens_seen + run_tokens,
                    "elapsed": elapsed_before + time.perf_counter() - t0}
            save_checkpoint(checkpoints / f"step-{done:06d}", model, optimizer, sampler, cfg, meta)
            _prune_checkpoints(checkpoints, cfg.keep_checkpoints, done)
        if on_step is not None:
            on_step(record)
    wall = time.perf_counter() - t0
    model.eval()
    summary = _summary(cfg, history, n_trainable, n_total, run_tokens, wall, train_seconds, tokens_seen, elapsed_before)
    if cfg.save_final:
        summary["saved"] = _save_final(cfg, model, out)
        write_json_atomic(out / "summary.json", {**summary, "config": asdict(cfg), "history": history})
    say(_summary_text(summary))
    return TrainResult(model, tokenizer, summary, history)


def _summary(cfg, history, n_trainable, n_total, run_tokens, wall, train_seconds, tokens_before, elapsed_before):
    losses = [h["loss"] for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    summary = {"method": cfg.method, "steps": cfg.steps, "trainable_params": n_trainable, "total_params": n_total,
               "first_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
               "tokens": tokens_before + run_tokens, "seconds": elapsed_before + wall,
               "tokens_per_s": run_tokens / train_seconds if train_seconds > 0 else None}
    if evals:
        summary.update(eval_loss_start=evals[0]["eval_loss"], eval_loss=evals[-1]["eval_loss"],
                       eval_ppl=evals[-1]["eval_ppl"])
    if torch.cuda.is_available():
        summary["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
    return summary


def _summary_text(s: dict) -> str:
    lines = [f"done: {s['steps']} steps in {_fmt_time(s['seconds'])} | {s['tokens']:,} tokens"
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


def _save_final(cfg: TrainConfig, model, out: Path) -> str:
    """LoRA/QLoRA: the adapter in peft's format (out/adapter); full: the whole model (out/model)."""
    if cfg.method == "full":
        from reference_models import save_pretrained

        save_pretrained(model, out / "model")
        return str(out / "model")
    from minilora.lora.peft_io import save_adapter

    save_adapter(model, out / "adapter")
    return str(out / "adapter")


# --- CLI -------------------------------------------------------------------------------------------

_HELP = {
    "model": "base model folder: config.json + model.safetensors (reference_models / transformers layout)",
    "data": "training data: .jsonl Alpaca records (instruction, input, output) or a .txt corpus",
    "out": "output folder: checkpoints/, adapter/ (lora, qlora) or model/ (full), summary.json",
    "method": "full: train every weight; lora: frozen base + adapters; qlora: 4-bit frozen base + adapters",
    "eval_data": "held-out data file (same kinds as --data); default: hold out --eval-fraction of --data",
    "eval_fraction": "fraction of --data held out for eval when --eval-data is not given (0 disables)",
    "tasks": "keep only JSONL records whose 'task' is one of these (comma-separated names)",
    "tokenizer": "'byte' (built-in UTF-8 bytes + BOS/EOS/PAD) or a tokenizer.json (file or folder); "
                 "default: the model folder's tokenizer.json if present, else byte",
    "max_seq_len": "tokens per sequence; longer Alpaca responses are cut, text is windowed",
    "batch_size": "sequences per micro-batch",
    "grad_accum": "micro-batches per optimizer step (loss is token-weighted across them)",
    "steps": "optimizer steps",
    "lr": "peak learning rate",
    "min_lr_ratio": "the cosine schedule ends at lr * min_lr_ratio",
    "warmup_steps": "linear warmup steps from lr/warmup_steps up to lr",
    "weight_decay": "AdamW decoupled weight decay",
    "clip": "clip the global gradient norm to this value (0 disables)",
    "optimizer": "adamw: torch.optim.AdamW; offload: minilora CPUOffloadAdamW (states on the host)",
    "offload_state_bits": "offload optimizer state precision: 32 or 8 (blockwise 8-bit)",
    "lora_r": "LoRA rank r",
    "lora_alpha": "LoRA alpha (scaling = alpha / r)",
    "lora_dropout": "dropout on the adapter input",
    "lora_targets": "modules to adapt: 'all-linear' or comma-separated names/suffixes, e.g. q_proj,v_proj",
    "quant_type": "qlora base weight format: nf4 or fp4",
    "quant_block_size": "qlora block size (values per absmax)",
    "double_quant": "qlora: quantize the absmax scales too (8-bit, blocks of 256)",
    "precision": "auto: bf16 autocast on CUDA, fp32 on CPU; fp32; bf16: autocast everywhere",
    "grad_checkpointing": "recompute each block's activations in backward (less memory, ~30%% more time)",
    "eval_every": "evaluate every N steps and at the end (0 disables eval)",
    "eval_batches": "limit each eval to N batches (default: the whole eval set)",
    "save_every": "write a checkpoint every N steps and at the end (0: no checkpoints); without --resume, "
                  "a run refuses an OUT whose checkpoints/ already holds an earlier run's checkpoints",
    "keep_checkpoints": "keep the newest N checkpoints of this run (0 keeps all); the one latest.json "
                        "names is never deleted",
    "resume": "continue from OUT/checkpoints/latest.json (same settings required); bit-exact",
    "save_final": "save the adapter (lora, qlora) or model (full) at the end",
    "log_every": "print a progress line every N steps",
    "seed": "seed for initialisation, data order and dropout",
    "device": "auto (cuda if available), cpu, cuda or cuda:N (the CUDA device must exist)",
    "quiet": "print nothing but errors",
}


class _Parser:
    """argparse, with errors as one line and exit status 2 (no usage block, no traceback)."""

    @staticmethod
    def build():
        import argparse

        class OneLine(argparse.ArgumentParser):
            def error(self, message):
                print(f"minilora.train: error: {message}", file=sys.stderr)
                raise SystemExit(2)

        p = OneLine(prog="python -m minilora.train", description=__doc__.splitlines()[0],
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        defaults = TrainConfig()
        for f in fields(TrainConfig):
            flag = "--" + f.name.replace("_", "-")
            default = getattr(defaults, f.name)
            kw = {"help": _HELP[f.name], "default": default}
            if f.name in ("method", "optimizer", "precision", "quant_type"):
                kw["choices"] = {"method": METHODS, "optimizer": OPTIMIZERS, "precision": PRECISIONS,
                                 "quant_type": ("nf4", "fp4")}[f.name]
            if isinstance(default, bool):
                kw["action"] = argparse.BooleanOptionalAction
            elif f.name == "tasks":
                kw["type"] = lambda s: [t for t in s.split(",") if t]
            elif isinstance(default, (int, float)) or f.name == "eval_batches":
                kw["type"] = float if isinstance(default, float) else int
            if f.name in ("model", "data"):
                kw["required"] = True
            p.add_argument(flag, **kw)
        return p


def main(argv=None) -> int:
    args = _Parser.build().parse_args(argv)
    cfg = TrainConfig(**vars(args))
    try:
        train(cfg)
    except KeyboardInterrupt:
        print("minilora.train: interrupted; continue with --resume (from the last checkpoint)", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        print(f"minilora.train: error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    except Exception as exc:  # a corrupt safetensors file raises the library's own error type
        if type(exc).__name__ in ("SafetensorError", "HeaderTooLarge"):
            print(f"minilora.train: error: unreadable safetensors file: {exc}".splitlines()[0], file=sys.stderr)
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
