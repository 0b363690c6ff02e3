"""minilora.quant.qlora: LinearNF4 (forward, backward without a saved dense weight, the bitsandbytes
state-dict format), quantize_model, prepare_for_kbit_training, and QLoRA = quantize + LoRA."""
import json
import threading

import bitsandbytes.functional as bnbF
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from minilora.quant.matmul_4bit import WEIGHT_BUFFERS
from minilora.quant.nf4 import nf4_codebook, quantize_4bit
from minilora.quant.bnb_format import Bnb4bitFormat, quant_state_from_dict
from minilora.quant.qlora import LinearNF4, prepare_for_kbit_training, quantize_model
import factories
from reference_models import save_pretrained



def tiny_gpt(seed=0):
    return factories.tiny_gpt(seed, vocab_size=96, n_embd=64, embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0)


# ------------------------------------------------------------------------------------ LinearNF4

@given(in_features=st.integers(1, 80), out_features=st.integers(1, 40), bias=st.booleans(),
       quant_type=st.sampled_from(["nf4", "fp4"]), double_quant=st.booleans(),
       compute_dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 999))
def test_linear_nf4_forward_and_input_grad_equal_dense_dequantized(in_features, out_features, bias, quant_type,
                                                                  double_quant, compute_dtype, seed):
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    layer = LinearNF4.from_linear(linear, quant_type, 64, double_quant, compute_dtype)
    weight = quantize_4bit(linear.weight, quant_type, 64, double_quant).dequantize(compute_dtype)
    b = None if linear.bias is None else linear.bias.to(compute_dtype)
    x = torch.randn(3, 5, in_features, requires_grad=True)
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (3, 5, out_features)
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = nn.functional.linear(x_ref.to(compute_dtype), weight, b).float()
    assert torch.equal(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert torch.equal(x.grad, x_ref.grad)
    assert all(not p.requires_grad for p in layer.parameters())


def test_linear_nf4_does_not_save_the_dense_weight_for_backward():
    layer = LinearNF4.from_linear(nn.Linear(256, 512))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert not any(t.numel() >= 256 * 512 and t.is_floating_point() for t in saved), [t.shape for t in saved]
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_linear_nf4_trainable_bias_gets_its_gradient():
    layer = LinearNF4.from_linear(nn.Linear(64, 8))
    layer.bias.requires_grad_(True)
    x = torch.randn(6, 64)
    layer(x).sum().backward()
    assert torch.equal(layer.bias.grad, torch.full((8,), 6.0))


def eager_linear_reference(layers, x):
    """The layers' forward and input gradient through fresh dequantize_4bit tensors and nn.functional.linear."""
    x = x.detach().clone().requires_grad_(True)
    h = x
    for layer in layers:
        h = nn.functional.linear(h, layer.quant_state.dequantize(layer.compute_dtype), layer.bias)
    h.backward(torch.ones_like(h))
    return h.detach(), x.grad


def test_linear_nf4_layers_of_different_sizes_share_one_reused_buffer_bit_identical_to_eager():
    # a wide layer, a narrow one, a wide one: each call dequantizes over the previous layer's weight,
    # and backward decodes again after the forward of the others, so any stale value would show
    WEIGHT_BUFFERS.release()
    sizes = [(96, 200), (200, 24), (24, 160)]
    layers = [LinearNF4.from_linear(nn.Linear(i, o), "nf4", 64, True) for i, o in sizes]
    x = torch.randn(7, 96, requires_grad=True)
    h = x
    for layer in layers:
        h = layer(h)
    h.backward(torch.ones_like(h))
    y_ref, grad_ref = eager_linear_reference(layers, x)
    assert torch.equal(h, y_ref) and torch.equal(x.grad, grad_ref)
    held = [entry[1] for entry in WEIGHT_BUFFERS.entries.values()]
    assert len(held) == 1 and held[0].numel() == max(i * o for i, o in sizes)  # one buffer, the largest weight
    WEIGHT_BUFFERS.release()
    assert not WEIGHT_BUFFERS.entries


def test_linear_nf4_in_concurrent_threads_gets_one_buffer_per_thread():
    layers = [LinearNF4.from_linear(nn.Linear(128, 128 + 64 * k)) for k in range(2)]
    x = torch.randn(5, 128)
    expected, results, barrier = {}, {}, threading.Barrier(2)

    def run(k):
        # the reference in the same thread: a new thread's matmul may use another intra-op thread count
        expected[k] = eager_linear_reference([layers[k]], x)[0]
        barrier.wait()
        results[k] = [layers[k](x) for _ in range(30)]

    threads = [threading.Thread(target=run, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(2):
        assert all(torch.equal(y, expected[k]) for y in results[k]), k


def test_linear_nf4_backend_is_checked_and_shown():
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'eager', 'compiled', 'triton'\), got 'gpu'"):
        LinearNF4(64, 16, backend="gpu")
    layer = LinearNF4.from_linear(nn.Linear(64, 16))
    assert layer.backend == "auto" and "backend" not in repr(layer)
    layer.backend = "eager"
    assert "backend=eager" in repr(layer) and "backend" not in json.dumps(list(layer.state_dict()))
    layer.backend = "fast"
    with pytest.raises(ValueError, match="backend must be one of .*got 'fast'"):
        layer(torch.randn(2, 64))


def test_requantize_of_dequantized_weight_is_exact_without_double_quant():
    layer = LinearNF4.from_linear(nn.Linear(100, 30), double_quant=False)
    packed, absmax = layer.weight.clone(), layer.absmax.clone()
    layer.requantize_(layer.dequantize_weight())
    # each block's absmax is decoded exactly (code +-1) and every value sits on a codebook point
    assert torch.equal(layer.weight, packed) and torch.equal(layer.absmax, absmax)


def test_state_dict_is_bitsandbytes_format_and_round_trips():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    layer = LinearNF4.from_linear(linear, "nf4", 64, True)
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}
    # the same tensors bitsandbytes' QuantState.as_dict(packed=True) produces for the same weight
    packed, qs = bnbF.quantize_4bit(linear.weight.detach(), blocksize=64, quant_type="nf4", compress_statistics=True)
    ref = qs.as_dict(packed=True)
    assert torch.equal(sd["weight"], packed)
    for key in ("quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"):
        assert torch.equal(sd["weight." + key], ref[key]), key
    other = LinearNF4(96, 40)
    other.load_state_dict(sd)
    assert torch.equal(other.dequantize_weight(), layer.dequantize_weight())
    assert torch.equal(other.bias, layer.bias)


def test_bad_4bit_state_dicts_are_rejected():
    sd = LinearNF4.from_linear(nn.Linear(96, 40), "nf4", 64, True).state_dict()
    sd.pop("bias")
    strip = lambda d: {k: v for k, v in d.items()}  # noqa: E731
    with pytest.raises(ValueError, match="exactly one weight.quant_state.bitsandbytes__nf4"):
        quant_state_from_dict({k: v for k, v in sd.items() if "quant_state" not in k}, "fc.")
    bad = strip(sd)
    bad["weight"] = bad["weight"][:-1]
    with pytest.raises(ValueError, match=r"fc.weight has 1919 bytes, quant_state shape \(40, 96\) needs 1920"):
        quant_state_from_dict(bad, "fc.")
    bad = strip(sd)
    bad["weight.quant_map"] = bad["weight.quant_map"] * 2
    with pytest.raises(ValueError, match="fc.weight.quant_map is not the nf4 codebook"):
        quant_state_from_dict(bad, "fc.")
    bad = strip(sd)
    bad.pop("weight.nested_absmax")
    with pytest.raises(ValueError, match="fc.weight.nested_absmax is missing"):
        quant_state_from_dict(bad, "fc.")
    bad = strip(sd)
    meta = json.loads(bytes(bad["weight.quant_state.bitsandbytes__nf4"].tolist()))
    meta["dtype"] = "int8"
    bad["weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)
    with pytest.raises(ValueError, match="dtype must be one of .*got 'int8'"):
        quant_state_from_dict(bad, "fc.")
    with pytest.raises(ValueError, match=r"quantized weight has shape \(40, 96\), the layer is \(96, 40\)"):
        LinearNF4(40, 96).set_state(quant_state_from_dict(strip(sd)))
    with pytest.raises(RuntimeError, match="holds no weight yet"):
        LinearNF4(4, 4).dequantize_weight()


# ------------------------------------------------------------------------- model-level helpers

def test_quantize_model_swaps_linears_but_not_the_head():
    model = quantize_model(tiny_gpt(), skip=("lm_head",))
    names = {n for n, m in model.named_modules() if isinstance(m, LinearNF4)}
    assert names == {f"transformer.h.{i}.{p}" for i in range(2)
                     for p in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert type(model.lm_head) is nn.Linear
    logits = model(torch.randint(0, 96, (2, 16)))
    assert logits.shape == (2, 16, 96) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="found no nn.Linear to quantize"):
        quantize_model(nn.Sequential(nn.ReLU()))


def test_prepare_for_kbit_training_bf16_norms_fp32_and_input_grads():
    model = quantize_model(tiny_gpt(), compute_dtype=torch.bfloat16)
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    prepare_for_kbit_training(model)
    assert all(not p.requires_grad for p in model.parameters())
    assert model.transformer.ln_f.weight.dtype == torch.float32
    seen = {}
    model.transformer.h[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    model.train()
    logits, loss = model(torch.randint(0, 96, (2, 16)), torch.randint(0, 96, (2, 16)))
    assert seen["x"].requires_grad and torch.isfinite(loss)


# ------------------------------------------------------------------------------ QLoRA = + LoRA

def _train(model, steps, seed=0):
    torch.manual_seed(seed)
    data = torch.randint(0, 96, (8, 17))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    model.train()
    for step in range(steps):
        batch = data[(step % 2) * 4:(step % 2) * 4 + 4]
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_qlora_trains_close_to_lora_and_only_adapters_get_grads():
    from minilora.lora.layer import LoRAConfig
    from minilora.lora.model import inject, unload

    config = LoRAConfig(r=8, alpha=16, target_modules=["c_attn", "c_proj", "c_fc"])
    lora = tiny_gpt()
    inject(lora, config)
    qlora = quantize_model(tiny_gpt(), double_quant=True)
    inject(qlora, config)
    frozen = {n: p.detach().clone() for n, p in qlora.named_parameters() if "lora_" not in n}
    assert all(not p.requires_grad for n, p in qlora.named_parameters() if "lora_" not in n)
    lora_losses, qlora_losses = _train(lora, 40), _train(qlora, 40)
    # QLoRA learns: loss drops by more than 15% (from ln(96) on a random tiny model) ...
    assert qlora_losses[-1] < 0.85 * qlora_losses[0]
    # ... and ends within 5% of LoRA on the same fp32 base, same data, same steps (measured: 0.2%)
    assert abs(qlora_losses[-1] - lora_losses[-1]) < 0.05 * lora_losses[-1], (qlora_losses[-1], lora_losses[-1])
    for n, p in qlora.named_parameters():
        if "lora_" in n:
            assert p.grad is not None
        else:
            assert p.grad is None and torch.equal(p, frozen[n]), n
    for n, b in qlora.named_buffers():
        assert not b.requires_grad

    # unload: merge + dequantize into plain nn.Linear, same function
    x = torch.randint(0, 96, (2, 16))
    qlora.eval()
    with torch.no_grad():
        before = qlora(x)
    merged = unload(qlora)
    assert not any(isinstance(m, LinearNF4) for m in merged.modules())
    assert isinstance(merged.transformer.h[0].attn.c_attn, nn.Linear)
    with torch.no_grad():
        after = merged(x)
    assert (after - before).abs().max() < 1e-4


def test_qlora_unload_requantize_keeps_4bit_with_stated_error():
    from minilora.lora.layer import LoRAConfig
    from minilora.lora.model import inject, unload

    model = quantize_model(tiny_gpt(), double_quant=False)
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=["c_attn"]))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.05)  # a non-trivial adapter to merge
    layer = model.transformer.h[0].attn.c_attn
    merged_dense = (layer.base_layer.dequantize_weight()
                    + layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight).detach()
    unload(model, requantize=True)
    base = model.transformer.h[0].attn.c_attn
    assert isinstance(base, LinearNF4)
    # requantizing the merged weight adds at most one NF4 rounding: |err| <= absmax * largest half-gap
    err = (base.dequantize_weight() - merged_dense).abs()
    absmax = merged_dense.reshape(-1, 64).abs().amax(1, keepdim=True)
    half_gap = (nf4_codebook().diff() / 2).max()  # 0.152, between -1 and -0.696
    assert torch.all(err.reshape(-1, 64) <= absmax * half_gap * (1 + 1e-5))
    assert err.mean() < 0.1 * merged_dense.abs().mean()


