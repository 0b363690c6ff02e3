"""The mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE; reference_models/moe.py) against
transformers 5.24 on tiny random checkpoints: logits bit-identical to transformers' "eager" experts
and within 1e-5 of its default ("grouped_mm", which sums an expert's contributions in another
order), for random expert counts and top-k; the same routing decisions; greedy generation; full
fine-tuning gradients; the router's auxiliary loss; the checkpoint layout transformers writes (one
matrix per expert), read and written; and the one-line refusals.
"""
import json

import pytest
import torch
import transformers as tf
from hf_factories import MOE_FAMILIES, assert_training_gradients_equal, save_tiny
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from reference_models import Llama, LlamaConfig, MoEConfig, load_pretrained, save_pretrained
from reference_models.moe import SparseMoE

pytestmark = pytest.mark.interop


def ids(batch=2, seq=17, seed=0):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def twins(family, folder, dtype=torch.float32, experts="eager", **overrides):
    """The same tiny checkpoint in transformers (with the given experts implementation) and in ours."""
    save_tiny(family, folder, **overrides)
    hf = tf.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, experts_implementation=experts)
    return hf.eval(), load_pretrained(folder, dtype=dtype)


def logits_of(model, x):
    with torch.no_grad():
        out = model(x)
    return out if torch.is_tensor(out) else out.logits


def hf_routing(hf, x):
    """(indices, weights) that each of transformers' routers chose, layer by layer."""
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append((out[2], out[1])))
             for n, m in hf.named_modules() if n.endswith("mlp.gate")]
    logits_of(hf, x)
    for h in hooks:
        h.remove()
    return seen


def our_routing(ours, x):
    logits_of(ours, x)
    return [tuple(reversed(b.mlp.route(b.mlp.router_logits))) for b in ours.model.layers
            if isinstance(b.mlp, SparseMoE)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_logits_bit_identical_to_transformers_eager_experts(family, dtype, tmp_path):
    # the same ops in the same order: fp32 softmax, top-k, renormalisation, Mixtral's fp32 weights
    # against Qwen's compute-dtype ones, tokens taken first pick first, index_add_ expert by expert
    hf, ours = twins(family, tmp_path, dtype=dtype)
    assert torch.equal(logits_of(ours, ids()), logits_of(hf, ids()))


@st.composite
def experts(draw, family):
    n = draw(st.integers(1, 8))
    kw = dict(num_experts_per_tok=draw(st.integers(1, n)), num_hidden_layers=draw(st.integers(1, 3)))
    if family == "mixtral":
        kw["num_local_experts"] = n
    else:
        kw.update(num_experts=n, norm_topk_prob=draw(st.booleans()), decoder_sparse_step=draw(st.integers(1, 2)),
                  mlp_only_layers=draw(st.sampled_from([[], [0]])))
    return kw


@pytest.mark.parametrize("family", MOE_FAMILIES)
@settings(max_examples=4)
@given(data=st.data())
def test_expert_counts_and_top_k_route_and_compute_as_transformers(tmp_path_factory, family, data):
    overrides = data.draw(experts(family))
    folder = tmp_path_factory.mktemp("moe")
    hf, ours = twins(family, folder, **overrides)
    x = ids(seq=data.draw(st.integers(1, 12)))
    for (i_hf, w_hf), (i_ours, w_ours) in zip(hf_routing(hf, x), our_routing(ours, x), strict=True):
        assert torch.equal(i_ours, i_hf) and torch.equal(w_ours, w_hf)  # the same experts, the same weights
    assert torch.equal(logits_of(ours, x), logits_of(hf, x))
    default = tf.AutoModelForCausalLM.from_pretrained(folder).eval()  # grouped_mm: another summation order
    torch.testing.assert_close(logits_of(ours, x), logits_of(default, x), rtol=0, atol=1e-5)


WINDOWS = {"mixtral": dict(sliding_window=6), "qwen3_moe": dict(sliding_window=6, use_sliding_window=True),
           "qwen2_moe": dict(sliding_window=6, use_sliding_window=True, max_window_layers=2)}


@pytest.mark.parametrize("window", [False, True], ids=["full", "sliding"])
@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_greedy_generation_equals_transformers(family, window, tmp_path):
    # 5 + 20 tokens: past every sliding window, routed anew at each decoding step
    hf, ours = twins(family, tmp_path, **(WINDOWS[family] if window else {}))
    assert ours.config.sliding_window == (6 if window else None)
    prompt = ids(batch=2, seq=5, seed=3)
    theirs = hf.generate(prompt, max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0,
                         eos_token_id=None, attention_mask=torch.ones_like(prompt))
    assert torch.equal(ours.generate(prompt, 20, temperature=0), theirs)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_full_fine_tuning_gradients_equal_transformers(family, tmp_path):
    # router, experts (both 3-D tensors), shared expert and its gate: every gradient, by name
    hf, ours = twins(family, tmp_path)
    assert_training_gradients_equal(hf, ours, ids())


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_gradient_checkpointing_gives_the_same_gradients(family, tmp_path):
    _, ours = twins(family, tmp_path)
    x = ids()
    grads = []
    for ckpt in (False, True):
        ours.zero_grad()
        ours.set_gradient_checkpointing(ckpt)
        ours.train()
        _, loss, aux = ours(x, x, aux_loss=True)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters()})
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_router_aux_loss_and_total_loss_equal_transformers(family, tmp_path):
    hf, ours = twins(family, tmp_path, router_aux_loss_coef=0.1)
    x = ids()
    out = hf(x, labels=x, output_router_logits=True)
    targets = torch.cat([x[:, 1:], torch.full((2, 1), -100)], dim=1)
    logits, loss, aux = ours(x, targets, aux_loss=True)
    torch.testing.assert_close(aux, out.aux_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss, out.loss, rtol=1e-6, atol=0)  # cross-entropy + 0.1 * aux
    assert torch.equal(ours(x, aux_loss=True)[1], aux)  # without targets: (logits, aux)


