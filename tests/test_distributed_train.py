"""train_distributed: 2 gloo ranks with batch_size b take the steps one process takes with 2b,
and their adapter-only checkpoint resumes on 1 process (a different world size)."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minilora
from minilora import distributed as D
from minilora.train import TrainConfig, train, train_distributed
from factories import tiny_llama
from reference_models import Llama
from test_distributed import spawn

DATA = str(Path(minilora.__file__).parent / "data" / "corpus_eval.txt")


def byte_llama() -> Llama:
    return tiny_llama(0, vocab_size=260)  # >= the byte tokenizer's 259 ids; every dim divides by 2


def config(out, batch_size: int, **kw) -> TrainConfig:
    # constant lr (no warmup, min_lr_ratio 1) so that a run cut at step 2 continues like one of 3 steps;
    # a small clip so that clipping (over FSDP2's sharded gradients) really scales the step
    base = dict(data=DATA, out=str(out), method="lora", max_seq_len=32, batch_size=batch_size, steps=3, lr=1e-2,
                warmup_steps=0, min_lr_ratio=1.0, clip=0.05, lora_r=4, lora_alpha=8, eval_fraction=0.0,
                log_every=1, quiet=True, seed=3, device="cpu")  # the gloo ranks run on CPU, also where CUDA exists
    return TrainConfig(**{**base, **kw})


def _worker(env, out):
    summary = train_distributed(config(out, batch_size=2, save_every=2, eval_data=DATA,
                                         eval_every=1, eval_batches=1), "full_shard", byte_llama(), env)
    assert summary["world_size"] == 2 and summary["final_loss"] > 0


def test_two_ranks_then_resume_on_one_equal_one_process_training(tmp_path):
    import json
    import shutil

    spawn(_worker, str(tmp_path / "dist"))
    # as if the 2-rank run had stopped after its step-2 checkpoint: resume it on 1 rank
    checkpoints = tmp_path / "dist" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == ["step-000002", "step-000003"]
    (checkpoints / "latest.json").write_text(json.dumps({"step": 2, "path": "step-000002"}))
    shutil.rmtree(tmp_path / "dist" / "adapter")
    with pytest.raises(ValueError, match=r"global batch of 4 sequences .* this run has 2; set --batch-size to 4"):
        train_distributed(config(tmp_path / "dist", batch_size=2, resume=True), "none", byte_llama(),
                            D.DistEnv(0, 1, 0, torch.device("cpu"), "gloo"))
    with pytest.raises(ValueError, match=r"trained with lr=0.01, this run has 0.02"):
        train_distributed(config(tmp_path / "dist", batch_size=4, resume=True, lr=2e-2), "none", byte_llama(),
                            D.DistEnv(0, 1, 0, torch.device("cpu"), "gloo"))
    one_rank = D.DistEnv(0, 1, 0, torch.device("cpu"), "gloo")  # no process group needed for "none"
    train_distributed(config(tmp_path / "dist", batch_size=4, resume=True), "none", byte_llama(), one_rank)
    train(config(tmp_path / "single", batch_size=4), model=byte_llama())
    got = load_file(str(tmp_path / "dist" / "adapter" / "adapter_model.safetensors"))
    expected = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == expected.keys() and len(got) == 2 * 7 * 2
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    # lora_B starts at zero: a nonzero B shows the three steps were taken
    assert got["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].abs().max() > 1e-3


class _Crash(Exception):
    pass


def _crash_at(step):
    def on_step(record):
        if record["step"] == step:
            raise _Crash  # on every rank, as if the job died right after the checkpoint at `step`
    return on_step


def _worker_resume(env, out):
    out = Path(out)
    for strategy, method in (("ddp", "qlora"), ("full_shard", "lora")):
        # dropout (each rank its own RNG stream), micro-batches (no_sync) and clipping all take part
        kw = dict(batch_size=2, steps=4, save_every=2, grad_accum=2, lora_dropout=0.1, strategy=strategy,
                  method=method)
        whole = train(config(out / strategy / "whole", **kw), byte_llama(), env=env)
        with pytest.raises(_Crash):
            train(config(out / strategy / "cut", **kw), byte_llama(), on_step=_crash_at(2), env=env)
        resumed = train(config(out / strategy / "cut", resume=True, **kw), byte_llama(), env=env)
        trainable = lambda name, p: p.requires_grad  # noqa: E731
        a, b = D.gather_full_state(whole.model, trainable), D.gather_full_state(resumed.model, trainable)
        assert [h["loss"] for h in whole.history] == [h["loss"] for h in resumed.history], strategy
        if env.is_main:
            assert a.keys() == b.keys() and len(a) == 2 * 7 * 2
            for name in a:
                assert torch.equal(a[name], b[name]), f"{strategy} {name}"
            folder = out / strategy / "cut" / "checkpoints" / "step-000004"
            assert (folder / "rng-rank0.safetensors").is_file() and (folder / "rng-rank1.safetensors").is_file()


def test_two_ranks_interrupted_and_resumed_equal_an_uninterrupted_run_bit_for_bit(tmp_path):
    spawn(_worker_resume, str(tmp_path))


def test_torchrun_runs_minilora_train_flags_on_two_ranks(tmp_path):
    """`torchrun -m minilora.distributed` is minilora.train's command line: any of its flags works."""
    import json
    import subprocess
    import sys

    torchrun = Path(sys.executable).parent / "torchrun"
    argv = [str(torchrun), "--nproc_per_node", "2", "--master_port", str(D.free_port()), "-m", "minilora.distributed",
            "--model", str(tmp_path / "base"), "--data", DATA, "--out", str(tmp_path / "run"), "--device", "cpu",
            "--strategy", "shard_grad_op", "--method", "qlora", "--lora-r", "4", "--lora-dropout", "0.1",
            "--grad-accum", "2", "--batch-size", "1", "--steps", "2", "--max-seq-len", "32", "--save-every", "2",
            "--eval-every", "2", "--eval-batches", "1", "--grad-checkpointing", "--log-every", "1"]
    from reference_models import save_pretrained

    save_pretrained(byte_llama(), tmp_path / "base")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "shard_grad_op on 2 x cpu (gloo), 1 x 2 x 2 sequences per step" in proc.stdout, proc.stdout
    assert "step 2/2 | loss" in proc.stdout and "eval step 2 | loss" in proc.stdout
    assert "Warning" not in proc.stderr, proc.stderr  # nothing from our own code (torchrun's OMP note aside)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["strategy"] == "shard_grad_op" and summary["world_size"] == 2
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "run" / "checkpoints" / "step-000002" / "rng-rank1.safetensors").is_file()
