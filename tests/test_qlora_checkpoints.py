"""4-bit checkpoints: folders quantized and saved by transformers + bitsandbytes on CPU load into
reference models with LinearNF4 layers (no requantization), give transformers' logits, and save
back byte for byte; transformers loads our 4-bit folders as 4-bit models."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hf_factories import save_tiny
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import reference_models
from minilora.quant.bnb_format import Bnb4bitFormat
from minilora.quant.qlora import LinearNF4, quantize_model
from reference_models.quantized_formats import register_quantized_format

ROOT = Path(__file__).resolve().parent.parent

# transformers + bitsandbytes put a 4-bit model on CUDA wherever CUDA exists; the tests compare with
# our CPU models, so pin the oracle to CPU on every machine
DEVICE_MAP = "cpu"


def reference_matmul(model):
    """bitsandbytes' Linear4bit, on a CPU with AVX512-BF16 and in inference (eval, no grad), repacks
    its weight for a bf16 kernel on the first forward: another rounding than the dequantize + matmul
    it runs everywhere else, and a crash when in_features < blocksize (our tiny models). Compare
    against that dequantize + matmul path on every machine."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False
    return model


# bitsandbytes 0.50.2's native CPU dequantize_4bit returns wrong values (errors near 1.0) when a
# weight's last dimension is below the block size, as in a 32-wide tiny model, on some CPUs (seen on an
# AVX512 machine; its pure-PyTorch kernel is right). Every 4-bit weight here is 64 or more wide.
WIDE = {"llama": dict(hidden_size=64, intermediate_size=128), "gpt2": dict(n_embd=64)}


def transformers_4bit(family, folder, quant_type, double_quant):
    save_tiny(family, folder / "fp32", **WIDE[family])
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder / "fp32", quantization_config=config, dtype=torch.float32,
                                                 device_map=DEVICE_MAP)
    model.save_pretrained(folder / "hf4bit")
    return reference_matmul(model.eval())


CASES = [("llama", "nf4", True), ("llama", "nf4", False), ("llama", "fp4", True), ("llama", "fp4", False),
         ("gpt2", "nf4", True), ("gpt2", "fp4", False)]


