"""minilora.train's long-context switches: --loss full|chunked, --loss-chunk N, --offload-activations,
--mlp-tile N.

The chunked loss trains as the full one does, to rounding (tests/test_loss.py states the bound);
activation offload is bit-identical to checkpointing without it; the tiled MLP gives the same first
loss bit for bit and trains to rounding (tests/test_tiled_mlp.py states the bound); bad combinations
exit 2 with one line.
"""
import json
from pathlib import Path

import pytest
import torch

from factories import tiny_llama

import minilora
from minilora.train import TrainConfig, main, train
from reference_models import save_pretrained

CORPUS = Path(minilora.__file__).parent / "data" / "corpus_eval.txt"  # the shipped held-out stories


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    save_pretrained(tiny_llama(0, vocab_size=259, num_hidden_layers=3, max_position_embeddings=256, bos_token_id=256,
                               eos_token_id=257), folder)
    return folder


@pytest.fixture(scope="module")
def corpus():
    return CORPUS


def config(model, data, out, **kw):
    base = dict(model=str(model), data=str(data), out=str(out), max_seq_len=32, batch_size=4, steps=4, lr=1e-2,
                warmup_steps=1, eval_every=0, log_every=100, quiet=True, save_final=False, device="cpu")
    return TrainConfig(**{**base, **kw})


