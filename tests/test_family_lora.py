"""LoRA and QLoRA on every decoder family, against peft on the transformers twin of the same
checkpoint: adapters move both ways with equal logits (fused projections included), the same
modules are targeted and the same parameters counted, merge/unload gives peft's merged model, a
4-bit base trains its adapters as the dense model with the dequantized weights would, and 4-bit
folders move between transformers + bitsandbytes and us both ways."""
import copy
import warnings

import pytest
import torch
import transformers
from hf_factories import FAMILIES, save_tiny, save_tiny_families
from peft import LoraConfig, PeftModel, get_peft_model
from test_qlora_checkpoints import loads_in_transformers_and_round_trips, reference_matmul
from transformers import BitsAndBytesConfig

from minilora.lora.layer import LoRAConfig
from minilora.lora.model import inject, lora_layers, merge, target_names, trainable_parameters, unload
from minilora.lora.peft_io import load_adapter, save_adapter
from minilora.quant.qlora import LinearNF4, quantize_model
from reference_models import load_pretrained, save_pretrained

pytestmark = pytest.mark.interop
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")

DECODERS = [f for f in FAMILIES if f != "gpt2"]
HF_ATTN = {"gemma2": "eager"}  # transformers runs Gemma 2 eager only
# peft's names, fused projections included: Phi-3's qkv_proj / gate_up_proj, GPT-NeoX's query_key_value
LISTS = {"phi3": ["qkv_proj", "gate_up_proj"], "gpt_neox": ["query_key_value", "dense_4h_to_h"]}
IDS = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_tiny_families(tmp_path_factory.mktemp("families"), DECODERS)


def twins(checkpoints, family):
    ours = load_pretrained(checkpoints / family).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        checkpoints / family, attn_implementation=HF_ATTN.get(family, "sdpa")).eval()
    return ours, theirs


def logits(model):
    with torch.no_grad():
        out = model(IDS)
    return out if torch.is_tensor(out) else out.logits


