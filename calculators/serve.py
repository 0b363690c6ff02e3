"""`python -m minilora.calc serve [--port N]`: the vram calculator as a page on this machine.

A stdlib http.server, bound to 127.0.0.1 unless --host says otherwise, serving one HTML page and a
small script (calculators/web/, package data: no build step, nothing fetched from the network)
and a JSON API:

    GET /api/vram?model=llama-2-7b&method=qlora   what `vram --model llama-2-7b --method qlora --json` prints
    GET /api/form                                 the form's fields, from the CLI's flag declarations

The API answers through the function the CLI itself answers with (`cli.answer`, handed in by
`cli.main`, so this module needs nothing else from the CLI): a query parameter is a flag without
its dashes (`grad-ckpt=full`; a switch is `inference=1`), and bad input gets status 400 with the
CLI's one-line message as {"error": ...}. The server reads what the CLI reads, a local config.json
given as --model included, so it listens on the loopback address by default.
"""
from __future__ import annotations

import json
import re
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from urllib.parse import parse_qsl, urlsplit

__all__ = ["serve", "query_to_argv", "make_server"]

_ON, _OFF = ("1", "true", "on", "yes"), ("0", "false", "off", "no", "")
_STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/index.html": ("index.html", "text/html; charset=utf-8"),
           "/app.js": ("app.js", "text/javascript; charset=utf-8")}


def query_to_argv(command: str, query: str, fields: list[dict]) -> list[str]:
    """`model=gpt2&inference=1` -> ["vram", "--model=gpt2", "--inference"]. A key that is no field
    still becomes a flag, so the CLI's parser names it in its error."""
    switches = {f["name"] for f in fields if f["kind"] == "bool"}
    argv = [command]
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in switches and value.lower() in _ON + _OFF:
            argv += [f"--{key}"] if value.lower() in _ON else []
        else:
            argv.append(f"--{key}={value}")  # `=` keeps a value such as -5GB from reading as a flag
    return argv


def _handler(answer, fields: list[dict]):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            url = urlsplit(self.path)
            if url.path in _STATIC:
                name, kind = _STATIC[url.path]
                return self._send(200, (files(__package__) / "web" / name).read_bytes(), kind)
            if url.path == "/api/form":
                return self._json(200, fields)
            api = re.fullmatch(r"/api/(params|vram|fit|cost)", url.path)
            if not api:
                return self._json(404, {"error": f"no page at {url.path}: try / or /api/vram?model=..."})
            try:
                return self._json(200, answer(query_to_argv(api.group(1), url.query, fields)))
            except ValueError as exc:  # cli.CalcError: the line the CLI prints on stderr
                return self._json(400, {"error": str(exc)})

        def _json(self, status: int, body):
            self._send(status, json.dumps(body, indent=2, default=str).encode(), "application/json")

        def _send(self, status: int, body: bytes, kind: str):
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format, *args):  # quiet: a line per request would bury the address
            pass

    return Handler


def make_server(answer, fields: list[dict], host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """The server, bound and ready to serve_forever (port 0: any free port, see server_address)."""
    try:
        return ThreadingHTTPServer((host, port), _handler(answer, fields))
    except OSError as exc:  # the CLI prints it as its one line
        raise OSError(f"cannot serve on {host}:{port}: {exc.strerror or exc}; choose another --port "
                      "(0: any free one)") from None


def serve(answer, fields: list[dict], host: str = "127.0.0.1", port: int = 8000) -> int:
    """Serve until interrupted; prints the page's address first (with the port chosen for port 0)."""
    server = make_server(answer, fields, host, port)
    print(f"the calculator's page: http://{host}:{server.server_address[1]}/ (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0
