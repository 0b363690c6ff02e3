"""Adapters move between minilora (on the reference models) and the real peft (on the transformers
twin of the same checkpoint) both ways with equal logits; trainable counts equal peft's."""
import json
import warnings

import pytest
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

from hf_factories import save_tiny_families
from minilora.lora.layer import LoRAConfig
from minilora.lora.model import inject, lora_layers, trainable_parameters
from minilora.lora.peft_io import load_adapter, save_adapter
from reference_models import load_pretrained

pytestmark = pytest.mark.interop
warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")

TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "llama": "all-linear"}
# "plain" also carries per-module ranks and alphas, written to / read from rank_pattern, alpha_pattern.
VARIANTS = {"plain": {"rank_pattern": {"c_attn": 6, "q_proj": 6}, "alpha_pattern": {"c_fc": 3, "o_proj": 3}},
            "dora": {"use_dora": True}, "rslora": {"use_rslora": True}}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_tiny_families(tmp_path_factory.mktemp("ckpt"), ("gpt2", "llama"))


def twins(checkpoints, family):
    ours = load_pretrained(checkpoints / family).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(checkpoints / family).eval()
    return ours, theirs


def peft_config(config: LoRAConfig, **extra) -> LoraConfig:
    return LoraConfig(r=config.r, lora_alpha=config.alpha, target_modules=config.target_modules,
                      exclude_modules=config.exclude_modules, bias=config.bias, use_rslora=config.use_rslora,
                      use_dora=config.use_dora, rank_pattern=config.rank_pattern,
                      alpha_pattern=config.alpha_pattern, **extra)


def our_config(family, variant):
    kw = dict(VARIANTS[variant])
    for key in ("rank_pattern", "alpha_pattern"):  # keep only the keys this family has
        if key in kw:
            kw[key] = {k: v for k, v in kw[key].items() if (k.startswith("c_")) == (family == "gpt2")}
    return LoRAConfig(r=4, alpha=8, target_modules=TARGETS[family], **kw)


