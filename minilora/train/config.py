"""TrainConfig: every setting of a training run (each one a flag of `python -m minilora.train`), its
validation, and which settings a checkpoint must share with the run that resumes it."""
from __future__ import annotations

from dataclasses import dataclass

from reference_models.loss import LOSSES, check_loss_chunk
from reference_models.tiled_mlp import check_mlp_tile

__all__ = ["TrainConfig", "METHODS", "OPTIMIZERS", "PRECISIONS", "QUANT_TYPES", "LOSSES", "RESUME_KEYS",
           "RESUME_DEFAULTS"]

METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "offload")
PRECISIONS = ("auto", "fp32", "bf16")
QUANT_TYPES = ("nf4", "fp4")
# Settings a checkpoint must share with the run that resumes it (others, e.g. logging, may change):
# everything that shapes the token stream (data, tasks, tokenizer, max_seq_len, eval_fraction, seed)
# or the update (lr schedule, clip, ...). The batch is compared as the global batch (batch_size x
# world size), so a run may resume on another number of processes; the strategy may change too.
# check_resume_settings also refuses adding or dropping --eval-data when eval_fraction > 0
# (without it, the eval split is carved out of --data).
RESUME_KEYS = ("model", "data", "tokenizer", "method", "tasks", "max_seq_len", "grad_accum", "steps", "lr", "clip",
               "min_lr_ratio", "warmup_steps", "weight_decay", "optimizer", "offload_state_bits", "lora_r",
               "lora_alpha", "lora_dropout", "lora_targets", "quant_type", "quant_block_size", "double_quant",
               "seed", "eval_fraction", "loss", "loss_chunk", "mlp_tile")
# What a checkpoint written before a RESUME_KEYS setting existed was trained with.
RESUME_DEFAULTS = {"loss": "full", "loss_chunk": None, "mlp_tile": 0}


@dataclass
class TrainConfig:
    """Every field is also a CLI flag (`lora_r` -> `--lora-r`); the help text lives in cli.HELP."""

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
    offload_activations: bool = False
    loss: str = "full"
    loss_chunk: int | None = None
    mlp_tile: int = 0
    eval_every: int = 50
    eval_batches: int | None = None
    save_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    save_final: bool = True
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    strategy: str = "none"
    quiet: bool = False

    def validate(self) -> None:
        from minilora.distributed import check_strategy

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
        need(self.quant_type in QUANT_TYPES, f"quant_type must be nf4 or fp4, got {self.quant_type!r}")
        self._validate_long_context()
        need(bool(self.data), "data is required (a .jsonl Alpaca file or a .txt corpus)")
        check_strategy(self.strategy, 1)  # the name only; the number of ranks is checked when the run starts
        need(self.optimizer == "adamw" or self.strategy == "none",
             f"optimizer must be 'adamw' under strategy {self.strategy!r}, got {self.optimizer!r} "
             "(CPUOffloadAdamW copies and frees each gradient in its accumulate hook, which may run before "
             "DDP/FSDP2 have reduced it; FSDP2's own CPUOffloadPolicy is the sharded alternative)")

    def _validate_long_context(self) -> None:
        """The loss, activation-offload and MLP-tiling settings, each refused with the value and what is allowed."""
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.loss_chunk is not None:
            check_loss_chunk(self.loss_chunk, self.max_seq_len, "loss_chunk")
            if self.loss != "chunked":
                raise ValueError(f"loss_chunk applies to loss 'chunked' only (the full loss has no chunks), "
                                 f"got loss {self.loss!r} with loss_chunk {self.loss_chunk}")
        if self.offload_activations and not self.grad_checkpointing:
            raise ValueError("offload_activations needs grad_checkpointing: it moves each block's checkpointed "
                             "input to the host, and without checkpointing blocks keep all their activations")
        tile = self.mlp_tile  # needs no checkpointing: without it each block's MLP keeps only its input
        if isinstance(tile, bool) or not isinstance(tile, int) or tile < 0:
            raise ValueError(f"mlp_tile must be 0 (off) or an integer >= 1 (tokens per tile), got {tile!r}")
        if tile:
            check_mlp_tile(tile, self.max_seq_len, "mlp_tile")