def test_aux_loss_is_top_k_when_every_expert_is_equally_likely():
    # uniform router probabilities: f sums to k over the experts, P_e = 1/E, so E * sum f_e P_e = k
    config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                         model_type="mixtral", moe=MoEConfig(num_experts=5, num_experts_per_tok=3,
                                                             moe_intermediate_size=24))
    model = Llama(config)
    for block in model.model.layers:
        torch.nn.init.zeros_(block.mlp.gate.weight)
    _, aux = model(ids(seq=9) % 50, aux_loss=True)
    assert aux.item() == pytest.approx(3.0, abs=1e-6)
    dense = Llama(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                              num_attention_heads=2))
    with pytest.raises(ValueError, match="aux_loss=True needs a mixture-of-experts model; model_type 'llama'"):
        dense(ids(seq=3) % 50, aux_loss=True)


def test_mixtral_router_jitter_in_training_equals_transformers(tmp_path):
    # training mode multiplies the block's input by U(1 - j, 1 + j): the same draws from the same seed
    hf, ours = twins("mixtral", tmp_path, router_jitter_noise=0.3)
    x = ids()
    hf.train(), ours.train()
    torch.manual_seed(7)
    theirs = hf(x).logits
    torch.manual_seed(7)
    assert torch.equal(ours(x), theirs)
    assert not torch.equal(ours(x), logits_of(ours.eval(), x))  # the noise is really there


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_saved_checkpoint_is_transformers_layout_tensor_for_tensor(family, tmp_path):
    # transformers 5.24 writes one matrix per expert (Mixtral under block_sparse_moe with w1/w3/w2);
    # ours writes the same keys and the same values, and transformers loads it back to equal logits
    hf, ours = twins(family, tmp_path / "hf")
    save_pretrained(ours, tmp_path / "ours")
    theirs, mine = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "ours" / "model.safetensors")
    assert set(mine) == set(theirs)
    assert any(".experts.3." in k for k in mine) and not any(k.endswith("gate_up_proj") for k in mine)
    for key, t in mine.items():
        assert torch.equal(t, theirs[key]), key
    back = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", experts_implementation="eager").eval()
    assert torch.equal(logits_of(back, ids()), logits_of(hf, ids()))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_fused_expert_tensors_in_a_file_load_as_they_are(family, tmp_path):
    # a file holding transformers' in-memory state dict (3-D gate_up_proj / down_proj) reads the same
    hf, ours = twins(family, tmp_path / "hf")
    (tmp_path / "fused").mkdir()
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "fused" / "model.safetensors")
    assert torch.equal(logits_of(load_pretrained(tmp_path / "fused"), ids()), logits_of(ours, ids()))


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_parameter_names_and_shapes_are_transformers(family, tmp_path):
    hf, ours = twins(family, tmp_path)
    assert {n: p.shape for n, p in ours.named_parameters()} == {n: p.shape for n, p in hf.named_parameters()}


