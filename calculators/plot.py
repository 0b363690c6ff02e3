"""`vram --plot FILE.png|FILE.svg`: the memory terms as one stacked bar against the GPU's memory.

The bar is `report.bar_segments`: first what is alive at the peak (solid; it ends at the total on
the GPU), then what is alive only at another moment of the step (faded and hatched). A dashed
line marks the GPU: the one given with --gpu, else the smallest in the table it fits on (none if
it fits on none). In an SVG
each segment is a group with the id `bar:<term, spaces as _>:<peak|later>`.

matplotlib is an optional extra (`pip install 'minilora[plot]'`); it is imported here only, and
without pyplot, so no global backend is chosen for the caller.
"""
from __future__ import annotations

import os
import tempfile
import textwrap
from pathlib import Path

from .gpus import GiB

__all__ = ["save_bar", "segment_id", "marked_gpu"]


def segment_id(term: str, at_peak: bool) -> str:
    return f"bar:{term.replace(' ', '_')}:{'peak' if at_peak else 'later'}"


def marked_gpu(out: dict) -> dict | None:
    """The GPU the bar is drawn against: --gpu's, else the smallest in the table it fits on."""
    return out["gpu"] or (out["fits_on"][0] if out["fits_on"] else None)


def save_bar(out: dict, path: str) -> None:
    """Draw `out` (a `vram` answer) into `path` (.png or .svg), written atomically."""
    from matplotlib.figure import Figure

    colors = {t["name"]: f"C{i % 10}" for i, t in enumerate(out["terms"])}
    fig = Figure(figsize=(10, 3.2), layout="constrained")
    ax = fig.add_subplot()
    left, at_peak = 0.0, {seg["term"] for seg in out["bar"] if seg["at_peak"]}
    for seg in out["bar"]:
        width = seg["bytes"] / GiB
        bars = ax.barh(0, width, left=left, height=0.5, color=colors[seg["term"]], edgecolor="white",
                       alpha=1.0 if seg["at_peak"] else 0.35, hatch=None if seg["at_peak"] else "//",
                       label=seg["term"] if seg["at_peak"] or seg["term"] not in at_peak else None)
        bars.patches[0].set_gid(segment_id(seg["term"], seg["at_peak"]))
        left += width
    gpu = marked_gpu(out)
    memory = gpu["memory"] if gpu else 0
    if gpu:
        ax.axvline(memory / GiB, color="black", linestyle="--", linewidth=1.2)
        ax.text(memory / GiB, 0.33, f"{gpu['name']}: {memory / GiB:g} GiB ", va="bottom", ha="right")
    total = out["total_gpu_bytes"] / GiB
    ax.axvline(total, color="black", linewidth=0.8)
    ax.text(total, -0.33, f" total {total:,.2f} GiB", va="top")
    ax.set_yticks([])
    ax.set_ylim(-0.6, 0.6)
    ax.set_xlim(0, max(left, memory / GiB) * 1.08)
    ax.set_xlabel("GiB (solid: alive together at the peak; hatched: alive at another moment of the step)")
    ax.set_title("\n".join(textwrap.wrap(out["answer"], 110)), fontsize=9)
    fig.legend(loc="outside lower center", ncol=5, fontsize=8, frameon=False)
    _save_atomically(fig, Path(path))


def _save_atomically(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format=path.suffix[1:].lower(), dpi=110)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
