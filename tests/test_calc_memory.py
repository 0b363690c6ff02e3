"""calculators.states / terms / memory: model-state bytes equal the real tensors' nbytes after a
training step on the reference models; sharding arithmetic against torch.chunk and DeepSpeed's
estimators; the peak is composed from the terms as the memory module's docstring says."""
import math
import re

import pytest
import torch
from hypothesis import assume, given, strategies as st

from calculators import (LoRASpec, TrainingSetup, deepspeed_zero2_estimate, deepspeed_zero3_estimate,
                         fsdp_rank0_elements, model_spec, model_state_bytes, nf4_bytes, parameter_tensors,
                         training_memory)
from factories import tiny_gpt, tiny_llama


def tiny(family, dtype):
    if family == "llama":
        model = tiny_llama(0, vocab_size=101, hidden_size=64, intermediate_size=96, attention_bias=True,
                           o_proj_bias=False, model_type="qwen2")
    else:
        model = tiny_gpt(0, vocab_size=101, n_positions=64, n_embd=64)
    return model.to(dtype), model_spec(model.config.to_hf_dict())


def unique_nbytes(tensors):
    seen = {}
    for t in tensors:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def train_step(model, optimizer):
    idx = torch.randint(0, 101, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    optimizer.step()


def real_states(model, optimizer):
    params = [p for p in model.parameters()]
    trainable = [p for p in params if p.requires_grad]
    states = [v for p in trainable for v in optimizer.state[p].values() if torch.is_tensor(v)]
    return {"weights": unique_nbytes(params), "gradients": unique_nbytes([p.grad for p in trainable]),
            "optimizer": unique_nbytes(states) if states else 0}


def predicted(spec, **kw):
    # the reference models train the minilora way; QLoRA here is quantize_model + inject, no prepare
    kw.setdefault("stack", "minilora")
    if kw.get("method") == "qlora":
        kw.setdefault("prepare_kbit", False)
    s = model_state_bytes(spec, TrainingSetup(**kw))
    return {"weights": s.weights, "gradients": s.gradients, "optimizer": s.optimizer + s.master}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype,optimizer", [(torch.float32, "adamw"), (torch.bfloat16, "adamw"),
                                             (torch.bfloat16, "sgd-momentum"), (torch.float32, "sgd")])
def test_full_finetune_state_bytes_exact(family, dtype, optimizer):
    model, spec = tiny(family, dtype)
    opt = {"adamw": lambda p: torch.optim.AdamW(p, foreach=False),
           "sgd-momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
           "sgd": lambda p: torch.optim.SGD(p, lr=0.1)}[optimizer](model.parameters())
    train_step(model, opt)
    dname = "fp32" if dtype == torch.float32 else "bf16"
    # torch optimizers on bf16 parameters keep bf16 states and no master copy
    assert real_states(model, opt) == predicted(spec, method="full", dtype=dname, optimizer=optimizer,
                                                master_weights=False)


@pytest.mark.interop
def test_adamw8bit_state_bytes_exact_vs_bitsandbytes():
    import bitsandbytes as bnb
    model, spec = tiny("llama", torch.float32)
    opt = bnb.optim.AdamW8bit(model.parameters())
    train_step(model, opt)
    assert real_states(model, opt) == predicted(spec, method="full", dtype="fp32", optimizer="adamw8bit")


@pytest.mark.parametrize("targets,dropout", [(None, 0.0), ("all-linear", 0.1), (["c_proj"], 0.0)])
def test_lora_state_bytes_exact(targets, dropout):
    from minilora.lora.layer import LoRAConfig
    from minilora.lora.model import inject
    from calculators import lora_layers

    model, spec = tiny("gpt2", torch.float32)
    names = [lin.name for lin in lora_layers(spec, targets)]
    inject(model, LoRAConfig(r=4, alpha=8, dropout=dropout, target_modules=names))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=False)
    train_step(model, opt)
    assert real_states(model, opt) == predicted(spec, method="lora", dtype="fp32",
                                                lora=LoRASpec(rank=4, targets=targets))


