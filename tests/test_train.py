"""minilora/train/loop.py end to end on tiny models: loss goes down with each method, an interrupted and
resumed run is bit-identical to an uninterrupted one, and the saved adapter loads in peft."""
import json

import pytest
import torch

from factories import tiny_gpt, tiny_llama
from minilora.train import TrainConfig, lr_at, main, train

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


def _tiny_llama(folder, seed=0):
    from reference_models import save_pretrained

    model = tiny_llama(seed, vocab_size=259, max_position_embeddings=256, bos_token_id=256, eos_token_id=257)
    save_pretrained(model, folder)
    return folder


def _tiny_gpt(folder, seed=0):
    from reference_models import save_pretrained

    # dropout on (GPTConfig's defaults): an exact resume must also restore the RNG that draws the masks
    model = tiny_gpt(seed, vocab_size=259, n_positions=256, bos_token_id=256, eos_token_id=257)
    save_pretrained(model, folder)
    return folder



@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return _tiny_llama(tmp_path_factory.mktemp("llama"))


def _cfg(model, data, out, **kw):
    # device "cpu": the tests compare with CPU oracles (peft, exact resumes, fp32 tolerances), and "auto"
    # would pick CUDA with bf16 autocast where a GPU exists
    base = dict(model=str(model), data=str(data), out=str(out), max_seq_len=32, batch_size=4, steps=8,
                lr=1e-2, warmup_steps=2, eval_every=0, log_every=100, quiet=True, save_final=False, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_loss_goes_down_with_each_method(method, llama_dir, corpus, tmp_path):
    lr = 3e-3 if method == "full" else 2e-2
    result = train(_cfg(llama_dir, corpus, tmp_path, method=method, lr=lr, eval_every=8, eval_fraction=0.1))
    s = result.summary
    assert s["eval_loss"] < s["eval_loss_start"] - 0.1, s
    losses = [h["loss"] for h in result.history if "loss" in h]
    assert sum(losses[-2:]) < sum(losses[:2])
    if method == "full":
        assert s["trainable_params"] == s["total_params"]
    else:
        assert 0 < s["trainable_params"] < s["total_params"] / 2


class _Crash(Exception):
    pass


def _crash_at(step):
    def on_step(record):
        if record["step"] == step:
            raise _Crash  # as if the process died right after the checkpoint at `step`
    return on_step


def _whole_then_cut_at_4(model_dir, corpus, tmp_path, kw):
    """Train tmp_path/whole uninterrupted, and tmp_path/cut until the process "dies" after step 4."""
    whole = train(_cfg(model_dir, corpus, tmp_path / "whole", **kw))
    with pytest.raises(_Crash):
        train(_cfg(model_dir, corpus, tmp_path / "cut", **kw), on_step=_crash_at(4))
    return whole


def _assert_same_training(whole, resumed):
    """Bit for bit: every trainable tensor, and the loss of every step."""
    a = {n: p for n, p in whole.model.named_parameters() if p.requires_grad}
    b = {n: p for n, p in resumed.model.named_parameters() if p.requires_grad}
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert [h["loss"] for h in whole.history] == [h["loss"] for h in resumed.history]


@pytest.mark.parametrize("method, family, extra", [
    ("lora", "gpt", dict(lora_dropout=0.1)),
    ("full", "gpt", dict(grad_accum=2)),
    ("qlora", "llama", dict(lora_dropout=0.1)),
    ("lora", "llama", dict(optimizer="offload", grad_accum=2)),
])
def test_resume_after_interruption_is_bit_identical(method, family, extra, corpus, tmp_path):
    model_dir = (_tiny_gpt if family == "gpt" else _tiny_llama)(tmp_path / "base")
    kw = dict(method=method, steps=6, save_every=2, lr=3e-3, **extra)
    whole = _whole_then_cut_at_4(model_dir, corpus, tmp_path, kw)
    assert json.loads((tmp_path / "cut" / "checkpoints" / "latest.json").read_text())["step"] == 4
    resumed = train(_cfg(model_dir, corpus, tmp_path / "cut", resume=True, **kw))
    _assert_same_training(whole, resumed)
    # adapter-only checkpoints for LoRA/QLoRA: no base weights in them
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "cut" / "checkpoints" / "step-000006" / "trainable.safetensors"))
    assert all(("lora_" in k) == (method != "full") for k in saved)


