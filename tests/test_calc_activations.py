"""calculators.activations against what autograd really saves in the reference models (CPU), the
"minilora" stack.

Saved bytes are counted with torch.autograd.graph.saved_tensors_hooks, each storage once (keyed
by untyped_storage().data_ptr()), parameters excluded (bench/stack_cases.saved_bytes). The
replay in calculators/activations.py is exact: every assertion here is equality. The same grid as
the "hf" stack's (tests/test_calc_stack_hf.py) runs against our models below.
"""
import itertools

import pytest
import torch
from hypothesis import given, settings

from bench.stack_cases import FAMILIES, METHODS, Case, measure, predict
from bench.stack_cases import saved_bytes as saved_by
from calculators import ActivationSetup, activation_bytes, block_targets, lora_layers, model_spec
from factories import tiny_gpt, tiny_llama
from stack_grid import case_of, cases


def saved_bytes(model, batch, seq, vocab):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, vocab, (batch, seq), generator=g)
    return saved_by(model, lambda: model(idx, idx.roll(-1, dims=1)))[1]   # targets: a tensor of their own


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
@settings(max_examples=8)
@given(drawn=cases)
def test_saved_activation_and_model_state_bytes_exact_vs_reference_models(family, method, drawn):
    case = case_of("minilora", family, method, drawn)
    assert predict(case) == measure(case), case


def test_readme_qlora_recipe_exact():
    """README: prepare_for_kbit_training(quantize_model(model, compute_dtype=torch.bfloat16)), then
    inject(model, LoRAConfig(r=16, target_modules="all-linear")); no checkpointing (0.977 before)."""
    case = Case("minilora", "llama", "qlora-prepare", precision="bf16", batch=2, seq=256, rank=16)
    assert predict(case) == measure(case)


def build(family, width, attn, dtype, pdrop=0.0):
    if family == "gpt2":
        model = tiny_gpt(0, vocab_size=101, n_positions=64, n_embd=width, attn_impl=attn,
                         embd_pdrop=pdrop, resid_pdrop=pdrop, attn_pdrop=pdrop)
    else:
        model = tiny_llama(0, vocab_size=101, hidden_size=width, intermediate_size=3 * width, attn_impl=attn)
    return model.to(dtype).train(), model_spec(model.config.to_hf_dict())


def predicted(spec, batch, seq, dtype, attn, ckpt, pdrop=0.0, **lora):
    setup = ActivationSetup(batch=batch, seq=seq, dtype="fp32" if dtype == torch.float32 else "bf16", attn=attn,
                            grad_ckpt="full" if ckpt else "none", device="cpu", stack="minilora",
                            embd_pdrop=pdrop, resid_pdrop=pdrop, attn_pdrop=pdrop, **lora)
    return activation_bytes(spec, setup)["total"]


# a small grid: both families x attention x checkpointing, batch / seq / width / dtype varied
GRID = [(fam, attn, ckpt, b, t, w, dt)
        for (fam, attn, ckpt), (b, t, w, dt) in zip(
            itertools.product(["gpt2", "llama"], ["sdpa", "eager"], [False, True]),
            itertools.cycle([(1, 24, 64, torch.float32), (3, 40, 96, torch.bfloat16),
                             (2, 33, 64, torch.bfloat16), (2, 16, 96, torch.float32)]))]


@pytest.mark.parametrize("family,attn,ckpt,batch,seq,width,dtype", GRID)
def test_full_finetune_activations_exact_vs_saved_tensors(family, attn, ckpt, batch, seq, width, dtype):
    model, spec = build(family, width, attn, dtype)
    model.set_gradient_checkpointing(ckpt)
    real = saved_bytes(model, batch, seq, 101)
    pred = predicted(spec, batch, seq, dtype, attn, ckpt)
    assert pred == real


@pytest.mark.parametrize("attn,dtype,batch", [("sdpa", torch.bfloat16, 2), ("eager", torch.bfloat16, 1),
                                              ("sdpa", torch.float32, 1), ("sdpa", torch.float32, 3)])
