"""reference_models against transformers: same logits, loss, generated tokens, gradients.

Oracle: tiny random transformers models (tests/hf_factories.py) saved with save_pretrained and
loaded with our load_pretrained; and our save_pretrained loaded back by transformers.
"""
import pytest
import torch
import transformers as tf
from hf_factories import FAMILIES, save_tiny, tiny_hf_model
from hypothesis import given, settings
from hypothesis import strategies as st

from reference_models import GPT, GPTConfig, Llama, LlamaConfig, from_hf_config, load_pretrained, save_pretrained

FP32_TOL = 1e-5

HF_CLASSES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
              "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
              "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
              "gpt_neox": "GPTNeoXForCausalLM"}


def ids(batch=2, seq=17, vocab=128, seed=0):
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def load_both(family, tmp_path, **overrides):
    hf = save_tiny(family, tmp_path, **overrides)
    return hf, load_pretrained(tmp_path)


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_fp32(family, tmp_path):
    hf, ours = load_both(family, tmp_path)
    x = ids()
    with torch.no_grad():
        assert max_diff(ours(x), hf(x).logits) <= FP32_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_bf16(family, tmp_path):
    # Both sides load the same fp32 file as bf16. GPT-2: our tanh-GELU is torch's fused kernel
    # where transformers writes the formula out op by op, so bf16 roundings differ by an ulp or
    # two (bf16 step is 2**-8 relative): we allow 1% of the largest |logit|. The Llama family runs
    # the same ops in the same order as transformers and is bit-identical (next test).
    save_tiny(family, tmp_path)
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    ours = load_pretrained(tmp_path, dtype=torch.bfloat16)
    assert ours.lm_head.weight.dtype == torch.bfloat16
    x = ids()
    with torch.no_grad():
        ref = hf(x).logits
        assert max_diff(ours(x), ref) <= 0.01 * ref.float().abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_llama_family_logits_bit_identical_to_transformers(family, dtype, tmp_path):
    # RMSNorm in fp32 then cast, RoPE angles in fp32 with transformers' inv_freq expression,
    # rotate_half layout, SDPA with enable_gqa: the same ops in the same order, on the same torch.
    save_tiny(family, tmp_path)
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    ours = load_pretrained(tmp_path, dtype=dtype)
    x = ids()
    with torch.no_grad():
        assert torch.equal(ours(x), hf(x).logits)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("tied", [True, False])
def test_tied_and_untied_embeddings(family, tied, tmp_path):
    hf, ours = load_both(family, tmp_path, tie_word_embeddings=tied)
    embedding = ours.get_submodule("transformer.wte" if family == "gpt2" else "model.embed_tokens").weight
    assert (ours.lm_head.weight is embedding) == tied
    x = ids()
    with torch.no_grad():
        assert max_diff(ours(x), hf(x).logits) <= FP32_TOL


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_head_dim_override_and_multi_query(family, tmp_path):
    # head_dim 16 with hidden 32 and 4 heads: q_proj is 32 -> 64, o_proj 64 -> 32; one kv head (MQA)
    hf, ours = load_both(family, tmp_path, head_dim=16, num_key_value_heads=1)
    assert ours.model.layers[0].self_attn.q_proj.weight.shape == (64, 32)
    x = ids()
    with torch.no_grad():
        assert max_diff(ours(x), hf(x).logits) <= FP32_TOL


def test_mistral_sliding_window_matches_transformers(tmp_path):
    # window 5 over 17 tokens: queries past position 5 must not see the oldest keys
    hf, ours = load_both("mistral", tmp_path, sliding_window=5)
    assert ours.config.sliding_window == 5
    x = ids()
    with torch.no_grad():
        ref = hf(x).logits
        assert max_diff(ours(x), ref) <= FP32_TOL
        ours.config.sliding_window = None
        for blk in ours.model.layers:
            blk.self_attn.sliding_window = None
        assert max_diff(ours(x), ref) > 1e-3  # the window really changes the answer


