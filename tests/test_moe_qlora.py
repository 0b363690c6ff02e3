"""QLoRA on mixture-of-experts models (minilora/quant/qlora.py ExpertsNF4): every expert's matrix
quantized as its own weight, byte-identical to bitsandbytes; routers stay in the compute dtype; the
4-bit experts compute as the dense experts holding their dequantized weights; LoRA on 4-bit experts
trains, merges and unmerges bit for bit; and 4-bit folders move between transformers + bitsandbytes
(which keeps experts dense) and us, while a model holding 4-bit experts is refused by save_pretrained."""
import json

import bitsandbytes.functional as bnb
import pytest
import torch
from hf_factories import MOE_FAMILIES, save_tiny
from test_nf4 import bnb_default_quantize_blockwise
from test_qlora_checkpoints import DEVICE_MAP, loads_in_transformers_and_round_trips, reference_matmul
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from minilora.lora.layer import LoRAConfig
from minilora.lora.model import inject, merge, trainable_parameters, unload, unmerge
from minilora.quant.nf4 import dynamic_map, quantize_4bit
from minilora.quant.qlora import ExpertsNF4, LinearNF4, quantize_model
from reference_models import load_pretrained, save_pretrained
from reference_models.moe import Experts, Gate

pytestmark = pytest.mark.interop
# bitsandbytes' CPU kernels want 4-bit weights at least 64 wide (see test_qlora_checkpoints.WIDE)
WIDE = dict(hidden_size=64, intermediate_size=128, moe_intermediate_size=64, shared_expert_intermediate_size=64)
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))


def tiny(family, folder, **overrides):
    keys = {k: v for k, v in WIDE.items() if family == "qwen2_moe" or k != "shared_expert_intermediate_size"}
    if family == "mixtral":
        keys.pop("moe_intermediate_size")
    if family == "qwen3_moe":
        keys["head_dim"] = 16  # o_proj's input, heads x head_dim, 64 wide too
    save_tiny(family, folder, **keys, **overrides)
    return load_pretrained(folder)


