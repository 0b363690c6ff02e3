"""Training: one loop for one process and for DDP / FSDP2, and what it reads and writes.

    config.py      TrainConfig: every setting (each a flag), its validation, what resume compares
    build.py       the device, precision, model for the method (full, LoRA, QLoRA) and the optimizer
    strategy.py    what differs on one process, under DDP and under FSDP2
    loop.py        the step, evaluation and the loop: train(), train_distributed()
    offload_activations.py   ActivationOffload: checkpointed block inputs wait in (pinned) host memory
    checkpoint.py  the checkpoint format (one, resumable on any world size); legacy.py reads the
                   layouts before it; state.py its in-memory form and encodings
    resume.py      the checkpoints folder: latest.json, resume checks, pruning
    report.py      progress lines and the summary
    cli.py         `python -m minilora.train` (and `torchrun -m minilora.distributed`)
    data.py, tokenizer.py   Alpaca / text data and tokenizers

`python -m minilora.train --help` lists every flag."""
from .build import autocast, build_model, make_optimizer
from .checkpoint import load_checkpoint, save_checkpoint
from .cli import main
from .config import TrainConfig
from .loop import TrainResult, evaluate, lr_at, train, train_distributed
from .offload_activations import ActivationOffload

__all__ = ["TrainConfig", "TrainResult", "train", "train_distributed", "build_model", "make_optimizer", "autocast",
           "evaluate", "lr_at", "save_checkpoint", "load_checkpoint", "main", "ActivationOffload"]
