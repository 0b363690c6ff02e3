"""`vram --explain`: each term's formula, with the numbers put in, evaluates to the term's bytes, and
the phases (what is alive together) add up to the total on the GPU; the stacked bar's segments
alive at the peak add up to that total too.

The formulas are read here by a small evaluator of our own (numbers, x, +, -, /, parentheses and
ceil; the words between numbers say what each counts and are skipped), so a formula that says
one thing while the code computes another fails.
"""
import ast
import json
import math
import operator
import re
from fractions import Fraction

import pytest
from hypothesis import assume, given, strategies as st

from calculators import TrainingSetup, inference_memory, model_spec, training_memory
from calculators.cli import main
from calculators.memory import OPTIMIZERS
from calculators.report import bar_segments

_TOKEN = re.compile(r"\s*(?:(?P<number>\d+(?:,\d{3})*(?:\.\d+)?)|(?P<op>[()+\-/])|(?P<word>[A-Za-z_][\w'.\-]*))")

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(formula: str) -> Fraction:
    """The value of a formula as Term.formula writes them; anything else it holds is an error."""
    tokens, pos = [], 0
    while formula[pos:].strip():
        m = _TOKEN.match(formula, pos)
        assert m and m.end() > pos, f"cannot read {formula[pos:]!r} in {formula!r}"
        pos = m.end()
        if m["number"]:
            tokens.append(m["number"].replace(",", ""))
        elif m["op"]:
            tokens.append(m["op"])
        elif m["word"] in ("x", "ceil"):
            tokens.append("*" if m["word"] == "x" else "ceil")

    def value(node):
        if isinstance(node, ast.Constant):
            return Fraction(str(node.value))
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.Call) and node.func.id == "ceil" and len(node.args) == 1:
            return Fraction(math.ceil(value(node.args[0])))
        raise AssertionError(f"not arithmetic: {ast.dump(node)} in {formula!r}")

    try:
        tree = ast.parse(" ".join(tokens), mode="eval")
    except SyntaxError:
        raise AssertionError(f"not a formula: {formula!r}") from None
    return value(tree.body)


def test_the_evaluator_reads_what_it_should():
    assert evaluate("2 moments x 1,024 params x 2 B + 7 tensors x 4 B step") == 2 * 1024 * 2 + 28
    assert evaluate("ceil((10 B + 1 B) / 4 GPUs)") == 3
    assert evaluate("2 x (4 + 2) B scores") == 12
    for broken in ("5, 6", "5 6 B", "2 x", "(1 + 2"):
        with pytest.raises(AssertionError):
            evaluate(broken)


@given(model=st.sampled_from(["gpt2", "llama-2-7b", "mistral-7b", "mixtral-8x7b", "gemma-3-4b", "qwen3-0.6b",
                              "pythia-160m", "phi-3-mini"]),
       method=st.sampled_from(["full", "lora", "qlora"]), optimizer=st.sampled_from(OPTIMIZERS),
       grad_ckpt=st.sampled_from(["none", "full", "selective"]), attn=st.sampled_from(["sdpa", "eager"]),
       dtype=st.sampled_from(["bf16", "fp32"]), gpus=st.sampled_from([1, 2, 8]),
       zero=st.sampled_from(["none", "0", "1", "2", "3", "full-shard", "grad-op"]),
       grad_accum=st.sampled_from([1, 4]), device=st.sampled_from(["cuda", "cpu"]),
       batch=st.integers(1, 8), seq=st.integers(1, 4096), stack=st.sampled_from(["hf", "minilora"]),
       autocast=st.sampled_from(["none", "bf16"]))
def test_training_formulas_evaluate_to_the_terms_and_phases_to_the_total(model, method, optimizer, grad_ckpt, attn,
                                                                          dtype, gpus, zero, grad_accum, device,
                                                                          batch, seq, stack, autocast):
    assume(not (stack == "hf" and grad_ckpt == "selective"))  # transformers has no selective recomputation
    setup = TrainingSetup(method=method, optimizer=optimizer, grad_ckpt=grad_ckpt, attn=attn, dtype=dtype,
                          gpus=gpus, zero=zero, grad_accum=grad_accum, device=device, batch=batch, seq=seq,
                          stack=stack, autocast=autocast)
    b = training_memory(model_spec(model), setup)
    for t in b.terms:
        assert evaluate(t.formula) == t.gpu, (t.name, t.formula, t.gpu)
    _check_phases(b.as_dict())