@pytest.mark.parametrize("state_bits,dtype", [(32, torch.float32), (8, torch.float32), (32, torch.bfloat16)])
def test_offload_host_bytes_exact(state_bits, dtype):
    from minilora.optim.offload import CPUOffloadAdamW

    model, spec = tiny("llama", dtype)
    master = "fp32" if dtype == torch.bfloat16 else None
    opt = CPUOffloadAdamW(model.parameters(), state_bits=state_bits, master_weights=master, page_size=4096)
    train_step(model, opt)
    s = model_state_bytes(spec, TrainingSetup(method="full", dtype="fp32" if dtype == torch.float32 else "bf16",
                                              optimizer="offload" if state_bits == 32 else "offload8bit",
                                              master_weights=master is not None, stack="minilora"))
    mem = opt.memory_bytes()
    assert mem["cpu"] == s.host
    assert mem["device"] == s.weights + opt.link.staging_bytes


def test_nf4_bits_per_parameter():
    n = 4096 * 4096
    assert nf4_bytes(n, 64, double_quant=False) * 8 / n == pytest.approx(4.5, abs=1e-4)
    assert nf4_bytes(n, 64, double_quant=True) * 8 / n == pytest.approx(4.127, abs=1e-3)


@given(rows=st.integers(1, 50), cols=st.integers(1, 5), gpus=st.integers(1, 8))
def test_fsdp_rank0_shard_matches_torch_chunk(rows, cols, gpus):
    shapes = [(rows, cols), (rows,)]
    expected = sum(torch.chunk(torch.empty(s), gpus, dim=0)[0].numel() for s in shapes)
    assert fsdp_rank0_elements(shapes, gpus) == expected