def test_4bit_save_refuses_mixed_layers_and_plain_models(tmp_path):
    model = quantize_model(tiny_gpt())
    model.transformer.h[1].mlp.c_fc = LinearNF4.from_linear(nn.Linear(64, 256), quant_type="fp4")
    with pytest.raises(ValueError, match="one quantization_config per checkpoint"):
        save_pretrained(model, tmp_path / "mixed")  # save_pretrained goes through the registered format
    assert list((tmp_path / "mixed").iterdir()) == []  # refused before anything is written
    with pytest.raises(ValueError, match="has no LinearNF4 layers"):
        Bnb4bitFormat(LinearNF4).save(tiny_gpt())


# ------------------------------------------------------------------ dtype / device / misuse

@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("cast", ["to_bf16", "half", "float", "model_to_bf16"])
def test_dtype_casts_keep_the_quantization_state_fp32_and_bit_identical(double_quant, cast):
    torch.manual_seed(0)
    layer = LinearNF4.from_linear(nn.Linear(96, 40), double_quant=double_quant)
    before = layer.dequantize_weight()
    buffers = {n: b.clone() for n, b in layer.named_buffers()}
    if cast == "model_to_bf16":
        model = nn.Sequential(layer).to(torch.bfloat16)
        layer = model[0]
    else:
        layer = {"to_bf16": lambda m: m.to(torch.bfloat16), "half": lambda m: m.half(),
                 "float": lambda m: m.float()}[cast](layer)
    bias_dtype = {"half": torch.float16, "float": torch.float32}.get(cast, torch.bfloat16)
    # the quantization state only ever changes device; the bias follows the dtype ...
    for n, b in layer.named_buffers():
        assert b.dtype == buffers[n].dtype and torch.equal(b, buffers[n]), n
    assert layer.absmax2 is None or layer.absmax2.dtype == torch.float32
    assert layer.bias.dtype == bias_dtype
    assert torch.equal(layer.dequantize_weight(), before)
    # ... compute_dtype is kept, as bitsandbytes' Linear4bit keeps its compute_dtype under .to(dtype)
    assert layer.compute_dtype == torch.float32
    x = torch.randn(2, 96)
    assert layer(x).dtype == torch.float32 and layer(x.to(bias_dtype)).dtype == bias_dtype
    # and the state dict still loads (it failed on "weight.absmax is torch.float16")
    fresh = LinearNF4(96, 40, double_quant=double_quant).to(bias_dtype)
    fresh.load_state_dict(layer.state_dict())
    assert torch.equal(fresh.dequantize_weight(), before) and torch.equal(fresh.bias, layer.bias)