def test_resume_refuses_a_changed_setting(llama_dir, corpus, tmp_path):
    train(_cfg(llama_dir, corpus, tmp_path, steps=2, save_every=2))
    with pytest.raises(ValueError, match="trained with lora_r=8, this run has 4"):
        train(_cfg(llama_dir, corpus, tmp_path, steps=2, save_every=2, lora_r=4, resume=True))


@pytest.mark.parametrize("change, message", [
    (dict(tokenizer="byte"), "trained with tokenizer=None, this run has 'byte'"),
    (dict(eval_data="corpus"), "trained with eval_data=None, this run has '"),
    (dict(clip=0.5), "trained with clip=1.0, this run has 0.5"),
])
def test_resume_refuses_a_changed_token_stream_or_update(change, message, llama_dir, corpus, tmp_path):
    # a tokenizer change re-tokenizes the data; eval_data=None carves the eval split out of --data
    import re

    change = {k: str(corpus) if v == "corpus" else v for k, v in change.items()}
    train(_cfg(llama_dir, corpus, tmp_path, steps=2, save_every=2))
    with pytest.raises(ValueError, match=re.escape(message)):
        train(_cfg(llama_dir, corpus, tmp_path, steps=2, save_every=2, resume=True, **change))


def test_fresh_run_refuses_an_out_with_an_earlier_runs_checkpoints(llama_dir, corpus, tmp_path, capsys):
    # an earlier, longer run left step-2 and step-4; a fresh 2-step run would have written step-2,
    # pointed latest.json at it, then pruned it as "older" than step-4 (--keep-checkpoints 1)
    common = ["--model", str(llama_dir), "--data", str(corpus), "--out", str(tmp_path), "--max-seq-len", "32",
              "--batch-size", "2", "--save-every", "2", "--keep-checkpoints", "0", "--no-save-final", "--quiet"]
    assert main(common + ["--steps", "4"]) == 0
    checkpoints = tmp_path / "checkpoints"
    before = sorted(p.name for p in checkpoints.glob("step-*"))
    assert before == ["step-000002", "step-000004"]
    capsys.readouterr()
    assert main(common[:-4] + ["--keep-checkpoints", "1", "--no-save-final", "--quiet", "--steps", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds checkpoints of an earlier run" in err and "--resume" in err, err
    assert sorted(p.name for p in checkpoints.glob("step-*")) == before
    assert json.loads((checkpoints / "latest.json").read_text())["path"] == "step-000004"
    # --resume is the way to go on with that folder: it finishes at once (4 of 4 steps done)
    assert main(common + ["--steps", "4", "--resume"]) == 0


def test_prune_never_deletes_the_checkpoint_latest_points_to_nor_later_steps(tmp_path):
    from minilora.train.resume import prune_checkpoints

    for step in (1, 2, 3, 6, 8):
        (tmp_path / f"step-{step:06d}").mkdir()
    (tmp_path / "latest.json").write_text(json.dumps({"step": 2, "path": "step-000002"}))
    prune_checkpoints(tmp_path, keep=1, current=3)  # step 3 saved, latest.json not yet moved to it
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [
        "step-000002", "step-000003", "step-000006", "step-000008"]
    (tmp_path / "latest.json").write_text(json.dumps({"step": 3, "path": "step-000003"}))
    prune_checkpoints(tmp_path, keep=1, current=3)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000003", "step-000006", "step-000008"]
    prune_checkpoints(tmp_path, keep=0, current=8)  # 0 keeps all
    assert len(list(tmp_path.glob("step-*"))) == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cli_cuda_without_cuda_exits_2_with_one_line(llama_dir, corpus, tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "minilora.train", "--model", str(llama_dir), "--data", str(corpus),
                           "--out", str(tmp_path), "--device", "cuda", "--quiet"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "CUDA is not available" in proc.stderr, proc.stderr


def test_grad_accumulation_is_token_weighted(llama_dir, tmp_path):
    # Records with very different response lengths: a mean of per-micro-batch means would differ.
    data = tmp_path / "a.jsonl"
    rows = [{"instruction": "x", "output": "y" * n} for n in (1, 2, 40, 3, 60, 1, 5, 30)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(method="full", steps=1, max_seq_len=240, eval_fraction=0, lr=1e-3, warmup_steps=0, clip=0)
    one = train(_cfg(llama_dir, data, tmp_path / "one", batch_size=4, **kw))
    two = train(_cfg(llama_dir, data, tmp_path / "two", batch_size=2, grad_accum=2, **kw))
    assert one.history[-1]["loss"] == pytest.approx(two.history[-1]["loss"], rel=1e-5)
    for (n, p), q in zip(one.model.named_parameters(), two.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cfg = TrainConfig(data="x", steps=20, lr=1.0, warmup_steps=4, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_saved_adapter_loads_in_peft_with_the_same_logits(family, corpus, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir = (_tiny_gpt if family == "gpt" else _tiny_llama)(tmp_path / "base")
    result = train(_cfg(model_dir, corpus, tmp_path / "run", steps=3, save_final=True, lr=1e-2))
    ours = result.model.eval()
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(tmp_path / "run" / "adapter")).eval()
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = peft_model(input_ids=x).logits
        mine = ours(x)
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(input_ids=x).logits
    assert (plain - theirs).abs().max() > 1e-3  # the adapter was trained: it changes the logits


def test_cli_help_documents_every_flag(capsys):
    from dataclasses import fields

    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name


@pytest.mark.parametrize("argv_tail, message", [
    (["--method", "prefix"], "argument --method: invalid choice: 'prefix'"),
    (["--steps", "many"], "argument --steps: invalid int value: 'many'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--steps", "0"], "steps must be an integer >= 1, got 0"),
    (["--eval-batches", "0"], "eval_batches must be an integer >= 1 (or unset for the whole eval set), got 0"),
    (["--device", "meta"], "device must be auto, cpu, cuda or cuda:N, got 'meta'"),
    (["--device", "cpu:1"], "device must be auto, cpu, cuda or cuda:N, got 'cpu:1'"),
    (["--device", "cuda:99"], "device 'cuda:99' asked for, but "),
])
def test_cli_bad_flags_exit_2_with_one_line(argv_tail, message, llama_dir, corpus, tmp_path, capsys):
    argv = ["--model", str(llama_dir), "--data", str(corpus), "--out", str(tmp_path)] + argv_tail
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_cli_bad_files_exit_2_with_one_line(llama_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a"\n')
    broken_model = tmp_path / "broken"
    broken_model.mkdir()
    (broken_model / "config.json").write_text((llama_dir / "config.json").read_text())
    (broken_model / "model.safetensors").write_bytes(b"\x00" * 16)
    cases = [
        (["--model", str(llama_dir), "--data", str(bad)], "bad.jsonl:2: invalid JSON"),
        (["--model", str(llama_dir), "--data", str(tmp_path / "none.txt")], "data file not found"),
        (["--model", str(tmp_path / "nowhere"), "--data", str(bad)], "model must be a folder with config.json"),
        (["--model", str(broken_model), "--data", str(bad)], "error:"),
    ]
    for argv, message in cases:
        assert main(argv + ["--out", str(tmp_path / "o"), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_cli_trains_and_writes_a_summary(llama_dir, corpus, tmp_path, capsys):
    code = main(["--model", str(llama_dir), "--data", str(corpus), "--out", str(tmp_path), "--steps", "2",
                 "--max-seq-len", "32", "--batch-size", "2", "--log-every", "1", "--eval-every", "2"])
    assert code == 0
    out = capsys.readouterr().out
    assert "step 2/2 | loss" in out and "tok/s | eta" in out and "eval step 2 | loss" in out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["steps"] == 2 and (tmp_path / "adapter" / "adapter_config.json").is_file()


def test_grad_checkpointing_gives_the_same_training_bit_for_bit(llama_dir, corpus, tmp_path):
    kw = dict(method="lora", steps=3, lr=1e-2)
    plain = train(_cfg(llama_dir, corpus, tmp_path / "a", **kw))
    ckpt = train(_cfg(llama_dir, corpus, tmp_path / "b", grad_checkpointing=True, **kw))
    assert ckpt.model.gradient_checkpointing and not plain.model.gradient_checkpointing
    for (n, p), q in zip(plain.model.named_parameters(), ckpt.model.parameters()):
        assert torch.equal(p, q), n


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_bf16_autocast_trains(method, llama_dir, corpus, tmp_path):
    # CUDA runs bf16 autocast by default; on CPU --precision bf16 exercises the same path. qlora's fp32
    # adapters on a 4-bit base take the LowRankAdd autograd Function, whose backward runs outside autocast.
    result = train(_cfg(llama_dir, corpus, tmp_path, method=method, precision="bf16", steps=4, lr=2e-2,
                        eval_every=4, eval_fraction=0.1))
    assert result.summary["eval_loss"] < result.summary["eval_loss_start"]
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # autocast, not a cast


# ---- checkpoints written before format 2 still resume (minilora/train/legacy.py) -----------------------

def _as_format_1(folder):
    """Rewrite a format-2 checkpoint in the layout `python -m minilora.train` wrote before format 2:
    trainable.safetensors as is; state.safetensors + state.json's "skeleton" hold {"optimizer": the
    optimizer's state_dict(), "rng": {"torch", "python"}} with tensors under "s.<path>"."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    state = json.loads((folder / "trainer_state.json").read_text())
    tensors = {"s." + k: v for k, v in load_file(str(folder / "optimizer.safetensors")).items()}
    with safe_open(str(folder / "rng-rank0.safetensors"), "pt") as f:
        tensors["s.rng.torch"] = f.get_tensor("torch")
        version, internal, gauss = json.loads(f.metadata()["python"])
    optimizer = json.loads(json.dumps(state["optimizer"]).replace('"__tensor__": "optimizer.', '"__tensor__": "s.optimizer.'))
    rng = {"__dict__": [["torch", {"__tensor__": "s.rng.torch"}],
                        ["python", {"__tuple__": [version, {"__tuple__": internal}, gauss]}]]}
    save_file(tensors, str(folder / "state.safetensors"))
    config = {k: v for k, v in state["config"].items() if k != "strategy"}  # a field format 2 added
    (folder / "state.json").write_text(json.dumps({
        "format": "minilora-train-checkpoint-1", "config": config, "sampler": state["sampler"],
        "skeleton": {"__dict__": [["optimizer", optimizer], ["rng", rng]]}, "step": state["step"],
        "history": state["history"], "tokens_seen": state["tokens_seen"], "elapsed": state["elapsed"]}))
    for name in ("trainer_state.json", "optimizer.safetensors", "rng-rank0.safetensors"):
        (folder / name).unlink()


def _as_format_0(folder, cfg):
    """Rewrite a format-2 checkpoint in the layout `torchrun -m minilora.distributed` wrote before format 2:
    adapter/ in peft's format (or model.safetensors for full), optimizer.safetensors keyed
    "<param name>.<state>" with the names in its metadata, trainer_state.json without "format" or RNG."""
    from safetensors.torch import load_file, save_file

    from minilora.lora.peft_io import save_adapter
    from minilora.train import build_model

    state = json.loads((folder / "trainer_state.json").read_text())
    trainable = load_file(str(folder / "trainable.safetensors"))
    if cfg.method == "full":
        save_file(trainable, str(folder / "model.safetensors"))
    else:
        model, _ = build_model(cfg, device=torch.device("cpu"))
        with torch.no_grad():
            for name, value in trainable.items():
                model.get_parameter(name).copy_(value)
        save_adapter(model, folder / "adapter")
    names = state["param_names"]
    moments = {}
    for key, value in load_file(str(folder / "optimizer.safetensors")).items():
        _, _, index, what = key.split(".", 3)  # optimizer.state.<index>.<state>
        moments[f"{names[0][int(index)]}.{what}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in torch.optim.AdamW([torch.zeros(1)]).state_dict()["param_groups"]]
    save_file(moments, str(folder / "optimizer.safetensors"),
              metadata={"param_groups": json.dumps(groups), "param_names": json.dumps(names)})
    config = {k: v for k, v in state["config"].items() if k != "strategy"}
    (folder / "trainer_state.json").write_text(json.dumps({
        "step": state["step"], "world_size": 1, "history": state["history"], "sampler": state["sampler"],
        "strategy": "ddp", "config": config, "global_batch": state["global_batch"]}))
    for name in ("trainable.safetensors", "rng-rank0.safetensors"):
        (folder / name).unlink()


@pytest.mark.parametrize("layout, method, family, extra", [
    ("format 1", "lora", "gpt", dict(lora_dropout=0.1)),    # holds the RNG states: dropout continues exactly
    ("format 1", "lora", "llama", dict(optimizer="offload", grad_accum=2)),
    ("format 0", "lora", "llama", dict(grad_accum=2)),       # no RNG states in it: no dropout here
    ("format 0", "full", "llama", dict()),
])
def test_resume_from_a_checkpoint_written_before_format_2_is_bit_identical(layout, method, family, extra, corpus,
                                                                            tmp_path):
    model_dir = (_tiny_gpt if family == "gpt" else _tiny_llama)(tmp_path / "base")
    kw = dict(method=method, steps=6, save_every=2, lr=3e-3, **extra)
    whole = _whole_then_cut_at_4(model_dir, corpus, tmp_path, kw)
    folder = tmp_path / "cut" / "checkpoints" / "step-000004"
    if layout == "format 1":
        _as_format_1(folder)
    else:
        _as_format_0(folder, _cfg(model_dir, corpus, tmp_path / "cut", **kw))
    assert not (folder / "rng-rank0.safetensors").exists()
    resumed = train(_cfg(model_dir, corpus, tmp_path / "cut", resume=True, **kw))
    _assert_same_training(whole, resumed)


def test_resume_refuses_an_unknown_checkpoint_format_with_one_line(llama_dir, corpus, tmp_path, capsys):
    common = ["--model", str(llama_dir), "--data", str(corpus), "--out", str(tmp_path), "--max-seq-len", "32",
              "--batch-size", "2", "--steps", "2", "--save-every", "2", "--no-save-final", "--quiet"]
    assert main(common) == 0
    state_path = tmp_path / "checkpoints" / "step-000002" / "trainer_state.json"
    state_path.write_text(json.dumps({**json.loads(state_path.read_text()), "format": "minilora-train-checkpoint-9"}))
    capsys.readouterr()
    assert main(common + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds checkpoint format 'minilora-train-checkpoint-9'" in err, err
    state_path.unlink()
    assert main(common + ["--resume"]) == 2
    assert "is not a minilora checkpoint: trainer_state.json is missing" in capsys.readouterr().err


def test_resume_refuses_another_global_batch(llama_dir, corpus, tmp_path):
    train(_cfg(llama_dir, corpus, tmp_path, steps=2, save_every=2))
    with pytest.raises(ValueError, match=r"global batch of 4 sequences \(batch_size x world_size\), this run has 2"):
        train(_cfg(llama_dir, corpus, tmp_path, steps=2, save_every=2, batch_size=2, resume=True))


def test_offload_optimizer_is_refused_under_ddp_and_fsdp2():
    # its gradient hook copies and frees each gradient, possibly before DDP / FSDP2 have reduced it
    for strategy in ("ddp", "full_shard", "shard_grad_op"):
        with pytest.raises(ValueError, match=rf"optimizer must be 'adamw' under strategy '{strategy}', got 'offload'"):
            TrainConfig(data="x.txt", optimizer="offload", strategy=strategy).validate()
    TrainConfig(data="x.txt", optimizer="offload").validate()  # one process: fine


def test_a_distributed_strategy_takes_cuda_local_rank_not_a_numbered_device():
    from minilora.train.strategy import Strategy

    # refused before any process group is joined
    with pytest.raises(ValueError, match=r"device must be auto, cpu or cuda under strategy 'ddp' "
                                         r"\(each rank takes cuda:LOCAL_RANK\), got 'cuda:1'"):
        Strategy.start(TrainConfig(data="x.txt", strategy="ddp", device="cuda:1"))
    with pytest.raises(ValueError, match=r"strategy must be one of none, ddp, full_shard, shard_grad_op, got 'zero9'"):
        TrainConfig(data="x.txt", strategy="zero9").validate()
