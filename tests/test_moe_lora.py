"""LoRA on expert tensors (minilora/lora/experts.py, peft_experts.py) against peft 0.21 on the transformers
twin of the same tiny MoE checkpoint: target_parameters adapters move both ways with equal logits and
counts; "all-linear" adapts what peft's does but the routers; adapters trained when experts were
per-expert linear layers (transformers 4) load into ours as into peft, and equal the hand-merged
weights; the router only by name; merge / unload; and the refusals peft shares.

peft 0.21 converts transformers-4 targets (w1/w3/w2, gate_proj/up_proj/down_proj) to the fused expert
tensors for Mixtral and Qwen3-MoE but not for Qwen2-MoE (transformers' conversion table has no entry
naming qwen2_moe itself), so there those tests check Qwen2-MoE against the hand-merged weights only."""
import json
import warnings

import pytest
import torch
import transformers
from hf_factories import MOE_FAMILIES, TINY, save_tiny_families
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_family_lora import train_a_few_steps

from minilora.lora.experts import LoRAExperts
from minilora.lora.layer import LoRAConfig, LoRALinear
from minilora.lora.model import (adapter_names_per_sample, inject, merge, target_names, trainable_parameters,
                                 unload, unmerge)
from minilora.lora.peft_io import load_adapter, save_adapter
from reference_models import load_pretrained
from reference_models.moe import Experts

pytestmark = pytest.mark.interop
warnings.filterwarnings("ignore", message=".*(rank|alpha)_pattern keys did not match.*")  # peft's, on every MoE
IDS = torch.randint(0, 128, (3, 10), generator=torch.Generator().manual_seed(1))
EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
PEFT_CONVERTS = ("mixtral", "qwen3_moe")
PER_EXPERT = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"), "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
              "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj")}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_tiny_families(tmp_path_factory.mktemp("moe"), MOE_FAMILIES)


def twins(checkpoints, family):
    theirs = transformers.AutoModelForCausalLM.from_pretrained(checkpoints / family, experts_implementation="eager")
    return load_pretrained(checkpoints / family).eval(), theirs.eval()


def logits(model):
    with torch.no_grad():
        out = model(IDS)
    return out if torch.is_tensor(out) else out.logits