@pytest.mark.parametrize("family", FAMILIES)
def test_save_pretrained_loads_in_transformers(family, tmp_path):
    _, ours = load_both(family, tmp_path / "src")
    save_pretrained(ours, tmp_path / "out")
    hf2 = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(hf2).__name__ == HF_CLASSES[family]
    x = ids()
    with torch.no_grad():
        assert max_diff(ours(x), hf2(x).logits) <= FP32_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_sharded_checkpoint_loads(family, tmp_path):
    hf = tiny_hf_model(family)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    ours = load_pretrained(tmp_path)
    x = ids()
    with torch.no_grad():
        assert max_diff(ours(x), hf(x).logits) <= FP32_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_cache_equals_no_cache_equals_transformers(family, tmp_path):
    hf, ours = load_both(family, tmp_path)
    prompt = ids(batch=2, seq=5)
    n = 12
    cached = ours.generate(prompt, n, temperature=0)
    uncached = ours.generate(prompt, n, temperature=0, use_cache=False)
    ref = hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                      pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(prompt))
    assert cached.shape == (2, 5 + n)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, ref)


def test_generation_under_bf16_autocast_uses_the_autocast_dtype_in_the_cache(tmp_path):
    _, ours = load_both("llama", tmp_path)
    prompt = ids(batch=1, seq=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours.generate(prompt, 3, temperature=0)
    assert out.shape == (1, 7)


def test_sliding_window_generation_cache_equals_no_cache(tmp_path):
    _, ours = load_both("mistral", tmp_path, sliding_window=4)
    prompt = ids(batch=2, seq=6)
    assert torch.equal(ours.generate(prompt, 10, temperature=0),
                       ours.generate(prompt, 10, temperature=0, use_cache=False))


def test_sampling_top_k_1_is_greedy_and_top_k_limits_choices(tmp_path):
    _, ours = load_both("llama", tmp_path)
    prompt = ids(batch=3, seq=4)
    torch.manual_seed(0)
    assert torch.equal(ours.generate(prompt, 6, temperature=0.7, top_k=1), ours.generate(prompt, 6, temperature=0))
    with torch.no_grad():
        allowed = ours(prompt)[:, -1].topk(3).indices  # (B, 3)
    torch.manual_seed(1)
    nxt = ours.generate(prompt, 1, temperature=5.0, top_k=3)[:, -1:]  # (B, 1)
    assert (nxt == allowed).any(dim=1).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_equals_transformers_labels_loss(family, tmp_path):
    hf, ours = load_both(family, tmp_path)
    x = ids()
    labels = x.clone()
    labels[0, :4] = -100  # ignored positions count in neither
    # transformers shifts labels inside; our targets are already the next tokens
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], dim=1)
    with torch.no_grad():
        logits, loss = ours(x, targets)
        ref = hf(x, labels=labels).loss
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_matches_sdpa_and_transformers_eager(family, tmp_path):
    save_tiny(family, tmp_path, **({"sliding_window": 6} if family == "mistral" else {}))
    sdpa = load_pretrained(tmp_path)
    eager = load_pretrained(tmp_path, attn_impl="eager")
    hf_eager = tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = ids()
    with torch.no_grad():
        assert max_diff(eager(x), sdpa(x)) <= FP32_TOL
        assert max_diff(eager(x), hf_eager(x).logits) <= FP32_TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_gives_same_gradients(family, tmp_path):
    _, ours = load_both(family, tmp_path)
    x = ids()
    targets = ids(seed=1)

    def grads():
        ours.zero_grad(set_to_none=True)
        ours(x, targets)[1].backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters()}

    plain = grads()
    ours.set_gradient_checkpointing(True)
    ckpt = grads()
    assert set(plain) == set(ckpt)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)


def test_gradient_checkpointing_recomputes_blocks(tmp_path):
    # the switch must really take effect: each block's forward starts twice (forward + recompute)
    _, ours = load_both("llama", tmp_path)
    counts = []
    ours.model.layers[0].register_forward_pre_hook(lambda *a: counts.append(1))
    ours.set_gradient_checkpointing(True)
    ours(ids(), ids(seed=1))[1].backward()
    assert len(counts) == 2
    counts.clear()
    ours.set_gradient_checkpointing(False)
    ours(ids(), ids(seed=1))[1].backward()
    assert len(counts) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_from_hf_config_round_trips_the_config(family):
    hf_cfg = tiny_hf_model(family).config.to_dict()
    model = from_hf_config(hf_cfg)
    back = model.config.to_hf_dict()
    for key in ("vocab_size", "model_type", "tie_word_embeddings"):
        assert back[key] == hf_cfg[key]
    n_ours = sum(p.numel() for p in model.parameters())
    n_hf = sum(p.numel() for p in tiny_hf_model(family).parameters())
    assert n_ours == n_hf


def test_gpt_config_validation():
    with pytest.raises(ValueError, match=r"n_embd \(30\) must be divisible by n_head \(4\)"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match=r"attn_impl must be one of \['eager', 'sdpa'\], got 'flash'"):
        GPTConfig(attn_impl="flash")
    with pytest.raises(ValueError, match=r"n_layer must be an int >= 1, got 0"):
        GPTConfig(n_layer=0)


