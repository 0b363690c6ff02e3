"""The benchmark suite's driver (bench/__main__.py) and the GPU memory validation's CPU paths."""
import json

import pytest
import torch

import bench.__main__ as suite
from bench import memory_validation as mv


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU skip path")
def test_suite_skips_gpu_only_benchmarks_with_the_reason_and_writes_the_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(suite, "RESULTS", tmp_path)
    assert suite.main(["--only", "memory_validation"]) == 0
    out = capsys.readouterr().out
    assert "memory_validation: skipped: needs a CUDA device" in out
    machine = suite.machine_name()
    summary = json.loads((tmp_path / f"suite-{machine}.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["memory_validation"]
    assert summary["runs"][0]["status"].startswith("skipped: needs a CUDA device")
    assert summary["machine"]["torch"] == torch.__version__
    assert "| memory_validation | skipped" in (tmp_path / f"suite-{machine}.md").read_text()


FAKE_OK = """
import json, os, sys
out = os.path.join(os.environ["FAKE_RESULTS"], "fake-m.json")
json.dump({"benchmark": "fake", "machine": {"device": "x"}, "note": "a note", "argv": sys.argv[1:],
           "goal": "ratio < 1", "goal_met": True,
           "results": [{"shape": "s", "ratio": 0.75}]}, open(out, "w"))
"""


def test_suite_runs_each_benchmark_in_a_child_and_gathers_its_results(tmp_path, monkeypatch, capsys):
    (tmp_path / "fakebench_ok.py").write_text(FAKE_OK)
    (tmp_path / "fakebench_fail.py").write_text("raise SystemExit(3)\n")
    results = tmp_path / "results"
    results.mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv("FAKE_RESULTS", str(results))
    monkeypatch.setattr(suite, "RESULTS", results)
    monkeypatch.setattr(suite, "SUITE", {"fake": ("fakebench_ok", None), "broken": ("fakebench_fail", None),
                                         "absent": ("fakebench_absent", None)})
    assert suite.main(["--quick"]) == 1  # one benchmark failed
    summary = json.loads((results / f"suite-{suite.machine_name()}.json").read_text())
    runs = {r["name"]: r for r in summary["runs"]}
    assert runs["fake"]["status"] == "ok" and runs["fake"]["results"][0]["argv"] == ["--quick"]
    assert runs["fake"]["results"][0]["results"] == [{"shape": "s", "ratio": 0.75}]
    assert "machine" not in runs["fake"]["results"][0]  # stated once, at the top
    assert runs["broken"]["status"] == "failed (exit 3)"
    assert runs["absent"]["status"] == "skipped: fakebench_absent is not in this checkout"
    md = (results / f"suite-{suite.machine_name()}.md").read_text()
    assert "| shape   |   ratio |" in md and "_a note_" in md and "Goal: ratio < 1 (met)" in md and "failed (exit 3)" in md


def test_suite_rejects_an_unknown_benchmark_name(capsys):
    with pytest.raises(SystemExit) as exc:
        suite.main(["--only", "lora_stepp"])
    assert exc.value.code == 2
    assert "unknown benchmark 'lora_stepp'; choose from models, lora_step" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_memory_validation_without_cuda_says_so_and_exits_0(capsys):
    assert mv.main([]) == 0
    assert "needs CUDA" in capsys.readouterr().out


def test_memory_validation_dry_run_takes_real_steps_for_every_method(capsys):
    rows = mv.run(mv.MODEL_TINY, (8,), 1, torch.device("cpu"), stacks=("minilora",))
    ran = {r["method"]: r for r in rows if r["status"].startswith("ok")}
    assert {"full", "lora"} <= set(ran)
    assert ran["full"]["trainable"] > ran["lora"]["trainable"] > 0
    for r in ran.values():
        assert 0 < r["loss"] < 10 and r["measured_MiB"] is None  # nothing is measured on the CPU
        assert r["predicted_MiB"] > 0 and r["terms_MiB"]["weights"] > 0  # the calculator answered


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU skip path")
def test_suite_only_keeps_the_other_benchmarks_of_the_existing_summary(tmp_path, monkeypatch):
    monkeypatch.setattr(suite, "RESULTS", tmp_path)
    machine = suite.machine_name()
    earlier = {"name": "nf4", "status": "ok", "seconds": 1.0, "date": "2026-01-01T00:00:00+00:00", "results": []}
    (tmp_path / f"suite-{machine}.json").write_text(json.dumps({"runs": [earlier]}))
    assert suite.main(["--only", "memory_validation"]) == 0
    summary = json.loads((tmp_path / f"suite-{machine}.json").read_text())
    assert [r["name"] for r in summary["runs"]] == ["nf4", "memory_validation"]   # the suite's order
    assert summary["runs"][0] == earlier
    markdown = (tmp_path / f"suite-{machine}.md").read_text()
    assert "| nf4 " in markdown and "2026-01-01T00:00:00+00:00" in markdown
    (tmp_path / f"suite-{machine}.json").write_text("not json")   # unreadable: replaced, not merged
    assert suite.main(["--only", "memory_validation"]) == 0
    assert [r["name"] for r in json.loads((tmp_path / f"suite-{machine}.json").read_text())["runs"]] == [
        "memory_validation"]


@pytest.mark.interop
def test_memory_validation_dry_run_trains_the_hf_stack_for_every_method_and_checkpointing():
    """transformers + peft + bitsandbytes through the benchmark's own code on the CPU: every point
    takes two real steps (bitsandbytes' 4-bit layers included) and the calculator answers for it."""
    rows = mv.run(mv.MODEL_TINY, (8,), 1, torch.device("cpu"), stacks=("hf",))
    assert {(r["method"], r["grad_ckpt"]) for r in rows if r["status"] == "ok"} == \
        {(m, c) for m in mv.METHODS for c in (False, True)}
    trainable = {r["method"]: r["trainable"] for r in rows}
    assert trainable["full"] > trainable["lora"] == trainable["qlora"] > 0
    for r in rows:
        assert 0 < r["loss"] < 10 and r["measured_MiB"] is None and r["predicted_MiB"] > 0