def test_load_state_dict_copies_into_the_module_device_and_dtype():
    src = LinearNF4.from_linear(nn.Linear(64, 32), double_quant=True)
    sd = src.state_dict()
    dst = LinearNF4.from_linear(nn.Linear(64, 32), double_quant=True).to(torch.bfloat16)
    dst.load_state_dict(sd)
    loaded = dict(dst.named_buffers())
    assert loaded["weight"] is not sd["weight"] and loaded["absmax"] is not sd["weight.absmax"]
    assert loaded["absmax2"] is not sd["weight.nested_absmax"]
    assert loaded["weight"].data_ptr() != sd["weight"].data_ptr()
    assert loaded["absmax"].data_ptr() != sd["weight.absmax"].data_ptr()
    device = src.weight.device
    assert all(b.device == device for b in loaded.values())
    assert dst.bias.dtype == torch.bfloat16 and dst.bias.device == device
    assert dst.bias.data_ptr() != sd["bias"].data_ptr()
    assert torch.equal(dst.bias, sd["bias"].to(torch.bfloat16))
    assert torch.equal(dst.dequantize_weight(), src.dequantize_weight())
    # mutating the state dict afterwards does not reach the module
    expected = dst.dequantize_weight()
    sd["weight"].zero_()
    assert torch.equal(dst.dequantize_weight(), expected)


