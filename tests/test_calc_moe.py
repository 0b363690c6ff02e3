"""The calculator's mixture-of-experts arithmetic (calculators/moe.py, mla.py): active parameters
against the formula written out from each config, total counts against transformers (the shapes
themselves: tests/test_calc_models.py), activation bytes of our MoE models equal to what autograd
saves for a seeded (uneven) routing, exact 4-bit expert bytes, MLA's latent KV cache byte for byte
against transformers' generate, and the expert-imbalance setting with its one-line refusals."""
import json

import pytest
import torch
import transformers as tf
from factories import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st
from test_calc_kv_cache import cache_storage_bytes, generate_cache, tiny_model
from test_calc_models import hf_count

from calculators import (PRESETS, ActivationSetup, ConfigError, LoRASpec, TrainingSetup, activation_bytes,
                         active_parameters, block_targets, busiest_expert_tokens, count_parameters, kv_cache_bytes,
                         lora_layers, model_spec, model_state_bytes, training_memory)
from minilora.calc import main
from reference_models import MoEConfig
from reference_models.moe import SparseMoE

# (experts per sparse layer E, picked per token k, sparse layers, hidden h, expert size I), from each config.json
PRESET_EXPERTS = {"mixtral-8x7b": (8, 2, 32, 4096, 14336), "mixtral-8x22b": (8, 2, 56, 6144, 16384),
                  "qwen3-30b-a3b": (128, 8, 48, 2048, 768), "qwen3-235b-a22b": (128, 8, 94, 4096, 1536),
                  "deepseek-v3": (256, 8, 61 - 3, 7168, 2048)}  # DeepSeek-V3: first_k_dense_replace = 3
# what the model cards and reports state: (total, active per token), to the precision they state them
PUBLISHED = {"mixtral-8x7b": (46.7e9, 12.9e9, 1e8), "mixtral-8x22b": (141e9, 39e9, 1e9),
             "qwen3-30b-a3b": (30.5e9, 3.3e9, 1e8), "qwen3-235b-a22b": (235e9, 22e9, 1e9),
             "deepseek-v3": (671e9, 37e9, 1e9)}


@pytest.mark.parametrize("name", list(PRESET_EXPERTS))
def test_active_parameters_are_the_total_minus_the_experts_a_token_skips(name):
    E, k, sparse, h, inter = PRESET_EXPERTS[name]
    spec = model_spec(name)
    # each skipped expert is a gated MLP: gate (I, h) + up (I, h) + down (h, I)
    assert active_parameters(spec) == count_parameters(spec) - sparse * (E - k) * 3 * h * inter
    total, active, unit = PUBLISHED[name]
    assert abs(count_parameters(spec) - total) < unit and abs(active_parameters(spec) - active) < unit


@pytest.mark.interop
@settings(max_examples=8)
@given(family=st.sampled_from(["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"]), experts=st.integers(1, 6),
       pick=st.integers(1, 6), layers=st.integers(1, 3), step=st.integers(1, 2), dense=st.integers(0, 2))
def test_total_counts_exact_vs_transformers_for_random_expert_layouts(family, experts, pick, layers, step, dense):
    config = dict(model_type=family, vocab_size=53, hidden_size=32, intermediate_size=24, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=min(pick, experts))
    if family == "mixtral":
        config["num_local_experts"] = experts
    elif family == "deepseek_v3":
        config.update(n_routed_experts=experts, moe_intermediate_size=8, n_shared_experts=dense, n_group=1,
                      topk_group=1, first_k_dense_replace=dense, kv_lora_rank=8, q_lora_rank=None if step == 1 else 12,
                      qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=6)
    else:
        config.update(num_experts=experts, moe_intermediate_size=8, decoder_sparse_step=step,
                      mlp_only_layers=list(range(min(dense, layers))))
    assert count_parameters(model_spec(config)) == hf_count(config)


def ours(family, dtype, **moe):
    """A tiny MoE model of ours and its ModelSpec (4 experts, 2 per token)."""
    size = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48 if family == "mixtral" else 40,
                shared_expert_intermediate_size=40 if family == "qwen2_moe" else 0, **moe)
    bias = dict(attention_bias=True, o_proj_bias=False) if family == "qwen2_moe" else {}
    model = tiny_llama(0, vocab_size=101, hidden_size=64, intermediate_size=48, model_type=family,
                       moe=MoEConfig(**size), **bias)
    return model.to(dtype).train(), model_spec(model.config.to_hf_dict())