@given(model=st.sampled_from(["gpt2", "llama-3-8b", "gemma-2-2b", "mixtral-8x7b", "deepseek-v3"]),
       quant=st.sampled_from(["none", "nf4"]), attn=st.sampled_from(["sdpa", "eager"]),
       batch=st.integers(1, 8), prompt=st.integers(1, 8192), new_tokens=st.integers(0, 4096))
def test_inference_formulas_evaluate_to_the_terms(model, quant, attn, batch, prompt, new_tokens):
    b = inference_memory(model_spec(model), batch=batch, prompt=prompt, new_tokens=new_tokens, quant=quant, attn=attn)
    for t in b.terms:
        assert evaluate(t.formula) == t.gpu, (t.name, t.formula, t.gpu)
    _check_phases(b.as_dict())


def _check_phases(out: dict):
    """held throughout + the largest moment = the total; a term is alive in a phase at most whole;
    the bar's segments alive at the peak add up to the total, and each term's segments to the term."""
    terms = {t["name"]: t["gpu"] for t in out["terms"]}
    held, *moments = out["phases"]
    assert held["bytes"] + max(p["bytes"] for p in moments) == out["total_gpu_bytes"]
    for phase in out["phases"]:
        assert phase["bytes"] == sum(phase["parts"].values())
        assert all(0 < n <= terms[name] for name, n in phase["parts"].items()), phase
    assert not set(held["parts"]) & {name for p in moments for name in p["parts"]}
    bar = bar_segments(out)
    assert sum(s["bytes"] for s in bar if s["at_peak"]) == out["total_gpu_bytes"]
    for name, n in terms.items():
        assert sum(s["bytes"] for s in bar if s["term"] == name) == n


@pytest.mark.parametrize("args", [
    ["--model", "llama-2-7b", "--method", "qlora", "--targets", "all-linear", "--rank", "16", "--seq", "2048",
     "--grad-ckpt", "full"],
    ["--model", "llama-2-70b", "--method", "full", "--gpus", "8", "--zero", "3", "--optimizer", "adamw8bit"],
    ["--model", "mixtral-8x7b", "--method", "lora", "--gpus", "4", "--zero", "full-shard", "--attn", "eager"],
    ["--model", "llama-3-8b", "--inference", "--method", "qlora", "--seq", "4096", "--attn", "eager"],
], ids=["qlora", "zero3-8bit", "fsdp-eager", "inference"])
def test_explain_prints_numbers_that_add_up_to_the_terms_and_the_total(args, capsys):
    assert main(["vram", *args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert main(["vram", *args, "--explain"]) == 0
    text = capsys.readouterr().out
    section = text.split("How each term is computed", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    entries = []  # an entry starts two spaces in; its wrapped lines four
    for line in section:
        assert len(line) <= 100
        if line.startswith("    "):
            entries[-1] += " " + line.strip()
        else:
            entries.append(line.strip())
    printed = {}
    for entry in entries:
        name, rest = entry.split(": ", 1)
        formula, result = rest.rsplit(" = ", 1)
        printed[name] = (formula, int(result.removesuffix(" B").replace(",", "")))
    for t in out["terms"]:
        formula, result = printed[t["name"]]
        assert evaluate(formula) == result == t["gpu"], (t["name"], formula)
    total_formula, total = printed["total on the GPU"]
    numbers = [int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", total_formula.split(" = ")[1])]
    assert numbers[0] + max(numbers[1:]) == total == out["total_gpu_bytes"]
    for phase in out["phases"]:
        formula, result = printed[phase["name"]]
        assert (evaluate(formula) if phase["parts"] else 0) == result == phase["bytes"]
