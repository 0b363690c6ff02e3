"""GPU presets and memory-size parsing ("24GB", "80 GiB", "rtx-4090").

GPU makers' "GB" are binary: an "80GB" A100 reports 81920 MiB, a "24GB" RTX 4090 24564 MiB. So
"24GB" here means 24 GiB (2**30 bytes), as nvidia-smi and torch.cuda report it. Prices and peak
dense bf16 TFLOPS are assumptions printed next to every cost estimate (on-demand cloud prices
vary by provider and month: pass --price to use your own). fp32 TFLOPS are the plain FP32 (CUDA
core) peak, what torch's fp32 matmuls use by default (torch.backends.cuda.matmul.allow_tf32 is
False); with TF32 enabled they run closer to half the bf16 peak.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["GPU", "GPUS", "parse_size", "gpu_from_text", "GiB", "MiB"]

GiB = 2 ** 30
MiB = 2 ** 20


@dataclass(frozen=True)
class GPU:
    name: str
    memory: int          # bytes
    bf16_tflops: float   # dense peak, no sparsity (fp16 for GPUs without bf16)
    price_per_hour: float  # USD, an assumed on-demand price
    fp32_tflops: float = 19.5  # dense FP32 peak without TF32 (datasheet)

    def tflops(self, dtype: str) -> float:
        """Peak dense TFLOPS for matmuls in `dtype` (fp16 and bf16 share the tensor-core peak)."""
        if dtype in ("fp32", "float32"):
            return self.fp32_tflops
        if dtype in ("bf16", "bfloat16", "fp16", "float16"):
            return self.bf16_tflops
        raise ValueError(f"dtype must be one of fp32, bf16, fp16, got {dtype!r}")


GPUS = {g.name: g for g in [
    GPU("t4", 16 * GiB, 65.0, 0.35, 8.1),
    GPU("rtx-3060", 12 * GiB, 51.0, 0.10, 12.7),
    GPU("rtx-3090", 24 * GiB, 71.0, 0.25, 35.6),
    GPU("rtx-4090", 24 * GiB, 165.0, 0.40, 82.6),
    GPU("a10g", 24 * GiB, 70.0, 1.00, 31.2),
    GPU("l4", 24 * GiB, 121.0, 0.70, 30.3),
    GPU("v100-16gb", 16 * GiB, 125.0, 0.90, 15.7),
    GPU("v100-32gb", 32 * GiB, 125.0, 1.20, 15.7),
    GPU("a6000", 48 * GiB, 155.0, 0.80, 38.7),
    GPU("l40s", 48 * GiB, 362.0, 1.00, 91.6),
    GPU("a100-40gb", 40 * GiB, 312.0, 1.30, 19.5),
    GPU("a100-80gb", 80 * GiB, 312.0, 1.80, 19.5),
    GPU("h100-80gb", 80 * GiB, 989.0, 2.50, 67.0),
    GPU("h200", 141 * GiB, 989.0, 3.50, 67.0),
]}

_UNITS = {"": GiB, "g": GiB, "gb": GiB, "gib": GiB, "m": MiB, "mb": MiB, "mib": MiB,
          "t": 1024 * GiB, "tb": 1024 * GiB, "tib": 1024 * GiB}


_SIZE = re.compile(r"\s*([-+]?[0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*")


def parse_size(text: str) -> int:
    """"24GB" / "24 GiB" / "24" (GiB) / "16000MiB" -> bytes (binary units, see module docstring)."""
    m = _SIZE.fullmatch(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size: use e.g. 24GB, 80GiB, 16000MiB")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise ValueError(f"memory size must be > 0, got {text!r}: use e.g. 24GB, 80GiB, 16000MiB")
    return int(value)


def gpu_from_text(text: str) -> GPU:
    """A preset name (rtx-4090, a100-40gb, ...) or a size ("24GB") -> GPU."""
    key = str(text).strip().lower()
    if key in GPUS:
        return GPUS[key]
    m = _SIZE.fullmatch(key)
    if not m or m.group(2) not in _UNITS:  # neither a name nor a size: say both are possible
        raise ValueError(f"unknown GPU {text!r}: use a size such as 24GB or one of {', '.join(GPUS)}")
    size = parse_size(text)  # a size: its own error (a size of 0 is no unknown GPU)
    a100 = GPUS["a100-80gb"]  # a bare size: assume an A100's speed and price
    return GPU(f"{size / GiB:g} GiB GPU", size, a100.bf16_tflops, a100.price_per_hour, a100.fp32_tflops)
