"""Training: the loop (loop.py), data (data.py) and tokenizers (tokenizer.py).

`python -m minilora.train --help` lists every flag."""
from .loop import TrainConfig, TrainResult, build_model, evaluate, lr_at, main, train

__all__ = ["TrainConfig", "TrainResult", "train", "build_model", "evaluate", "lr_at", "main"]
