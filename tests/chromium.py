"""A headless Chromium driven over the DevTools protocol with the standard library only: enough to
open a page, run JavaScript in it, type into it and take a screenshot (tests/test_calc_page.py,
scripts/calc_page_screenshot.py). The websocket is RFC 6455 by hand: text frames, masked, no
extensions, which is all the DevTools endpoint needs.

    with Chromium() as browser:
        page = browser.open("http://127.0.0.1:8000/")
        page.wait_for("document.readyState === 'complete'")
        title = page.evaluate("document.title")
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = ["Chromium", "Page", "find_chromium", "CHROMIUM_FLAGS"]

# Debian's chromium as a test browser: no sandbox (CI runs as root), no GPU, and nothing that
# reaches the network on its own (the page must not need it either)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-port=0"]


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


class WebSocket:
    def __init__(self, url: str, timeout: float = 60):
        host, port, path = re.fullmatch(r"ws://([^/:]+):(\d+)(/.*)", url).groups()
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(f"websocket handshake refused: {head[:200]!r}")

    def _recv(self) -> bytes:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("the browser closed the connection")
        return chunk

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self.buffer += self._recv()
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def _frame(self, opcode: int, data: bytes):
        n = len(data)
        header = bytes([0x80 | opcode]) + (bytes([0x80 | n]) if n < 126 else
                                           bytes([0x80 | 126]) + struct.pack(">H", n) if n < 1 << 16 else
                                           bytes([0x80 | 127]) + struct.pack(">Q", n))
        mask = os.urandom(4)
        masked = (int.from_bytes(data, "big") ^ int.from_bytes((mask * (n // 4 + 1))[:n], "big")).to_bytes(n, "big")
        self.sock.sendall(header + mask + masked)

    def send(self, text: str):
        self._frame(0x1, text.encode())

    def recv(self) -> str:
        message = b""
        while True:
            b0, b1 = self._read(2)
            n = b1 & 0x7F
            if n >= 126:
                n = struct.unpack(">H" if n == 126 else ">Q", self._read(2 if n == 126 else 8))[0]
            mask = self._read(4) if b1 & 0x80 else b""
            payload = self._read(n)
            if mask:
                payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            opcode = b0 & 0x0F
            if opcode == 0x8:
                raise ConnectionError("the browser closed the websocket")
            if opcode == 0x9:
                self._frame(0xA, payload)
                continue
            message += payload
            if b0 & 0x80:
                return message.decode()

    def close(self):
        self.sock.close()


class Chromium:
    """A headless Chromium with its own temporary profile; `with` closes it and removes the profile."""

    def __init__(self, binary: str | None = None, timeout: float = 60):
        binary = binary or find_chromium()
        if not binary:
            raise FileNotFoundError("no chromium on PATH: apt-get install chromium")
        self.profile = tempfile.mkdtemp(prefix="minilora-chromium-")
        self.log = open(Path(self.profile) / "stderr.log", "wb")
        self.proc = subprocess.Popen([binary, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "about:blank"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log)
        # Chromium writes its DevTools port and browser path here once it listens
        active = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not (active.is_file() and len(active.read_text().split()) >= 2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise RuntimeError(f"chromium did not start: {(Path(self.profile) / 'stderr.log').read_text()[-2000:]}")
            time.sleep(0.1)
        port, path = active.read_text().split()[:2]
        self.ws = WebSocket(f"ws://127.0.0.1:{port}{path}", timeout)
        self.last_id = 0

    def call(self, method: str, session: str | None = None, **params):
        """One DevTools command; events that arrive meanwhile are dropped (pages are polled instead)."""
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        self.ws.send(json.dumps(message))
        while True:
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str, width: int = 1280, height: int = 900) -> "Page":
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        page = Page(self, session)
        page.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        page.call("Page.navigate", url=url)
        return page

    def close(self):
        if getattr(self, "ws", None):
            try:
                self.call("Browser.close")
            except (OSError, RuntimeError):
                pass
            self.ws.close()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Page:
    def __init__(self, browser: Chromium, session: str):
        self.browser, self.session = browser, session

    def call(self, method: str, **params):
        return self.browser.call(method, self.session, **params)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression (a promise is awaited); a thrown error raises."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        while True:
            try:
                value = self.evaluate(expression)
            except RuntimeError:  # e.g. the page is still navigating
                value = None
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {timeout} s for {expression}")
            time.sleep(0.1)

    def type_into(self, selector: str, text: str):
        """Focus an input, select what it holds and type `text` over it, as a user would."""
        self.evaluate(f"(() => {{ const el = document.querySelector({json.dumps(selector)}); el.focus(); "
                      f"el.select(); }})()")
        self.call("Input.insertText", text=text)

    def screenshot(self, path) -> bytes:
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        Path(path).write_bytes(data)
        return data
