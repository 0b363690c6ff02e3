"""minilora.distributed: 2 gloo processes on CPU (torch.multiprocessing.spawn, a free port).

Each spawn costs a few seconds of start-up, so one spawn checks several strategies in turn.
Workers are module-level functions (spawn pickles them by name) and raise on failure, which
mp.spawn re-raises here with the worker's traceback.
"""
import copy
import os
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from minilora import distributed as D
from minilora.train import load_checkpoint, save_checkpoint, train_distributed
import factories
from reference_models import Llama

WORLD = 2


def tiny_llama(seed: int = 0) -> Llama:
    # every dim 0 (vocab 64, hidden 32, kv 2*8, mlp 64) divides by 2: shards are even, no padding
    return factories.tiny_llama(seed, attn_impl="sdpa")


def odd_llama() -> Llama:
    return factories.tiny_llama(0, vocab_size=67)


def batch(rows: int = 4, seq: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 64, (rows, seq + 1), generator=g)


def spawn(fn, *args, nprocs=WORLD):
    port = D.free_port()
    mp.spawn(_entry, args=(nprocs, port, fn, args), nprocs=nprocs, join=True)


def _entry(rank, world, port, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = D.init_distributed("gloo")  # CPU processes even where CUDA exists (the default there is nccl)
    try:
        fn(env, *args)
    finally:
        D.shutdown()


# ---- DDP / FSDP2 full fine-tuning == one process on the concatenated batch -------------------------

def _step(model, opt, ids, micro_batches: int):
    """One optimizer step over `ids`, split into micro-batches (gradient accumulation)."""
    chunks = ids.chunk(micro_batches)
    for i, chunk in enumerate(chunks):
        with D.no_sync(model, enabled=i < len(chunks) - 1):
            _, loss = model(chunk[:, :-1], chunk[:, 1:])
            (loss / len(chunks)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _worker_equivalence(env, steps):
    ids = batch()
    per_rank = ids.chunk(env.world_size)[env.rank]  # (2, 13): the ranks' batches concatenate to ids
    for strategy in ("ddp", "full_shard", "shard_grad_op"):
        model = tiny_llama()
        reference = copy.deepcopy(model)
        wrapped = D.wrap_model(model, strategy, env)
        # The ranks sum gradients in another order than one process, so gradients differ in the last
        # bits. With AdamW's default eps (1e-8), lr * m / (sqrt(v) + eps) turns such a difference in
        # a gradient near zero into a visible step (seen: 3e-5 after 3 steps on an AVX512 machine);
        # eps = 1e-5 keeps the update smooth there without changing it for ordinary gradients.
        opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-2, eps=1e-5)
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, eps=1e-5)
        for _ in range(steps):
            _step(wrapped, opt, per_rank, micro_batches=2)
            _step(reference, ref_opt, ids, micro_batches=1)
        full = D.gather_full_state(wrapped)
        if env.rank == 0:
            ref_state = dict(reference.named_parameters())
            assert full.keys() == ref_state.keys(), strategy
            for name, value in full.items():
                torch.testing.assert_close(value, ref_state[name].detach(), rtol=1e-4, atol=2e-6,
                                           msg=lambda m: f"{strategy} {name}: {m}")
            moved = max((v - tiny_llama().get_parameter(n)).abs().max().item() for n, v in full.items())
            assert moved > 1e-3, f"{strategy}: training did not change the parameters"


def test_ddp_and_fsdp2_full_finetune_equal_single_process_on_concatenated_batch():
    spawn(_worker_equivalence, 3)


# ---- errors --------------------------------------------------------------------------------------

def test_wrap_model_rejects_unknown_strategy():
    with pytest.raises(ValueError, match=r"strategy must be one of none, ddp, full_shard, shard_grad_op, got 'zero4'"):
        D.wrap_model(nn.Linear(2, 2), "zero4")


def test_wrap_model_needs_a_process_group():
    with pytest.raises(ValueError, match=r"strategy 'ddp' needs a process group"):
        D.wrap_model(nn.Linear(2, 2), "ddp")


def test_fsdp2_rejects_mixed_trainable_dtypes_in_one_unit(monkeypatch):
    # checked before any collective, so no process group is needed to reach the error
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    model = tiny_llama()
    model.model.layers[1].mlp.up_proj.to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"'block 1' mixes .*float32.*bfloat16|'block 1' mixes .*bfloat16.*float32"):
        D.wrap_model(model, "full_shard")


