"""The README's "Popular claims" table is what the calculator prints today: each row's flags are run
and its peak, total and host memory compared to the figures written there (to their two decimals)."""
import json
import re
from pathlib import Path

import pytest

from calculators.cli import main

README = Path(__file__).resolve().parent.parent / "README.md"
BASE = ["--model", "llama-2-7b", "--targets", "all-linear", "--rank", "16"]


def claim_rows() -> list[list[str]]:
    section = README.read_text().split("### Popular claims, run through the calculator", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows[1:]]  # the header row left out


def test_the_table_has_the_rows_the_claims_need():
    rows = claim_rows()
    assert len(rows) >= 10 and all(len(r) == 6 for r in rows)
    assert {"--stack minilora", "--autocast bf16", "--prepare-kbit no"} <= {f for r in rows for f in re.findall(
        r"--[a-z-]+ [a-z0-9]+", r[2])}


@pytest.mark.parametrize("row", claim_rows(), ids=lambda r: r[2].strip("`"))
def test_each_claim_row_is_what_the_cli_prints(row, capsys):
    _, _, flags, peak, total, verdict = row
    assert main(["vram", *BASE, *flags.strip("`").split(), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    gib = 2 ** 30
    assert peak == f"{out['peak_bytes'] / gib:.2f} GiB"
    assert total == f"{out['total_gpu_bytes'] / gib:.2f} GiB"
    host = re.search(r"\+ ([\d.]+) GiB host memory", verdict)
    assert (f"{out['cpu_bytes'] / gib:.1f}" if out["cpu_bytes"] else None) == (host.group(1) if host else None)


# The README's long-context table: its columns' flags (with --stack minilora and the 8B QLoRA base)
LONG_BASE = ["--model", "llama-3.1-8b", "--method", "qlora", "--rank", "16", "--targets", "all-linear", "--grad-ckpt",
             "full", "--stack", "minilora", "--batch", "1"]
LONG_COLUMNS = {"none": [], "chunked loss": ["--loss", "chunked"], "offload": ["--offload-activations"],
                "both": ["--loss", "chunked", "--offload-activations"],
                "both + tiled MLP": ["--loss", "chunked", "--offload-activations", "--mlp-tile", "4096"]}


def long_context_cells() -> list[tuple[str, str, str]]:
    """(row label, column, cell) of every calculator cell of the long-context table."""
    section = README.read_text().split("## Long context on one GPU", 1)[1].split("\n## ", 1)[0]
    lines = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ")]
    header = [cell.strip() for cell in lines[0]]
    return [(row[0].strip(), column, row[header.index(column)].strip()) for row in lines[1:]
            for column in LONG_COLUMNS]


def run_json(argv, capsys) -> dict:
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_long_context_table_has_every_gpu_and_column():
    cells = long_context_cells()
    assert {row for row, _, _ in cells} == {"16 GiB", "24 GiB", "48 GiB", "80 GiB", "peak at 2,048 tokens"}
    assert len(cells) == 5 * len(LONG_COLUMNS)


@pytest.mark.parametrize("row,column,cell", long_context_cells(), ids=lambda v: str(v))
def test_each_long_context_cell_is_what_the_cli_prints(row, column, cell, capsys):
    flags = LONG_BASE + LONG_COLUMNS[column]
    if row.startswith("peak"):
        flags = [("2048" if flag == "4096" else flag) for flag in flags]   # a tile as long as the sequence
        out = run_json(["vram"] + flags + ["--seq", "2048"], capsys)
        want = f"{out['peak_bytes'] / 2 ** 30:.2f} GiB"
        if out["cpu_bytes"]:
            want += f" (host {out['cpu_bytes'] / 2 ** 30:.2f} GiB)"
        assert cell == want
        return
    out = run_json(["fit"] + flags + ["--gpu", row.replace(" GiB", "GB"), "--search", "seq"], capsys)
    want = f"{out['largest']:,}"
    if out.get("model_limit") == out["largest"]:
        want += f"* ({out['memory_alone']:,})"
    assert cell == want
