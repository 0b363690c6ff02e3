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
