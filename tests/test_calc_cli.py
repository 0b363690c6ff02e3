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
    # k and v x 32 layers x 8 kv heads x (prompt + new tokens - 1: the last token is never fed back) x 128 x bf16
    assert terms["KV cache"] == 2 * 32 * 8 * (1024 + 256 - 1) * 128 * 2


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


# --- issue 15: the answer first, every default visible, one clear line per edge case -------------------

@pytest.mark.parametrize("args,message", [
    (["vram", "--model", "gpt2", "--gpu", "0GB"], r"--gpu: memory size must be > 0, got '0GB'"),
    (["vram", "--model", "gpt2", "--gpu", "-5GB"], r"--gpu: memory size must be > 0, got '-5GB'"),
    (["fit", "--model", "gpt2", "--gpu", "-0.5"], r"--gpu: memory size must be > 0, got '-0.5'"),
    (["vram", "--model", "gpt2", "--batch", "-1e3"], r"--batch: must be a number, got '-1e3'"),
    (["vram"], r"--model is required: a preset \(gpt2, .*llama-2-7b.*\), a config.json or a folder"),
    (["cost", "--gpu", "h100-80gb"], r"--model is required"),
    (["vram", "--model", "gpt2", "--plot", "bar.pdf"], r"--plot must name a .png or .svg file, got 'bar.pdf'"),
    (["vram", "--model", "gpt2", "--new-tokens", "10"], r"--new-tokens applies to --inference only"),
])
def test_edge_cases_exit_2_with_one_clear_line(args, message):
    import re
    code, out, err = run_cli(*args)
    assert (code, out) == (2, ""), (code, out, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(f"^python -m minilora.calc( [a-z]+)?: error: .*{message}", err), err


def test_json_into_a_closed_pipe_exits_quietly():
    """`--json | head`: the reader leaves before the answer is written; no BrokenPipeError."""
    proc = subprocess.Popen([sys.executable, "-m", "minilora.calc", "vram", "--model", "llama-2-7b", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # before the interpreter has even started: the write meets a closed pipe
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and err == "", err
    shell = subprocess.run(["bash", "-c", f"set -o pipefail; {sys.executable} -m minilora.calc vram --model gpt2 "
                            "--json | head -n 2"], capture_output=True, text=True, timeout=120)
    assert shell.returncode == 0 and shell.stderr == "" and shell.stdout.startswith("{"), shell


LAYOUT_CASES = [
    ["vram", "--model", "llama-2-7b", "--method", "qlora", "--targets", "all-linear", "--rank", "16",
     "--seq", "2048", "--grad-ckpt", "full"],
    ["vram", "--model", "llama-2-7b", "--method", "full", "--optimizer", "offload", "--gpu", "rtx-4090"],
    ["vram", "--model", "llama-2-70b", "--method", "full", "--gpus", "8", "--zero", "3", "--attn", "eager"],
    ["vram", "--model", "llama-2-70b", "--method", "full", "--batch", "64", "--seq", "8192"],
    ["vram", "--model", "gemma-3-4b", "--inference", "--seq", "8192", "--gpu", "t4", "--explain"],
    ["params", "--model", "llama-3-8b", "--rank", "64", "--targets", "all-linear"],
    ["fit", "--model", "llama-2-7b", "--gpu", "rtx-4090"],
    ["fit", "--model", "llama-3.1-8b", "--method", "qlora", "--search", "seq", "--grad-ckpt", "full"],
    ["fit", "--model", "llama-2-70b", "--method", "full", "--search", "batch"],
    ["cost", "--model", "llama-3-8b", "--tokens", "50000000", "--gpu", "h100-80gb"],
]


@pytest.mark.parametrize("args", LAYOUT_CASES, ids=lambda a: " ".join(a[:4]))
def test_the_answer_comes_first_and_no_line_is_over_100_columns(args, capsys):
    assert main([*args, "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)["answer"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(answer.split()[0]) and " ".join(answer.split()[:6]) in lines[0], (lines[0], answer)
    assert " ".join(" ".join(lines).split()).startswith(" ".join(answer.split())), lines[:3]
    assert not [line for line in lines if len(line) > 100], [line for line in lines if len(line) > 100]
    settings = [i for i, line in enumerate(lines) if line.startswith("settings: ")]
    assert len(settings) == 1 and settings[0] > 1, "the settings come after the answer, once"


def test_vram_answer_names_the_gpus_it_fits_on_or_the_verdict_for_gpu(capsys):
    from calculators.gpus import GPUS, GiB
    assert main(["vram", "--model", "llama-2-7b", "--method", "qlora", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gpu"] is None  # no hidden default GPU
    fits = [g["name"] for g in out["fits_on"]]
    assert fits == sorted((n for n, g in GPUS.items() if g.memory >= out["total_gpu_bytes"]),
                          key=lambda n: (GPUS[n].memory, list(GPUS).index(n)))
    smallest = GPUS[fits[0]].memory / GiB
    assert f"fits on {smallest:g} GiB GPUs ({fits[0]}" in out["answer"]
    for gpu, verdict in (("t4", "fits on t4"), ("4GB", "does not fit on 4 GiB GPU")):
        assert main(["vram", "--model", "llama-2-7b", "--method", "qlora", "--gpu", gpu]) == 0
        assert verdict in capsys.readouterr().out.splitlines()[0]


def test_peak_below_the_terms_sum_is_explained_in_words(capsys):
    assert main(["vram", "--model", "llama-2-7b", "--method", "qlora", "--seq", "2048", "--grad-ckpt", "full",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    summed = sum(t["gpu"] for t in out["terms"])
    assert summed > out["total_gpu_bytes"]
    words = out["peak_explained"]
    assert f"{summed / 2**30:,.2f} GiB" in words and f"{out['total_gpu_bytes'] / 2**30:,.2f} GiB total" in words
    assert "Held throughout: weights" in words and "The peak is at backward start" in words
    assert "Backward end adds gradients + recomputed block + backward workspace" in words
    assert main(["vram", "--model", "llama-2-7b", "--method", "qlora", "--seq", "2048", "--grad-ckpt", "full"]) == 0
    assert "Held throughout: weights" in " ".join(capsys.readouterr().out.split())


def _help_blocks(command):
    """{dest: its --help text, whitespace collapsed}, from the real `--help` output."""
    from calculators.cli import build_parser
    code, out, _ = run_cli(command, "--help")
    assert code == 0
    text = " ".join(out.split("options:", 1)[1].split())
    actions = [a for a in build_parser().commands[command].flags if a.option_strings]
    starts = [text.index(a.option_strings[-1] + (" " if a.nargs == 0 else f" {a.metavar or a.dest.upper()}"))
              for a in actions]
    return {a.dest: (a, text[s:e]) for a, s, e in zip(actions, starts, starts[1:] + [len(text)])}


@pytest.mark.parametrize("command", ["params", "vram", "fit", "cost", "serve"])
def test_help_shows_every_default(command):
    from calculators.cli import UNSET
    for dest, (action, block) in _help_blocks(command).items():
        if action.nargs == 0:  # a switch: off unless given
            continue
        if action.default is None:
            assert f"(default: {UNSET[dest]})" in block if dest in UNSET else block.split()[2] == "required:", block
        else:
            assert f"(default: {action.default})" in block, block


def _printed_settings(out: str) -> dict:
    """The `settings:` block of the text output as {name: value}."""
    settings = " ".join(out.split("settings: ", 1)[1].split())
    return dict(item.split(" ", 1) for item in settings.split(", "))


def test_cost_prints_flops_per_token_once_and_the_price_it_used(capsys):
    assert main(["cost", "--model", "llama-3-8b", "--gpu", "h100-80gb"]) == 0
    out = capsys.readouterr().out
    assert out.lower().count("flops per token") == 1, out
    values = _printed_settings(out)
    assert all(v.strip() for v in values.values()), values
    assert values["price"].startswith("2.5 ") and "h100-80gb" in values["price"]


def test_fit_search_does_not_show_the_searched_setting(capsys):
    for what in ("seq", "batch", "rank"):
        args = ["fit", "--model", "llama-3.1-8b", "--method", "qlora", "--search", what]
        assert main([*args, "--json"]) == 0
        assert what not in json.loads(capsys.readouterr().out)["settings"]
        assert main(args) == 0
        settings = _printed_settings(capsys.readouterr().out)
        assert what not in settings and settings["search"] == what, settings


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
    (["--prepare-kbit", "maybe"], "--prepare-kbit must be one of auto, yes, no"),
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
    from calculators import ActivationSetup, activation_bytes, model_spec, model_state_bytes, training_memory
    from calculators.cli import build_parser, build_setup
    from calculators.long_context import with_chunked_loss
    from calculators.training_setup import DTYPE_BYTES
    from calculators.cli import run as run_cli_args

    argv = ["vram", "--model", "mistral-7b", *flags, "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    args = build_parser().parse_args(argv)
    spec = model_spec("mistral-7b")
    setup = build_setup(args, spec)
    states = model_state_bytes(spec, setup)
    assert out["model_state_bytes"] == states.weights + states.gradients + states.master + states.optimizer + states.host
    replayed = activation_bytes(spec, ActivationSetup.of(spec, setup))
    if setup.loss == "chunked":  # minilora's default loss: the final norm's, not lm_head's, and the loss's own
        head_gradient = DTYPE_BYTES[states.precision.embedding] if setup.method == "full" else 0
        replayed = with_chunked_loss(replayed, spec, setup, head_gradient)
    assert out["saved_activation_bytes"] == replayed["total"] == training_memory(spec, setup).saved_activation_bytes
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


def test_fit_methods_carries_qlora_and_lora_only_choices_to_their_methods_only(capsys):
    assert main(["fit", "--model", "llama-2-7b", "--method", "qlora", "--prepare-kbit", "no",
                 "--autocast-adapter-dtype", "no", "--gpu", "24GB", "--json"]) == 0
    rows = {(r["method"], r["grad_ckpt"]): r["total_gpu"] for r in json.loads(capsys.readouterr().out)["methods"]}
    assert main(["vram", "--model", "llama-2-7b", "--method", "qlora", "--prepare-kbit", "no",
                 "--autocast-adapter-dtype", "no", "--gpu", "24GB", "--json"]) == 0
    assert rows[("qlora", "none")] == json.loads(capsys.readouterr().out)["total_gpu_bytes"]
    assert main(["vram", "--model", "llama-2-7b", "--method", "full", "--gpu", "24GB", "--json"]) == 0
    assert rows[("full", "none")] == json.loads(capsys.readouterr().out)["total_gpu_bytes"]
