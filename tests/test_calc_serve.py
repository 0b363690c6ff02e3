"""`python -m minilora.calc serve`: /api/vram answers what `vram --json` prints for the same flags
(and bad input with the CLI's line), the server binds to 127.0.0.1 and the page fetches nothing
from elsewhere; then the page itself, in a real headless Chromium (Debian's package): fill the
form, read the answer, follow the shareable URL, see an error.

The browser tests need `chromium` on PATH. CI installs it (.ci/run) and sets CI=true, and there a
missing browser fails the run; elsewhere those tests skip, saying why.
"""
import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from urllib.parse import urlencode

import pytest

from calculators.cli import main
from calculators.serve import make_server, query_to_argv
from chromium import Chromium, find_chromium

GRID = [  # (query for /api/vram, the same flags for the CLI)
    ({"model": "llama-2-7b"}, []),
    ({"model": "llama-2-7b", "method": "qlora", "targets": "all-linear", "rank": "16", "seq": "2048",
      "grad-ckpt": "full", "gpu": "6GB"}, []),
    ({"model": "llama-2-70b", "method": "full", "gpus": "8", "zero": "3", "optimizer": "adamw8bit"}, []),
    ({"model": "mixtral-8x7b", "zero": "full-shard", "gpus": "4", "attn": "eager", "dtype": "fp32"}, []),
    ({"model": "llama-2-7b", "method": "full", "optimizer": "offload", "master-weights": "yes", "stack": "minilora",
      "gpu": "a100-40gb"}, []),
    ({"model": "gemma-3-4b", "inference": "1", "seq": "8192", "new-tokens": "1024", "batch": "4"}, ["--inference"]),
    ({"model": "qwen3-0.6b", "method": "qlora", "no-double-quant": "true", "grad-accum": "8"}, ["--no-double-quant"]),
    ({"model": "gpt2", "inference": "0", "dropout": "0.1", "alpha": "32"}, []),
]
BAD = [{"model": "gpt2", "gpu": "0GB"}, {"model": "gpt2", "gpu": "-5GB"}, {"method": "qlora"},
       {"model": "gpt2", "method": "dora"}, {"model": "gpt2", "batch": "0"}, {"model": "gpt2", "colour": "red"},
       {"model": "gpt2", "inference": "maybe"}, {"model": "no-such-model"}]


def _cli_argv(query: dict, switches: list) -> list:
    flags = [f"--{k}={v}" for k, v in query.items() if f"--{k}" not in switches and k != "inference"]
    return ["vram", *flags, *switches]


