"""calculators' chunked-loss and activation-offload terms against our models on CPU (issue 16). Both
are minilora.train's, so every setup here names stack="minilora" (--stack minilora).

Exact: the bytes kept for backward against saved_tensors_hooks (each storage once, parameters
excluded); the chunked loss's forward buffers against the allocations an op-by-op tracker sees
(tests/allocations.py), up to the learned-token mask (1 byte per token), three fp32 values per
chunk row (target logit, max, sum of exponentials), the one-hot's index temporaries (12 bytes per
row: an int64 arange and the fp32 values at the targets) and two fp32 scalars; its backward
allocates nothing; the offloaded bytes against the host tensors ActivationOffload holds.
"""
import json
import types
from dataclasses import replace

import pytest
import torch
from allocations import AllocationTracker, saved_bytes
from hypothesis import given, settings
from hypothesis import strategies as st
from stack_grid import case_of, cases

from bench.stack_cases import FAMILIES, LAYERS, METHODS, Case, build_minilora, hf_config, training_setup
from bench.stack_cases import VOCAB as VOCAB_GRID
from bench.stack_cases import saved_bytes as saved_by

from calculators import (ActivationSetup, LoRASpec, TrainingSetup, activation_bytes, largest_fitting, lora_layers,
                         model_spec, training_memory)
from calculators.gpus import GiB
from calculators.long_context import DEFAULT_LOSS_CHUNK, chunked_loss_bytes, pinned_bytes
from calculators.cli import main
from factories import tiny_model
from minilora.train import ActivationOffload, TrainConfig
from reference_models.loss import DEFAULT_LOSS_CHUNK as MODELS_DEFAULT_CHUNK
from reference_models.loss import chunked_cross_entropy
from reference_models.tiled_mlp import TileableMLP
from test_calc_explain import evaluate

VOCAB, BATCH, SEQ = 101, 2, 24