def test_llama_config_validation():
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be a multiple of num_key_value_heads \(3\)"):
        LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"head_dim must be even .* got 7"):
        LlamaConfig(hidden_size=28, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"model_type must be one of .*got 'gemma'"):
        LlamaConfig(model_type="gemma")
    with pytest.raises(ValueError, match=r"'qwen2' cannot express attention_bias=False"):
        LlamaConfig(model_type="qwen2").to_hf_dict()


def test_generate_and_forward_argument_errors():
    model = GPT(GPTConfig(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2)).eval()
    prompt = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"exceeds the 8 positions"):
        model.generate(prompt, 6)
    with pytest.raises(ValueError, match=r"temperature must be >= 0"):
        model.generate(prompt, 1, temperature=-1.0)
    with pytest.raises(ValueError, match=r"top_k must be None or an int >= 1, got 0"):
        model.generate(prompt, 1, top_k=0)
    with pytest.raises(ValueError, match=r"max_new_tokens must be an int >= 0, got -1"):
        model.generate(prompt, -1)
    with pytest.raises(ValueError, match=r"sequence length 9 exceeds n_positions=8"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match=r"targets must have shape \(1, 3\)"):
        model(prompt, torch.zeros(1, 2, dtype=torch.long))


@settings(max_examples=10)
@given(
    family=st.sampled_from(["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2"]),
    n_kv=st.sampled_from([1, 2, 4]),
    head_dim=st.sampled_from([4, 8, 12]),
    layers=st.integers(1, 2),
    tied=st.booleans(),
    seq=st.integers(1, 9),
)
def test_random_llama_configs_save_and_load_in_transformers(tmp_path_factory, family, n_kv, head_dim, layers, tied, seq):
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=n_kv, head_dim=head_dim,
                         tie_word_embeddings=tied, model_type=family,
                         attention_bias=family == "qwen2", o_proj_bias=False,
                         rope_theta=500.0, sliding_window=None)
    torch.manual_seed(0)
    assert_transformers_loads_the_same_model(Llama(config).eval(), tmp_path_factory, seq)


@settings(max_examples=5)
@given(n_layer=st.integers(1, 2), n_head=st.sampled_from([1, 2, 4]), n_inner=st.sampled_from([None, 24]),
       act=st.sampled_from(["gelu_new", "gelu", "relu"]), seq=st.integers(1, 9))
def test_random_gpt_configs_save_and_load_in_transformers(tmp_path_factory, n_layer, n_head, n_inner, act, seq):
    config = GPTConfig(vocab_size=64, n_positions=16, n_embd=16, n_layer=n_layer, n_head=n_head,
                       n_inner=n_inner, activation_function=act)
    torch.manual_seed(0)
    assert_transformers_loads_the_same_model(GPT(config).eval(), tmp_path_factory, seq)


def assert_transformers_loads_the_same_model(ours, tmp_path_factory, seq):
    folder = tmp_path_factory.mktemp("rt")
    save_pretrained(ours, folder)
    hf = tf.AutoModelForCausalLM.from_pretrained(folder).eval()
    x = ids(batch=1, seq=seq, vocab=64)
    with torch.no_grad():
        assert max_diff(ours(x), hf(x).logits) <= FP32_TOL


@settings(max_examples=8)
@given(family=st.sampled_from(["gpt2", "mistral"]), impl=st.sampled_from(["sdpa", "eager"]),
       chunks=st.lists(st.integers(1, 6), min_size=1, max_size=4))
def test_prefill_in_chunks_through_the_cache_equals_one_pass(tmp_path_factory, family, impl, chunks):
    # Chunks of T > 1 against a non-empty cache take the explicit-mask path of causal_attention;
    # window 3 makes Mistral's sliding mask bite within these short sequences.
    folder = tmp_path_factory.mktemp("m")
    save_tiny(family, folder, **({"sliding_window": 3} if family == "mistral" else {}))
    model = load_pretrained(folder, attn_impl=impl)
    x = ids(batch=2, seq=sum(chunks))
    cache = model.new_cache(2, x.shape[1])
    with torch.no_grad():
        full = model(x)
        pieces, start = [], 0
        for n in chunks:
            pieces.append(model(x[:, start:start + n], kv_cache=cache))
            start += n
    assert max_diff(torch.cat(pieces, dim=1), full) <= FP32_TOL
