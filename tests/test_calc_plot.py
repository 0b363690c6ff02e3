"""`vram --plot FILE.svg|FILE.png`: one bar segment per term (a term alive at the peak in part has
two: the part alive then and the rest), sized by its bytes, read back from the SVG itself; a PNG
is written with every term's colour in it; without matplotlib one clear line."""
import json
import os
import re
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from calculators.cli import main
from calculators.plot import segment_id



@pytest.fixture
def matplotlib():
    """The plot extra: CI installs it (.ci/run), so there a missing one fails; elsewhere it skips."""
    try:
        import matplotlib
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail("matplotlib is missing: CI installs the plot extra (pip install -e '.[plot]')")
        pytest.skip("matplotlib is not installed: pip install 'minilora[plot]'")
    return matplotlib

CASES = [
    ["--model", "llama-2-7b", "--method", "qlora", "--targets", "all-linear", "--rank", "16", "--seq", "2048",
     "--grad-ckpt", "full"],
    ["--model", "llama-2-7b", "--method", "full", "--optimizer", "offload", "--gpu", "rtx-4090"],
    ["--model", "llama-2-70b", "--method", "full", "--gpus", "8", "--zero", "3", "--grad-accum", "4"],
    ["--model", "gemma-3-4b", "--inference", "--seq", "8192", "--gpu", "t4"],
]


def _answer(args, capsys) -> dict:
    assert main(["vram", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _x_extent(path_d: str) -> float:
    xs = [float(x) for x, _ in re.findall(r"(-?[\d.]+) (-?[\d.]+)", path_d)]
    return max(xs) - min(xs)


@pytest.mark.parametrize("args", CASES, ids=["qlora", "offload", "zero3", "inference"])
def test_svg_has_one_segment_per_term_sized_by_its_bytes(args, tmp_path, capsys, matplotlib):
    out = _answer(args, capsys)
    path = tmp_path / "bar.svg"
    assert main(["vram", *args, "--plot", str(path)]) == 0
    assert f"wrote the stacked bar to {path}" in capsys.readouterr().out
    groups = {g.get("id"): g for g in ET.parse(path).iter("{http://www.w3.org/2000/svg}g")
              if (g.get("id") or "").startswith("bar:")}
    assert list(groups) == [segment_id(s["term"], s["at_peak"]) for s in out["bar"]]
    # every term with bytes on the GPU is in the bar, whole: its segments add up to it
    terms = {t["name"]: t["gpu"] for t in out["terms"] if t["gpu"]}
    assert {s["term"] for s in out["bar"]} == set(terms)
    widths = [_x_extent(next(g.iter("{http://www.w3.org/2000/svg}path")).get("d")) for g in groups.values()]
    scale = sum(widths) / sum(s["bytes"] for s in out["bar"])
    for s, width in zip(out["bar"], widths):
        assert width == pytest.approx(s["bytes"] * scale, abs=0.02), s
    # the segments alive at the peak end at the total on the GPU
    assert sum(s["bytes"] for s in out["bar"] if s["at_peak"]) == out["total_gpu_bytes"]
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file was renamed into place"


def test_png_is_written_with_each_terms_colour(tmp_path, capsys, matplotlib):
    from matplotlib.colors import to_rgb
    from matplotlib.image import imread

    out = _answer(CASES[0], capsys)
    path = tmp_path / "bar.png"
    path.write_bytes(b"an older file")  # replaced whole
    assert main(["vram", *CASES[0], "--plot", str(path)]) == 0
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 250
    pixels = {tuple(round(c * 255) for c in px[:3]) for row in imread(str(path)) for px in row}
    colours = {t["name"]: to_rgb(f"C{i % 10}") for i, t in enumerate(out["terms"])}
    wide = [s["term"] for s in out["bar"] if s["at_peak"] and s["bytes"] > 0.01 * out["total_gpu_bytes"]]
    assert len(wide) >= 4
    for term in wide:
        assert tuple(round(c * 255) for c in colours[term]) in pixels, term


def test_plot_without_matplotlib_is_one_clear_line(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; from calculators.cli import main; "
            f"sys.exit(main(['vram', '--model', 'gpt2', '--plot', {str(tmp_path / 'bar.png')!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == "", proc
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert "--plot needs matplotlib" in proc.stderr and "pip install 'minilora[plot]'" in proc.stderr
    assert not list(tmp_path.iterdir())