def build(family, dtype, method):
    model = tiny_model(family, vocab_size=VOCAB, n_positions=64, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0) \
        if family == "gpt2" else \
        tiny_model(family, vocab_size=VOCAB, hidden_size=64, intermediate_size=192, num_attention_heads=4,
                   num_key_value_heads=2, num_hidden_layers=3)
    model = model.to(dtype).train()
    spec = model_spec(model.config.to_hf_dict())
    if method == "lora":
        from minilora.lora.layer import LoRAConfig
        from minilora.lora.model import inject

        model.requires_grad_(False)
        inject(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    return model, spec


def setup_for(spec, dtype, method, ckpt, chunk, offload=False):
    names = lora_layers(spec, "all-linear") if method == "lora" else []
    return TrainingSetup(method=method, batch=BATCH, seq=SEQ, grad_ckpt="full" if ckpt else "none", device="cpu",
                         dtype="fp32" if dtype == torch.float32 else "bf16", loss="chunked", loss_chunk=chunk,
                         offload_activations=offload, stack="minilora",
                         lora=LoRASpec(rank=4, alpha=8, targets=[lin.name for lin in names] or None))


def ids(seed):
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


# both families x (full, LoRA) x (checkpointing off, on) x (fp32, bf16): half of the 16, each pair once
GRID = [("gpt2", torch.float32, "full", False), ("gpt2", torch.bfloat16, "full", True),
        ("gpt2", torch.bfloat16, "lora", False), ("gpt2", torch.float32, "lora", True),
        ("llama", torch.bfloat16, "full", False), ("llama", torch.float32, "full", True),
        ("llama", torch.float32, "lora", False), ("llama", torch.bfloat16, "lora", True)]


@pytest.mark.parametrize("family,dtype,method,ckpt", GRID)
def test_saved_bytes_with_the_chunked_loss_equal_the_calculators_exactly(family, dtype, method, ckpt):
    model, spec = build(family, dtype, method)
    model.set_gradient_checkpointing(ckpt)
    model.set_loss("chunked", 7)
    real = saved_bytes(lambda: model(ids(0), ids(1)), model.parameters())  # targets of their own, as in training
    setup = setup_for(spec, dtype, method, ckpt, 7)
    out = training_memory(spec, setup)
    terms = {t.name: t for t in out.terms}
    hidden_states = BATCH * SEQ * spec.hidden_size * dtype.itemsize
    b = chunked_loss_bytes(spec, setup, dtype.itemsize, method == "full", hidden_states)
    assert real == out.saved_activation_bytes == terms["activations"].gpu + b["kept"] + head_gradient(spec, dtype, method)
    assert terms["chunked loss"].gpu == b["kept"] + b["forward"]


def head_gradient(spec, dtype, method):
    """With full fine-tuning the chunked loss keeps the head's gradient too (the gradients term counts
    it, saved_tensors_hooks sees it)."""
    return spec.vocab_size * spec.hidden_size * dtype.itemsize if method == "full" else 0


# recipes where the hidden states are not in the compute dtype or lm_head would keep a cast copy:
# autocast over fp32 weights (an fp32 residual stream, 16-bit matmuls) and QLoRA with and without
# prepare_for_kbit_training (fp32 norms); Gemma 2's final soft-cap, applied per chunk, keeps nothing
RECIPES = [("llama", "lora-all", "fp32+autocast", False), ("gpt2", "full", "fp32+autocast", True),
           ("llama", "full", "fp32+autocast", False), ("gpt2", "lora-qv", "fp32+autocast", False),
           ("llama", "qlora-prepare", "bf16", True), ("gpt2", "qlora-prepare", "bf16", False),
           ("qwen3", "qlora", "bf16", False), ("llama", "full", "bf16", False),
           ("gemma2", "lora-all", "fp32+autocast", False), ("gpt_neox", "qlora-prepare", "bf16", False)]


@pytest.mark.parametrize("family,method,precision,ckpt", RECIPES)
def test_saved_bytes_with_the_chunked_loss_under_autocast_and_qlora_equal_the_calculators_exactly(
        family, method, precision, ckpt):
    case = Case("minilora", family, method, ckpt=ckpt, precision=precision)
    model = build_minilora(case)
    model.set_loss("chunked", 7)
    x = torch.randint(0, VOCAB_GRID, (case.batch, case.seq), generator=torch.Generator().manual_seed(0))

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "fp32+autocast"):
            return model(x, x.roll(-1, dims=1))[1]

    _, real = saved_by(model, forward)
    spec = model_spec(hf_config(case).to_dict())
    out = training_memory(spec, replace(training_setup(case), loss="chunked", loss_chunk=7))
    assert real == out.saved_activation_bytes


@given(tokens=st.integers(1, 60), hidden=st.sampled_from([16, 64]), vocab=st.integers(2, 300),
       chunk=st.integers(1, 64), dtype=st.sampled_from([torch.float32, torch.bfloat16]), trainable=st.booleans())