@pytest.mark.parametrize("gpus", [1, 2, 8, 64])
def test_zero_model_states_agree_with_deepspeed_estimates(gpus):
    spec = model_spec("llama-2-7b")
    P = 6_738_415_616
    # minilora's full fine-tuning of a bf16 model keeps an fp32 master copy: ZeRO's 16 B/param
    setup = TrainingSetup(method="full", dtype="bf16", gpus=gpus, grad_ckpt="full", stack="minilora")
    terms = {t.name: t.gpu for t in training_memory(spec, TrainingSetup(**{**setup.__dict__, "zero": "zero2"})).terms}
    ours = terms["weights"] + terms["gradients"] + terms["master weights"] + terms["optimizer states"]
    steps = 4 * len(parameter_tensors(spec))  # torch's 4-byte step per tensor; DeepSpeed does not count it
    # DeepSpeed's ZeRO-2 adds a full 16-bit gradient buffer and its fp32 gradient partition
    deepspeed_buffers = 2 * P - -(-2 * P // gpus) + int(4 * P / gpus)
    assert abs(ours - steps + deepspeed_buffers - deepspeed_zero2_estimate(P, gpus)) <= 2 * gpus
    terms = {t.name: t.gpu for t in training_memory(spec, TrainingSetup(**{**setup.__dict__, "zero": "zero3"})).terms}
    ours = terms["weights"] + terms["gradients"] + terms["master weights"] + terms["optimizer states"]
    largest = 32000 * 4096  # the largest single module: the embedding (or lm_head)
    deepspeed_buffers = int(2 * P / gpus) + 4 * largest
    assert abs(ours - steps + deepspeed_buffers - deepspeed_zero3_estimate(P, largest, gpus)) <= 4 * gpus


def test_sharding_divides_the_right_terms():
    spec = model_spec("llama-2-7b")
    one = {t.name: t.gpu for t in training_memory(spec, TrainingSetup(method="full")).terms}
    for zero, divided in [("zero1", {"optimizer states", "master weights"}),
                          ("zero2", {"optimizer states", "master weights", "gradients"}),
                          ("fsdp-full", {"optimizer states", "master weights", "gradients", "weights"})]:
        eight = {t.name: t.gpu for t in training_memory(spec, TrainingSetup(method="full", gpus=8, zero=zero)).terms}
        for name in ("weights", "gradients", "master weights", "optimizer states"):
            if name in divided:
                assert eight[name] == pytest.approx(one[name] / 8, rel=1e-3), (zero, name)
            else:
                assert eight[name] == one[name], (zero, name)
    ddp = {t.name: t.gpu for t in training_memory(spec, TrainingSetup(method="full", gpus=2, zero="ddp")).terms}
    assert ddp["DDP gradient buckets"] == one["gradients"]


def test_peak_grows_with_batch_and_seq_and_shrinks_with_checkpointing():
    spec = model_spec("llama-3-8b")
    base = TrainingSetup(method="qlora", batch=2, seq=1024)
    peak = training_memory(spec, base).peak
    assert training_memory(spec, TrainingSetup(**{**base.__dict__, "batch": 4})).peak > peak
    assert training_memory(spec, TrainingSetup(**{**base.__dict__, "seq": 2048})).peak > peak
    assert training_memory(spec, TrainingSetup(**{**base.__dict__, "grad_ckpt": "full"})).peak < peak


@given(model=st.sampled_from(["gpt2", "llama-2-7b", "mixtral-8x7b", "phi-3-mini", "gemma-2-9b"]),
       method=st.sampled_from(["full", "lora", "qlora"]),
       optimizer=st.sampled_from(["adamw", "adamw8bit", "sgd", "sgd-momentum", "offload", "offload8bit"]),
       grad_ckpt=st.sampled_from(["none", "full", "selective"]), attn=st.sampled_from(["sdpa", "eager"]),
       dtype=st.sampled_from(["fp32", "bf16"]), gpus=st.sampled_from([1, 2, 8]),
       zero=st.sampled_from(["none", "ddp", "zero1", "zero2", "zero3", "fsdp-full", "fsdp-grad-op"]),
       grad_accum=st.sampled_from([1, 4]), device=st.sampled_from(["cuda", "cpu"]),
       batch=st.integers(1, 4), seq=st.integers(1, 4096), stack=st.sampled_from(["hf", "minilora"]),
       autocast=st.sampled_from(["none", "bf16"]))
def test_peak_is_the_held_terms_plus_the_largest_phase(model, method, optimizer, grad_ckpt, attn, dtype, gpus,
                                                       zero, grad_accum, device, batch, seq, stack, autocast):
    """peak = weights + master + optimizer + strategy, cuBLAS and dequantize buffers + max(backward start,
    backward through the blocks, backward end, step), each phase holding its terms; host bytes are the
    terms' CPU bytes; the note says the same."""
    assume(not (stack == "hf" and grad_ckpt == "selective"))  # transformers has no selective recomputation
    setup = TrainingSetup(method=method, optimizer=optimizer, grad_ckpt=grad_ckpt, attn=attn, dtype=dtype, gpus=gpus,
                          zero=zero, grad_accum=grad_accum, device=device, batch=batch, seq=seq, stack=stack,
                          autocast=autocast)
    b = training_memory(model_spec(model), setup)
    terms = {t.name: t for t in b.terms}
    assert len(terms) == len(b.terms)

    def gpu(*names):
        return sum(terms[n].gpu for n in names if n in terms)

    static, start, blocks, end, step = (int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", b.notes[0]))
    assert static == gpu("weights", "master weights", "optimizer states", "DDP gradient buckets",
                         "gathered parameters", "cuBLAS workspaces", "4-bit dequantize buffer")
    assert ("4-bit dequantize buffer" in terms) == (stack == "minilora" and method == "qlora")
    # backward start also holds the gradients produced before it (none, the head's, or all of them); the
    # loss's term is the stack's default loss: "logits and loss" (hf) or "chunked loss" (minilora.train's)
    loss = "logits and loss" if stack == "hf" else "chunked loss"
    assert loss in terms
    assert gpu("activations", loss) <= start <= gpu("activations", loss, "gradients")
    if grad_accum > 1:
        assert start == gpu("activations", loss, "gradients")
    # backward end also holds what the first block saved (a part of the activations)
    assert gpu("gradients", "recomputed block", "backward workspace") <= end
    assert end <= gpu("gradients", "recomputed block", "backward workspace", "activations")
    # backward through the blocks: the blocks' part of the activations, a recomputed block, the workspace
    assert gpu("recomputed block", "backward workspace") <= blocks
    assert blocks <= gpu("activations", "recomputed block", "backward workspace", "gradients")
    assert step == gpu("gradients")
    assert b.peak == static + max(start, blocks, end, step)
    assert b.total_gpu == b.peak + terms["CUDA context"].gpu
    assert b.cpu == sum(t.cpu for t in b.terms)
    assert ("recomputed block" in terms) == (grad_ckpt == "full")


def test_every_term_states_its_assumption():
    for method in ("full", "lora", "qlora"):
        b = training_memory(model_spec("mistral-7b"), TrainingSetup(method=method, optimizer="offload"))
        assert all(t.assumption for t in b.terms)
        assert b.cpu > 0


def test_bad_setup():
    spec = model_spec("gpt2")
    with pytest.raises(ValueError, match="batch must be an integer >= 1, got 0"):
        training_memory(spec, TrainingSetup(batch=0))
    with pytest.raises(ValueError, match="method must be one of full, lora, qlora, got 'dora'"):
        training_memory(spec, TrainingSetup(method="dora"))
    with pytest.raises(ValueError, match="unknown sharding 'zero4'"):
        training_memory(spec, TrainingSetup(zero="zero4", gpus=2))


@pytest.mark.parametrize("family,double_quant,dtype", [("llama", True, torch.bfloat16), ("gpt2", False, torch.float32),
                                                       ("llama", False, torch.float32)])
def test_qlora_state_bytes_exact(family, double_quant, dtype):
    from minilora.lora.layer import LoRAConfig
    from minilora.lora.model import inject
    from minilora.quant.qlora import quantize_model

    model, spec = tiny(family, dtype)
    quantize_model(model, double_quant=double_quant)
    inject(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], foreach=False)
    train_step(model, opt)
    real = real_states(model, opt)
    real["weights"] = unique_nbytes(list(model.parameters()) + list(model.buffers()))
    dname = "fp32" if dtype == torch.float32 else "bf16"
    assert real == predicted(spec, method="qlora", dtype=dname, double_quant=double_quant,
                             lora=LoRASpec(rank=4, targets="all-linear"))


@pytest.mark.parametrize("method", ["qlora", "lora", "full"])
@pytest.mark.parametrize("gpus", [2, 3, 8])
def test_fsdp_grad_op_weights_plus_gathered_equal_unsharded_weights(method, gpus):
    """reshard_after_forward=False: between forward and backward every rank holds every weight once."""
    spec = model_spec("llama-2-7b")
    setup = TrainingSetup(method=method, lora=LoRASpec(rank=16, targets="all-linear"), seq=2048, grad_ckpt="full",
                          gpus=gpus, zero="fsdp-grad-op")
    terms = {t.name: t.gpu for t in training_memory(spec, setup).terms}
    assert terms["weights"] + terms["gathered parameters"] == model_state_bytes(spec, setup).weights


def test_fsdp_qlora_gathers_only_the_sharded_dense_part():
    """NF4 buffers are replicated (counted whole in weights): FSDP gathers only norms, embeddings,
    lm_head and the LoRA adapters; full-shard gathers two blocks of those."""
    spec = model_spec("llama-2-7b")
    lora = LoRASpec(rank=16, targets="all-linear")
    setup = TrainingSetup(method="qlora", lora=lora, gpus=2, zero="fsdp-full", stack="minilora", prepare_kbit=False)
    states = model_state_bytes(spec, setup)
    terms = {t.name: t.gpu for t in training_memory(spec, setup).terms}
    from calculators.lora import lora_tensors
    block = sum(t.numel for t in parameter_tensors(spec) if ".layers.0." in t.name and t.kind == "norm")
    block += sum(math.prod(shape) for name, shape in lora_tensors(spec, lora) if ".layers.0." in name)
    assert terms["gathered parameters"] == 2 * block * 2
    dense = sum(math.prod(s) for s in states.dense_shapes + states.trainable_shapes)
    grad_op = {t.name: t.gpu for t in training_memory(spec, TrainingSetup(**{**setup.__dict__, "zero": "grad-op"})).terms}
    assert grad_op["gathered parameters"] == 2 * dense - 2 * fsdp_rank0_elements(
        states.dense_shapes + states.trainable_shapes, 2)
    assert grad_op["gathered parameters"] < states.weights - states.quantized_bytes


def test_distributed_docstring_names_only_options_that_exist():
    import inspect
    import re
    import calculators.distributed as dist
    params = {p for f in vars(dist).values() if inspect.isfunction(f) for p in inspect.signature(f).parameters}
    torch_options = {"reshard_after_forward", "gradient_as_bucket_view"}  # torch's own, quoted as such
    promised = set(re.findall(r"\b(\w+)=(?:True|False)\b", dist.__doc__)) - torch_options
    assert promised <= params, promised - params
    assert "test_zero_model_states_agree_with_deepspeed_estimates" in dist.__doc__