def train_a_few_steps(model, steps=3):
    """Moves A and B away from their init, so every saved tensor matters."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(steps):
        out = model(x)
        out = out if torch.is_tensor(out) else out.logits
        loss = torch.nn.functional.cross_entropy(out.flatten(0, 1)[:-1], x.flatten()[1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def peft_config(targets):
    return LoraConfig(r=4, lora_alpha=8, target_modules=targets)


@pytest.mark.parametrize("family", DECODERS)
def test_adapter_trained_in_peft_loads_here_with_equal_logits(checkpoints, tmp_path, family):
    ours, theirs = twins(checkpoints, family)
    peft_model = get_peft_model(theirs, peft_config("all-linear"))
    train_a_few_steps(peft_model)
    peft_model.save_pretrained(tmp_path)
    base = logits(ours)
    load_adapter(ours, tmp_path)
    assert (logits(ours) - base).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(logits(ours), logits(peft_model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", DECODERS)
def test_adapter_trained_here_loads_in_peft_with_equal_logits_and_counts(checkpoints, tmp_path, family):
    ours, theirs = twins(checkpoints, family)
    targets = LISTS.get(family, ["q_proj", "v_proj", "down_proj"])
    inject(ours, LoRAConfig(r=4, alpha=8, target_modules=targets))
    train_a_few_steps(ours)
    save_adapter(ours, tmp_path)
    peft_model = PeftModel.from_pretrained(theirs, tmp_path).eval()
    torch.testing.assert_close(logits(ours), logits(peft_model), rtol=0, atol=1e-5)
    _, theirs_again = twins(checkpoints, family)
    expected = get_peft_model(theirs_again, peft_config(targets)).get_nb_trainable_parameters()
    assert trainable_parameters(ours)[:2] == expected  # digit for digit


@pytest.mark.parametrize("family", DECODERS)
@pytest.mark.parametrize("targets", ["all-linear", None])
def test_targets_select_the_modules_peft_selects(checkpoints, family, targets):
    # all-linear: every linear but the head; None: peft's per-family default (q_proj/v_proj, GPT-NeoX's
    # query_key_value). peft has no default for Phi-3 and OLMo 2 and refuses; we refuse Phi-3 too and
    # take q_proj/v_proj for OLMo 2 (minilora picks the default by the modules it finds).
    ours, theirs = twins(checkpoints, family)
    if targets is None and family in ("phi3", "olmo2"):
        with pytest.raises(ValueError, match="target_modules"):
            get_peft_model(theirs, peft_config(None))
        if family == "phi3":
            with pytest.raises(ValueError, match=r"target_modules=None and no default target"):
                target_names(ours, LoRAConfig(target_modules=None))
        return
    peft_model = get_peft_model(theirs, peft_config(targets))
    peft_names = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules()
                  if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    assert set(target_names(ours, LoRAConfig(target_modules=targets))) == peft_names
    assert "lm_head" not in peft_names


@pytest.mark.parametrize("family", DECODERS)
def test_merge_and_unload_equal_peft_merged_model_saved_for_transformers(checkpoints, tmp_path, family):
    ours, theirs = twins(checkpoints, family)
    inject(ours, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    train_a_few_steps(ours)
    save_adapter(ours, tmp_path / "adapter")
    unmerged = logits(ours)
    merge(ours)
    torch.testing.assert_close(logits(ours), unmerged, rtol=0, atol=1e-5)
    unload(ours)
    assert not lora_layers(ours)
    save_pretrained(ours, tmp_path / "merged")
    peft_merged = PeftModel.from_pretrained(theirs, tmp_path / "adapter").merge_and_unload().eval()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", attn_implementation=HF_ATTN.get(family, "sdpa")).eval()
    assert set(reloaded.state_dict()) == set(peft_merged.state_dict())
    torch.testing.assert_close(logits(reloaded), logits(peft_merged), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", DECODERS)
def test_qlora_forward_and_backward_equal_the_dequantized_dense_model(checkpoints, family):
    ours, _ = twins(checkpoints, family)
    qlora = quantize_model(copy.deepcopy(ours), quant_type="nf4", double_quant=True)
    quantized = {n: m for n, m in qlora.named_modules() if isinstance(m, LinearNF4)}
    assert quantized and "lm_head" not in quantized
    dense = copy.deepcopy(ours)
    with torch.no_grad():  # the dense twin holds exactly the weights the 4-bit layers compute with
        for name, layer in quantized.items():
            dense.get_submodule(name).weight.copy_(layer.dequantize_weight(torch.float32))
    config = LoRAConfig(r=4, alpha=8, target_modules="all-linear")
    inject(qlora, config)
    inject(dense, config)
    with torch.no_grad():  # B starts at zero: give it values, so that the adapters take part
        torch.manual_seed(0)
        for name, p in qlora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
        result = dense.load_state_dict({n: p for n, p in qlora.state_dict().items() if "lora_" in n}, strict=False)
    assert not result.unexpected_keys
    targets = torch.cat([IDS[:, 1:], torch.full((3, 1), -100)], dim=1)
    grads = []
    for model in (qlora, dense):
        model.train()
        out, loss = model(IDS, targets)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert set(grads[0]) == set(grads[1]) and all("lora_" in n for n in grads[0])
    torch.testing.assert_close(logits(qlora.eval()), logits(dense.eval()), rtol=0, atol=1e-5)
    for name, g in grads[0].items():
        assert g.abs().max() > 0, name
        torch.testing.assert_close(g, grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


# bitsandbytes' native CPU dequantize is wrong for weights narrower than its block size (64) on some
# CPUs (tests/test_qlora_checkpoints.py): every linear here is 64 or more wide on its input side
WIDE = dict(hidden_size=64, intermediate_size=128)
WIDE_HEADS = {"qwen3": 16, "gemma2": 16, "gemma3_text": 16}  # 4 heads x 16 = o_proj's 64 inputs


@pytest.mark.parametrize("family", DECODERS)
def test_transformers_4bit_folder_loads_here_and_ours_loads_there(tmp_path, family):
    overrides = dict(WIDE, **({"head_dim": WIDE_HEADS[family]} if family in WIDE_HEADS else {}))
    save_tiny(family, tmp_path / "fp32", **overrides)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "fp32", quantization_config=config, dtype=torch.float32, device_map="cpu",
        attn_implementation=HF_ATTN.get(family, "sdpa"))
    hf.save_pretrained(tmp_path / "hf4bit")
    hf = reference_matmul(hf.eval())
    ours = load_pretrained(tmp_path / "hf4bit")
    assert sum(isinstance(m, LinearNF4) for m in ours.modules()) == \
        sum(type(m).__name__ == "Linear4bit" for m in hf.modules()) > 0
    torch.testing.assert_close(logits(ours), logits(hf), rtol=1e-5, atol=1e-5)
    save_pretrained(ours, tmp_path / "ours")
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() == \
        (tmp_path / "hf4bit" / "model.safetensors").read_bytes()
    # and the other way: ours quantized, saved, loaded by transformers as a 4-bit model
    mine = quantize_model(load_pretrained(tmp_path / "fp32"), quant_type="nf4", double_quant=True)
    save_pretrained(mine, tmp_path / "mine4bit")
    loads_in_transformers_and_round_trips(mine, tmp_path / "mine4bit", seed=1)