def dequantized_twin(model):
    """The same model with each 4-bit layer replaced by its dequantized dense weights."""
    dense = load_pretrained(model.folder)
    experts = [n for n, m in model.named_modules() if isinstance(m, ExpertsNF4)]
    for name, module in model.named_modules():
        if name in experts:
            dense.set_submodule(name, module.dequantized())
        elif isinstance(module, LinearNF4) and not any(name.startswith(e + ".") for e in experts):
            linear = dense.get_submodule(name)
            linear.weight.data = module.dequantize_weight()
    return dense.eval()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_each_expert_is_quantized_byte_for_byte_as_bitsandbytes_quantizes_it(tmp_path, family):
    model = tiny(family, tmp_path)
    dense = {n: (m.gate_up_proj.detach().clone(), m.down_proj.detach().clone())
             for n, m in model.named_modules() if isinstance(m, Experts)}
    quantize_model(model)
    for name, (gate_up, down) in dense.items():
        experts = model.get_submodule(name)
        assert isinstance(experts, ExpertsNF4)
        for tensor, weight in (("gate_up_proj", gate_up), ("down_proj", down)):
            for e in range(weight.shape[0]):
                packed, state = bnb.quantize_4bit(weight[e], blocksize=64, compress_statistics=True, quant_type="nf4")
                ours = getattr(experts, tensor)[e].quant_state
                assert torch.equal(ours.packed, packed) and torch.equal(ours.offset, state.offset)
                assert torch.equal(ours.absmax2, state.state2.absmax)
                # the 8-bit codes of the scales: bitsandbytes' pure-PyTorch kernel (exact nearest; its
                # native CPU kernel is off by one code now and then, see test_nf4.py)
                raw = bnb.quantize_4bit(weight[e], blocksize=64, quant_type="nf4")[1].absmax
                assert torch.equal(ours.absmax, bnb_default_quantize_blockwise(raw - state.offset, dynamic_map(), 256)[0])


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_routers_stay_dense_in_the_compute_dtype(tmp_path, family):
    model = quantize_model(tiny(family, tmp_path), compute_dtype=torch.bfloat16)
    gates = [m for m in model.modules() if isinstance(m, Gate)]
    assert gates and all(type(m) is Gate and m.weight.dtype == torch.bfloat16 for m in gates)
    assert all(m.compute_dtype == torch.bfloat16 for m in model.modules() if isinstance(m, ExpertsNF4))
    assert model(IDS).dtype == torch.bfloat16


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_4bit_experts_compute_as_the_dense_experts_with_their_dequantized_weights(tmp_path, family):
    model = quantize_model(tiny(family, tmp_path)).eval()
    model.folder = tmp_path
    assert torch.equal(model(IDS), dequantized_twin(model)(IDS))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_lora_on_4bit_experts_trains_like_lora_on_the_dequantized_experts(tmp_path, family):
    quantized = quantize_model(tiny(family, tmp_path))
    quantized.folder = tmp_path
    dense = dequantized_twin(quantized)
    config = LoRAConfig(r=2, alpha=4, init="gaussian", target_modules=["q_proj"], target_parameters=EXPERTS)
    for model in (quantized, dense):
        torch.manual_seed(0)
        inject(model, config)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(n)))
        model.train()
        model(IDS, IDS)[1].backward()
    grads = {n: p.grad for n, p in dense.named_parameters() if p.requires_grad}
    assert grads and {n for n, p in quantized.named_parameters() if p.requires_grad} == set(grads)
    for n, p in quantized.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7, msg=n)
    assert trainable_parameters(quantized) == trainable_parameters(dense)  # 4-bit experts counted logically


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_merge_into_4bit_experts_unmerges_bit_for_bit_and_unloads_dense(tmp_path, family):
    model = quantize_model(tiny(family, tmp_path)).eval()
    inject(model, LoRAConfig(r=2, alpha=4, init="gaussian", target_modules=[], target_parameters=EXPERTS))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.01)
    layer = model.model.layers[0].mlp.experts
    experts = layer.base_layer
    before = [s.packed.clone() for s in experts.quant_states()["down_proj"]]
    # merged = each expert's W (dequantized) + scaling * B[e] @ A[e] in fp32, quantized once more
    A, B = layer.lora_A["default"]["down_proj"], layer.lora_B["default"]["down_proj"]
    expected = [quantize_4bit(experts.down_proj[e].dequantize_weight() + 2.0 * (B[e] @ A[e]).detach(), "nf4", 64, True)
                for e in range(experts.num_experts)]
    unmerged = model(IDS)
    merge(model)
    for state, want in zip(experts.quant_states()["down_proj"], expected):
        assert torch.equal(state.packed, want.packed) and torch.equal(state.absmax, want.absmax)
    unmerge(model)
    assert all(torch.equal(s.packed, b) for s, b in zip(experts.quant_states()["down_proj"], before))
    assert torch.equal(model(IDS), unmerged)
    unload(model)  # dequantize first, merge in full precision: the unmerged function, up to fp32 rounding
    assert type(model.model.layers[0].mlp.experts) is Experts
    torch.testing.assert_close(model(IDS), unmerged, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_transformers_4bit_moe_folder_loads_here_and_ours_loads_there(tmp_path, family):
    # transformers + bitsandbytes quantize the attention (and Qwen2-MoE's shared expert and its gate)
    # and keep the experts and the router dense; we read that folder, give its logits and re-save it
    # byte for byte; ours, quantized with experts=False, loads in transformers as a 4-bit model
    tiny(family, tmp_path / "fp32")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", quantization_config=config, dtype=torch.float32,
                                              device_map=DEVICE_MAP, experts_implementation="eager")
    hf.save_pretrained(tmp_path / "hf4bit")
    reference_matmul(hf.eval())
    ours = load_pretrained(tmp_path / "hf4bit")
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), hf(IDS).logits, rtol=1e-5, atol=1e-5)
    save_pretrained(ours, tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == \
        (tmp_path / "hf4bit" / "model.safetensors").read_bytes()
    assert json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"] == \
        json.loads((tmp_path / "hf4bit" / "config.json").read_text())["quantization_config"]
    mine = quantize_model(load_pretrained(tmp_path / "fp32"), experts=False).eval()
    save_pretrained(mine, tmp_path / "ours4bit")
    loads_in_transformers_and_round_trips(mine, tmp_path / "ours4bit", seed=5)


def test_a_model_with_4bit_experts_is_refused_by_save_pretrained_in_one_line(tmp_path):
    model = quantize_model(tiny("mixtral", tmp_path / "fp32"))
    with pytest.raises(ValueError, match=r"^model\.layers\.0\.mlp\.experts holds 4-bit experts, which transformers "
                                         r"5\.24 \+ bitsandbytes cannot read[^\n]*$"):
        save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()
