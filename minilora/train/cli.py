"""The command line of the training loop, shared by its two entry points:

    python -m minilora.train ...                                   --strategy none by default
    torchrun --nproc_per_node N -m minilora.distributed ...        --strategy full_shard by default

Every TrainConfig field is a flag (`lora_r` -> `--lora-r`), documented in HELP; errors are one line
on stderr and exit status 2 (no usage block, no traceback).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from minilora.distributed import STRATEGIES, shutdown

from .config import LOSSES, METHODS, OPTIMIZERS, PRECISIONS, QUANT_TYPES, TrainConfig
from .loop import train

__all__ = ["HELP", "ENTRY_POINTS", "build_parser", "main"]

HELP = {
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
    "batch_size": "sequences per micro-batch, per rank (a step sees batch-size x ranks x grad-accum)",
    "grad_accum": "micro-batches per optimizer step (loss is token-weighted across them)",
    "steps": "optimizer steps",
    "lr": "peak learning rate",
    "min_lr_ratio": "the cosine schedule ends at lr * min_lr_ratio",
    "warmup_steps": "linear warmup steps from lr/warmup_steps up to lr",
    "weight_decay": "AdamW decoupled weight decay",
    "clip": "clip the global gradient norm to this value (0 disables)",
    "optimizer": "adamw: torch.optim.AdamW; offload: minilora CPUOffloadAdamW (states on the host; "
                 "strategy none only)",
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
    "offload_activations": "with --grad-checkpointing: keep each block's checkpointed input in pinned host memory "
                           "between forward and backward, copied on side streams, prefetched one block ahead "
                           "(device memory holds two block inputs instead of one per layer)",
    "loss": "full: the (B, T, V) logits, then the cross-entropy; chunked: head and loss over chunks of tokens, "
            "recomputed in backward, so the logits never exist (same loss to fp32 rounding)",
    "loss_chunk": "with --loss chunked: learned tokens of the micro-batch per chunk, 1 to --max-seq-len "
                  "(default: reference_models.loss.DEFAULT_LOSS_CHUNK, 1024)",
    "mlp_tile": "run every block's MLP over tiles of N tokens of the micro-batch, 1 to --max-seq-len (0: off): "
                "forward keeps only the MLP's input, backward recomputes one tile at a time, so the MLP's "
                "(tokens, intermediate) tensors exist for one tile; with or without --grad-checkpointing",
    "eval_every": "evaluate every N steps and at the end (0 disables eval)",
    "eval_batches": "limit each eval to N batches (default: the whole eval set)",
    "save_every": "write a checkpoint every N steps and at the end (0: no checkpoints); without --resume, "
                  "a run refuses an OUT whose checkpoints/ already holds an earlier run's checkpoints",
    "keep_checkpoints": "keep the newest N checkpoints of this run (0 keeps all); the one latest.json "
                        "names is never deleted",
    "resume": "continue from OUT/checkpoints/latest.json (same settings and global batch required; "
              "any strategy and number of ranks); bit-exact on the same ranks",
    "save_final": "save the adapter (lora, qlora) or model (full) at the end",
    "log_every": "print a progress line every N steps",
    "seed": "seed for initialisation, data order and dropout",
    "device": "auto (cuda if available), cpu, cuda or cuda:N (the CUDA device must exist); under ddp and "
              "FSDP2: auto, cpu (gloo) or cuda (NCCL, each rank on cuda:LOCAL_RANK)",
    "strategy": "none: one process; ddp: replicate, all-reduce grads; full_shard: FSDP2, reshard after "
                "forward (ZeRO-3); shard_grad_op: FSDP2, params stay gathered until backward (ZeRO-2-like). "
                "Launch several ranks with torchrun",
    "quiet": "print nothing but errors",
}
CHOICES = {"method": METHODS, "optimizer": OPTIMIZERS, "precision": PRECISIONS, "quant_type": QUANT_TYPES,
           "strategy": STRATEGIES, "loss": LOSSES}
# entry point -> (program name in usage lines and errors, default strategy)
ENTRY_POINTS = {"minilora.train": ("python -m minilora.train", "none"),
                "minilora.distributed": ("torchrun --nproc_per_node N -m minilora.distributed", "full_shard")}


class OneLineParser(argparse.ArgumentParser):
    """argparse, with errors as one line naming the entry point, and exit status 2."""

    entry = "minilora.train"

    def error(self, message):
        print(f"{self.entry}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser(entry: str = "minilora.train") -> argparse.ArgumentParser:
    prog, strategy = ENTRY_POINTS[entry]
    p = OneLineParser(prog=prog, description="Fine-tune a reference model: full, LoRA or QLoRA, on one process "
                      "or under DDP / FSDP2, with exact resume.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.entry = entry
    defaults = TrainConfig(strategy=strategy)
    for f in fields(TrainConfig):
        default = getattr(defaults, f.name)
        kw = {"help": HELP[f.name], "default": default}
        if f.name in CHOICES:
            kw["choices"] = CHOICES[f.name]
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        elif f.name == "tasks":
            kw["type"] = lambda s: [t for t in s.split(",") if t]
        elif isinstance(default, (int, float)) or f.name in ("eval_batches", "loss_chunk"):
            kw["type"] = float if isinstance(default, float) else int
        if f.name in ("model", "data"):
            kw["required"] = True
        p.add_argument("--" + f.name.replace("_", "-"), **kw)
    return p


def main(argv=None, entry: str = "minilora.train") -> int:
    cfg = TrainConfig(**vars(build_parser(entry).parse_args(argv)))
    try:
        train(cfg)
    except KeyboardInterrupt:
        print(f"{entry}: interrupted; continue with --resume (from the last checkpoint)", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        print(f"{entry}: error: {exc}".splitlines()[0], file=sys.stderr)
        return 2
    except Exception as exc:  # a corrupt safetensors file raises the library's own error type
        if type(exc).__name__ in ("SafetensorError", "HeaderTooLarge"):
            print(f"{entry}: error: unreadable safetensors file: {exc}".splitlines()[0], file=sys.stderr)
            return 2
        raise
    finally:
        shutdown()  # leaves the process group train() joined for ddp / FSDP2 (nothing otherwise)
    return 0
