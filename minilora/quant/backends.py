"""How a quantization call runs: the `backend` argument, the torch.compile'd paths and the Triton
kernels behind it.

Two choices travel with each call, and neither is a module-global switch:

  * `kernel` ("auto" | "cpu" | "cuda" | "cuda-ieee", minilora/quant/bnb_cuda.py): WHICH bytes,
    i.e. which of bitsandbytes' kernels the rounding reproduces;
  * `backend` ("auto" | "eager" | "compiled" | "triton", here): HOW they are computed. Every
    backend gives the same bytes for the same inputs (tested bit for bit), so the choice is about
    speed only.

"eager" is the readable reference and the fallback: plain PyTorch ops, in chunks. "compiled" runs a
function through torch.compile where one exists for the call (see each function's docstring for its
coverage; the rest of that call runs eager). "triton" runs hand-written Triton kernels
(minilora/quant/triton_dequantize.py, triton_matmul.py): on CUDA tensors, or on CPU tensors in
Triton's interpreter (TRITON_INTERPRET=1), which is how CI checks their bits without a GPU.

"auto" is `AUTO_BACKEND[device type]`, "eager" everywhere today, a choice made from measurements:
the compiled dequantize did not pay on an H100 (0.29 ms both ways at 4096 x 4096 fp32, 0.36 vs
0.29 ms in bf16: per-call overhead dominates, not bytes); the compiled CPU 8-bit encoder (3.5x
faster on 2 cores) compiles C++ for seconds on first use, so callers ask for it
(CPUOffloadAdamW(fused=True)); the Triton kernels have not been timed on a GPU yet. bench/nf4.py
on CUDA times them against bitsandbytes and the eager path and says in its JSON which backend
wins ("faster_backend"); when that is "triton", CUDA's entry here becomes "triton" (and "auto"
falls back to "eager" where Triton is not installed).

One cache holds the compiled functions (`COMPILED`), and one fallback serves them all: a path
torch.compile cannot build or run here (no C++ compiler, no Triton) warns once, is recorded in
`COMPILED.unavailable`, and its caller's eager path serves from then on. The Triton backend has no
silent fallback: asked for by name where it cannot run, it raises and says why.
"""
from __future__ import annotations

import warnings

import torch

__all__ = ["BACKENDS", "AUTO_BACKEND", "resolve_backend", "load_triton_kernels", "triton_unavailable",
           "require_triton", "CompiledPaths", "COMPILED", "run_compiled"]

BACKENDS = ("auto", "eager", "compiled", "triton")
# what "auto" runs, by device type (others: "eager"); see the module docstring for why
AUTO_BACKEND = {"cpu": "eager", "cuda": "eager"}


def resolve_backend(backend, device=None, allowed: tuple = BACKENDS) -> str:
    """The backend a call on `device` runs (never "auto"): cheap and deterministic, no measuring.
    `allowed` is what the calling function offers (all of BACKENDS unless it says otherwise)."""
    if backend not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")
    if backend != "auto":
        return backend
    choice = AUTO_BACKEND.get(torch.device(device).type, "eager") if device is not None else "eager"
    return "eager" if choice == "triton" and triton_unavailable(device) else choice


def load_triton_kernels():
    """minilora.quant.triton_dequantize, imported on first use (ImportError without Triton)."""
    from minilora.quant import triton_dequantize

    return triton_dequantize


def triton_unavailable(device) -> str | None:
    """Why backend="triton" cannot run on `device` here, or None when it can."""
    try:
        kernels = load_triton_kernels()
    except ImportError as exc:
        return f"Triton is not installed ({exc}); pip install triton"
    device = torch.device(device)
    if device.type == "cuda" or (device.type == "cpu" and kernels.INTERPRETED):
        return None
    return (f"Triton kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter (TRITON_INTERPRET=1 "
            f"set before minilora's Triton kernels are first imported); got a tensor on {device}")


def require_triton(device) -> None:
    """Raise, saying why, unless backend="triton" can run on `device`."""
    reason = triton_unavailable(device)
    if reason is None:
        return
    if reason.startswith("Triton is not installed"):
        raise ImportError(f"backend='triton' needs Triton: {reason}")
    raise ValueError(f"backend='triton' cannot run here: {reason}")


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
