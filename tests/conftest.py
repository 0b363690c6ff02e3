"""Shared test set-up: Hypothesis profiles and the interop requirement.

The interop libraries (transformers, peft, bitsandbytes, torchao, accelerate) are test extras.
A run without them is not a green run: the session fails at start unless
MINILORA_ALLOW_MISSING_INTEROP=1 is set (for a quick local loop only; CI never sets it).
"""
import importlib
import os

import pytest
from hypothesis import HealthCheck, settings

# "ci" is bounded so the whole suite stays within minutes on 2 cores; "sweep" is for long runs
# by hand (HYPOTHESIS_PROFILE=sweep python -m pytest ...).
settings.register_profile(
    "ci", max_examples=20, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "sweep", max_examples=500, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tests run tiny models: one intra-op thread is faster than two for them, and on a busy 2-core
# machine a 2-thread parallel region can stall for hundreds of milliseconds per op.
import torch  # noqa: E402

torch.set_num_threads(1)

# Without a GPU, minilora's Triton kernels run in Triton's interpreter on CPU tensors
# (tests/test_nf4_triton.py). The switch must be set before triton is first imported, as triton
# decorates its own library kernels then, and the interop libraries checked below import it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

INTEROP = ("transformers", "peft", "bitsandbytes", "torchao", "accelerate")


def pytest_sessionstart(session):
    if os.environ.get("MINILORA_ALLOW_MISSING_INTEROP") == "1":
        return
    missing = []
    for name in INTEROP:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an install that is present but broken is as bad as a missing one
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    if missing:
        raise pytest.UsageError(
            "interop test extras are missing: " + ", ".join(missing)
            + '; install them with pip install -e ".[test,interop]"'
        )
