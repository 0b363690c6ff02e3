"""A run's checkpoints folder (OUT/checkpoints): which checkpoint --resume continues (latest.json),
whether its settings allow an exact continuation, which old checkpoints to delete, and refusing to
start a fresh run over an earlier run's checkpoints."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .config import RESUME_DEFAULTS, RESUME_KEYS, TrainConfig

__all__ = ["latest_checkpoint", "check_resume_settings", "check_fresh_out", "prune_checkpoints"]


def latest_checkpoint(checkpoints: Path) -> Path:
    """The checkpoint folder checkpoints/latest.json names (ValueError if there is none)."""
    pointer = Path(checkpoints) / "latest.json"
    if not pointer.is_file():
        raise ValueError(f"--resume: no checkpoint in {checkpoints} (latest.json is missing)")
    try:
        name = json.loads(pointer.read_text())["path"]
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"--resume: {pointer} is unreadable: {exc}") from exc
    return Path(checkpoints) / name


def check_resume_settings(saved: dict, cfg: TrainConfig, world_size: int = 1) -> None:
    """Refuse to resume with a RESUME_KEYS setting, or the global batch, changed from the trainer
    state `saved` (the per-rank batch may change with the world size, their product may not)."""
    config = saved.get("config", {})
    for key in RESUME_KEYS:
        saved_value = config.get(key, RESUME_DEFAULTS.get(key))
        if saved_value != getattr(cfg, key):
            raise ValueError(f"--resume: checkpoint was trained with {key}={saved_value!r}, "
                             f"this run has {getattr(cfg, key)!r}")
    global_batch = cfg.batch_size * world_size
    if saved.get("global_batch") != global_batch:
        raise ValueError(f"--resume: checkpoint was trained with a global batch of {saved.get('global_batch')} "
                         f"sequences (batch_size x world_size), this run has {global_batch}; "
                         f"set --batch-size to {saved.get('global_batch')} / world_size")
    if bool(config.get("eval_data")) != bool(cfg.eval_data) and cfg.eval_fraction > 0:
        raise ValueError(f"--resume: checkpoint was trained with eval_data={config.get('eval_data')!r}, this run has "
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


def step_number(folder: Path) -> int | None:
    """N for a folder named step-N; None for any other name."""
    try:
        return int(folder.name[len("step-"):])
    except ValueError:
        return None


def prune_checkpoints(checkpoints: Path, keep: int, current: int | None = None) -> None:
    """Keep the newest `keep` checkpoints up to step `current` (0 keeps all).

    Only folders of lower step numbers are deleted, never the one latest.json names, and never
    later steps (a run resumed from an earlier checkpoint overwrites those as it reaches them)."""
    if keep <= 0:
        return
    try:
        protected = latest_checkpoint(checkpoints).name
    except ValueError:
        protected = None
    steps = sorted((n, f) for f in Path(checkpoints).glob("step-*") if f.is_dir() and (n := step_number(f)) is not None)
    if current is None:
        current = steps[-1][0] if steps else 0
    older = [(n, f) for n, f in steps if n <= current]
    for n, old in older[:-keep]:
        if n < current and old.name != protected:
            shutil.rmtree(old, ignore_errors=True)