CONFIGS = {"experts": dict(target_modules=[], target_parameters=EXPERTS),
           "q+down experts": dict(target_modules=["q_proj"], target_parameters=["mlp.experts.down_proj"]),
           "router by name": dict(target_modules=["o_proj"], target_parameters=["gate.weight", "experts.down_proj"])}


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_adapter_trained_in_peft_loads_here_with_equal_logits(checkpoints, tmp_path, family, kind):
    ours, theirs = twins(checkpoints, family)
    peft_model = get_peft_model(theirs, LoraConfig(r=2, lora_alpha=4, **CONFIGS[kind]))
    train_a_few_steps(peft_model)
    peft_model.save_pretrained(tmp_path)
    base = logits(ours)
    load_adapter(ours, tmp_path)
    assert (logits(ours) - base).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(logits(ours), logits(peft_model), rtol=0, atol=1e-5)
    assert trainable_parameters(ours)[0] == peft_model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("kind", CONFIGS)
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_adapter_trained_here_loads_in_peft_with_equal_logits_and_counts(checkpoints, tmp_path, family, kind):
    ours, theirs = twins(checkpoints, family)
    inject(ours, LoRAConfig(r=2, alpha=4, **CONFIGS[kind]))
    train_a_few_steps(ours)
    save_adapter(ours, tmp_path)
    peft_model = PeftModel.from_pretrained(theirs, tmp_path).eval()
    torch.testing.assert_close(logits(ours), logits(peft_model), rtol=0, atol=1e-5)
    _, fresh = twins(checkpoints, family)
    expected = get_peft_model(fresh, LoraConfig(r=2, lora_alpha=4, **CONFIGS[kind])).get_nb_trainable_parameters()
    assert trainable_parameters(ours)[:2] == expected  # digit for digit


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_expert_adapter_counts_are_E_r_in_plus_out_per_tensor(checkpoints, family):
    # the formula written out from the config: per sparse layer E * r * ((C + 2I) + (I + C))
    ours, _ = twins(checkpoints, family)
    inject(ours, LoRAConfig(r=3, alpha=6, target_modules=[], target_parameters=EXPERTS))
    c = TINY[family]
    E = c.get("num_local_experts", c.get("num_experts"))
    C, inter = c["hidden_size"], c.get("moe_intermediate_size", c["intermediate_size"])
    assert trainable_parameters(ours)[0] == c["num_hidden_layers"] * E * 3 * ((C + 2 * inter) + (inter + C))
    layer = ours.model.layers[0].mlp.experts
    assert isinstance(layer, LoRAExperts)
    assert layer.lora_A["default"]["gate_up_proj"].shape == (E, 3, C)  # per expert (r, in)
    assert layer.lora_B["default"]["down_proj"].shape == (E, C, 3)  # per expert (out, r)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_all_linear_adapts_what_peft_does_but_the_routers(checkpoints, tmp_path, family):
    # peft's all-linear on a transformers 5 MoE also wraps the router (gate.weight); ours never does
    # unless the router is named. Counts differ by exactly the routers' r * (C + E) per layer.
    ours, theirs = twins(checkpoints, family)
    peft_model = get_peft_model(theirs, LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    assert "gate.weight" in peft_model.peft_config["default"].target_parameters
    inject(ours, LoRAConfig(r=2, alpha=4, target_modules="all-linear"))
    assert not any(isinstance(m, LoRALinear) and n.endswith("mlp.gate") for n, m in ours.named_modules())
    c = TINY[family]
    E = c.get("num_local_experts", c.get("num_experts"))
    routers = c["num_hidden_layers"] * 2 * (c["hidden_size"] + E)
    assert trainable_parameters(ours)[0] == peft_model.get_nb_trainable_parameters()[0] - routers
    with torch.no_grad():  # equal logits once peft's routers are switched off (B = 0)
        for n, p in peft_model.named_parameters():
            if "mlp.gate.lora_B" in n:
                p.zero_()
    train_a_few_steps(ours)
    save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_parameters"] == sorted(EXPERTS) and "gate" not in config["target_modules"]
    torch.testing.assert_close(logits(ours), logits(PeftModel.from_pretrained(twins(checkpoints, family)[1],
                                                                              tmp_path)), rtol=0, atol=1e-5)


def test_routers_are_adapted_only_when_named(checkpoints):
    ours, _ = twins(checkpoints, "qwen2_moe")
    names = target_names(ours, LoRAConfig(r=1, target_modules="all-linear"))
    assert not any(n.endswith(("mlp.gate", "shared_expert_gate")) for n in names)
    assert any(n.endswith("shared_expert.down_proj") for n in names)  # the shared expert is an MLP like any
    named = target_names(ours, LoRAConfig(r=1, target_modules=["gate", "shared_expert_gate"]))
    assert sorted(n.rsplit(".", 1)[-1] for n in named) == ["gate", "gate", "shared_expert_gate", "shared_expert_gate"]


def per_expert_file(family, folder, r=2, alpha=4, seed=0):
    """An adapter as peft wrote it when experts were nn.Linear modules (transformers 4): each expert's
    projections, and Qwen2-MoE's shared expert, whose projections have the same names."""
    block, gate, up, down = PER_EXPERT[family]
    c = TINY[family]
    E = c.get("num_local_experts", c.get("num_experts"))
    C, inter = c["hidden_size"], c.get("moe_intermediate_size", c["intermediate_size"])
    g, tensors = torch.Generator().manual_seed(seed), {}
    for layer in range(c["num_hidden_layers"]):
        mlps = {f"{block}.experts.{e}": inter for e in range(E)}
        if family == "qwen2_moe":
            mlps["mlp.shared_expert"] = c["shared_expert_intermediate_size"]
        for mlp, size in mlps.items():
            for proj, (n_in, n_out) in ((gate, (C, size)), (up, (C, size)), (down, (size, C))):
                key = f"base_model.model.model.layers.{layer}.{mlp}.{proj}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(r, n_in, generator=g) * 0.2
                tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * 0.2
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "target_modules": [gate, up, down]}))
    return tensors


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_per_expert_adapter_loads_here_as_in_peft_and_equals_the_merged_experts(checkpoints, tmp_path, family):
    block, gate, up, down = PER_EXPERT[family]
    tensors = per_expert_file(family, tmp_path)
    ours, theirs = twins(checkpoints, family)
    load_adapter(ours, tmp_path)
    if family in PEFT_CONVERTS:
        peft_model = PeftModel.from_pretrained(theirs, tmp_path)
        torch.testing.assert_close(logits(ours), logits(peft_model), rtol=0, atol=1e-5)
    oracle, _ = twins(checkpoints, family)  # each expert's W + (alpha / r) B A, written into the fused tensors

    def delta(key):
        return 2.0 * tensors[f"base_model.model.{key}.lora_B.weight"] @ tensors[f"base_model.model.{key}.lora_A.weight"]

    with torch.no_grad():
        for i, blk in enumerate(oracle.model.layers):
            experts = f"model.layers.{i}.{block}.experts"
            for e in range(blk.mlp.experts.num_experts):
                blk.mlp.experts.gate_up_proj[e] += torch.cat([delta(f"{experts}.{e}.{gate}"), delta(f"{experts}.{e}.{up}")])
                blk.mlp.experts.down_proj[e] += delta(f"{experts}.{e}.{down}")
            if family == "qwen2_moe":
                for proj in (gate, up, down):
                    getattr(blk.mlp.shared_expert, proj).weight += delta(f"model.layers.{i}.mlp.shared_expert.{proj}")
    torch.testing.assert_close(logits(ours), logits(oracle), rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", PEFT_CONVERTS)
def test_per_expert_names_target_the_fused_tensors_as_peft_converts_them(checkpoints, tmp_path, family):
    # gate and up side by side: gate_up_proj gets rank 2r and alpha 2 alpha; the counts are peft's
    _, gate, up, down = PER_EXPERT[family]
    ours, theirs = twins(checkpoints, family)
    inject(ours, LoRAConfig(r=2, alpha=4, target_modules=["q_proj", gate, up, down]))
    layer = ours.model.layers[0].mlp.experts
    assert layer.r["default"] == {"gate_up_proj": 4, "down_proj": 2}
    assert layer.scaling["default"] == {"gate_up_proj": 2.0, "down_proj": 2.0}
    peft_model = get_peft_model(theirs, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", gate, up, down]))
    assert trainable_parameters(ours)[0] == peft_model.get_nb_trainable_parameters()[0]
    with pytest.raises(ValueError, match=rf"target_modules names {gate} but not {up}: an expert's {gate} and {up} "
                                         r"are one tensor"):
        inject(twins(checkpoints, family)[0], LoRAConfig(r=2, target_modules=[gate, down]))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_merge_unmerge_and_unload(checkpoints, family):
    ours, _ = twins(checkpoints, family)
    inject(ours, LoRAConfig(r=2, alpha=4, target_modules=["q_proj"], target_parameters=EXPERTS))
    train_a_few_steps(ours)
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if "base_layer" in n}
    unmerged = logits(ours)
    merge(ours)
    torch.testing.assert_close(logits(ours), unmerged, rtol=0, atol=1e-5)
    unmerge(ours)
    for n, p in ours.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
    unload(ours)
    assert type(ours.model.layers[0].mlp.experts) is Experts and not hasattr(ours, "lora_configs")
    torch.testing.assert_close(logits(ours), unmerged, rtol=0, atol=1e-5)


def test_expert_lora_refusals_name_the_problem(checkpoints):
    ours, _ = twins(checkpoints, "mixtral")
    with pytest.raises(ValueError, match=r"dropout must be 0 for LoRA on expert tensors.*peft's ParamWrapper"):
        inject(ours, LoRAConfig(dropout=0.1, target_modules=[], target_parameters=EXPERTS))
    with pytest.raises(ValueError, match="has no DoRA"):
        inject(ours, LoRAConfig(use_dora=True, target_modules=[], target_parameters=EXPERTS))
    with pytest.raises(ValueError, match=r"rank must be in 1\.\.32 for model\.layers\.0\.mlp\.experts\.gate_up_proj "
                                         r"\(per expert\) \(32 -> 96\), got 33"):
        inject(ours, LoRAConfig(r=33, target_modules=[], target_parameters=EXPERTS))
    with pytest.raises(ValueError, match=r"target_parameters entries \['experts\.up_proj'\] match no expert tensor"):
        inject(ours, LoRAConfig(target_modules=[], target_parameters=["experts.up_proj"]))
    assert not any(isinstance(m, LoRAExperts) for m in ours.modules())  # every refusal left the model as it was
    inject(ours, LoRAConfig(r=2, target_modules=[], target_parameters=EXPERTS))
    with pytest.raises(ValueError, match="mixed-adapter batches cannot pass LoRA on expert tensors"):
        with adapter_names_per_sample(ours, ["default", "__base__", "default"]):
            pass


@settings(max_examples=6)
@given(r=st.integers(1, 4), experts=st.sampled_from([EXPERTS, EXPERTS[:1], EXPERTS[1:]]), rslora=st.booleans())
def test_peft_file_layout_round_trips_and_nests_as_peft_does(tmp_path_factory, checkpoints, r, experts, rslora):
    # A (E*r, in) expert-major, B (out, r*E) rank-major; gate_up_proj under .base_layer only when
    # down_proj is adapted too (peft nests one ParamWrapper per tensor, the first registered innermost)
    folder = tmp_path_factory.mktemp("adapter")
    ours, _ = twins(checkpoints, "qwen3_moe")
    inject(ours, LoRAConfig(r=r, alpha=2 * r, target_modules=[], target_parameters=experts, use_rslora=rslora))
    train_a_few_steps(ours, steps=1)
    save_adapter(ours, folder)
    keys = load_file(folder / "adapter_model.safetensors")
    layer = ours.model.layers[0].mlp.experts
    nested = ".base_layer" if len(experts) == 2 else ""
    for tensor in layer.lora_A["default"]:
        prefix = f"base_model.model.model.layers.0.mlp.experts{nested if tensor == 'gate_up_proj' else ''}"
        A, B = keys[f"{prefix}.lora_A.weight"], keys[f"{prefix}.lora_B.weight"]
        ours_A, ours_B = layer.lora_A["default"][tensor], layer.lora_B["default"][tensor]
        assert torch.equal(A[r:2 * r], ours_A[1])  # expert 1's rows
        assert torch.equal(B[:, 1::4], ours_B[1])  # expert 1's columns, every E-th
    again, _ = twins(checkpoints, "qwen3_moe")
    load_adapter(again, folder)
    assert torch.equal(logits(again), logits(ours))
