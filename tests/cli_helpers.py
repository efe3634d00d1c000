"""Helpers for the ``agt-mesh`` subprocess tests (``test_cli*.py``)."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
#: environment variables the CLI reads; never inherited from the developer's shell
CLI_ENV = (
    "AGT_MESH_HOME",
    "AGT_RELAY_URL",
    "AGT_REGISTRY_URL",
    "AGT_PROFILE",
    "AGENTMESH_RELAY_TOKEN",
    "AGT_RELAY_TOKEN",
)


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLI_ENV}
    env.update(extra)
    return env


@dataclass
class Result:
    code: int
    out: str
    err: str
    seconds: float

    def json(self) -> Any:
        return json.loads(self.out)

    def json_lines(self) -> list[Any]:
        return [json.loads(line) for line in self.out.splitlines() if line.strip()]

    def __str__(self) -> str:
        return f"exit {self.code} after {self.seconds:.2f} s\n--- stdout\n{self.out}--- stderr\n{self.err}"


def cli(*args: str, env: dict[str, str] | None = None, input: str | None = None, timeout: float = 60) -> Result:
    """Run ``python -m agt_mesh ARGS`` and collect the result."""
    t0 = time.monotonic()
    proc = subprocess.run(
        [PY, "-m", "agt_mesh", *args],
        capture_output=True,
        text=True,
        env=env if env is not None else clean_env(),
        input=input,
        timeout=timeout,
        cwd=ROOT,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)


def ok(*args: str, **kw: Any) -> Result:
    """``cli`` that must exit 0."""
    res = cli(*args, **kw)
    assert res.code == 0, str(res)
    return res


def new_identity(state: Path, env: dict[str, str] | None = None) -> str:
    state.mkdir(mode=0o700, exist_ok=True)
    return str(ok("identity", "new", "--state-dir", str(state), "--json", env=env).json()["did"])


class Listener:
    """``agt-mesh listen`` in the background; ``ready()`` waits for its 'listening as' line."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [PY, "-m", "agt_mesh", "listen", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env if env is not None else clean_env(),
            cwd=ROOT,
        )
        self.err_lines: list[str] = []
        self.out_lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read_err, daemon=True)
        self._reader.start()
        self._out_reader = threading.Thread(target=self._read_out, daemon=True)
        self._out_reader.start()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.out_lines.append(line)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err_lines.append(line)
            if "listening as" in line:
                self._ready.set()
        self._ready.set()

    def ready(self, timeout: float = 30) -> Listener:
        assert self._ready.wait(timeout), "listen did not start: " + "".join(self.err_lines)
        assert self.proc.poll() is None, f"listen exited {self.proc.returncode}: " + "".join(self.err_lines)
        return self

    def result(self, timeout: float = 30) -> Result:
        # not communicate(): the reader threads own stdout and stderr
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"listen did not exit within {timeout} s: {''.join(self.err_lines)}") from None
        self._reader.join(5)
        self._out_reader.join(5)
        return Result(
            self.proc.returncode, "".join(self.out_lines), "".join(self.err_lines), time.monotonic() - self.t0
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def blackhole() -> Iterator[str]:
    """An ``http://`` URL whose TCP connections are accepted by the kernel and never answered."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@contextlib.contextmanager
def rate_limited_registry() -> Iterator[str]:
    """A registry stand-in that answers every request with 429 and ``Retry-After: 7``."""

    class Handler(BaseHTTPRequestHandler):
        def _reply(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            if length:
                self.rfile.read(length)
            body = b'{"detail": "Rate limit exceeded"}'
            self.send_response(429)
            self.send_header("content-type", "application/json")
            self.send_header("retry-after", "7")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _reply

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@contextlib.contextmanager
def skewed_registry(offset: float) -> Iterator[str]:
    """A registry stand-in whose ``Date`` header is ``offset`` seconds off; it knows nobody."""
    import email.utils

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b'{"status": "healthy"}' if self.path == "/health" else b'{"detail": "Agent not found"}'
            self.send_response(200 if self.path == "/health" else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def date_time_string(self, timestamp: float | None = None) -> str:
            return email.utils.formatdate(time.time() + offset, usegmt=True)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class TSPeer:
    """``interop/ts_peer.js``: a real npm 4.0.0 ``MeshClient`` driven over JSON lines."""

    def __init__(self, log: Path) -> None:
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            ["node", str(ROOT / "interop" / "ts_peer.js")],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=ROOT,
        )
        self.replies: queue.Queue[dict[str, Any]] = queue.Queue()
        self.events: list[dict[str, Any]] = []
        self._next = 0
        threading.Thread(target=self._read, daemon=True).start()
        self.did = ""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            (self.events.append if "event" in obj else self.replies.put)(obj)

    def call(self, cmd: str, timeout: float = 30, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self._next += 1
        self.proc.stdin.write(json.dumps({"id": self._next, "cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"ts peer: no answer to {cmd} within {timeout} s") from None
        assert reply.get("ok"), f"ts peer: {cmd} failed: {reply} (events: {self.events})"
        return reply

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("quit", timeout=5)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
