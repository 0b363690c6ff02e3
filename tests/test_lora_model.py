"""Model-level LoRA (minilora/lora/model.py) on the reference models: inject, target matching,
switching, disabling, deleting, merging, unloading, mixed-adapter batches."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from minilora.lora.layer import LoRAConfig, LoRALinear
from minilora.lora.model import (adapter_names_per_sample, delete_adapter, disable_adapters, inject, lora_layers,
                                 merge, set_adapter, target_names, trainable_parameters, unload, unmerge)
import factories


def tiny_gpt(seed=0, **kw):
    return factories.tiny_gpt(seed, **{**dict(embd_pdrop=0.0, resid_pdrop=0.0, attn_pdrop=0.0), **kw}).eval()


def tiny_llama(seed=0):
    return factories.tiny_llama(seed, intermediate_size=48, max_position_embeddings=32).eval()


def randomize_(model, adapter="default", std=0.2, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            if adapter in layer.lora_B:
                w = layer.lora_B[adapter].weight
                w.copy_(torch.randn(w.shape, generator=g) * std)


IDS = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------ target matching (peft's rules)
def test_list_matches_full_names_and_dot_suffixes_only():
    model = tiny_llama()
    names = target_names(model, LoRAConfig(target_modules=["q_proj", "layers.1.mlp.up_proj"]))
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                     "model.layers.1.mlp.up_proj"]
    # "proj" is not a `.`-suffix of "q_proj": a list entry is a name, not a substring
    with pytest.raises(ValueError, match=r"matches no module"):
        target_names(model, LoRAConfig(target_modules=["proj"]))


def test_string_is_a_full_regex_match():
    model = tiny_llama()
    assert target_names(model, LoRAConfig(target_modules=r".*\.0\..*(k|v)_proj")) == [
        "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"]
    with pytest.raises(ValueError, match=r"matches no module"):
        target_names(model, LoRAConfig(target_modules=r"q_proj"))  # fullmatch: the whole name must match


def test_all_linear_leaves_out_the_output_head_and_exclude_works():
    model = tiny_gpt()
    names = target_names(model, LoRAConfig(target_modules="all-linear"))
    assert "lm_head" not in names and len(names) == 8
    names = target_names(model, LoRAConfig(target_modules="all-linear", exclude_modules=["c_fc"]))
    assert len(names) == 6 and not any(n.endswith("c_fc") for n in names)


def test_default_targets_follow_peft():
    assert target_names(tiny_gpt(), LoRAConfig())[0].endswith("c_attn")
    assert {n.rsplit(".", 1)[1] for n in target_names(tiny_llama(), LoRAConfig())} == {"q_proj", "v_proj"}


def test_rank_and_alpha_patterns():
    model = tiny_llama()
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                             alpha_pattern={r"layers\.1\.self_attn\.q_proj": 1}))
    layers = lora_layers(model)
    assert layers["model.layers.0.self_attn.v_proj"].r["default"] == 2
    assert layers["model.layers.0.self_attn.q_proj"].scaling["default"] == 2.0
    assert layers["model.layers.1.self_attn.q_proj"].scaling["default"] == 0.25


# ------------------------------------------------------------------ bad input
def test_nothing_matched_lists_the_linear_modules():
    with pytest.raises(ValueError, match=r"target_modules=\['query'\].*matches no module; linear modules here: "
                                         r"c_attn \(x2\), c_proj \(x4\), c_fc \(x2\), lm_head"):
        inject(tiny_gpt(), LoRAConfig(target_modules=["query"]))


def test_one_list_entry_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match=r"target_modules entries \['q_prj'\] match no module"):
        inject(tiny_llama(), LoRAConfig(target_modules=["q_prj", "v_proj"]))


def test_non_linear_target_is_refused_by_name_and_type():
    with pytest.raises(TypeError, match=r"must be linear layers.*transformer\.wte \(Embedding\)"):
        inject(tiny_gpt(), LoRAConfig(target_modules=["wte"]))
    with pytest.raises(TypeError, match=r"model\.layers\.0\.input_layernorm \(RMSNorm\)"):
        inject(tiny_llama(), LoRAConfig(target_modules=["input_layernorm"]))


def test_pattern_matching_no_target_is_an_error():
    with pytest.raises(ValueError, match=r"rank_pattern key 'o_proj' matches none of the targeted modules"):
        inject(tiny_llama(), LoRAConfig(target_modules=["q_proj"], rank_pattern={"o_proj": 2}))


def test_rank_too_large_names_the_module_and_leaves_the_model_untouched():
    model = tiny_gpt()
    before = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"rank must be in 1..32 for transformer.h.0.attn.c_attn \(32 -> 96\), got 40"):
        inject(model, LoRAConfig(r=40, target_modules=["c_attn"]))
    assert {n: type(m) for n, m in model.named_modules()} == before


def test_duplicate_and_unknown_adapter_names():
    model = tiny_gpt()
    inject(model, LoRAConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match=r"adapter 'default' already exists"):
        inject(model, LoRAConfig(target_modules=["c_attn"]))
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['nope'\]; this model has \['default'\]"):
        set_adapter(model, "nope")
    with pytest.raises(ValueError, match=r"adapter_name must be .* got 'a.b'"):
        inject(model, LoRAConfig(target_modules=["c_attn"]), "a.b")


# ------------------------------------------------------------------ behaviour
def test_inject_freezes_everything_but_the_adapter_and_returns_originals():
    model = tiny_gpt()
    originals = {n: m for n, m in model.named_modules() if n.endswith("c_attn")}
    replaced = inject(model, LoRAConfig(target_modules=["c_attn"]))
    assert replaced == originals
    assert all(lora_layers(model)[n].base_layer is m for n, m in originals.items())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.attn.c_attn.lora_{ab}.default.weight" for i in (0, 1) for ab in "AB"}


@given(st.sampled_from(["gpt", "llama"]), st.sampled_from([["c_attn", "c_fc"], "all-linear"]), st.booleans())
@settings(max_examples=8)
def test_gradients_reach_only_adapter_parameters_in_a_model(family, targets, dora):
    model = tiny_gpt() if family == "gpt" else tiny_llama()
    if family == "llama" and targets != "all-linear":
        targets = ["q_proj", "down_proj"]
    inject(model, LoRAConfig(r=2, target_modules=targets, use_dora=dora))
    randomize_(model)
    model.train()
    logits, loss = model(IDS, IDS)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".lora_" in n for n in with_grad)
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}


def test_disable_adapters_runs_the_base_model_even_when_merged():
    model = tiny_gpt()
    base = model(IDS).detach()
    inject(model, LoRAConfig(target_modules="all-linear"))
    randomize_(model)
    adapted = model(IDS).detach()
    assert (adapted - base).abs().max() > 1e-3
    with disable_adapters(model):
        torch.testing.assert_close(model(IDS), base)
    merge(model)
    with disable_adapters(model):
        torch.testing.assert_close(model(IDS), base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(IDS), adapted, rtol=1e-5, atol=1e-5)  # merged again afterwards
    assert all(layer.merged_adapters == ["default"] for layer in lora_layers(model).values())


def test_set_adapter_switches_outputs_and_trainability():
    model = tiny_llama()
    inject(model, LoRAConfig(target_modules=["q_proj", "v_proj"]), "a")
    inject(model, LoRAConfig(target_modules=["o_proj"]), "b")
    randomize_(model, "a", seed=1)
    randomize_(model, "b", seed=2)
    out_b = model(IDS).detach()  # inject made "b" the active one
    set_adapter(model, "a")
    out_a = model(IDS).detach()
    assert not torch.allclose(out_a, out_b)
    assert all(".a." in n for n, p in model.named_parameters() if p.requires_grad)
    set_adapter(model, ["a", "b"])
    assert {n.split(".lora_")[1].split(".")[1] for n, p in model.named_parameters() if p.requires_grad} == {"a", "b"}


def test_delete_adapter():
    model = tiny_gpt()
    base = model(IDS).detach()
    inject(model, LoRAConfig(target_modules=["c_attn"]), "a")
    randomize_(model, "a")
    merge(model)
    with pytest.raises(ValueError, match=r"adapter 'a' is merged into c_attn \(x2\); unmerge\(model\) first"):
        delete_adapter(model, "a")
    unmerge(model)
    delete_adapter(model, "a")
    assert model.lora_configs == {} and all(not layer.lora_A for layer in lora_layers(model).values())
    torch.testing.assert_close(model(IDS), base, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unload_returns_plain_linears_with_merged_weights(dtype):
    model = tiny_llama().to(dtype)
    inject(model, LoRAConfig(target_modules="all-linear", use_dora=True))
    randomize_(model, std=0.05)
    adapted = model(IDS).detach().float()
    unload(model)
    assert not lora_layers(model) and not hasattr(model, "lora_configs")
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    tolerance = 1e-4 if dtype == torch.float32 else 0.15
    torch.testing.assert_close(model(IDS).float(), adapted, rtol=0, atol=tolerance)


def test_safe_merge_error_names_module_and_adapter():
    model = tiny_gpt()
    inject(model, LoRAConfig(target_modules=["c_fc"]), "broken")
    with torch.no_grad():
        lora_layers(model)["transformer.h.1.mlp.c_fc"].lora_B["broken"].weight.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"merging adapter 'broken' into transformer.h.1.mlp.c_fc gives non-finite"):
        merge(model, safe=True)


def test_trainable_parameters_percent_and_bias_modes():
    model = tiny_gpt()
    total = sum(p.numel() for p in model.parameters())
    inject(model, LoRAConfig(r=4, target_modules=["c_attn"], bias="lora_only"))
    trainable, all_params, percent = trainable_parameters(model)
    lora = 2 * 4 * (32 + 96)
    assert (trainable, all_params) == (lora + 2 * 96, total + lora)
    assert percent == pytest.approx(100 * trainable / all_params)


def test_modules_to_save_are_trainable():
    model = tiny_llama()
    inject(model, LoRAConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]))
    assert model.lm_head.weight.requires_grad


# ------------------------------------------------------------------ mixed-adapter batches
@given(st.lists(st.sampled_from(["a", "b", "__base__"]), min_size=1, max_size=5), st.booleans())
@settings(max_examples=12)
def test_mixed_batch_equals_each_sample_alone(names, dora):
    model = tiny_llama()
    inject(model, LoRAConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=dora), "a")
    inject(model, LoRAConfig(r=2, target_modules=["k_proj", "v_proj"]), "b")
    randomize_(model, "a", seed=1)
    randomize_(model, "b", seed=2)
    ids = IDS[:1].repeat(len(names), 1) if len(names) > 1 else IDS[:1]
    ids = (ids + torch.arange(len(names))[:, None]) % 64  # different rows
    with adapter_names_per_sample(model, names):
        mixed = model(ids)
    for i, name in enumerate(names):
        if name == "__base__":
            with disable_adapters(model):
                alone = model(ids[i:i + 1])
        else:
            set_adapter(model, name)
            alone = model(ids[i:i + 1])
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-5)


def test_mixed_batch_bad_input():
    model = tiny_gpt()
    inject(model, LoRAConfig(target_modules=["c_attn"]), "a")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['zz'\]"):
        with adapter_names_per_sample(model, ["a", "zz"]):
            pass
    with pytest.raises(ValueError, match=r"has 3 names for a batch of 4 rows"):
        with adapter_names_per_sample(model, ["a", "a", "__base__"]):
            model(IDS)
    merge(model)
    with pytest.raises(ValueError, match=r"unmerge\(model\) before a mixed batch"):
        with adapter_names_per_sample(model, ["a"] * 4):
            pass


def test_lora_linear_in_state_dict_keeps_peft_key_names():
    model = tiny_gpt()
    inject(model, LoRAConfig(target_modules=["c_attn"], use_dora=True))
    keys = set(model.state_dict())
    assert {"transformer.h.0.attn.c_attn.base_layer.weight", "transformer.h.0.attn.c_attn.lora_A.default.weight",
            "transformer.h.0.attn.c_attn.lora_B.default.weight",
            "transformer.h.0.attn.c_attn.lora_magnitude_vector.default"} <= keys
    assert isinstance(model.transformer.h[0].attn.c_attn, LoRALinear)


def test_quantized_base_counts_logically_and_unloads_to_linear_or_stays_quantized():
    from minilora.quant.qlora import LinearNF4

    for requantize in (False, True):
        model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
        model[0] = LinearNF4.from_linear(model[0])
        model.requires_grad_(False)
        inject(model, LoRAConfig(r=2, target_modules=["0", "2"]))
        trainable, total, _ = trainable_parameters(model)
        assert (trainable, total) == (2 * (16 + 16) + 2 * (16 + 8), 16 * 16 + 16 + 16 * 8 + 8 + trainable)
        randomize_(model)
        x = torch.randn(3, 16)
        y = model(x).detach()
        merged = (model[0].base_layer.dequantize_weight() + model[0].delta_weight("default")).detach()
        unload(model, requantize=requantize)
        assert type(model[0]) is (LinearNF4 if requantize else nn.Linear)
        if not requantize:  # dequantize, then merge in fp32: the function does not change
            torch.testing.assert_close(model(x), y, rtol=0, atol=1e-5)
        else:  # requantizing the merged weight moves each weight by at most absmax * (largest half-gap)
            half_gap = (1.0 - 0.7229568362236023) / 2  # the largest half-gap of the NF4 codebook
            err = (model[0].dequantize_weight() - merged).abs()
            assert 0 < err.max() <= merged.abs().max() * half_gap


def test_disable_adapters_on_a_merged_4bit_model_is_idempotent():
    from minilora.quant.qlora import LinearNF4

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 64))
    model[0] = LinearNF4.from_linear(model[0])
    model[2] = LinearNF4.from_linear(model[2])
    inject(model, LoRAConfig(r=8, target_modules=["0", "2"]))
    randomize_(model)
    w0 = {n: m.base_layer.dequantize_weight().clone() for n, m in lora_layers(model).items()}
    x = torch.randn(3, 256)
    with disable_adapters(model):
        y_base = model(x)
    merge(model)
    w_merged = {n: m.base_layer.dequantize_weight().clone() for n, m in lora_layers(model).items()}
    y_merged = model(x)
    for _ in range(3):
        with disable_adapters(model):
            assert torch.equal(model(x), y_base)
        assert torch.equal(model(x), y_merged)
        for n, m in lora_layers(model).items():
            assert torch.equal(m.base_layer.dequantize_weight(), w_merged[n])
    unmerge(model)
    for n, m in lora_layers(model).items():
        assert torch.equal(m.base_layer.dequantize_weight(), w0[n])


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("quantized", [False, True])
def test_failed_inject_leaves_the_model_bit_identical(init, quantized):
    torch.manual_seed(0)
    model = nn.Sequential()
    model.a, model.b = nn.Linear(16, 16), nn.Linear(16, 4)
    if quantized:
        from minilora.quant.qlora import LinearNF4

        model.a = LinearNF4.from_linear(model.a, block_size=32)
    inject(model, LoRAConfig(r=2, target_modules=["a"]), "first")
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=r"rank must be in 1\.\.4 for b"):
        inject(model, LoRAConfig(r=8, init=init, target_modules=["a", "b"]), "second")
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert list(model.lora_configs) == ["first"] and model.a.active_adapters == ["first"]


def test_failed_inject_after_modifying_restores_pissa_base_weights(monkeypatch):
    """Even a failure inside add_adapter (after PiSSA rewrote earlier layers) restores every base weight."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.a, model.b = nn.Linear(16, 16), nn.Linear(16, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    original = LoRALinear.add_adapter

    def flaky(self, *args, **kw):
        calls.append(self.name)
        if self.name == "b":
            raise RuntimeError("boom")
        return original(self, *args, **kw)

    monkeypatch.setattr(LoRALinear, "add_adapter", flaky)
    with pytest.raises(RuntimeError, match="boom"):
        inject(model, LoRAConfig(r=4, init="pissa", target_modules=["a", "b"]))
    assert calls == ["a", "b"]
    assert type(model.a) is nn.Linear and type(model.b) is nn.Linear and not hasattr(model, "lora_configs")
    after = model.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)


def test_matching_helpers_follow_peft():
    from minilora.lora.layer import pattern_matches
    from minilora.lora.model import in_modules_to_save, suffix_match

    assert suffix_match("model.q_proj", "q_proj") and suffix_match("q_proj", "q_proj")
    assert not suffix_match("model.xq_proj", "q_proj")
    assert in_modules_to_save("lm_head", ["lm_head"]) and in_modules_to_save("model.lm_head.weight", ["lm_head"])
    assert in_modules_to_save("transformer.wte.weight", ["wte"]) and not in_modules_to_save("my_lm_head.weight", ["lm_head"])
    assert pattern_matches("q_proj", "model.layers.0.q_proj") and not pattern_matches("q_proj", "model.xq_proj")
