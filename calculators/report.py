"""What `python -m minilora.calc` prints: the answer first, then how it was reached, then the settings.

Everything here reads the answer object that --json prints (cli.run), so the page and the text say
the same: `answer_line` (the first line), `peak_explained` (why the terms add up to more than the
peak: which are alive together), `bar_segments` (the stacked bar of the page and of --plot) and
`render` (the text, every line within WIDTH columns).
"""
from __future__ import annotations

import textwrap

from .gpus import GPUS, GiB

__all__ = ["WIDTH", "answer_line", "peak_explained", "bar_segments", "render", "explain_lines"]

WIDTH = 100


def _gib(n: int) -> str:
    return f"{n / GiB:,.2f} GiB"


def _wrap(text: str, indent: str = "", first: str = "", width: int = WIDTH) -> list[str]:
    """`text` in lines of at most `width` columns; a number stays on the line of its unit (12 B)."""
    glued = text.replace(" B", "\0B").replace(" GiB", "\0GiB")
    lines = textwrap.wrap(glued, width, initial_indent=first, subsequent_indent=indent, break_on_hyphens=False)
    return [line.replace("\0", " ") for line in lines]


# --- the answer line, per command -------------------------------------------------------------------

def answer_line(command: str, out: dict) -> str:
    """The one-sentence answer a command prints first (and the page shows)."""
    return {"params": _params_answer, "vram": _vram_answer, "fit": _fit_answer, "cost": _cost_answer}[command](out)


def _params_answer(out: dict) -> str:
    total = f"{out['params']:,} parameters"
    if "active_params" in out:  # mixture of experts
        total += f" ({out['active_params']:,} active per token)"
    if "lora_trainable" not in out:
        return f"{total}, all trained (full fine-tuning)"
    return (f"{total}; LoRA trains {out['lora_trainable']:,} "
            f"({out['lora_percent']:.4f}% of all) in {out['lora_layers']:,} layers")


def _vram_answer(out: dict) -> str:
    total, peak = out["total_gpu_bytes"], out["peak_bytes"]
    text = f"{_gib(total)} per GPU (peak {_gib(peak)} allocated"
    text += f" + {_gib(total - peak)} CUDA context)" if total > peak else ")"
    if out["cpu_bytes"]:
        text += f" and {_gib(out['cpu_bytes'])} of host memory"
    gpu = out["gpu"]
    if gpu:
        spare = gpu["memory"] - total
        return text + (f": fits on {gpu['name']} ({_gib(gpu['memory'])}, {_gib(spare)} to spare)" if spare >= 0
                       else f": does not fit on {gpu['name']} ({_gib(gpu['memory'])}), {_gib(-spare)} over")
    if not out["fits_on"]:
        largest = max(GPUS.values(), key=lambda g: g.memory)
        return text + (f": fits on no GPU in the table (the largest, {largest.name}, has "
                       f"{_gib(largest.memory)}); try --gpus with --zero, or `fit`")
    smallest = out["fits_on"][0]["memory"]
    tier = [g["name"] for g in out["fits_on"] if g["memory"] == smallest]
    larger = len(out["fits_on"]) - len(tier)
    return text + (f": fits on {smallest / GiB:g} GiB GPUs ({', '.join(tier)})"
                   + (f" and the {larger} larger ones in the table" if larger else ""))


def _fit_answer(out: dict) -> str:
    gpu = f"{out['gpu']['name']} ({_gib(out['gpu']['memory'])})"
    if "methods" in out:
        verdicts = []
        for method in dict.fromkeys(r["method"] for r in out["methods"]):
            rows = [r for r in out["methods"] if r["method"] == method]
            fitting = [r for r in rows if r["fits"]]
            verdicts.append(f"{method} does not fit" if not fitting else f"{method} fits" if fitting[0] is rows[0]
                            else f"{method} fits with --grad-ckpt {fitting[0]['grad_ckpt']}")
        return f"on {gpu}: " + ", ".join(verdicts)
    if out["largest"]:
        limit = (f" (the model's max_position_embeddings; memory alone would allow {out['memory_alone']:,})"
                 if "memory_alone" in out else "")
        return f"largest {out['search']} that fits on {gpu}: {out['largest']:,}{limit}"
    alt = ", ".join(f"{r['method']} (grad-ckpt {r['grad_ckpt']}, {_gib(r['total_gpu'])})"
                    for r in out.get("alternatives", [])) or "nothing at batch 1: more GPUs (--gpus/--zero) or a larger GPU"
    return f"does not fit on {gpu} even at {out['search']} 1; what would: {alt}"


def _cost_answer(out: dict) -> str:
    c = out["cost"]
    return (f"{c['dollars']:,.2f} USD: {c['gpu_hours']:,.2f} GPU-hours ({c['hours']:,.2f} h of wall-clock on "
            f"{c['assumptions']['gpus']} x {out['gpu']['name']})")


# --- what is alive at the peak -----------------------------------------------------------------------

def _peak_phase(out: dict) -> dict:
    return max(out["phases"][1:], key=lambda p: p["bytes"])  # the first of equals, as max() in memory.py


def bar_segments(out: dict) -> list[dict]:
    """The stacked bar: each term's bytes alive at the peak (these add up to the total on the GPU),
    then the bytes of terms alive only at another moment."""
    held, peak = out["phases"][0]["parts"], _peak_phase(out)["parts"]
    now, later = [], []
    for t in out["terms"]:
        alive = held.get(t["name"], 0) + peak.get(t["name"], 0)
        if alive:
            now.append({"term": t["name"], "bytes": alive, "at_peak": True})
        if t["gpu"] > alive:
            later.append({"term": t["name"], "bytes": t["gpu"] - alive, "at_peak": False})
    return now + later