def test_strategy_none_is_refused_on_several_ranks():
    # nothing would average the gradients: each rank would train its own model
    assert D.check_strategy("none", 1) == "none" and D.check_strategy("fsdp-full", 4) == "full_shard"
    with pytest.raises(ValueError, match=r"strategy 'none' on 2 ranks would train 2 unsynchronised models"):
        D.check_strategy("none", 2)
    two_ranks = D.DistEnv(0, 2, 0, torch.device("cpu"), "gloo")
    with pytest.raises(ValueError, match=r"strategy 'none' on 2 ranks"):
        D.wrap_model(nn.Linear(2, 2), "none", two_ranks)
    from minilora.train import TrainConfig

    with pytest.raises(ValueError, match=r"strategy 'none' on 2 ranks"):  # before any model is built
        train_distributed(TrainConfig(data="unused.txt", model="nowhere"), "none", env=two_ranks)


def test_ddp_does_not_broadcast_buffers_every_forward():
    # the buffers (QLoRA's 4-bit codes and scales, rotary tables) are frozen and equal on every rank
    env = D.init_distributed("gloo")  # a group of one, in this process
    try:
        model = qlora_llama()
        assert any(b.dtype == torch.uint8 for b in model.buffers())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # torch 2.13 deprecates broadcast_buffers=False with a FutureWarning
            ddp = D.wrap_model(model, "ddp", env)
        assert ddp.broadcast_buffers is False and ddp.forward_sync_buffers is False
        ids = batch(rows=2, seq=8)
        _, loss = ddp(ids[:, :-1], ids[:, 1:])
        loss.backward()
    finally:
        D.shutdown()


def test_init_distributed_rejects_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be 'gloo' or 'nccl', got 'mpi'"):
        D.init_distributed("mpi")


# ---- FSDP2 LoRA: train, save the gathered adapter, load it in one process; resume on 1 process ------

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_llama():
    from minilora.lora.layer import LoRAConfig
    from minilora.lora.model import inject

    model = tiny_llama()
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=LORA_TARGETS))
    torch.manual_seed(2)
    with torch.no_grad():  # B starts at zero; a random B makes the first steps move A as well
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.02)
    return model


def qlora_llama():
    from minilora.lora.layer import LoRAConfig
    from minilora.lora.model import inject
    from minilora.quant.qlora import prepare_for_kbit_training, quantize_model

    model = quantize_model(tiny_llama(), block_size=64, double_quant=True)
    prepare_for_kbit_training(model, use_gradient_checkpointing=False)
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=LORA_TARGETS))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.02)
    return model


def adamw(model):
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _worker_fsdp_lora(env, folder, steps):
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(folder)
    ids = batch()
    per_rank = ids.chunk(env.world_size)[env.rank]
    model = D.wrap_model(lora_llama(), "full_shard", env)
    opt = adamw(model)
    for step in range(steps):
        _, loss = model(per_rank[:, :-1], per_rank[:, 1:])
        loss.backward()
        if step == steps - 1:  # grads and AdamW moments both alive: the peak of model states
            held = D.model_state_bytes(model, opt)
            (folder / f"bytes{env.rank}.json").write_text(json.dumps(held))
        opt.step()
        opt.zero_grad(set_to_none=True)
    D.save_adapter_sharded(model, folder / "adapter")
    save_checkpoint(folder / "ckpt", model, opt, {"step": steps})
    model.eval()
    with torch.no_grad():
        logits = model(ids[:, :-1])  # every rank runs the same batch: FSDP2 forward is collective
    model.train()
    _, loss = model(per_rank[:, :-1], per_rank[:, 1:])  # one more step, to check resume against
    loss.backward()
    opt.step()
    after = D.gather_full_state(model, lambda n, p: p.requires_grad)
    # the same checkpoint resumed into a model sharded the other way takes the same step
    other = D.wrap_model(lora_llama(), "shard_grad_op", env)
    other_opt = adamw(other)
    assert load_checkpoint(folder / "ckpt", other, other_opt)["step"] == steps
    _, loss = other(per_rank[:, :-1], per_rank[:, 1:])
    loss.backward()
    other_opt.step()
    resumed = D.gather_full_state(other, lambda n, p: p.requires_grad)
    # full fine-tuning of a model whose vocab (67 rows) does not divide by 2: padded shards
    odd = D.wrap_model(odd_llama(), "full_shard", env)
    odd_opt = torch.optim.AdamW(odd.parameters(), lr=1e-3)
    for _ in range(2):
        _, loss = odd(per_rank[:, :-1] % 67, per_rank[:, 1:] % 67)
        loss.backward()
        held = D.model_state_bytes(odd, odd_opt)
        odd_opt.step()
        odd_opt.zero_grad(set_to_none=True)
    (folder / f"bytes_full{env.rank}.json").write_text(json.dumps(held))
    # QLoRA: 4-bit base (buffers) + fp32 adapters, sharded, equals one process on the whole batch
    qlora, reference = qlora_llama(), qlora_llama()
    qlora = D.wrap_model(qlora, "full_shard", env)
    q_opt, ref_opt = adamw(qlora), adamw(reference)
    for _ in range(2):
        _step(qlora, q_opt, per_rank, micro_batches=1)
        _step(reference, ref_opt, ids, micro_batches=1)
    _, loss = qlora(per_rank[:, :-1], per_rank[:, 1:])
    loss.backward()
    (folder / f"bytes_qlora{env.rank}.json").write_text(json.dumps(D.model_state_bytes(qlora, q_opt)))
    q_opt.zero_grad(set_to_none=True)
    trained = D.gather_full_state(qlora, lambda n, p: p.requires_grad)
    if env.is_main:
        expected = {n: p for n, p in reference.named_parameters() if p.requires_grad}
        assert trained.keys() == expected.keys() and len(trained) == 28
        for name in trained:
            torch.testing.assert_close(trained[name], expected[name].detach(), rtol=1e-4, atol=2e-6,
                                       msg=lambda m: f"qlora {name}: {m}")
    if env.is_main:
        assert resumed.keys() == after.keys()
        for name in after:
            torch.testing.assert_close(resumed[name], after[name], rtol=1e-5, atol=1e-7)
        save_file({"logits": logits.contiguous()}, str(folder / "logits.safetensors"))
        save_file(after, str(folder / "after.safetensors"))


