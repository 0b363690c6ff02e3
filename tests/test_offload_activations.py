"""minilora/train/offload_activations.py on CPU: the code path CUDA runs, with host-to-host copies.

Offloading moves tensors and nothing else, so training with it is bit-identical to training
without it (both with checkpointing); the host holds L - 1 block inputs between forward and
backward; backward fetches each block's input one block ahead and holds at most two at a time.
"""
import pytest
import torch

from minilora.train.offload_activations import ActivationOffload
from reference_models import GPT, GPTConfig, GPTNeoX, GPTNeoXConfig, Llama, LlamaConfig

LAYERS = 4


def build(family, dtype=torch.float32):
    torch.manual_seed(0)
    if family == "gpt2":
        model = GPT(GPTConfig(vocab_size=101, n_positions=64, n_embd=32, n_layer=LAYERS, n_head=4, embd_pdrop=0.0,
                              resid_pdrop=0.0, attn_pdrop=0.0))
    elif family == "gpt_neox":
        model = GPTNeoX(GPTNeoXConfig(vocab_size=101, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=LAYERS, num_attention_heads=4))
    else:
        model = Llama(LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                                  num_attention_heads=4, num_key_value_heads=2))
    return model.to(dtype).train()


def prepare(model, method):
    if method == "full":
        return model
    from minilora.lora.layer import LoRAConfig
    from minilora.lora.model import inject
    from minilora.quant.qlora import quantize_model

    model.requires_grad_(False)
    if method == "qlora":
        quantize_model(model)
    inject(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    return model


def gradients(model, x, y):
    model.zero_grad(set_to_none=True)
    loss = model(x, y)[1]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,method,dtype", [("llama", "full", torch.float32), ("llama", "lora", torch.bfloat16),
                                                 ("llama", "qlora", torch.float32), ("gpt2", "full", torch.bfloat16),
                                                 ("gpt2", "lora", torch.float32), ("gpt_neox", "lora", torch.float32)])
def test_training_with_offload_is_bit_identical_to_checkpointing_without_it(family, method, dtype):
    model = prepare(build(family, dtype), method)
    x, y = torch.randint(0, 101, (2, 24)), torch.randint(0, 101, (2, 24))
    model.set_gradient_checkpointing(True)
    want_loss, want = gradients(model, x, y)
    model.set_gradient_checkpointing(True, offload=ActivationOffload("cpu"))
    for _ in range(2):  # and again: a second step reuses nothing of the first
        loss, got = gradients(model, x, y)
        assert torch.equal(loss, want_loss) and want.keys() == got.keys()
        for name in want:
            assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_host_holds_every_block_input_but_the_last_until_backward(family):
    model = build(family, torch.bfloat16)
    offload = ActivationOffload("cpu")
    model.set_gradient_checkpointing(True, offload=offload)
    batch, seq = 3, 16
    x = torch.randint(0, 101, (batch, seq))
    loss = model(x, x)[1]
    assert offload.host_bytes() == (LAYERS - 1) * batch * seq * 32 * 2
    assert offload.device_inputs() == 1
    assert offload.copies == [("to host", i) for i in range(LAYERS - 1)]
    loss.backward()
    assert offload.host_bytes() == 0 and offload.device_inputs() == 0  # all released with the graph


def test_backward_prefetches_one_block_ahead_and_holds_at_most_two_inputs():
    model = build("llama")
    offload = ActivationOffload("cpu")
    model.set_gradient_checkpointing(True, offload=offload)
    held = []
    for block in model.model.layers:  # runs at each block's recompute, after its input was unpacked
        block.register_forward_pre_hook(lambda module, args: held.append((module.layer, offload.device_inputs())))
    x = torch.randint(0, 101, (2, 12))
    loss = model(x, x)[1]
    held.clear()
    loss.backward()
    assert [layer for layer, _ in held] == list(reversed(range(LAYERS)))
    assert max(n for _, n in held) <= 2
    forward = [("to host", i) for i in range(LAYERS - 1)]
    # unpacking block i's input (already on the device) fetches block i - 1's
    assert offload.copies == forward + [("to device", i) for i in reversed(range(LAYERS - 1))]


def test_eval_and_no_grad_forwards_offload_nothing():
    model = build("llama")
    offload = ActivationOffload("cpu")
    model.set_gradient_checkpointing(True, offload=offload)
    with torch.no_grad():
        model(torch.randint(0, 101, (1, 8)))
    assert offload.copies == [] and offload.host_bytes() == 0


def test_offload_without_checkpointing_is_refused_in_one_line():
    model = build("llama")
    with pytest.raises(ValueError, match="activation offload needs gradient checkpointing"):
        model.set_gradient_checkpointing(False, offload=ActivationOffload("cpu"))
    with pytest.raises(ValueError, match="offload must have a saving\\(layer, x\\) method, got str"):
        model.set_gradient_checkpointing(True, offload="cpu")
    assert not model.gradient_checkpointing and model.activation_offload is None  # nothing changed
