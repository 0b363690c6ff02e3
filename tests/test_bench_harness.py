"""The README's examples leave the checkout as it was, and the bench harness prints only its table:
reading the libraries' versions imports none of them (torchao's import logs a "Failed to load
... .so" line per CUDA extension on a CPU build of torch)."""
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_machine_info_reads_versions_without_importing_the_libraries():
    code = ("import json, sys; from bench._harness import machine_info; info = machine_info(); "
            "print(json.dumps([{k: info[k] for k in ('torchao', 'transformers', 'peft', 'bitsandbytes')}, "
            "[m for m in ('torchao', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules]]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    versions, imported = json.loads(proc.stdout)
    assert imported == []
    assert versions == {k: importlib.metadata.version(k) for k in versions}


def _checkout_state():
    if (ROOT / ".git").exists() and shutil.which("git"):
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout
    return sorted((str(p.relative_to(ROOT)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in (ROOT / "bench" / "results").iterdir())


@pytest.mark.slow
def test_readme_pretrain_example_leaves_the_checkout_clean():
    """`python -m bench.experiments.pretrain` (here --quick, 2 steps) writes its model and its curve
    under build/, which git ignores; bench/results keeps the committed curve."""
    work = ROOT / "build" / "experiments" / "pretrain-quick"
    new = [p for p in (work.parent.parent, work.parent, work, work.parent / "init") if not p.exists()]
    ours = [p for p in new if not any(q in p.parents for q in new)]  # the outermost folders this run makes
    before = _checkout_state()
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.experiments.pretrain", "--quick", "--steps", "2"],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert _checkout_state() == before
        assert list(work.glob("exp-pretrain-quick-*.json")) and list(work.glob("exp-pretrain-quick-*.md"))
    finally:
        for path in ours:
            shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(not shutil.which("git") or not (ROOT / ".git").exists(), reason="needs a git checkout")
@pytest.mark.parametrize("path", ["runs/demo/adapter/adapter_model.safetensors", "build/experiments/pretrain/model"])
def test_what_the_readme_examples_write_is_ignored(path):
    assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path