STEPS = 3


@pytest.fixture(scope="module")
def fsdp_lora_run(tmp_path_factory):
    """One 2-process FSDP2 LoRA run shared by the tests below (a spawn costs seconds)."""
    folder = tmp_path_factory.mktemp("fsdp_lora")
    spawn(_worker_fsdp_lora, str(folder), STEPS)
    return folder


def test_fsdp2_lora_adapter_loads_in_one_process_and_resumes_on_another_world_size(fsdp_lora_run):
    from safetensors.torch import load_file

    from minilora.lora.peft_io import load_adapter

    folder = fsdp_lora_run
    # the gathered adapter, loaded into a fresh single-process model, gives the FSDP2 logits
    single = tiny_llama()
    load_adapter(single, folder / "adapter")
    ids = batch()
    with torch.no_grad():
        logits = single.eval()(ids[:, :-1])
        untrained = tiny_llama().eval()(ids[:, :-1])
    torch.testing.assert_close(logits, load_file(str(folder / "logits.safetensors"))["logits"],
                               rtol=1e-5, atol=1e-5)
    assert (logits - untrained).abs().max() > 1e-3, "the adapter did not change the model"
    # resume the 2-process checkpoint on 1 process (no process group): the next step matches
    model = lora_llama()
    opt = adamw(model)
    state = load_checkpoint(folder / "ckpt", model, opt)
    assert state["step"] == STEPS and state["world_size"] == WORLD
    _, loss = model(ids[:, :-1], ids[:, 1:])
    loss.backward()
    opt.step()
    expected = load_file(str(folder / "after.safetensors"))
    got = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=2e-6, msg=lambda m: f"{name}: {m}")


def _calculator_terms() -> dict:
    from calculators.lora import LoRASpec
    from calculators.memory import TrainingSetup, training_memory
    from calculators.models import model_spec

    spec = model_spec(tiny_llama().config.to_hf_dict(), name="tiny")
    setup = TrainingSetup(method="lora", dtype="fp32", batch=2, seq=12, device="cpu", gpus=WORLD, zero="fsdp-full",
                          lora=LoRASpec(rank=4, alpha=8, targets=LORA_TARGETS), stack="minilora")
    return {t.name: t.gpu for t in training_memory(spec, setup).terms}


def _held(folder, prefix: str = "bytes") -> list[dict]:
    import json

    return [json.loads((folder / f"{prefix}{rank}.json").read_text()) for rank in range(WORLD)]


def test_calculator_fsdp2_weights_and_gradients_equal_what_each_shard_holds(fsdp_lora_run):
    calc = _calculator_terms()
    trainable = [p for p in lora_llama().parameters() if p.requires_grad]
    for held in _held(fsdp_lora_run):  # measured on each rank after backward, AdamW states alive
        assert held["params"] == calc["weights"], (held, calc)
        assert held["grads"] == calc["gradients"], (held, calc)
        assert calc["master weights"] == 0
        # AdamW's two fp32 moments are sharded like the parameters: 8 B per trainable element / N
        moments = held["optimizer"] - held["optimizer_scalars"]
        assert moments == 8 * sum(p.numel() for p in trainable) // WORLD
        assert held["optimizer_scalars"] == 4 * len(trainable)  # one fp32 step per tensor, NOT sharded


def test_calculator_fsdp2_optimizer_states_equal_what_each_shard_holds(fsdp_lora_run):
    # sharded moments plus the whole per-tensor step scalars, on every rank
    calc = _calculator_terms()
    for held in _held(fsdp_lora_run):
        assert held["optimizer"] == calc["optimizer states"], (held, calc)


