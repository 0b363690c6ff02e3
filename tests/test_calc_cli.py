"""python -m minilora.calc: answers, JSON, one-line errors with exit status 2, and no torch import."""
import json
import subprocess
import sys

import pytest

from calculators.cli import main


def run_cli(*args):
    proc = subprocess.run([sys.executable, "-m", "minilora.calc", *args], capture_output=True, text=True,
                          timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_calculators_and_calc_entry_import_no_torch():
    code = ("import sys, calculators, calculators.cli, minilora.calc; "
            "bad = [m for m in ('torch', 'reference_models', 'transformers') if m in sys.modules]; "
            "bad += [m for m in sys.modules if m.startswith('minilora.') and m != 'minilora.calc']; "
            "print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("args,message", [
    (["params", "--model", "llama-9b"], "unknown model 'llama-9b'.*llama-2-7b"),
    (["params", "--model", "/no/such/config.json"], "config file not found"),
    (["vram", "--batch", "0"], "--batch: must be > 0"),
    (["vram", "--seq", "-5"], "--seq: must be > 0"),
    (["params", "--model", "gpt2", "--rank", "5000", "--targets", "c_attn"], "rank must be in 1..768"),
    (["params", "--model", "gpt2", "--targets", "q_proj"], "match no linear layer"),
    (["vram", "--method", "dora"], "--method must be one of full, lora, qlora"),
    (["fit", "--gpu", "lots"], "unknown GPU 'lots'"),
    (["vram", "--zero", "7", "--gpus", "2"], "unknown sharding '7'"),
    (["nonsense"], "invalid choice"),
])
def test_bad_input_exits_2_with_one_line(args, message):
    import re
    code, out, err = run_cli(*args)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(message, err), err
    assert "Traceback" not in err


@pytest.mark.parametrize("content,message", [("{broken", "cannot read .* as JSON"),
                                             ('{"model_type": "llama", "vocab_size": 10}', "config is missing"),
                                             ('[1, 2]', "must hold a JSON object")])
