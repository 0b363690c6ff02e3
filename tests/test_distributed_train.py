"""train_distributed: 2 gloo ranks with batch_size b take the steps one process takes with 2b,
and their adapter-only checkpoint resumes on 1 process (a different world size)."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import minilora
from minilora import distributed as D
from minilora.train import TrainConfig, train, train_distributed
from reference_models import Llama, LlamaConfig
from test_distributed import spawn

DATA = str(Path(minilora.__file__).parent / "data" / "corpus_eval.txt")


def byte_llama() -> Llama:
    torch.manual_seed(0)  # vocab 260 >= the byte tokenizer's 259 ids; every dim divides by 2
    return Llama(LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2))


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