def trainable(result):
    return {n: p.detach().clone() for n, p in result.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_chunked_loss_trains_as_the_full_loss_does(method, llama_dir, corpus, tmp_path):
    kw = dict(method=method, lr=3e-3 if method == "full" else 1e-2, eval_every=4, eval_fraction=0.1)
    full = train(config(llama_dir, corpus, tmp_path / "full", loss="full", **kw))
    chunked = train(config(llama_dir, corpus, tmp_path / "chunked", loss="chunked", loss_chunk=24, **kw))
    assert chunked.model.loss == "chunked" and chunked.model.loss_chunk == 24
    for a, b in zip(full.history, chunked.history):  # the step-0 eval, then each step's loss
        for key in ("loss", "eval_loss"):
            if key in a:
                assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (key, a, b)
    want, got = trainable(full), trainable(chunked)
    for name in want:  # four AdamW steps apart by the loss's rounding
        assert (want[name] - got[name]).abs().max() <= 1e-4 * want[name].abs().max(), name


def test_activation_offload_trains_bit_for_bit_as_checkpointing_alone(llama_dir, corpus, tmp_path):
    kw = dict(method="qlora", grad_checkpointing=True, loss="chunked")
    plain = train(config(llama_dir, corpus, tmp_path / "a", **kw))
    offloaded = train(config(llama_dir, corpus, tmp_path / "b", offload_activations=True, **kw))
    assert offloaded.model.activation_offload is not None and plain.model.activation_offload is None
    assert [h["loss"] for h in plain.history] == [h["loss"] for h in offloaded.history]
    want, got = trainable(plain), trainable(offloaded)
    assert all(torch.equal(want[n], got[n]) for n in want)


def test_resume_refuses_another_loss_and_reads_older_checkpoints_as_full(llama_dir, corpus, tmp_path):
    kw = dict(steps=4, save_every=2, keep_checkpoints=0)
    train(config(llama_dir, corpus, tmp_path, loss="full", **kw))
    with pytest.raises(ValueError, match="trained with loss='full', this run has 'chunked'"):
        train(config(llama_dir, corpus, tmp_path, loss="chunked", resume=True, **kw))
    checkpoints = tmp_path / "checkpoints"
    state_file = checkpoints / "step-000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["loss"], state["config"]["loss_chunk"]  # as a checkpoint written before these settings
    state_file.write_text(json.dumps(state))
    (checkpoints / "latest.json").write_text(json.dumps({"step": 2, "path": "step-000002"}))
    resumed = train(config(llama_dir, corpus, tmp_path, loss="full", resume=True, **kw))
    assert [h["step"] for h in resumed.history if "loss" in h] == [1, 2, 3, 4]


@pytest.mark.parametrize("argv_tail, message", [
    (["--loss", "fused"], "argument --loss: invalid choice: 'fused'"),
    (["--loss", "chunked", "--loss-chunk", "0"], "loss_chunk must be an integer >= 1 (tokens per chunk), got 0"),
    (["--loss", "chunked", "--loss-chunk", "33"],
     "loss_chunk must be at most the sequence length 32 (a longer chunk is the whole sequence), got 33"),
    (["--loss", "full", "--loss-chunk", "8"], "loss_chunk applies to loss 'chunked' only"),
    (["--offload-activations"], "offload_activations needs grad_checkpointing"),
    (["--mlp-tile", "-1"], "mlp_tile must be 0 (off) or an integer >= 1 (tokens per tile), got -1"),
    (["--mlp-tile", "33"], "mlp_tile must be at most the sequence length 32 (a longer tile is the whole sequence), "
                           "got 33"),
])
def test_bad_long_context_flags_exit_2_with_one_line(argv_tail, message, llama_dir, corpus, tmp_path, capsys):
    argv = ["--model", str(llama_dir), "--data", str(corpus), "--out", str(tmp_path), "--max-seq-len", "32"]
    try:
        code = main(argv + argv_tail)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_the_cli_trains_with_both_switches(llama_dir, corpus, tmp_path, capsys):
    code = main(["--model", str(llama_dir), "--data", str(corpus), "--out", str(tmp_path), "--steps", "2",
                 "--max-seq-len", "32", "--batch-size", "2", "--grad-checkpointing", "--offload-activations",
                 "--loss", "chunked", "--loss-chunk", "16", "--quiet", "--device", "cpu"])
    assert code == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["loss"] == "chunked" and summary["config"]["offload_activations"] is True


@pytest.mark.parametrize("method,memory", [("qlora", dict(grad_checkpointing=True, offload_activations=True)),
                                           ("lora", dict(optimizer="offload")), ("full", dict(grad_checkpointing=True))])
def test_the_tiled_mlp_trains_as_the_whole_mlp_does(method, memory, llama_dir, corpus, tmp_path):
    # 4 x 32 tokens in tiles of 16: the first loss is bit-identical, the MLP's weight gradients agree
    # to rounding, so four AdamW steps end apart by that rounding (CPUOffloadAdamW's accumulate hooks
    # see one gradient per weight: the tiles' sum)
    kw = dict(method=method, lr=3e-3 if method == "full" else 1e-2, loss="chunked", **memory)
    whole = train(config(llama_dir, corpus, tmp_path / "whole", **kw))
    tiled = train(config(llama_dir, corpus, tmp_path / "tiled", mlp_tile=16, **kw))
    assert tiled.model.mlp_tile == 16 and whole.model.mlp_tile is None
    assert whole.history[0]["loss"] == tiled.history[0]["loss"]
    for a, b in zip(whole.history, tiled.history):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (a, b)
    want, got = trainable(whole), trainable(tiled)
    for name in want:
        assert (want[name] - got[name]).abs().max() <= 1e-4 * want[name].abs().max(), name


def test_resume_refuses_another_mlp_tile_and_reads_older_checkpoints_as_untiled(llama_dir, corpus, tmp_path):
    kw = dict(steps=4, save_every=2, keep_checkpoints=0)
    train(config(llama_dir, corpus, tmp_path, mlp_tile=16, **kw))
    with pytest.raises(ValueError, match="trained with mlp_tile=16, this run has 0"):
        train(config(llama_dir, corpus, tmp_path, resume=True, **kw))
    checkpoints = tmp_path / "checkpoints"
    state_file = checkpoints / "step-000002" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["mlp_tile"]  # as a checkpoint written before the setting
    state_file.write_text(json.dumps(state))
    (checkpoints / "latest.json").write_text(json.dumps({"step": 2, "path": "step-000002"}))
    resumed = train(config(llama_dir, corpus, tmp_path, resume=True, **kw))
    assert [h["step"] for h in resumed.history if "loss" in h] == [1, 2, 3, 4]


def test_a_mixture_of_experts_model_refuses_the_tile_in_one_line(corpus, tmp_path, capsys):
    folder = tmp_path / "mixtral"
    save_pretrained(tiny_llama(0, vocab_size=259, model_type="mixtral", max_position_embeddings=64, bos_token_id=256,
                               eos_token_id=257, moe=dict(num_experts=4, num_experts_per_tok=2,
                                                          moe_intermediate_size=64)), folder)
    code = main(["--model", str(folder), "--data", str(corpus), "--out", str(tmp_path / "out"), "--max-seq-len", "32",
                 "--mlp-tile", "8", "--steps", "1", "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "layer 0's mlp is a SparseMoE" in err, err


def _fsdp_worker(env, out, data, mlp_tile=0):
    from minilora.train import train_distributed

    cfg = config("", data, out, method="full", batch_size=2, steps=2, lr=1e-3, loss="chunked", loss_chunk=8,
                 eval_fraction=0.0, save_final=True, mlp_tile=mlp_tile)
    train_distributed(cfg, "full_shard", tiny_llama(0, vocab_size=260), env)


@pytest.mark.parametrize("mlp_tile", [0, 8])
def test_fsdp2_shards_the_head_the_chunked_loss_reads(mlp_tile, corpus, tmp_path):
    # full fine-tuning: FSDP2 shards lm_head.weight, which the chunked loss multiplies by directly
    # (inside the root's forward, where FSDP2 has gathered it); 2 ranks x 2 = one process x 4. With
    # the tiled MLP, the MLP's weights (gathered in the block's forward and again for its backward)
    # get their gradients from the tiles' sums
    from safetensors.torch import load_file
    from test_distributed import spawn

    spawn(_fsdp_worker, str(tmp_path / "dist"), str(corpus), mlp_tile)
    single = config("", corpus, tmp_path / "single", method="full", batch_size=4, steps=2, lr=1e-3, loss="chunked",
                    loss_chunk=8, eval_fraction=0.0, save_final=True, mlp_tile=mlp_tile)
    train(single, model=tiny_llama(0, vocab_size=260))
    got = load_file(str(tmp_path / "dist" / "model" / "model.safetensors"))
    want = load_file(str(tmp_path / "single" / "model" / "model.safetensors"))
    assert got.keys() == want.keys() and "lm_head.weight" in got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert (got["lm_head.weight"] - tiny_llama(0, vocab_size=260).lm_head.weight).abs().max() > 1e-4  # it trained


def _ddp_worker(env, out, data):
    from minilora.train import train_distributed

    cfg = config("", data, out, method="lora", batch_size=2, steps=2, mlp_tile=8, eval_fraction=0.0, save_final=True)
    train_distributed(cfg, "ddp", tiny_llama(0, vocab_size=260), env)


def test_ddp_reduces_the_tiled_mlps_gradients_as_one_process_sums_them(corpus, tmp_path):
    # DDP marks each weight ready when its gradient accumulates: the tiled MLP hands over one per
    # weight per backward (the tiles' sum), so 2 ranks x 2 = one process x 4
    from safetensors.torch import load_file
    from test_distributed import spawn

    spawn(_ddp_worker, str(tmp_path / "dist"), str(corpus))
    single = config("", corpus, tmp_path / "single", method="lora", batch_size=4, steps=2, mlp_tile=8,
                    eval_fraction=0.0, save_final=True)
    train(single, model=tiny_llama(0, vocab_size=260))
    got = load_file(str(tmp_path / "dist" / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "single" / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and any(".mlp." in name for name in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")
