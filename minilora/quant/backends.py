"""How a quantization call runs: the `backend` argument, and the torch.compile'd paths behind it.

Two choices travel with each call, and neither is a module-global switch:

  * `kernel` ("auto" | "cpu" | "cuda" | "cuda-ieee", minilora/quant/bnb_cuda.py): WHICH bytes,
    i.e. which of bitsandbytes' kernels the rounding reproduces;
  * `backend` ("auto" | "eager" | "compiled", here): HOW they are computed. Every backend gives
    the same bytes for the same inputs (tested bit for bit), so the choice is about speed only.

"eager" is the readable reference: plain PyTorch ops, in chunks. "compiled" runs a function
through torch.compile where one exists for the call (see each function's docstring for its
coverage; the rest of that call runs eager). "auto" is eager today: the compiled dequantize did
not pay on an H100 (0.29 ms both ways at 4096 x 4096 fp32, 0.36 vs 0.29 ms in bf16: per-call
overhead dominates, not bytes), and the compiled CPU 8-bit encoder (3.5x faster on 2 cores)
compiles C++ for seconds on first use, so callers ask for it (CPUOffloadAdamW(fused=True)).
A backend that pays by default (a Triton dequantize on CUDA) enters `resolve_backend`'s "auto".

One cache holds the compiled functions (`COMPILED`), and one fallback serves them all: a path
torch.compile cannot build or run here (no C++ compiler, no Triton) warns once, is recorded in
`COMPILED.unavailable`, and its caller's eager path serves from then on.
"""
from __future__ import annotations

import warnings

import torch

__all__ = ["BACKENDS", "resolve_backend", "CompiledPaths", "COMPILED", "run_compiled"]

BACKENDS = ("auto", "eager", "compiled")


def resolve_backend(backend) -> str:
    """The backend a call runs ("eager" or "compiled"): cheap and deterministic, no measuring."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return "eager" if backend == "auto" else backend


class CompiledPaths:
    """torch.compile'd twins of eager functions, each built once (on first use) under a name.

    `run` returns fn(*args) through its compiled version, or None when that path cannot be built
    or run here: then one RuntimeWarning, the name goes into `unavailable`, and every later `run`
    of it returns None at once, so the caller's eager path (the same bits) serves."""

    def __init__(self):
        self.built: dict[str, object] = {}
        self.unavailable: set[str] = set()  # names of the paths that fell back to eager, a record

    def run(self, name: str, fn, *args, dynamic: bool):
        if name in self.unavailable:
            return None
        try:
            if name not in self.built:
                self.built[name] = torch.compile(fn, dynamic=dynamic, fullgraph=True)
            return self.built[name](*args)
        except Exception as exc:  # noqa: BLE001  whatever stops the compiler, eager gives the same bits
            self.unavailable.add(name)
            warnings.warn(f"compiled {name} unavailable ({type(exc).__name__}: {exc}); using the eager path",
                          RuntimeWarning, stacklevel=4)
            return None


COMPILED = CompiledPaths()


def run_compiled(name: str, fn, *args, dynamic: bool):
    """COMPILED.run, looked up at call time (a test may swap in a fresh CompiledPaths)."""
    return COMPILED.run(name, fn, *args, dynamic=dynamic)