def train_a_few_steps(model, steps=3, logits=lambda out: out):
    """Moves A, B and DoRA's magnitude away from their init, so every saved tensor matters."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(logits(model(ids)).flatten(0, 1)[:-1], ids.flatten()[1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


IDS = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_adapter_trained_here_loads_in_peft_with_equal_logits(checkpoints, tmp_path, family, variant):
    ours, theirs = twins(checkpoints, family)
    with torch.no_grad():
        base_logits = ours(IDS)
    inject(ours, our_config(family, variant))
    train_a_few_steps(ours)
    save_adapter(ours, tmp_path)
    peft_model = PeftModel.from_pretrained(theirs, tmp_path).eval()
    with torch.no_grad():
        ours_logits, peft_logits = ours(IDS), peft_model(IDS).logits
    assert (ours_logits - base_logits).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(ours_logits, peft_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_adapter_trained_in_peft_loads_here_with_equal_logits(checkpoints, tmp_path, family, variant):
    ours, theirs = twins(checkpoints, family)
    config = our_config(family, variant)
    peft_model = get_peft_model(theirs, peft_config(config))
    train_a_few_steps(peft_model, logits=lambda out: out.logits)
    peft_model.save_pretrained(tmp_path)
    with torch.no_grad():
        base_logits = ours(IDS)
    load_adapter(ours, tmp_path)
    with torch.no_grad():
        ours_logits, peft_logits = ours(IDS), peft_model(IDS).logits
    assert (ours_logits - base_logits).abs().max() > 1e-2
    torch.testing.assert_close(ours_logits, peft_logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_saved_files_have_exactly_peft_keys_shapes_and_config(checkpoints, tmp_path, family):
    ours, theirs = twins(checkpoints, family)
    config = our_config(family, "dora")
    inject(ours, config)
    save_adapter(ours, tmp_path / "ours")
    get_peft_model(theirs, peft_config(config)).save_pretrained(tmp_path / "peft")
    a = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    b = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    ca, cb = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    for key in ("peft_type", "r", "lora_alpha", "use_dora", "use_rslora", "fan_in_fan_out", "bias"):
        assert ca[key] == cb[key], key


COUNT_CONFIGS = {
    "gpt2": [
        dict(target_modules=["c_attn"]),
        dict(target_modules=["c_attn", "c_proj"], r=8),
        dict(target_modules=r"transformer\.h\.[01]\.attn\.c_attn"),
        dict(target_modules="all-linear", r=2),
        dict(target_modules=["c_attn", "c_fc"], rank_pattern={"c_fc": 2}, bias="all"),
        dict(target_modules=["c_attn", "c_proj"], bias="lora_only", use_dora=True),
    ],
    "llama": [
        dict(target_modules=["q_proj", "v_proj"]),
        dict(target_modules=r".*\.(q|k)_proj", r=2),
        dict(target_modules="all-linear"),
        dict(target_modules="all-linear", exclude_modules=["down_proj"], rank_pattern={"v_proj": 2}),
        dict(target_modules=["q_proj", "o_proj", "up_proj"], use_dora=True),
    ],
}


@pytest.mark.parametrize("family, kw", [(f, kw) for f, kws in COUNT_CONFIGS.items() for kw in kws])
def test_trainable_counts_equal_peft_exact(checkpoints, family, kw):
    ours, theirs = twins(checkpoints, family)
    config = LoRAConfig(**{"r": 4, **kw})
    inject(ours, config)
    peft_trainable, peft_all = get_peft_model(theirs, peft_config(config)).get_nb_trainable_parameters()
    trainable, total, percent = trainable_parameters(ours)
    assert (trainable, total) == (peft_trainable, peft_all)
    assert percent == pytest.approx(100 * peft_trainable / peft_all)
    if family == "llama":  # transformers' Llama is nn.Linear throughout: inject works on it directly too
        _, hf_llama = twins(checkpoints, family)
        inject(hf_llama, config)
        assert trainable_parameters(hf_llama)[:2] == (peft_trainable, peft_all)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_all_linear_targets_the_same_modules_as_peft(checkpoints, family):
    ours, theirs = twins(checkpoints, family)
    inject(ours, LoRAConfig(target_modules="all-linear"))
    peft_model = get_peft_model(theirs, LoraConfig(target_modules="all-linear"))
    peft_names = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
                  and hasattr(m, "base_layer")}
    assert set(lora_layers(ours)) == peft_names
    assert "lm_head" not in peft_names


# ------------------------------------------------------------------ bad adapter files
def _saved(checkpoints, tmp_path, family="gpt2", **kw):
    ours, _ = twins(checkpoints, family)
    inject(ours, LoRAConfig(r=4, target_modules=["c_attn"], **kw))
    save_adapter(ours, tmp_path)
    return tmp_path


def test_adapter_for_other_module_names_is_refused(checkpoints, tmp_path):
    folder = _saved(checkpoints, tmp_path)
    llama, _ = twins(checkpoints, "llama")
    with pytest.raises(ValueError, match=r"target_modules=\['c_attn'\].*matches no module.*q_proj \(x2\)"):
        load_adapter(llama, folder)
    assert not lora_layers(llama) and not getattr(llama, "lora_configs", {})


def test_adapter_with_wrong_shapes_is_refused_naming_module_and_shapes(checkpoints, tmp_path):
    folder = _saved(checkpoints, tmp_path)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.transformer.h.1.attn.c_attn.lora_B.weight"
    tensors[key] = torch.zeros(95, 4)
    save_file(tensors, path)
    ours, _ = twins(checkpoints, "gpt2")
    with pytest.raises(ValueError, match=r"h\.1\.attn\.c_attn\.lora_B\.weight: file has \(95, 4\), model has \(96, 4\)"):
        load_adapter(ours, folder)
    assert not getattr(ours, "lora_configs", {})  # nothing half-loaded stays behind


def test_adapter_with_unknown_or_missing_tensors_is_refused(checkpoints, tmp_path):
    folder = _saved(checkpoints, tmp_path)
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    tensors["base_model.model.transformer.h.7.attn.c_attn.lora_A.weight"] = torch.zeros(4, 32)
    del tensors["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    save_file(tensors, path)
    ours, _ = twins(checkpoints, "gpt2")
    with pytest.raises(ValueError, match=r"h\.7\.attn\.c_attn\.lora_A\.weight: no such LoRA tensor.*lacks 1 tensor"):
        load_adapter(ours, folder)


def test_adapter_config_with_unsupported_options_is_refused(checkpoints, tmp_path):
    folder = _saved(checkpoints, tmp_path)
    raw = json.loads((folder / "adapter_config.json").read_text())
    raw["layers_to_transform"] = [0]
    (folder / "adapter_config.json").write_text(json.dumps(raw))
    ours, _ = twins(checkpoints, "gpt2")
    with pytest.raises(ValueError, match=r"does not implement: \{'layers_to_transform': \[0\]\}"):
        load_adapter(ours, folder)
    raw["peft_type"] = "IA3"
    (folder / "adapter_config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"only LoRA adapters can be loaded, got peft_type='IA3'"):
        load_adapter(ours, folder)


def test_missing_adapter_files_are_named(tmp_path, checkpoints):
    ours, _ = twins(checkpoints, "gpt2")
    with pytest.raises(FileNotFoundError, match=r"adapter_config.json not found"):
        load_adapter(ours, tmp_path)


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)


def _tiny_folder(tmp_path, **kw):
    donor = _Tiny()
    inject(donor, LoRAConfig(r=2, target_modules=["a", "b"], **kw))
    with torch.no_grad():
        for p in donor.parameters():
            if p.requires_grad:
                p.add_(1.0)  # trained values that differ from the target model's
    return save_adapter(donor, tmp_path / "adapter")


def _break(folder, key, value=None):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    if value is None:
        del tensors[key]
    else:
        tensors[key] = value
    save_file(tensors, path)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: list(m.active_adapters) for n, m in lora_layers(model).items()})


def _assert_same(model, snap):
    state, grads, active = snap
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert {n: list(m.active_adapters) for n, m in lora_layers(model).items()} == active


def test_failed_load_keeps_the_active_adapter_and_its_trainable_params(tmp_path):
    folder = _tiny_folder(tmp_path)
    _break(folder, "base_model.model.b.lora_A.weight")
    model = _Tiny()
    inject(model, LoRAConfig(r=2, target_modules=["a"]), "mine")
    snap = _snapshot(model)
    assert snap[1]["a.lora_A.mine.weight"]
    with pytest.raises(ValueError, match=r"lacks 1 tensor"):
        load_adapter(model, folder, "theirs")
    _assert_same(model, snap)
    assert list(model.lora_configs) == ["mine"]


@pytest.mark.parametrize("kw", [dict(bias="all"), dict(modules_to_save=["head"])])
def test_failed_load_copies_no_bias_or_modules_to_save_tensor(tmp_path, kw):
    folder = _tiny_folder(tmp_path, **kw)
    assert any(k.endswith(".bias") for k in load_file(folder / "adapter_model.safetensors"))
    _break(folder, "base_model.model.b.lora_B.weight", torch.zeros(7, 2))
    model = _Tiny()
    inject(model, LoRAConfig(r=2, target_modules=["a"]), "mine")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"b\.lora_B\.weight: file has \(7, 2\), model has \(8, 2\)"):
        load_adapter(model, folder, "theirs")
    _assert_same(model, snap)


@pytest.mark.parametrize("key", ["base_model.model.a.base_layer.weight", "base_model.model.head.weight",
                                 "base_model.model.a.base_layer.bias"])
def test_adapter_file_cannot_overwrite_base_weights(tmp_path, key):
    folder = _tiny_folder(tmp_path)  # bias="none", no modules_to_save
    shape = (8, 8) if key.endswith("a.base_layer.weight") else (3, 8) if "head" in key else (8,)
    _break(folder, key, torch.full(shape, 7.0))
    model = _Tiny()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=rf"{key.replace('.', chr(92) + '.')}: not a LoRA tensor.*bias='none'"):
        load_adapter(model, folder)
    _assert_same(model, snap)
    assert not lora_layers(model) and not getattr(model, "lora_configs", {})


def test_bias_and_modules_to_save_tensors_still_load(tmp_path):
    folder = _tiny_folder(tmp_path, bias="all", modules_to_save=["head"])
    model = _Tiny()
    load_adapter(model, folder)
    donor = load_file(folder / "adapter_model.safetensors")
    state = model.state_dict()
    for key in ("a.base_layer.bias", "head.weight", "head.bias"):
        assert torch.equal(state[key], donor["base_model.model." + key])