def _names(phase: dict, terms: dict) -> str:
    return " + ".join(name if n == terms[name] else f"{_gib(n)} of the {name}" for name, n in phase["parts"].items())


def peak_explained(out: dict) -> str:
    """In words: which terms are alive together, and so why the peak is not the terms' sum."""
    terms = {t["name"]: t["gpu"] for t in out["terms"]}
    held, peak = out["phases"][0], _peak_phase(out)
    summed, total = sum(terms.values()), out["total_gpu_bytes"]
    text = (f"The terms add up to {_gib(summed)}, "
            + ("the total: they are all alive together. " if summed == total else
               f"more than the {_gib(total)} total, because they are not all alive at once. ")
            + f"Held throughout: {_names(held, terms)} ({_gib(held['bytes'])}). "
            + f"The peak is at {peak['name']}, which adds {_names(peak, terms) or 'nothing'} "
            + f"({_gib(peak['bytes'])}).")
    for phase in out["phases"][1:]:
        if phase is not peak and phase["bytes"]:
            text += f" {phase['name'].capitalize()} adds {_names(phase, terms)} ({_gib(phase['bytes'])})."
    return text


# --- the text -----------------------------------------------------------------------------------------

def render(command: str, out: dict, explain: bool = False) -> str:
    lines = _wrap(out["answer"], "  ")
    if command == "vram":
        lines += ["", *_terms_table(out["terms"]), "", *_wrap(out["peak_explained"])]
        if out.get("recipe"):   # training: the code the answer is for
            lines += ["", *_wrap(f"recipe ({out['stack']}): {out['recipe']}", "  ")]
        if explain:
            lines += ["", *explain_lines(out)]
    elif command == "fit" and "methods" in out:
        rows = [(r["method"], r["grad_ckpt"], _gib(r["total_gpu"]), "fits" if r["fits"] else "does not fit")
                for r in out["methods"]]
        lines += ["", *_table([("method", "grad-ckpt", "GPU total", "verdict"), *rows])]
    elif command == "cost":
        lines += ["", *_cost_table(out["cost"])]
    return "\n".join(lines + ["", *_settings_lines(out["settings"])])


def _table(rows, right=()) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(str(v).rjust(w) if i in right else str(v).ljust(w) for i, (v, w) in enumerate(zip(r, widths)))
            .rstrip() for r in rows]


def _terms_table(terms: list) -> list[str]:
    """term | GPU | CPU (when any term has host bytes) | assumption, wrapped within WIDTH."""
    host = any(t["cpu"] for t in terms)
    total = ("sum of the terms", _gib(sum(t["gpu"] for t in terms)), _gib(sum(t["cpu"] for t in terms)) if host else "")
    rows = [("term", "GPU", "CPU" if host else "")] + [
        (t["name"], _gib(t["gpu"]), (_gib(t["cpu"]) if t["cpu"] else "") if host else "") for t in terms] + [total]
    left = _table([r if host else r[:2] for r in rows], right=(1, 2))
    indent = max(len(line) for line in left) + 2
    lines = []
    for i, line in enumerate(left):
        text = "assumption" if i == 0 else terms[i - 1]["assumption"] if i <= len(terms) else ""
        wrapped = _wrap(text, width=WIDTH - indent) or [""]
        lines.append((line.ljust(indent) + wrapped[0]).rstrip())
        lines += [" " * indent + w for w in wrapped[1:]]
    return lines


# cost.py's assumptions that the settings already show, and the FLOPs rule printed with its value
_COST_SHOWN_ELSEWHERE = ("flops per token", "mfu", "gpus", "tokens", "epochs", "price per GPU-hour")


def _cost_table(c: dict) -> list[str]:
    rows = [("FLOPs per token", f"{c['flops_per_token']:.3e} ({c['assumptions']['flops per token']})"),
            ("total FLOPs", f"{c['total_flops']:.3e}"), ("wall-clock hours", f"{c['hours']:,.2f}"),
            ("GPU-hours", f"{c['gpu_hours']:,.2f}"), ("cost (USD)", f"{c['dollars']:,.2f}")]
    rows += [(k, str(v)) for k, v in c["assumptions"].items() if k not in _COST_SHOWN_ELSEWHERE]
    width = max(len(k) for k, _ in rows) + 2
    return [line for k, v in rows for line in _wrap(v, " " * width, k.ljust(width))]


def _settings_lines(settings: dict) -> list[str]:
    rest = {k: v for k, v in settings.items() if k != "model"}
    lines = _wrap(f"model {settings['model']}", "  ", "") if "model" in settings else []
    return lines + _wrap(", ".join(f"{k} {v}" for k, v in rest.items()), " " * 10, "settings: ")


def explain_lines(out: dict) -> list[str]:
    """Each term's formula with the numbers put in, then how the terms make the total on the GPU."""
    lines = ["How each term is computed, in bytes (a number before B is bytes per element):"]
    for t in out["terms"]:
        lines += _wrap(f"{t['name']}: {t['formula']} = {t['gpu']:,} B", "    ", "  ")
    held, moments = out["phases"][0], out["phases"][1:]
    names = ", ".join(p["name"] for p in moments)
    values = ", ".join(f"{p['bytes']:,}" for p in moments)
    lines += _wrap(f"total on the GPU: held throughout + max({names}) = {held['bytes']:,} + max({values}) "
                   f"= {out['total_gpu_bytes']:,} B", "    ", "  ")
    for p in out["phases"]:
        parts = " + ".join(f"{n:,} {name}" for name, n in p["parts"].items()) or "0"
        lines += _wrap(f"{p['name']}: {parts} = {p['bytes']:,} B", "    ", "  ")
    return lines