def test_gpt2_dropout_masks_exact_vs_saved_tensors(attn, dtype, batch):
    # GPT-2 trains with dropout 0.1: masks are kept (on CPU in the input's dtype) and SDPA with
    # attention dropout falls back to the fp32 math kernel on CPU
    model, spec = build("gpt2", 64, attn, dtype, pdrop=0.1)
    real = saved_bytes(model, batch, 40, 101)
    assert predicted(spec, batch, 40, dtype, attn, False, pdrop=0.1) == real


LORA_GRID = [("llama", "sdpa", False, None, 0.0), ("llama", "eager", False, ["q_proj", "v_proj"], 0.1),
             ("llama", "sdpa", True, "all-linear", 0.0), ("llama", "eager", False, ["o_proj", "down_proj"], 0.0),
             ("gpt2", "sdpa", False, "all-linear", 0.1), ("gpt2", "eager", True, ["c_attn"], 0.0),
             ("gpt2", "eager", False, ["c_proj"], 0.0)]


@pytest.mark.parametrize("family,attn,ckpt,targets,dropout", LORA_GRID)
def test_lora_activations_exact_vs_saved_tensors(family, attn, ckpt, targets, dropout):
    from minilora.lora.layer import LoRAConfig
    from minilora.lora.model import inject

    model, spec = build(family, 64, attn, torch.bfloat16)
    names = [lin.name for lin in lora_layers(spec, targets)]
    inject(model, LoRAConfig(r=4, alpha=8, dropout=dropout, target_modules=names))
    model.train()
    model.set_gradient_checkpointing(ckpt)
    real = saved_bytes(model, 2, 24, 101)
    pred = predicted(spec, 2, 24, torch.bfloat16, attn, ckpt, trainable="lora",
                     lora_targets=block_targets(names), lora_rank=4, lora_dropout=dropout)
    assert pred == real


def test_lora_saves_less_than_full_finetuning():
    spec = model_spec("llama-2-7b")
    full = activation_bytes(spec, ActivationSetup(batch=1, seq=512, stack="minilora"))["total"]
    lora = activation_bytes(spec, ActivationSetup(batch=1, seq=512, stack="minilora", trainable="lora",
                                                  lora_targets=frozenset({"self_attn.q_proj", "self_attn.v_proj"})))
    assert lora["total"] < full
    eager = activation_bytes(spec, ActivationSetup(batch=1, seq=512, stack="minilora", attn="eager"))["total"]
    assert eager - full > 32 * 32 * 512 * 512 * 4  # at least the fp32 softmax of every layer


def test_bad_sizes():
    with pytest.raises(ValueError, match="batch and seq must be >= 1, got batch=0"):
        activation_bytes(model_spec("gpt2"), ActivationSetup(batch=0, seq=8))


@pytest.mark.parametrize("family,attn,ckpt", [("llama", "sdpa", False), ("gpt2", "eager", False), ("llama", "eager", True)])
def test_qlora_activations_exact_vs_saved_tensors(family, attn, ckpt):
    # LinearNF4 saves no dequantized weight for backward (it dequantizes again): a frozen 4-bit
    # layer keeps nothing, like a frozen nn.Linear
    from minilora.lora.layer import LoRAConfig
    from minilora.lora.model import inject
    from minilora.quant.qlora import quantize_model

    model, spec = build(family, 64, attn, torch.bfloat16)
    quantize_model(model)
    names = [lin.name for lin in lora_layers(spec, "all-linear")]
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=names))
    model.train()
    model.set_gradient_checkpointing(ckpt)
    real = saved_bytes(model, 2, 24, 101)
    pred = predicted(spec, 2, 24, torch.bfloat16, attn, ckpt, trainable="lora", quantized=True,
                     lora_targets=block_targets(names), lora_rank=4)
    assert pred == real