def saved_and_routing(model, batch, seq):
    """Bytes autograd saves (each storage once, parameters excluded) for a loss on distinct targets,
    and how many tokens each expert got in each sparse layer."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    g = torch.Generator().manual_seed(0)
    idx, targets = torch.randint(0, 101, (batch, seq), generator=g), torch.randint(0, 101, (batch, seq), generator=g)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, targets)
    counts = [torch.bincount(b.mlp.route(b.mlp.router_logits)[1].flatten(), minlength=4).tolist()
              for b in model.model.layers if isinstance(b.mlp, SparseMoE)]
    return sum(seen.values()), counts


CASES = [("mixtral", torch.float32, False, None), ("mixtral", torch.bfloat16, False, ["q_proj"]),
         ("mixtral", torch.bfloat16, False, ["w1", "w3", "w2"]), ("mixtral", torch.float32, True, None),
         ("qwen2_moe", torch.float32, False, None), ("qwen2_moe", torch.bfloat16, False, ["q_proj", "v_proj"]),
         ("qwen2_moe", torch.bfloat16, True, None)]


@pytest.mark.parametrize("family,dtype,ckpt,lora", CASES)
def test_moe_activation_bytes_equal_saved_tensors_for_a_seeded_routing(family, dtype, ckpt, lora):
    # exact, byte for byte: router, the N*k routed copies through their experts, the shared expert
    from minilora.lora.layer import LoRAConfig
    from minilora.lora.model import inject

    model, spec = ours(family, dtype, **({"norm_topk_prob": False} if family == "qwen2_moe" else {}))
    model.set_gradient_checkpointing(ckpt)
    targets = frozenset()
    if lora:
        inject(model, LoRAConfig(r=4, target_modules=lora))
        targets = block_targets(lin.name for lin in lora_layers(spec, lora))
    real, routing = saved_and_routing(model, 2, 17)
    assert all(sum(c) == 2 * 17 * 2 for c in routing) and any(len(set(c)) > 1 for c in routing)  # uneven
    setup = ActivationSetup(batch=2, seq=17, dtype="fp32" if dtype == torch.float32 else "bf16", stack="minilora",
                            grad_ckpt="full" if ckpt else "none", device="cpu", trainable="lora" if lora else "all",
                            lora_targets=targets, lora_rank=4)
    assert activation_bytes(spec, setup)["total"] == real


def test_qlora_moe_state_bytes_exact_experts_in_nf4_router_dense():
    from minilora.lora.layer import LoRAConfig
    from minilora.lora.model import inject
    from minilora.quant.qlora import quantize_model

    model, spec = ours("mixtral", torch.bfloat16)
    quantize_model(model)
    inject(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    weights = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
               for t in list(model.parameters()) + list(model.buffers())}
    states = model_state_bytes(spec, TrainingSetup(method="qlora", dtype="bf16", stack="minilora", prepare_kbit=False,
                                                   lora=LoRASpec(rank=4, targets=["q_proj", "v_proj"])))
    assert states.weights == sum(weights.values())
    assert all(b.mlp.gate.weight.dtype == torch.bfloat16 for b in model.model.layers)


def test_mla_kv_cache_is_the_latent_and_rope_key_byte_for_byte_vs_transformers():
    config = dict(model_type="deepseek_v3", vocab_size=97, hidden_size=48, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, moe_intermediate_size=16, n_routed_experts=4,
                  num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16,
                  q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10, max_position_embeddings=64)
    cache = generate_cache(tiny_model(config), 2, 7, 6)
    spec = model_spec(config)
    assert kv_cache_bytes(spec, 2, 7 + 6 - 1, dtype_bytes=4) == cache_storage_bytes(cache)
    assert [tuple(layer.keys.shape[-1:]) + tuple(layer.values.shape[-1:]) for layer in cache.layers] == [(16, 8)] * 3
    deepseek = model_spec("deepseek-v3")  # 512 + 64 values per layer and position, not 2 x 128 x (128 + 64)
    assert kv_cache_bytes(deepseek, 1, 1000, 2) == 61 * 1000 * (512 + 64) * 2


@pytest.mark.parametrize("tokens,imbalance,busiest", [(1024, 1.0, 64), (1024, 2.0, 128), (1024, 16.0, 1024),
                                                      (10, 1.5, 1), (10, 16.0, 10)])
def test_the_busiest_expert_gets_imbalance_times_the_balanced_share(tokens, imbalance, busiest):
    spec = model_spec("qwen3-30b-a3b")  # 128 experts, 8 per token: balanced share N / 16
    assert busiest_expert_tokens(spec, tokens, imbalance) == busiest


def test_imbalance_grows_the_backward_workspace_not_the_activations():
    spec = model_spec("mixtral-8x7b")  # wide experts: the busiest one's gradients outgrow attention's
    setup = TrainingSetup(method="lora", batch=4, seq=4096, lora=LoRASpec(targets=["q_proj"]))
    terms = [{t.name: t.gpu for t in training_memory(spec, TrainingSetup(**{**setup.__dict__,
                                                                             "expert_imbalance": f})).terms}
             for f in (1.0, 4.0)]
    assert terms[0]["activations"] == terms[1]["activations"]
    N = 4 * 4096
    assert busiest_expert_tokens(spec, N, 4.0) == N  # 4 x N * 2 / 8: every token
    assert terms[1]["backward workspace"] == N * (4 * 14336 + 2 * 4096) * 2 > terms[0]["backward workspace"]


def test_bad_expert_settings_are_one_line(capsys):
    with pytest.raises(ValueError, match=r"expert_imbalance must be between 1 \(balanced\) and num_experts / "
                                         r"experts_per_token = 16"):
        busiest_expert_tokens(model_spec("qwen3-30b-a3b"), 100, 17.0)
    with pytest.raises(ValueError, match=r"expert_imbalance must be a number >= 1 \(1: balanced routing\), got 0.5"):
        training_memory(model_spec("mixtral-8x7b"), TrainingSetup(expert_imbalance=0.5))
    for config, message in ((dict(PRESETS["qwen3-30b-a3b"], num_experts_per_tok=129),
                             r"num_experts_per_tok \(129\) must be at most num_experts \(128\)"),
                            (dict(PRESETS["deepseek-v3"], num_experts_per_tok=300),
                             r"num_experts_per_tok \(300\) must be at most n_routed_experts \(256\)")):
        with pytest.raises(ConfigError, match=message):
            model_spec(config)
    assert main(["vram", "--model", "llama-2-7b", "--expert-imbalance", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--expert-imbalance applies to mixture-of-experts models" in err


def test_cli_prints_active_parameters_and_costs_flops_by_them(capsys):
    assert main(["params", "--model", "mixtral-8x7b", "--method", "full", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["params"], out["active_params"]) == (46_702_792_704, 12_879_925_248)
    assert main(["cost", "--model", "mixtral-8x7b", "--method", "full", "--json", "--seq", "512"]) == 0
    cost = json.loads(capsys.readouterr().out)["cost"]
    assert cost["flops_per_token"] == 6 * 12_879_925_248 + 12 * 32 * 512 * 4096  # 6N on the active N + attention


def test_tiny_transformers_moe_configs_read_back_as_our_specs():
    # our reference models' configs, as config.json: the calculator reads the experts transformers builds
    for family in ("mixtral", "qwen2_moe", "qwen3_moe"):
        model, spec = ours(family, torch.float32)
        hf = tf.AutoConfig.for_model(**model.config.to_hf_dict())
        assert (spec.num_experts, spec.experts_per_token) == (4, 2)
        assert count_parameters(spec) == sum(p.numel() for p in model.parameters()) == hf_count(hf.to_dict())


def test_deepseek_v3_activations_replay_its_latent_attention_and_say_they_are_estimated():
    def activations(model, targets):
        b = training_memory(model_spec(model), TrainingSetup(method="qlora", batch=1, seq=1024,
                                                             lora=LoRASpec(targets=targets)))
        return next(t for t in b.terms if t.name == "activations")

    # peft's default targets for deepseek_v3 are the latent attention's own projections
    default, kv_only = activations("deepseek-v3", None), activations("deepseek-v3", ["kv_b_proj"])
    assert 0 < kv_only.gpu < default.gpu
    assert "estimated, not measured" in default.assumption and "DeepseekV3Attention" in default.assumption
    assert "estimated" not in activations("mixtral-8x7b", None).assumption