def test_the_chunked_loss_forward_buffers_equal_the_calculators_and_backward_allocates_nothing(
        tokens, hidden, vocab, chunk, dtype, trainable):
    spec = model_spec(dict(model_type="llama", vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=1, num_attention_heads=4))
    rows = min(chunk, tokens)
    setup = TrainingSetup(method="full" if trainable else "lora", batch=1, seq=tokens, loss="chunked",
                          loss_chunk=rows, device="cpu", stack="minilora")
    g = torch.Generator().manual_seed(tokens * vocab)
    h = torch.randn(1, tokens, hidden, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(vocab, hidden, generator=g).to(dtype).requires_grad_(trainable)
    targets = torch.randint(0, vocab, (1, tokens), generator=g)
    with AllocationTracker() as forward:
        loss = chunked_cross_entropy(h, weight, targets, rows)
    with AllocationTracker() as backward:
        loss.backward()
    b = chunked_loss_bytes(spec, setup, dtype.itemsize, trainable, tokens * hidden * dtype.itemsize)
    head_input = tokens * hidden * dtype.itemsize  # the caller's: alive, not allocated here
    head_gradient = vocab * hidden * dtype.itemsize if trainable else 0  # the gradients term's, not the loss's
    predicted = b["kept"] + b["forward"] - head_input + head_gradient
    assert 0 <= forward.peak - predicted <= tokens + 24 * rows + 8
    assert backward.peak == 4 + 1  # only the loss's own gradient (an fp32 1) and the bool saying it is 1


@pytest.mark.parametrize("family,dtype,method", [("llama", torch.bfloat16, "lora"), ("gpt2", torch.float32, "full"),
                                                 ("llama", torch.float32, "full"), ("gpt2", torch.bfloat16, "lora")])
def test_offload_host_and_device_bytes_equal_the_calculators_exactly(family, dtype, method):
    model, spec = build(family, dtype, method)
    model.set_loss("chunked", 7)
    model.set_gradient_checkpointing(True)
    everything = saved_bytes(lambda: model(ids(0), ids(1)), model.parameters())
    offload = ActivationOffload("cpu")
    model.set_gradient_checkpointing(True, offload=offload)
    loss = model(ids(0), ids(1))[1]
    host = offload.host_bytes()
    loss.backward()
    b = training_memory(spec, setup_for(spec, dtype, method, True, 7, offload=True))
    terms = {t.name: t for t in b.terms}
    assert host == terms["activation offload"].cpu == b.cpu > 0
    plain = setup_for(spec, dtype, method, True, 7)
    hidden_states = BATCH * SEQ * spec.hidden_size * dtype.itemsize
    kept = chunked_loss_bytes(spec, plain, dtype.itemsize, method == "full", hidden_states)["kept"]
    assert everything - host == terms["activations"].gpu + kept + head_gradient(spec, dtype, method)
    assert terms["activation offload"].gpu == host // (spec.num_layers - 1)  # one block input fetched ahead


def test_pinned_host_bytes_are_rounded_up_to_powers_of_two_on_cuda_only():
    # torch's CachingHostAllocator (PowerOf2Ceil in allocate()); a CPU holds the bytes themselves
    assert pinned_bytes(655_360_000, "cuda") == 2 ** 30 and pinned_bytes(2 ** 20, "cuda") == 2 ** 20
    assert pinned_bytes(655_360_000, "cpu") == 655_360_000
    spec = model_spec("llama-3.1-8b")
    cuda, cpu = (training_memory(spec, TrainingSetup(method="qlora", seq=57_704, grad_ckpt="full", device=device,
                                                    offload_activations=True, stack="minilora")).cpu
                 for device in ("cuda", "cpu"))
    assert cpu == 31 * 57_704 * 4096 * 2 and cuda == 31 * 2 ** 29


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA device")
def test_pinned_host_bytes_equal_torchs_host_allocator():
    model, spec = build("llama", torch.bfloat16, "lora")
    model.cuda().set_gradient_checkpointing(True, offload=ActivationOffload("cuda"))
    before = torch.cuda.memory.host_memory_stats().get("active_bytes.current", 0)
    loss = model(ids(0).cuda(), ids(1).cuda())[1]
    held = torch.cuda.memory.host_memory_stats()["active_bytes.current"] - before
    loss.backward()
    setup = setup_for(spec, torch.bfloat16, "lora", True, None, offload=True)
    assert held == training_memory(spec, TrainingSetup(**{**setup.__dict__, "device": "cuda", "loss": "full"})).cpu


def test_defaults_agree_with_the_models():
    assert DEFAULT_LOSS_CHUNK == MODELS_DEFAULT_CHUNK
    # each stack's default recipe: minilora.train's loss, transformers' full logits from labels=
    assert TrainingSetup(stack="minilora").loss == TrainConfig().loss == "chunked"
    assert TrainingSetup(stack="hf").loss == "full" and TrainingSetup().loss == "full"
    assert TrainingSetup(stack="minilora", loss="full").loss == "full"
    spec = model_spec("llama-3.1-8b")
    short = TrainingSetup(method="qlora", seq=300, loss="chunked", stack="minilora")  # a chunk: at most the tokens
    b = chunked_loss_bytes(spec, short, 2, False, 300 * spec.hidden_size * 2)
    assert (b["kept"], b["forward"]) == (300 * 4096 * 2, 300 * 4096 * 2 + 300 * 128256 * 6)


def test_each_switch_lengthens_the_longest_context():
    spec = model_spec("llama-3.1-8b")
    longest = {}
    for loss in ("full", "chunked"):
        for offload in (False, True):
            setup = TrainingSetup(method="qlora", grad_ckpt="full", loss=loss, offload_activations=offload,
                                  lora=LoRASpec(rank=16, targets="all-linear"), stack="minilora")
            seq = longest[loss, offload] = largest_fitting(spec, setup, 24 * GiB, "seq")
            fits = training_memory(spec, TrainingSetup(**{**setup.__dict__, "seq": seq})).total_gpu
            over = training_memory(spec, TrainingSetup(**{**setup.__dict__, "seq": seq + 1})).total_gpu
            assert fits <= 24 * GiB < over
    assert longest["full", False] < longest["full", True] < longest["chunked", True]
    assert longest["full", False] < longest["chunked", False] < longest["chunked", True]


@pytest.mark.parametrize("changes,message", [
    (dict(loss="fused"), "loss must be one of full, chunked, got 'fused'"),
    (dict(loss="chunked", loss_chunk=0), "loss_chunk must be an integer >= 1 (tokens per chunk), got 0"),
    (dict(loss="chunked", loss_chunk=513), "loss_chunk must be at most the sequence length 512"),
    (dict(loss="full", loss_chunk=64), "loss_chunk applies to loss 'chunked' only"),
    (dict(offload_activations=True), "offload_activations needs grad_ckpt 'full'"),
    (dict(offload_activations=True, grad_ckpt="selective"), "got grad_ckpt 'selective'"),
    (dict(loss="chunked", lora=LoRASpec(targets=["lm_head", "q_proj"])), "LoRA on lm_head needs loss 'full'"),
    (dict(mlp_tile=-1), "mlp_tile must be 0 (off) or an integer >= 1 (tokens per tile), got -1"),
    (dict(mlp_tile=2.5), "mlp_tile must be 0 (off) or an integer >= 1 (tokens per tile), got 2.5"),
    (dict(mlp_tile=513), "mlp_tile must be at most the sequence length 512 (a longer tile is the whole sequence), "
                         "got 513"),
])
def test_bad_settings_are_refused_naming_the_value(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        training_memory(model_spec("llama-2-7b"), TrainingSetup(**changes, stack="minilora"))


@pytest.mark.parametrize("flags,message", [
    (["--loss-chunk", "0", "--loss", "chunked"], "loss_chunk must be an integer >= 1"),
    (["--loss-chunk", "4096", "--loss", "chunked", "--seq", "2048"], "at most the sequence length 2048"),
    (["--offload-activations"], "offload_activations needs grad_ckpt 'full'"),
    (["--loss", "fast"], "--loss must be one of auto, full, chunked, got 'fast'"),
    (["--inference", "--loss", "chunked"], "--loss applies to training only"),
    (["--mlp-tile", "-8"], "mlp_tile must be 0 (off) or an integer >= 1 (tokens per tile), got -8"),
    (["--mlp-tile", "4096", "--seq", "2048"], "mlp_tile must be at most the sequence length 2048"),
    (["--mlp-tile", "many"], "argument --mlp-tile: invalid int value: 'many'"),
    (["--inference", "--mlp-tile", "64"], "--mlp-tile applies to training only"),
])
def test_the_cli_refuses_bad_long_context_flags_in_one_line(flags, message, capsys):
    stack = [] if "--inference" in flags else ["--stack", "minilora"]  # both are training settings
    assert main(["vram", "--model", "llama-3.1-8b", "--method", "qlora", *stack, *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_the_cli_answers_with_both_switches(capsys):
    args = ["--model", "llama-3.1-8b", "--method", "qlora", "--rank", "16", "--targets", "all-linear",
            "--grad-ckpt", "full", "--loss", "chunked", "--loss-chunk", "512", "--offload-activations", "--gpu", "24GB",
            "--stack", "minilora"]
    assert main(["vram", *args]) == 0
    out = capsys.readouterr().out
    assert "chunked loss" in out and "activation offload" in out and "of host memory" in out
    assert main(["fit", *args, "--search", "seq"]) == 0
    assert "largest seq that fits on 24 GiB GPU" in capsys.readouterr().out


def test_fit_says_when_the_models_context_limit_binds_and_how_far_memory_goes(capsys):
    args = ["fit", "--model", "llama-3.1-8b", "--method", "qlora", "--grad-ckpt", "full", "--loss", "chunked",
            "--offload-activations", "--search", "seq", "--gpu", "80GB", "--json", "--stack", "minilora"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["largest"] == out["model_limit"] == model_spec("llama-3.1-8b").max_positions
    setup = TrainingSetup(method="qlora", grad_ckpt="full", loss="chunked", offload_activations=True, stack="minilora")
    alone = out["memory_alone"]
    assert training_memory(model_spec("llama-3.1-8b"), replace(setup, seq=alone)).total_gpu <= 80 * GiB
    assert training_memory(model_spec("llama-3.1-8b"), replace(setup, seq=alone + 1)).total_gpu > 80 * GiB
    assert "the model's max_position_embeddings; memory alone would allow" in out["answer"]


@given(model=st.sampled_from(["gpt2", "llama-3.1-8b", "gemma-2-2b", "qwen3-0.6b"]),
       method=st.sampled_from(["full", "lora", "qlora"]), dtype=st.sampled_from(["bf16", "fp32"]),
       device=st.sampled_from(["cuda", "cpu"]), loss=st.sampled_from(["full", "chunked"]), offload=st.booleans(),
       chunk=st.one_of(st.none(), st.integers(1, 4096)), batch=st.integers(1, 4), seq=st.integers(1, 8192),
       tile=st.one_of(st.just(0), st.integers(1, 8192)), ckpt=st.sampled_from(["full", "full", "none"]))
def test_the_new_terms_formulas_and_phases_add_up(model, method, dtype, device, loss, offload, chunk, batch, seq, tile,
                                                  ckpt):
    setup = TrainingSetup(method=method, dtype=dtype, device=device, grad_ckpt=ckpt, batch=batch, seq=seq,
                          loss=loss, loss_chunk=min(chunk, seq) if chunk and loss == "chunked" else None,
                          offload_activations=offload and ckpt == "full", stack="minilora", mlp_tile=min(tile, seq))
    b = training_memory(model_spec(model), setup)
    for t in b.terms:
        assert evaluate(t.formula) == t.gpu, (t.name, t.formula, t.gpu)
    held, *moments = b.phases
    assert held.bytes + max(p.bytes for p in moments) == b.total_gpu
    terms = {t.name: t.gpu for t in b.terms}
    assert all(0 < n <= terms[name] for p in b.phases for name, n in p.parts.items())
    assert ("chunked loss" in terms) == (loss == "chunked") and ("logits and loss" in terms) == (loss == "full")
    assert ("activation offload" in terms) == (offload and ckpt == "full")
    assert ("recomputed MLP tile" in terms) == (0 < min(tile, seq) < batch * seq)


@pytest.mark.parametrize("flag", [["--loss", "chunked"], ["--offload-activations"], ["--mlp-tile", "256"]])
def test_the_hf_stack_refuses_minilora_trains_switches_in_one_line(flag, capsys):
    assert main(["vram", "--model", "llama-3.1-8b", "--method", "qlora", "--grad-ckpt", "full", *flag]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{flag[0]}" in err and "--stack minilora" in err, err


# ---- the tiled MLP (--mlp-tile) ------------------------------------------------------------------------

@given(model=st.sampled_from(["gpt2", "llama-3.1-8b", "qwen3-0.6b", "phi-3-mini"]),
       method=st.sampled_from(["full", "lora", "qlora"]), ckpt=st.sampled_from(["none", "full"]),
       seq=st.integers(1, 4096))
def test_a_tile_as_long_as_the_micro_batch_is_no_tiling(model, method, ckpt, seq):
    setup = TrainingSetup(method=method, seq=seq, grad_ckpt=ckpt, stack="minilora")
    one_tile, whole = (training_memory(model_spec(model), s) for s in (replace(setup, mlp_tile=seq), setup))
    assert (one_tile.terms, one_tile.phases, one_tile.peak) == (whole.terms, whole.phases, whole.peak)
    assert "set_mlp_tiling" in one_tile.recipe and "set_mlp_tiling" not in whole.recipe


def test_the_tiled_mlp_lengthens_the_longest_context_where_the_mlp_binds():
    # with the chunked loss and the offload, one recomputed block and the backward workspace bind (mostly
    # the MLP's): tiling them lengthens the context; with the full loss the (B, T, V) logits bind
    spec, gpu = model_spec("llama-3.1-8b"), 24 * GiB
    setup = TrainingSetup(method="qlora", grad_ckpt="full", loss="chunked", offload_activations=True, stack="minilora",
                          lora=LoRASpec(rank=16, targets="all-linear"))
    both = largest_fitting(spec, setup, gpu, "seq", limit=1 << 20)
    tiled = largest_fitting(spec, replace(setup, mlp_tile=4096), gpu, "seq", limit=1 << 20)
    assert tiled > 2 * both
    b = training_memory(spec, replace(setup, seq=tiled, mlp_tile=4096))
    assert "recomputed MLP tile" in b.phases[2].parts  # backward through the blocks
    full = replace(setup, loss="full", offload_activations=False)
    assert largest_fitting(spec, replace(full, mlp_tile=4096), gpu, "seq") == largest_fitting(spec, full, gpu, "seq")


def test_experts_refuse_the_tile_naming_the_model():
    with pytest.raises(ValueError, match="mlp_tile tiles dense MLPs; mixtral-8x7b routes tokens to experts"):
        training_memory(model_spec("mixtral-8x7b"), TrainingSetup(method="qlora", mlp_tile=64, stack="minilora"))


def test_the_cli_answers_with_the_tiled_mlp(capsys):
    args = ["--model", "llama-3.1-8b", "--method", "qlora", "--rank", "16", "--targets", "all-linear", "--grad-ckpt",
            "full", "--loss", "chunked", "--offload-activations", "--mlp-tile", "4096", "--stack", "minilora"]
    assert main(["vram", *args, "--seq", "8192", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "recomputed MLP tile" in out and "model.set_mlp_tiling(4096)" in out and "fp32 gradient sums" in out
    assert main(["fit", *args, "--gpu", "24GB", "--search", "seq", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["largest"] == model_spec("llama-3.1-8b").max_positions < answer["memory_alone"]


# ---- the tiled MLP, exact against the reference models over the sampled CPU grid ---------------------

def _tile_bytes_in_backward(model) -> list:
    """Instruments every tiled MLP: the bytes each tile's recompute in backward saves (its input rows
    are a view of the MLP's input, counted with the block: excluded, as the calculator does). Only
    for MLPs that run tiled: an MLP run whole under checkpointing's recompute saves through
    checkpoint's own hooks, which these would hide."""
    tiles = []
    for mlp in (m for m in model.modules() if isinstance(m, TileableMLP)):
        def per_token(self, x, original=type(mlp).per_token):
            if not torch.is_grad_enabled():  # the forward's tiles run without a graph
                return original(self, x)
            out = []
            tiles.append(saved_bytes(lambda: out.append(original(self, x)), [*self.parameters(), x]))
            return out[0]
        mlp.per_token = types.MethodType(per_token, mlp)
    return tiles


def _block_bytes(model, forward) -> list:
    """What each block saves (each storage once within the block, parameters excluded), without checkpointing."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    per_block, hooks = [], []

    def enter(block, args):
        seen = {}
        per_block.append(seen)
        block.saving = torch.autograd.graph.saved_tensors_hooks(
            lambda t: seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()) and t, lambda t: t)
        block.saving.__enter__()

    def leave(block, args, out):
        block.saving.__exit__(None, None, None)

    for block in (m for m in model.modules() if hasattr(m, "layer") and hasattr(m, "mlp")):
        hooks += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
    loss = forward()
    for h in hooks:
        h.remove()
    return loss, [sum(n for ptr, n in seen.items() if ptr not in skip) for seen in per_block]


# every family with a dense MLP: the experts' families refuse the tile (test_experts_refuse_the_tile_naming_the_model)
DENSE = [family for family in FAMILIES if family not in ("mixtral", "qwen2_moe", "qwen3_moe")]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", DENSE)
@settings(max_examples=4)
@given(drawn=cases, tile=st.integers(1, 40))
def test_the_tiled_mlps_saved_bytes_one_block_and_one_tile_equal_the_calculators_exactly(family, method, drawn, tile):
    case = case_of("minilora", family, method, drawn)
    tile = min(tile, case.seq)
    spec = model_spec(hf_config(case).to_dict())
    act = activation_bytes(spec, ActivationSetup.of(spec, replace(training_setup(case), mlp_tile=tile)))
    model = build_minilora(case)
    model.set_mlp_tiling(tile)
    ids = torch.randint(0, VOCAB_GRID, (case.batch, case.seq), generator=torch.Generator().manual_seed(1))

    def loss():  # as the grid measures it: "fp32+autocast" is Trainer(bf16=True)'s recipe
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case.precision == "fp32+autocast"):
            return model(ids, ids.roll(-1, dims=1))[1]

    if case.ckpt:
        out, saved = saved_by(model, loss)
    else:
        out, blocks = _block_bytes(model, loss)
        # blocks whose input needs a gradient; layer_full is the block of the kind that keeps the most
        one_kind = len(set(spec.layer_types)) < 2 or case.seq <= spec.sliding_window
        assert blocks[1:] == [act["layer_full"]] * (len(blocks) - 1) if one_kind else max(blocks) <= act["layer_full"]
        if case.method == "full":  # every block's input needs a gradient: the heaviest kind is measured too
            assert max(blocks) == act["layer_full"]
        out, saved = saved_by(model, loss)
    assert saved == act["total"]
    if case.batch * case.seq <= tile:  # one tile: the MLP runs whole, and nothing is recomputed for it
        assert act["mlp_tile"] == 0
        return
    tiles = _tile_bytes_in_backward(model)
    out.backward()
    # autograd runs no backward where nothing before it trains: GPT-NeoX's first MLP (parallel residual)
    # reads the frozen embedding's output, and under LoRA on query_key_value its own weights are frozen too
    skipped = spec.parallel_residual and case.method == "lora-qv"
    assert len(tiles) == (LAYERS - skipped) * -(-case.batch * case.seq // tile) and max(tiles) == act["mlp_tile"] > 0


@pytest.mark.parametrize("family,attn", [("qwen2", "sdpa"), ("gemma3_text", "sdpa"), ("qwen3", "eager")])
def test_the_recomputed_block_is_the_kind_of_block_that_keeps_the_most_exactly(family, attn):
    # past its window a sliding layer keeps its mask: Qwen2's second layer slides, Gemma 3's first
    case = Case("minilora", family, "full", attn=attn, precision="fp32", batch=1, seq=40, width=96)
    spec = model_spec(hf_config(case).to_dict())
    act = activation_bytes(spec, ActivationSetup.of(spec, training_setup(case)))
    model = build_minilora(case)
    ids = torch.randint(0, VOCAB_GRID, (case.batch, case.seq), generator=torch.Generator().manual_seed(1))
    _, blocks = _block_bytes(model, lambda: model(ids, ids.roll(-1, dims=1))[1])
    assert max(blocks) == act["layer_full"]
    assert len(set(blocks)) == (1 if attn == "eager" else 2)   # SDPA's mask is the difference