def test_calculator_fsdp2_full_finetune_with_padded_shards_equals_rank0(fsdp_lora_run):
    """Rank 0 holds ceil(rows / N) rows of every tensor: the calculator reports that rank."""
    from calculators.memory import TrainingSetup, training_memory
    from calculators.models import model_spec

    spec = model_spec(odd_llama().config.to_hf_dict(), name="odd")
    setup = TrainingSetup(method="full", dtype="fp32", batch=2, seq=12, device="cpu", gpus=WORLD, zero="fsdp-full",
                          stack="minilora")
    calc = {t.name: t.gpu for t in training_memory(spec, setup).terms}
    rank0, rank1 = _held(fsdp_lora_run, "bytes_full")
    assert rank0["params"] == rank1["params"] == calc["weights"]  # FSDP2 pads rank 1's storage too
    assert rank0["grads"] == calc["gradients"], (rank0, calc)
    assert rank0["optimizer"] - rank0["optimizer_scalars"] == 2 * rank0["params"]


def test_fsdp2_qlora_keeps_the_4bit_base_whole_on_every_rank_and_shards_the_rest(fsdp_lora_run):
    """LinearNF4 keeps its packed codes and scales as buffers, and FSDP2 shards parameters only:
    every rank holds the whole 4-bit base; embeddings, norms, lm_head and adapters are sharded."""
    model = qlora_llama()
    buffers = sum(b.nbytes for b in model.buffers())
    params = sum(p.nbytes for p in model.parameters())
    trainable = sum(p.nbytes for p in model.parameters() if p.requires_grad)
    assert buffers > 0
    for held in _held(fsdp_lora_run, "bytes_qlora"):
        assert held["buffers"] == buffers
        assert held["params"] == params // WORLD
        assert held["grads"] == trainable // WORLD


def test_calculator_fsdp2_qlora_weights_equal_what_each_rank_holds(fsdp_lora_run):
    from calculators.lora import LoRASpec
    from calculators.memory import TrainingSetup, training_memory
    from calculators.models import model_spec

    spec = model_spec(tiny_llama().config.to_hf_dict(), name="tiny")
    setup = TrainingSetup(method="qlora", dtype="fp32", batch=2, seq=12, device="cpu", gpus=WORLD, zero="fsdp-full",
                          lora=LoRASpec(rank=4, alpha=8, targets=LORA_TARGETS), stack="minilora")
    calc = {t.name: t.gpu for t in training_memory(spec, setup).terms}
    for held in _held(fsdp_lora_run, "bytes_qlora"):
        assert held["params"] + held["buffers"] == calc["weights"], (held, calc)


def test_init_distributed_nccl_with_more_local_ranks_than_gpus_says_what_to_do(monkeypatch):
    # as on a 1-GPU machine running 2 processes: rank 1 has no cuda:1 (checked before any CUDA call)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    message = (r"LOCAL_RANK=1 but this machine has 1 CUDA device\(s\): backend 'nccl' needs one GPU per process; "
               r"use backend='gloo' or at most 1 process\(es\) per node")
    with pytest.raises(ValueError, match=message):
        D.init_distributed()  # the default backend where CUDA is available
    with pytest.raises(ValueError, match=message):
        D.init_distributed("nccl")


def test_init_distributed_without_torchrun_rendezvous_says_how_to_launch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2 but MASTER_ADDR is not set: launch with torchrun"):
        D.init_distributed("gloo")


def test_load_adapter_sharded_restores_the_adapter_and_leaves_other_parameters_alone(tmp_path):
    # GPT-2 has biases and LayerNorms the adapter file does not hold (bias="none"): they must keep
    # their values, as must a second adapter, while the saved one comes back exactly
    from minilora.lora.layer import LoRAConfig
    from minilora.lora.model import inject
    from minilora.lora.peft_io import save_adapter
    from reference_models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj"]))
    inject(model, LoRAConfig(r=2, alpha=4, target_modules=["c_fc"]), adapter_name="other")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # every tensor, lora_B included, distinct from its initial value
    save_adapter(model, tmp_path / "adapter")
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name and ".default." in name:
                p.zero_()
    D.load_adapter_sharded(model, tmp_path / "adapter")
    for name, p in model.named_parameters():
        assert torch.equal(p, saved[name]), name
    assert any(n.endswith(".bias") for n in saved) and any(".other." in n for n in saved)


def test_load_adapter_sharded_needs_the_adapter_injected_first(tmp_path):
    with pytest.raises(ValueError, match=r"has no adapter 'default' to load into; inject it first"):
        D.load_adapter_sharded(tiny_llama(), tmp_path)


def test_load_checkpoint_rejects_a_folder_that_is_not_a_checkpoint(tmp_path):
    model = lora_llama()
    with pytest.raises(ValueError, match=r"is not a minilora checkpoint: trainer_state.json is missing"):
        load_checkpoint(tmp_path, model, adamw(model))
