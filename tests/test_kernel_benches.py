"""The kernel benchmarks' dry runs: bench/lora_profile.py (a torch.profiler profile of the full and the
LoRA step) and bench/nf4.py (every row, the Triton ones through Triton's interpreter on a CPU), run
through the code a GPU run takes, at tiny shapes, writing nothing. The measurements themselves are
for a GPU (bench/results/)."""
import pytest

from bench import lora_profile
from bench import nf4 as nf4_bench
from minilora.quant.backends import load_triton_kernels


@pytest.fixture
def results_dir(tmp_path, monkeypatch):
    def report(*args, **kwargs):
        raise AssertionError("a dry run must not write results")

    for bench in (lora_profile, nf4_bench):
        monkeypatch.setattr(bench, "report", report)
    monkeypatch.setattr(lora_profile, "RESULTS", tmp_path)
    return tmp_path


@pytest.mark.parametrize("op, expected", [
    ("aten::mm", "matmul"), ("aten::addmm", "matmul"), ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_scaled_dot_product_efficient_attention_backward", "attention"), ("aten::_foreach_lerp_", "optimizer"),
    ("aten::_fused_adamw_", "optimizer"), ("aten::nll_loss_backward", "loss"), ("aten::_log_softmax", "loss"),
    ("aten::_fused_rms_norm", "norm"), ("aten::embedding_dense_backward", "embedding"), ("aten::copy_", "copy / layout"),
    ("aten::silu_backward", "elementwise"), ("aten::mul", "elementwise"), ("aten::view", "other"),
])
def test_lora_profile_puts_ops_in_their_category(op, expected):
    assert lora_profile.category(op) == expected


def test_lora_profile_dry_run_profiles_both_steps_and_writes_nothing(results_dir, capsys):
    out = lora_profile.main(["--dry-run"])
    rows = {r["phase: category"]: r for r in out["rows"]}
    parts = [r for r in out["rows"] if r["phase: category"] != "total"]
    for group in ("forward: matmul", "backward: matmul", "forward: attention", "backward: attention"):
        assert rows[group]["full ms"] > 0 and rows[group]["LoRA ms"] > 0, group
    assert rows["optimizer"]["full ms"] > 0  # AdamW.step and zero_grad, found by their enclosing record
    assert rows["total"]["LoRA ms"] == pytest.approx(sum(r["LoRA ms"] for r in parts))
    assert rows["total"]["full ms"] == pytest.approx(sum(r["full ms"] for r in parts))
    assert sum(r["share of LoRA step"] for r in parts) == pytest.approx(1.0)
    assert out["ops"] and all(op["category"] == lora_profile.category(op["op"]) for op in out["ops"])
    assert {op["phase"] for op in out["ops"]} <= {"forward", "backward", "optimizer"}
    printed = capsys.readouterr().out
    assert "| backward: matmul " in printed and "Top " in printed and "nothing written" in printed
    assert list(results_dir.iterdir()) == []


def test_nf4_bench_dry_run_runs_every_row_and_writes_nothing(results_dir):
    out = nf4_bench.main(["--dry-run"])
    rows = out["results"]
    assert [r["op"] for r in rows][:3] == ["quantize nf4+dq", "dequantize", "dequantize"]
    forward = [r for r in rows if r["op"].startswith("linear forward")]
    assert [r["tokens"] for r in forward] == list(nf4_bench.DRY_TOKENS)
    assert rows[-1]["op"].startswith("linear fwd+bwd")
    if load_triton_kernels().INTERPRETED:  # a CPU machine: the Triton rows ran in the interpreter
        assert all("minilora triton ms" in r for r in rows if r["op"] == "dequantize")
        assert all("triton fused kernel ms" in r and "LinearNF4 triton ms" in r for r in forward)
        assert out["faster_backend"] in ("eager", "triton")
    assert out["goal_met"] is None  # a CPU and tiny shapes: the CUDA goals are not judged
    assert list(results_dir.iterdir()) == []