HUB_STYLE = {  # config.json keys as the hub's Mixtral-8x7B and Qwen3-30B-A3B spell them (4.x), sizes shrunk
    "mixtral": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 128, "hidden_size": 32,
                "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                "num_local_experts": 3, "num_experts_per_tok": 2, "rope_theta": 1e6, "sliding_window": None,
                "rms_norm_eps": 1e-5, "max_position_embeddings": 64, "router_aux_loss_coef": 0.02,
                "output_router_logits": False, "tie_word_embeddings": False},
    "qwen3_moe": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 128,
                  "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_experts": 5,
                  "num_experts_per_tok": 3, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [1],
                  "rope_theta": 1e6, "rope_scaling": None, "use_sliding_window": False, "sliding_window": None,
                  "max_window_layers": 48, "max_position_embeddings": 64, "tie_word_embeddings": False},
}


@pytest.mark.parametrize("family", HUB_STYLE)
def test_hub_style_config_json_reads_as_transformers_reads_it(family, tmp_path):
    config = tf.AutoConfig.for_model(**HUB_STYLE[family])
    torch.manual_seed(0)
    hf = tf.AutoModelForCausalLM.from_config(config, experts_implementation="eager").eval()
    hf.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(HUB_STYLE[family]))  # the 4.x spelling, not 5.x's
    ours = load_pretrained(tmp_path)
    assert ours.config.moe.num_experts == HUB_STYLE[family].get("num_local_experts", HUB_STYLE[family].get("num_experts"))
    assert torch.equal(logits_of(ours, ids()), logits_of(hf, ids()))


def rewrite(folder, change):
    """Apply change(tensors) to a saved checkpoint's tensors, in place."""
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")


def test_top_k_larger_than_the_expert_count_is_one_line(tmp_path):
    save_tiny("qwen3_moe", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "num_experts_per_tok": 5}))
    with pytest.raises(ValueError, match=r"^num_experts_per_tok \(5\) must be at most num_experts \(4\)[^\n]*$"):
        load_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"num_experts_per_tok \(9\) must be at most num_experts \(8\)"):
        MoEConfig(num_experts=8, num_experts_per_tok=9, moe_intermediate_size=4)


def test_an_expert_tensor_of_the_wrong_shape_is_named_in_one_line(tmp_path):
    save_tiny("mixtral", tmp_path)
    key = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    rewrite(tmp_path, lambda t: t.__setitem__(key, t[key][:, :30]))
    message = (rf"^tensor '{key}' has shape \(48, 30\) in the checkpoint, the config needs \(48, 32\) "
               r"\(expert 2 of 4\)$")
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        load_pretrained(tmp_path)


def test_a_missing_or_extra_expert_is_named(tmp_path):
    save_tiny("qwen2_moe", tmp_path)
    missing = "model.layers.0.mlp.experts.3.up_proj.weight"
    rewrite(tmp_path, lambda t: t.pop(missing))
    with pytest.raises(ValueError, match=rf"missing tensors \['{missing}'\]".replace(".", r"\.")):
        load_pretrained(tmp_path)
    save_tiny("qwen2_moe", tmp_path)
    extra = "model.layers.0.mlp.experts.4.down_proj.weight"
    rewrite(tmp_path, lambda t: t.__setitem__(extra, t[extra.replace(".4.", ".0.")].clone()))
    with pytest.raises(ValueError, match=rf"unexpected tensors \['{extra}'\]".replace(".", r"\.")):
        load_pretrained(tmp_path)


def test_configs_a_family_cannot_express_are_refused():
    moe = MoEConfig(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16)
    base = dict(vocab_size=50, hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2)
    with pytest.raises(ValueError, match="model_type 'llama' has no experts"):
        LlamaConfig(**base, moe=moe)
    with pytest.raises(ValueError, match="model_type 'mixtral' needs moe"):
        LlamaConfig(**base, model_type="mixtral")
    with pytest.raises(ValueError, match=r"'mixtral' cannot express moe.norm_topk_prob=False"):
        LlamaConfig(**base, model_type="mixtral", moe=MoEConfig(4, 2, 16, norm_topk_prob=False))
    with pytest.raises(ValueError, match=r"'qwen3_moe' cannot express moe.shared_expert_intermediate_size=8"):
        LlamaConfig(**base, model_type="qwen3_moe", moe=MoEConfig(4, 2, 16, shared_expert_intermediate_size=8))
    with pytest.raises(ValueError, match=r"mlp_only_layers must be layer indices in 0\.\.1, got \[2\]"):
        LlamaConfig(**base, model_type="qwen3_moe", moe=MoEConfig(4, 2, 16, mlp_only_layers=[2]))