@pytest.mark.parametrize("family,quant_type,double_quant", CASES)
def test_transformers_4bit_folder_loads_with_equal_logits_and_saves_bit_identical(tmp_path, family, quant_type,
                                                                                double_quant):
    hf = transformers_4bit(family, tmp_path, quant_type, double_quant)
    ours = reference_models.load_pretrained(tmp_path / "hf4bit")
    layers = [m for m in ours.modules() if isinstance(m, LinearNF4)]
    assert len(layers) == sum(type(m).__name__ == "Linear4bit" for m in hf.modules()) > 0
    assert all(m.quant_type == quant_type and m.double_quant == double_quant for m in layers)
    ids = torch.randint(0, 100, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = hf(ids).logits, ours(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # GPT-2: transformers transposed each Conv1D weight before quantizing; the bytes are already
    # nn.Linear (out, in) and load without a transpose.
    reference_models.save_pretrained(ours, tmp_path / "ours")
    assert (tmp_path / "ours" / "model.safetensors").read_bytes() == \
        (tmp_path / "hf4bit" / "model.safetensors").read_bytes()
    hf_config = json.loads((tmp_path / "hf4bit" / "config.json").read_text())["quantization_config"]
    our_config = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    assert our_config == hf_config


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_our_quantized_model_loads_in_transformers_as_4bit(tmp_path, family):
    save_tiny(family, tmp_path / "fp32", **WIDE[family])
    model = quantize_model(reference_models.load_pretrained(tmp_path / "fp32"), quant_type="nf4", double_quant=True)
    reference_models.save_pretrained(model, tmp_path / "ours4bit")
    hf = loads_in_transformers_and_round_trips(model, tmp_path / "ours4bit", seed=1)
    assert sum(type(m).__name__ == "Linear4bit" for m in hf.modules()) == \
        sum(isinstance(m, LinearNF4) for m in model.modules())


def loads_in_transformers_and_round_trips(model, folder, seed):
    """Our 4-bit folder loads in transformers with our logits, and through our loader re-saves
    bit for bit; returns transformers' model."""
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, device_map=DEVICE_MAP).eval()
    reference_matmul(hf)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    again = reference_models.load_pretrained(folder)
    reference_models.save_pretrained(again, folder.parent / "again")
    assert (folder.parent / "again" / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    return hf


def test_mismatched_4bit_checkpoints_are_rejected(tmp_path):
    transformers_4bit("llama", tmp_path, "nf4", True)
    folder = tmp_path / "hf4bit"
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"

    def write(name, mutate):
        bad = tmp_path / name
        bad.mkdir()
        (bad / "config.json").write_text((folder / "config.json").read_text())
        t = dict(tensors)
        mutate(t)
        safetensors.torch.save_file(t, bad / "model.safetensors", metadata={"format": "pt"})
        return bad

    truncated = write("truncated", lambda t: t.update({key: t[key][:-1].clone()}))
    with pytest.raises(ValueError, match=r"q_proj.weight has \d+ bytes, quant_state shape .* needs \d+"):
        reference_models.load_pretrained(truncated)

    def wrong_shape(t):
        qs_key = key + ".quant_state.bitsandbytes__nf4"
        meta = json.loads(bytes(t[qs_key].tolist()))
        meta["shape"] = meta["shape"][::-1] if meta["shape"][0] != meta["shape"][1] else [meta["shape"][0] * 2,
                                                                                        meta["shape"][1] // 2]
        t[qs_key] = torch.tensor(list(json.dumps(meta).encode()), dtype=torch.uint8)

    with pytest.raises(ValueError, match="q_proj.weight quant_state has shape .* the model needs"):
        reference_models.load_pretrained(write("shape", wrong_shape))
    with pytest.raises(ValueError, match="exactly one weight.quant_state"):
        reference_models.load_pretrained(write("no_state", lambda t: t.pop(key + ".quant_state.bitsandbytes__nf4")))


def test_gpt2_conv1d_layers_left_dense_in_a_4bit_folder_are_stored_transposed_and_stay_conv1d(tmp_path):
    # transformers quantizes GPT-2's Conv1D weights after transposing them; the ones it skips stay
    # Conv1D, (in, out) in the file. Ours: skipped c_proj layers stay dense nn.Linear (out, in).
    save_tiny("gpt2", tmp_path / "fp32", **WIDE["gpt2"])
    model = quantize_model(reference_models.load_pretrained(tmp_path / "fp32"), skip=("lm_head", "c_proj"))
    reference_models.save_pretrained(model, tmp_path / "ours4bit")
    tensors = safetensors.torch.load_file(tmp_path / "ours4bit" / "model.safetensors")
    for name, m in model.named_modules():
        if name.endswith("c_proj"):
            assert type(m) is torch.nn.Linear
            assert torch.equal(tensors[name + ".weight"], m.weight.t())  # bit for bit, (in, out)
    hf = loads_in_transformers_and_round_trips(model, tmp_path / "ours4bit", seed=2)
    assert sorted(n for n, m in hf.named_modules() if type(m).__name__ == "Conv1D") == \
        sorted(n for n, _ in model.named_modules() if n.endswith("c_proj"))


NO_MINILORA = """
import sys
import reference_models
try:
    reference_models.load_pretrained(sys.argv[1])
except RuntimeError as exc:
    print(exc)
print(sorted(m for m in sys.modules if m.split(".")[0] == "minilora"))
"""


def test_4bit_folder_loaded_without_minilora_says_what_to_import_and_imports_nothing(tmp_path):
    save_tiny("llama", tmp_path / "fp32", **WIDE["llama"])
    reference_models.save_pretrained(quantize_model(reference_models.load_pretrained(tmp_path / "fp32")),
                                     tmp_path / "ours4bit")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", NO_MINILORA, str(tmp_path / "ours4bit")], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    message, imported = run.stdout.strip().splitlines()
    assert message == ("this checkpoint holds bitsandbytes 4-bit weights and no loader for them is registered: "
                       "import minilora.quant.qlora first (it registers bitsandbytes' 4-bit format, which loads "
                       "into minilora's LinearNF4)")
    assert imported == "[]"  # reference_models reached for nothing in minilora


BUILD_MODEL = """
import sys
from minilora.train import TrainConfig, build_model
model, _ = build_model(TrainConfig(model=sys.argv[1], method="lora", device="cpu"))
print(sum(type(m).__name__ == "LinearNF4" for m in model.modules()))
"""


def test_minilora_train_loads_a_4bit_folder_in_a_fresh_process(tmp_path):
    # minilora's own loader registers the format it needs (nothing imported it before in that process)
    save_tiny("llama", tmp_path / "fp32", vocab_size=300, **WIDE["llama"])  # room for the byte tokenizer
    model = quantize_model(reference_models.load_pretrained(tmp_path / "fp32"))
    reference_models.save_pretrained(model, tmp_path / "ours4bit")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-c", BUILD_MODEL, str(tmp_path / "ours4bit")], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert int(run.stdout) == sum(isinstance(m, LinearNF4) for m in model.modules()) > 0


def test_a_format_for_an_unknown_quantization_is_refused():
    class Int8Format(Bnb4bitFormat):
        name = "bitsandbytes 8-bit"

    with pytest.raises(ValueError, match=r"unknown quantized format 'bitsandbytes 8-bit'; "
                                         r"known: \['bitsandbytes 4-bit'\]"):
        register_quantized_format(Int8Format(LinearNF4))