def test_bad_config_files_exit_2(tmp_path, content, message):
    import re
    (tmp_path / "config.json").write_text(content)
    code, _, err = run_cli("params", "--model", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1 and re.search(message, err), err


def test_params_json_matches_api():
    code, out, _ = run_cli("params", "--model", "llama-3-8b", "--rank", "16", "--targets", "q_proj,k_proj,v_proj,o_proj",
                           "--json")
    assert code == 0
    data = json.loads(out)
    assert data["params"] == 8_030_261_248 and data["lora_trainable"] == 13_631_488


def test_vram_prints_every_default_and_term(capsys):
    assert main(["vram", "--model", "mistral-7b", "--method", "qlora"]) == 0
    out = capsys.readouterr().out
    for setting in ("grad-ckpt", "optimizer", "attn", "dtype", "zero", "gpus", "targets"):
        assert setting in out
    for term in ("weights", "gradients", "optimizer states", "activations", "logits and loss", "CUDA context"):
        assert term in out
    assert "fits on" in out


def test_too_small_gpu_is_an_answer(capsys):
    assert main(["vram", "--model", "llama-2-70b", "--method", "full", "--gpu", "rtx-4090"]) == 0
    assert "does not fit" in capsys.readouterr().out
    assert main(["fit", "--model", "llama-2-70b", "--method", "full", "--gpu", "24GB", "--search", "batch"]) == 0
    out = capsys.readouterr().out
    assert "does not fit" in out and "what would" in out


def test_fit_finds_the_boundary(capsys):
    assert main(["fit", "--model", "llama-2-7b", "--method", "qlora", "--gpu", "24GB", "--search", "batch",
                 "--json"]) == 0
    best = json.loads(capsys.readouterr().out)["largest"]
    assert best >= 1
    for batch, fits in ((best, True), (best + 1, False)):
        assert main(["vram", "--model", "llama-2-7b", "--method", "qlora", "--gpu", "24GB", "--batch", str(batch),
                     "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["gpu"]["fits"] is fits


def test_cost_and_inference(capsys):
    assert main(["cost", "--model", "gpt2", "--method", "full", "--tokens", "1000000", "--json"]) == 0
    cost = json.loads(capsys.readouterr().out)["cost"]
    assert cost["flops_per_token"] >= 6 * 124_439_808
    assert main(["vram", "--model", "llama-3-8b", "--inference", "--seq", "1024", "--json"]) == 0
    terms = {t["name"]: t["gpu"] for t in json.loads(capsys.readouterr().out)["terms"]}
    assert terms["KV cache"] == 2 * 32 * 8 * (1024 + 256) * 128 * 2


@pytest.mark.parametrize("key,value", [("num_local_experts", -1), ("num_local_experts", "8"),
                                       ("num_experts_per_tok", 2.0)])
def test_bad_mixtral_expert_counts_exit_2_with_one_line(tmp_path, key, value):
    from calculators import PRESETS
    (tmp_path / "config.json").write_text(json.dumps({**PRESETS["mixtral-8x7b"], key: value}))
    code, out, err = run_cli("params", "--model", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1, (out, err)
    assert f"{key} must be a positive integer, got {value!r}" in err, err


def test_deeply_nested_config_exits_2_with_one_line(tmp_path):
    (tmp_path / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    code, _, err = run_cli("params", "--model", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "cannot read" in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("flag", ["--epochs", "--mfu", "--tokens"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "infinity"])
def test_cost_rejects_non_finite_numbers(flag, value, capsys):
    assert main(["cost", "--model", "gpt2", flag, value, "--json"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and flag in err, err


def test_cost_json_is_strict_json(capsys):
    assert main(["cost", "--model", "gpt2", "--json"]) == 0
    json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}"))


def test_cost_uses_the_peak_of_the_chosen_dtype(capsys):
    from calculators.gpus import GPUS
    results = {}
    for dtype in ("bf16", "fp32"):
        assert main(["cost", "--model", "gpt2", "--gpu", "a100-80gb", "--dtype", dtype, "--json"]) == 0
        results[dtype] = json.loads(capsys.readouterr().out)["cost"]
    assert results["bf16"]["assumptions"]["peak TFLOPS per GPU"] == GPUS["a100-80gb"].bf16_tflops
    assert results["fp32"]["assumptions"]["peak TFLOPS per GPU"] == GPUS["a100-80gb"].fp32_tflops
    assert GPUS["a100-80gb"].fp32_tflops < GPUS["a100-80gb"].bf16_tflops
    assert results["fp32"]["hours"] > results["bf16"]["hours"]
    assert "fp32" in str(results["fp32"]["assumptions"])
    assert main(["cost", "--model", "gpt2", "--dtype", "fp64"]) == 2


@pytest.mark.parametrize("extra", [["--gpus", "2"], ["--zero", "3"], ["--optimizer", "sgd"],
                                   ["--grad-ckpt", "full"], ["--grad-accum", "4"]])
def test_inference_refuses_training_only_flags(extra, capsys):
    assert main(["vram", "--model", "gpt2", "--inference", *extra]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and extra[0] in err and "--inference" in err, err


def test_inference_settings_do_not_list_training_only_flags(capsys):
    assert main(["vram", "--model", "gpt2", "--inference", "--json"]) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    for key in ("gpus", "zero", "optimizer", "grad-ckpt", "grad-accum", "master-weights"):
        assert key not in settings, settings
    assert settings["inference"] is True


@pytest.mark.parametrize("flag", ["--price", "--alpha", "--dropout"])
def test_float_flags_reject_non_finite_values(flag, capsys):
    assert main(["cost", "--model", "gpt2", flag, "nan", "--json"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and flag in err and "finite" in err, err


@pytest.mark.parametrize("args,message", [
    (["--master-weights", "yes"], r"master_weights=True \(--master-weights yes\) with --stack hf"),
    (["--method", "full", "--dtype", "fp16", "--autocast", "fp16"], "GradScaler cannot unscale fp16"),
    (["--method", "lora", "--prepare-kbit", "yes"], "prepare_model_for_kbit_training, for 4-bit models"),
    (["--grad-ckpt", "selective"], "transformers checkpoints whole decoder layers"),
    (["--stack", "minilora", "--autocast-adapter-dtype", "no"], "peft's option"),
    (["--method", "full", "--autocast-adapter-dtype", "yes"], "about LoRA adapters"),
    (["--stack", "minilora", "--autocast", "fp16"], "autocasts to bf16 only"),
    (["--attn", "flash", "--device", "cpu"], "flash_attention_2"),
    (["--stack", "jax"], "--stack must be one of hf, minilora"),
    (["--autocast", "fp8"], "--autocast must be one of none, bf16, fp16"),
    (["--model-dropout", "1.5"], "--model-dropout must be config or a probability"),
    (["--prepare-kbit", "maybe"], "--prepare-kbit must be auto, yes or no"),
    (["--device", "tpu"], "--device must be one of cuda, cpu"),
])
def test_recipes_the_libraries_do_not_run_exit_2_with_one_line(args, message, capsys):
    import re
    assert main(["vram", "--model", "llama-2-7b", *args]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


FLAG_SETS = [["--method", "qlora", "--targets", "all-linear", "--rank", "16", "--seq", "1024"],
             ["--method", "full", "--dtype", "fp32", "--autocast", "bf16", "--grad-ckpt", "full"],
             ["--method", "lora", "--stack", "minilora", "--attn", "eager", "--device", "cpu"],
             ["--method", "qlora", "--prepare-kbit", "no", "--autocast-adapter-dtype", "no", "--model-dropout", "0.1"]]


@pytest.mark.parametrize("flags", FLAG_SETS)
def test_vram_json_states_and_saved_bytes_equal_the_python_api(flags, capsys):
    from calculators import ActivationSetup, activation_bytes, model_spec, model_state_bytes
    from calculators.cli import build_parser, build_setup
    from calculators.cli import run as run_cli_args

    argv = ["vram", "--model", "mistral-7b", *flags, "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    args = build_parser().parse_args(argv)
    spec = model_spec("mistral-7b")
    setup = build_setup(args, spec)
    states = model_state_bytes(spec, setup)
    assert out["model_state_bytes"] == states.weights + states.gradients + states.master + states.optimizer + states.host
    assert out["saved_activation_bytes"] == activation_bytes(spec, ActivationSetup.of(spec, setup))["total"]
    assert out["stack"] == setup.stack and out["recipe"] in "\n".join(out["notes"])
    assert run_cli_args(args)["saved_activation_bytes"] == out["saved_activation_bytes"]


def test_hf_full_finetuning_is_plain_adamw_and_autocast_is_16_bytes_per_parameter(capsys):
    """transformers + torch AdamW on a bf16 model: 2 + 2 + 2 + 2 B/param; loaded in fp32 under
    Trainer(bf16=True)'s autocast: 4 + 4 + 4 + 4 (each plus AdamW's 4-byte step per tensor and
    RoPE's inv_freq buffers)."""
    from calculators import model_spec, parameter_tensors
    spec = model_spec("llama-2-7b")
    steps, buffers = 4 * len(parameter_tensors(spec)), 2 * 64 * 4
    for flags, per_param in ((["--dtype", "bf16"], 8), (["--dtype", "fp32", "--autocast", "bf16"], 16)):
        assert main(["vram", "--model", "llama-2-7b", "--method", "full", *flags, "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert out["model_state_bytes"] == per_param * 6_738_415_616 + steps + buffers


def test_config_dropout_and_the_device_change_the_saved_bytes(capsys):
    def saved(*flags):
        assert main(["vram", "--model", "gpt2", "--method", "full", *flags, "--json"]) == 0
        return json.loads(capsys.readouterr().out)["saved_activation_bytes"]

    config, none = saved(), saved("--model-dropout", "0")
    # GPT-2's config.json: 0.1 on attention, residual and embedding; a mask per dropout, bool on CUDA,
    # in the activations' dtype on CPU, where attention dropout also takes SDPA's math kernel
    assert config > none
    assert saved("--device", "cpu") > config
    # without dropout the devices differ only in LayerNorm's mean and rstd: fp32 on CUDA, bf16 on CPU
    # (25 LayerNorms x 2 statistics x 512 tokens x 2 bytes)
    assert none - saved("--model-dropout", "0", "--device", "cpu") == 25 * 2 * 512 * 2
