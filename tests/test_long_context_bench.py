"""bench/long_context_gpu.py's dry run: the GPU run's code (the calculator's longest sequence per
combination, two steps of both switches at the longest, with and without the tiled MLP, tokens/s of
each combination) on a tiny Llama on the CPU, writing nothing. The measurement itself needs a GPU
(bench/results/)."""
from bench import long_context_gpu


def test_the_gpu_run_goes_through_every_step_on_the_cpu_and_writes_nothing(monkeypatch):
    def report(*args, **kwargs):
        raise AssertionError("a dry run must not write results")

    monkeypatch.setattr(long_context_gpu, "report", report)
    out = long_context_gpu.main(["--dry-run"])
    assert set(out["longest"]) == set(long_context_gpu.COMBOS) and min(out["longest"].values()) > 0
    peaks, speeds = out["rows"][:len(long_context_gpu.PEAKS)], out["rows"][len(long_context_gpu.PEAKS):]
    assert [peak["combo"] for peak in peaks] == ["both", "both + tiled MLP"]
    for peak in peaks:
        assert peak["measured_peak_gib"] is None  # the CPU counts no allocations
        assert peak["host_tensors_gib"] > 0 and peak["predicted_peak_gib"] > 0
    assert peaks[1]["mlp_tile"] == out["mlp_tile"] == 16 < peaks[1]["seq"]  # the tiny model's MLP really tiles
    assert [r["combo"] for r in speeds] == list(long_context_gpu.COMBOS)
    assert all(r["tokens_per_s"] > 0 for r in speeds) and speeds[0]["vs none"] == 1.0

