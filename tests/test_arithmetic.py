"""Adapter arithmetic (minilora/lora/arithmetic.py): exact properties, and equality with peft's
add_weighted_adapter where peft is right; the documented differences are checked as differences."""
import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn

from hf_factories import tiny_hf_model
from minilora.lora.arithmetic import combine_adapters
from minilora.lora.layer import LoRAConfig
from minilora.lora.model import disable_adapters, inject, lora_layers, set_adapter
from minilora.lora.peft_io import load_adapter


class MLP(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.up = nn.Linear(width, hidden)
        self.down = nn.Linear(hidden, width)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


def two_adapters(ranks=(3, 5), alphas=(6.0, 4.0), rslora=False, width=12, hidden=20, seed=0):
    torch.manual_seed(seed)
    model = MLP(width, hidden)
    for name, r, alpha in zip("ab", ranks, alphas):
        inject(model, LoRAConfig(r=r, alpha=alpha, target_modules=["up", "down"], use_rslora=rslora), name)
        for layer in lora_layers(model).values():
            nn.init.normal_(layer.lora_B[name].weight, std=0.3)
    return model


def adapter_delta(model, name):
    """What adapter `name` adds to the base output, as a function of x."""
    def run(x):
        set_adapter(model, name)
        with torch.no_grad():
            y = model(x)
            with disable_adapters(model):
                return y - model(x)
    return run


def layer_deltas(model, name):
    return {n: layer.delta_weight(name) for n, layer in lora_layers(model).items()}


@given(st.tuples(st.integers(1, 8), st.integers(1, 8)), st.tuples(st.floats(-2, 2), st.floats(-2, 2)),
       st.booleans(), st.integers(0, 1000))
@settings(max_examples=15)
def test_cat_equals_the_weighted_sum_of_the_deltas(ranks, weights, rslora, seed):
    model = two_adapters(ranks=ranks, rslora=rslora, seed=seed)
    combine_adapters(model, ["a", "b"], list(weights), "cat", "c")
    da, db, dc = (layer_deltas(model, n) for n in "abc")
    for key in dc:
        torch.testing.assert_close(dc[key], weights[0] * da[key] + weights[1] * db[key], rtol=1e-5, atol=1e-5)
    assert lora_layers(model)["up"].r["c"] == sum(ranks) and lora_layers(model)["up"].scaling["c"] == 1.0


def test_cat_output_is_the_sum_of_individual_adapter_outputs_per_layer():
    """In one linear layer (no nonlinearity in between) the adapters' outputs add up exactly."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 14))
    for name in "ab":
        inject(model, LoRAConfig(r=3, target_modules=["0"]), name)
        nn.init.normal_(lora_layers(model)["0"].lora_B[name].weight)
    combine_adapters(model, ["a", "b"], [1.0, 1.0], "cat", "ab")
    x = torch.randn(5, 10)
    torch.testing.assert_close(adapter_delta(model, "ab")(x), adapter_delta(model, "a")(x) + adapter_delta(model, "b")(x),
                               rtol=1e-5, atol=1e-5)


def test_svd_is_exact_when_the_rank_covers_the_sum_and_truncates_otherwise():
    model = two_adapters(ranks=(2, 3))
    combine_adapters(model, ["a", "b"], [0.5, 1.5], "svd", "full", svd_rank=5)
    combine_adapters(model, ["a", "b"], [0.5, 1.5], "svd", "low", svd_rank=2)
    da, db = layer_deltas(model, "a"), layer_deltas(model, "b")
    for key, d in layer_deltas(model, "full").items():
        target = 0.5 * da[key] + 1.5 * db[key]
        torch.testing.assert_close(d, target, rtol=1e-4, atol=1e-5)
        low = layer_deltas(model, "low")[key]
        S = torch.linalg.svdvals(target)
        # Eckart-Young: the rank-2 truncation error is the norm of the dropped singular values
        assert math.isclose((low - target).norm().item(), S[2:].norm().item(), rel_tol=1e-4, abs_tol=1e-6)


def test_one_adapter_with_weight_one_reproduces_it_for_every_method():
    model = two_adapters(rslora=True)
    for method in ("cat", "linear", "svd", "ties", "dare_linear", "dare_ties"):
        combine_adapters(model, ["a"], [1.0], method, f"m_{method}", density=1.0)
        for key, d in layer_deltas(model, f"m_{method}").items():
            torch.testing.assert_close(d, layer_deltas(model, "a")[key], rtol=1e-4, atol=1e-5, msg=method)


def test_dare_keeps_the_expected_value():
    model = two_adapters(ranks=(4, 4), width=64, hidden=64)
    g = torch.Generator().manual_seed(0)
    combine_adapters(model, ["a", "b"], [1.0, 1.0], "dare_linear", "dare", density=0.5, svd_rank=64, generator=g)
    da, db = layer_deltas(model, "a"), layer_deltas(model, "b")
    for key, d in layer_deltas(model, "dare").items():
        target = da[key] + db[key]
        assert (d - target).abs().mean() > 0  # entries were dropped ...
        assert abs(d.sum() - target.sum()) < 0.1 * target.abs().sum()  # ... and the rest rescaled by 1/density


# ------------------------------------------------------------------ against peft
@pytest.fixture(scope="module")
def peft_pair(tmp_path_factory):
    """A transformers Llama with peft adapters one and two (r=4), and our copy with the same adapters."""
    def build(rslora):
        folder = tmp_path_factory.mktemp(f"arith_{rslora}")
        base = tiny_hf_model("llama")
        ours = copy.deepcopy(base)
        peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False, use_rslora=rslora), "one")
        peft_model.add_adapter("two", LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                               init_lora_weights=False, use_rslora=rslora))
        peft_model.save_pretrained(folder, selected_adapters=["one", "two"])
        load_adapter(ours, folder / "one", "one")
        load_adapter(ours, folder / "two", "two")
        return ours, peft_model
    return build


def _peft_deltas(peft_model, name):
    return {n.removeprefix("base_model.model."): m.get_delta_weight(name) for n, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and name in m.lora_A}


@pytest.mark.parametrize("ours_method, peft_method", [("cat", "cat"), ("linear", "linear"), ("svd", "svd"),
                                                      ("ties", "ties_svd")])
def test_equal_to_peft_without_rslora(peft_pair, ours_method, peft_method):
    ours, peft_model = peft_pair(False)
    combine_adapters(ours, ["one", "two"], [0.7, -0.4], ours_method, "m", density=0.5)
    peft_model.add_weighted_adapter(["one", "two"], [0.7, -0.4], "m", combination_type=peft_method, density=0.5)
    theirs = _peft_deltas(peft_model, "m")
    for key, d in layer_deltas(ours, "m").items():
        torch.testing.assert_close(d, theirs[key], rtol=1e-4, atol=1e-6)


def test_linear_has_cross_terms_like_peft_1155(peft_pair):
    ours, _ = peft_pair(False)
    combine_adapters(ours, ["one", "two"], [0.5, 0.5], "linear", "lin")
    da, db = layer_deltas(ours, "one"), layer_deltas(ours, "two")
    key = next(iter(da))
    assert (layer_deltas(ours, "lin")[key] - (0.5 * da[key] + 0.5 * db[key])).abs().max() > 1e-3


def test_peft_overscales_rslora_sources_by_sqrt_rank_and_we_do_not_3449(peft_pair):
    ours, peft_model = peft_pair(True)
    combine_adapters(ours, ["one", "two"], [0.7, -0.4], "cat", "m")
    peft_model.add_weighted_adapter(["one", "two"], [0.7, -0.4], "m", combination_type="cat")
    da, db, dm = layer_deltas(ours, "one"), layer_deltas(ours, "two"), layer_deltas(ours, "m")
    theirs = _peft_deltas(peft_model, "m")
    for key in dm:
        torch.testing.assert_close(dm[key], 0.7 * da[key] - 0.4 * db[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs[key], math.sqrt(8) * dm[key], rtol=1e-4, atol=1e-6)  # new rank 8


# ------------------------------------------------------------------ bad input
def test_bad_combination_arguments():
    model = two_adapters()
    with pytest.raises(ValueError, match=r"method must be one of .* got 'average'"):
        combine_adapters(model, ["a", "b"], [1, 1], "average", "c")
    with pytest.raises(ValueError, match=r"one weight per adapter, got 2 names and 1 weights"):
        combine_adapters(model, ["a", "b"], [1], "cat", "c")
    with pytest.raises(ValueError, match=r"unknown adapter\(s\) \['z'\]"):
        combine_adapters(model, ["a", "z"], [1, 1], "cat", "c")
    with pytest.raises(ValueError, match=r"'ties' needs density in \(0, 1\], got None"):
        combine_adapters(model, ["a", "b"], [1, 1], "ties", "c")
    with pytest.raises(ValueError, match=r"'linear' needs equal ranks, got \{a: 3, b: 5\}"):
        combine_adapters(model, ["a", "b"], [1, 1], "linear", "c")
    with pytest.raises(ValueError, match=r"adapter 'a' already exists"):
        combine_adapters(model, ["a", "b"], [1, 1], "cat", "a")


def test_dora_adapters_are_refused():
    torch.manual_seed(0)
    model = MLP(8, 8)
    inject(model, LoRAConfig(r=2, target_modules=["up"], use_dora=True), "d")
    with pytest.raises(ValueError, match=r"DoRA adapters \['d'\] cannot be combined \(at up\)"):
        combine_adapters(model, ["d"], [1.0], "cat", "c")
