"""Regenerate the README's screenshot of the calculator's page (docs/calc-page.png).

    python scripts/calc_page_screenshot.py [--out docs/calc-page.png] [--query "model=...&method=..."]

Serves the page in this process (the same server and answer as `python -m minilora.calc serve`),
opens it in a headless Chromium (tests/chromium.py; apt-get install chromium) and saves a PNG.
"""
from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from calculators.cli import answer, form_fields  # noqa: E402
from calculators.serve import make_server  # noqa: E402
from chromium import Chromium  # noqa: E402

QUERY = "model=llama-3-8b&method=qlora&targets=all-linear&rank=16&seq=2048&grad-ckpt=full&gpu=rtx-4090"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "docs" / "calc-page.png"), help="PNG to write")
    ap.add_argument("--query", default=QUERY, help="the page's inputs, as in its shareable URL")
    args = ap.parse_args()
    server = make_server(answer, form_fields(), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with Chromium() as browser:
            page = browser.open(f"http://127.0.0.1:{server.server_address[1]}/?{args.query}", 1280, 860)
            page.wait_for("document.body.dataset.state === 'ok'")
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(args.out)
    finally:
        server.shutdown()
        server.server_close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