def test_quantize_model_refuses_a_model_with_lora_adapters():
    from minilora.lora.layer import LoRAConfig
    from minilora.lora.model import inject

    model = tiny_gpt()
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=["c_attn"]))
    with pytest.raises(ValueError, match="quantize first, then inject"):
        quantize_model(model)
    assert not any(isinstance(m, LinearNF4) for m in model.modules())  # nothing was swapped
    assert any(p.requires_grad for n, p in model.named_parameters() if "lora_" in n)


def test_linear_nf4_refuses_int4_which_the_state_dict_format_cannot_store():
    linear = nn.Linear(64, 16)
    with pytest.raises(ValueError, match="nf4 or fp4"):
        LinearNF4(64, 16, quant_type="int4")
    with pytest.raises(ValueError, match="nf4 or fp4"):
        LinearNF4.from_linear(linear, quant_type="int4")
    with pytest.raises(ValueError, match="nf4 or fp4"):
        quantize_model(tiny_gpt(), quant_type="int4")
    layer = LinearNF4.from_linear(linear)
    with pytest.raises(ValueError, match="nf4 or fp4"):
        layer.set_state(quantize_4bit(linear.weight, "int4"))
    with pytest.raises(ValueError, match="nf4 or fp4"):
        LinearNF4.from_state(quantize_4bit(linear.weight, "int4"))
    layer.state_dict()  # the layer is unchanged and still saves


def test_load_state_dict_into_a_meta_module_takes_the_state_dicts_device():
    src = LinearNF4.from_linear(nn.Linear(64, 32), double_quant=True)
    with torch.device("meta"):
        dst = LinearNF4(64, 32)
    dst.load_state_dict(src.state_dict())
    assert not any(t.is_meta for t in (*dst.buffers(), *dst.parameters()))
    assert torch.equal(dst.dequantize_weight(), src.dequantize_weight()) and torch.equal(dst.bias, src.bias)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_module_stays_on_cuda_when_loading_a_cpu_state_dict():
    src = LinearNF4.from_linear(nn.Linear(64, 32), double_quant=True)
    dst = LinearNF4.from_linear(nn.Linear(64, 32), double_quant=True).cuda().to(torch.bfloat16)
    assert dst.absmax2.dtype == torch.float32 and dst.absmax2.is_cuda
    dst.load_state_dict(src.state_dict())
    assert all(b.is_cuda for b in dst.buffers()) and dst.bias.is_cuda and dst.bias.dtype == torch.bfloat16
    assert torch.equal(dst.dequantize_weight().cpu(), src.dequantize_weight())
