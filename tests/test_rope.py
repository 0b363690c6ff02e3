"""reference_models.rope against transformers' rotary embeddings: the same cos/sin, bit for bit,
call after call (dynamic's growing base and longrope's short/long switch follow the sequence
length the same way), for every rope_type and partial rotary."""
import pytest
import torch
import transformers as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from reference_models.rope import ROPE_TYPES, Rope, apply_rotary

# a prefill, then one position at a time past max_position_embeddings (16), then shorter and longer
# full sequences again: what generate() and later forward calls ask of a rotary embedding
CALLS = [torch.arange(0, 6)] + [torch.tensor([p]) for p in range(6, 30)] + \
        [torch.arange(0, 10), torch.arange(0, 16), torch.arange(0, 20), torch.arange(0, 3)]


def scaling(rope_type, factor, original, n_freq):
    return {
        "default": {},
        "linear": {"factor": factor},
        "dynamic": {"factor": factor},
        "yarn": {"factor": factor, "original_max_position_embeddings": original, "beta_fast": 16.0, "beta_slow": 2.0},
        "llama3": {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": original},
        "longrope": {"short_factor": [1.0 + i / 10 for i in range(n_freq)],
                     "long_factor": [factor + i / 5 for i in range(n_freq)],
                     "original_max_position_embeddings": original},
    }[rope_type]


def assert_same_cos_sin_call_after_call(theirs, ours):
    for positions in CALLS:
        cos, sin = theirs(torch.zeros(1), positions[None])
        our_cos, our_sin = ours.cos_sin(positions, torch.float32)
        assert torch.equal(our_cos, cos[0]) and torch.equal(our_sin, sin[0]), positions


@settings(max_examples=30)
@given(rope_type=st.sampled_from(list(ROPE_TYPES)), factor=st.sampled_from([1.5, 2.0, 4.0, 8.0]),
       original=st.sampled_from([4, 8, 12]), theta=st.sampled_from([100.0, 10000.0, 500000.0]),
       head_dim=st.sampled_from([8, 16, 32]))
def test_every_rope_type_bit_identical_to_transformers_call_after_call(rope_type, factor, original, theta, head_dim):
    params = {"rope_type": rope_type, "rope_theta": theta, **scaling(rope_type, factor, original, head_dim // 2)}
    config = tf.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=16,
                            rope_parameters=params)
    ours = Rope(config.rope_parameters, head_dim, 16)
    assert_same_cos_sin_call_after_call(LlamaRotaryEmbedding(config), ours)


@pytest.mark.parametrize("rope_type", ["default", "linear", "dynamic", "yarn", "longrope"])
@pytest.mark.parametrize("partial", [0.25, 0.5])
def test_partial_rotary_frequencies_bit_identical_to_transformers(rope_type, partial):
    # GPT-NeoX's rotary embedding (as Phi-3's) covers the first head_dim * partial dimensions
    params = {"rope_type": rope_type, "rope_theta": 1000.0, "partial_rotary_factor": partial,
              **scaling(rope_type, 2.0, 8, int(32 * partial) // 2)}
    config = tf.GPTNeoXConfig(hidden_size=128, num_attention_heads=4, max_position_embeddings=16,
                              rope_parameters=params)
    ours = Rope(config.rope_parameters, 32, 16)
    assert ours.dim == int(32 * partial)
    assert_same_cos_sin_call_after_call(GPTNeoXRotaryEmbedding(config), ours)


def test_partial_rotation_turns_only_the_rotated_dimensions_and_keeps_norms():
    x = torch.randn(2, 3, 5, 16, generator=torch.Generator().manual_seed(0))
    rope = Rope({"rope_type": "default", "rope_theta": 100.0, "partial_rotary_factor": 0.5}, 16, 32)
    cos, sin = rope.cos_sin(torch.arange(5), torch.float32)
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 8:], x[..., 8:])
    # a rotation: pairs (i, i + 4) of the rotated part keep their length
    pairs = lambda t: t[..., :4] ** 2 + t[..., 4:8] ** 2  # noqa: E731
    torch.testing.assert_close(pairs(y), pairs(x))
    assert torch.equal(y[:, :, 0], x[:, :, 0])  # position 0: angle 0


def test_rope_built_on_the_meta_device_keeps_real_frequencies():
    with torch.device("meta"):
        rope = Rope({"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8}, 16, 64)
    assert rope.inv_freq.device.type == "cpu"
    assert torch.isfinite(rope.cos_sin(torch.arange(4), torch.float32)[0]).all()