@pytest.fixture(scope="module")
def server():
    """`python -m minilora.calc serve --port 0` as a user starts it; yields the page's address."""
    proc = subprocess.Popen([sys.executable, "-m", "minilora.calc", "serve", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    url = re.search(r"http://127\.0\.0\.1:\d+/", line)
    assert url, (line, proc.stderr.read() if proc.poll() is not None else "")
    yield url.group(0)
    proc.terminate()
    proc.wait(timeout=30)


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=120) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


@pytest.mark.parametrize("query,switches", GRID, ids=[q["model"] for q, _ in GRID])
def test_api_answer_equals_vram_json(server, query, switches, capsys):
    status, kind, body = _get(server + "api/vram?" + urlencode(query))
    assert (status, kind) == (200, "application/json")
    assert main([*_cli_argv(query, switches), "--json"]) == 0
    assert json.loads(body) == json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("query", BAD, ids=lambda q: ",".join(f"{k}={v}" for k, v in q.items()))
def test_api_bad_input_gets_the_clis_line(server, query, capsys):
    status, _, body = _get(server + "api/vram?" + urlencode(query))
    argv = _cli_argv(query, []) + (["--inference=maybe"] if "inference" in query else [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert status == 400 and json.loads(body) == {"error": err.strip()}
    assert len(err.strip().splitlines()) == 1


def test_the_other_commands_answer_too(server, capsys):
    status, _, body = _get(server + "api/params?" + urlencode({"model": "llama-3-8b", "targets": "all-linear"}))
    assert main(["params", "--model", "llama-3-8b", "--targets", "all-linear", "--json"]) == 0
    assert status == 200 and json.loads(body) == json.loads(capsys.readouterr().out)
    assert _get(server + "api/nothing")[0] == 404


def test_binds_to_the_loopback_address_by_default():
    from calculators.cli import answer, form_fields
    srv = make_server(answer, form_fields(), port=0)
    try:
        assert srv.server_address[0] == "127.0.0.1"
    finally:
        srv.server_close()


def test_a_port_it_cannot_use_is_one_line():
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for args, message in ((["--port", "99999"], "--port: must be a port number in 0..65535, got '99999'"),
                              (["--port", str(port)], f"cannot serve on 127.0.0.1:{port}: ")):
            proc = subprocess.run([sys.executable, "-m", "minilora.calc", "serve", *args], capture_output=True,
                                  text=True, timeout=120)
            assert proc.returncode == 2 and proc.stdout == "", proc
            assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


def test_query_becomes_the_command_line():
    fields = [{"name": "inference", "kind": "bool"}, {"name": "gpu", "kind": "text"}]
    assert query_to_argv("vram", "gpu=-5GB&inference=1", fields) == ["vram", "--gpu=-5GB", "--inference"]
    assert query_to_argv("vram", "inference=off&x=1", fields) == ["vram", "--x=1"]


def test_page_and_script_fetch_nothing_from_the_network(server):
    status, kind, page = _get(server)
    assert status == 200 and kind.startswith("text/html")
    status, kind, script = _get(server + "app.js")
    assert status == 200 and kind.startswith("text/javascript")
    page, script = page.decode(), script.decode()
    assert sorted(re.findall(r'(?:src|href)="([^"]*)"', page)) == ["", "/app.js"]  # the share link; the script
    assert "://" not in page
    assert re.findall(r"https?://[^\"' ]+", script) == ["http://www.w3.org/2000/svg"]  # a namespace, not a fetch
    assert re.findall(r"fetch\(([^)]*)\)", script) and \
        all(arg.startswith('"/api/') for arg in re.findall(r"fetch\(([^)]*)\)", script))


# --- the page in a real browser ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    if not find_chromium():
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it and runs these tests")
    with Chromium() as b:
        yield b


def _shown(page, query: str | None = None) -> dict:
    """Wait until the page shows an answer (for `query` when given) and read what it shows."""
    done = "document.body.dataset.state === 'ok' || document.body.dataset.state === 'error'"
    if query is not None:
        done = f"({done}) && document.body.dataset.query === {json.dumps(query)}"
    page.wait_for(done)
    return page.evaluate("""(() => ({
        state: document.body.dataset.state, url: location.href,
        answer: document.getElementById('answer').textContent,
        error: document.getElementById('error').textContent,
        form: Object.fromEntries([...document.querySelectorAll('#form input, #form select')].map(
            (el) => [el.name, el.type === 'checkbox' ? el.checked : el.value])),
        segments: [...document.querySelectorAll('#bar rect[data-term]')].map((r) => ({
            term: r.dataset.term, bytes: Number(r.dataset.bytes), at_peak: r.dataset.atPeak === 'true',
            width: Number(r.getAttribute('width'))})),
        rows: document.querySelectorAll('#terms tr').length - 1,
        resources: performance.getEntriesByType('resource').map((e) => e.name),
    }))()""")


def _select(page, name: str, value: str):
    page.evaluate(f"(() => {{ const el = document.getElementById('f-{name}'); el.value = {json.dumps(value)}; "
                  "el.dispatchEvent(new Event('change', {bubbles: true})); })()")


def test_page_fills_the_form_and_shows_the_clis_answer(server, browser, capsys, tmp_path):
    page = browser.open(server)
    first = _shown(page)
    assert first["state"] == "ok" and first["form"]["model"] and "?model=" in first["url"]
    page.type_into("#f-model", "mistral-7b")
    _select(page, "method", "full")
    _select(page, "grad-ckpt", "full")
    page.type_into("#f-seq", "2048")
    page.type_into("#f-gpu", "a100-80gb")
    page.evaluate("document.getElementById('f-no-double-quant').click()")
    query = "model=mistral-7b&method=full&seq=2048&grad-ckpt=full&no-double-quant=1&gpu=a100-80gb"
    shown = _shown(page, query)
    assert main(["vram", "--model", "mistral-7b", "--method", "full", "--seq", "2048", "--grad-ckpt", "full",
                 "--no-double-quant", "--gpu", "a100-80gb", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert shown["state"] == "ok" and shown["answer"] == out["answer"]
    assert shown["rows"] == len(out["terms"])
    assert [{k: s[k] for k in ("term", "bytes", "at_peak")} for s in shown["segments"]] == out["bar"]
    scale = sum(s["width"] for s in shown["segments"]) / sum(s["bytes"] for s in shown["segments"])
    assert all(s["width"] == pytest.approx(s["bytes"] * scale, abs=0.01) for s in shown["segments"])
    assert all(r.startswith(server) for r in shown["resources"]), shown["resources"]
    shot = page.screenshot(tmp_path / "page.png")
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 20_000

    # the shareable URL: a new tab at that address shows the same form and the same answer
    again = _shown(browser.open(shown["url"]), query)
    assert (again["form"], again["answer"], again["url"]) == (shown["form"], shown["answer"], shown["url"])

    # bad input: the CLI's one line, and no stale answer beside it
    page.type_into("#f-gpu", "0GB")
    bad = _shown(page, query.replace("a100-80gb", "0GB"))
    assert main(["vram", "--model", "mistral-7b", "--method", "full", "--seq", "2048", "--grad-ckpt", "full",
                 "--no-double-quant", "--gpu", "0GB"]) == 2
    assert bad["state"] == "error" and bad["error"] == capsys.readouterr().err.strip() and bad["answer"] == ""
    assert bad["segments"] == []
