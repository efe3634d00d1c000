"""A registry that lies: an HTTP proxy in front of a real registry that rewrites bundles.

It stands for a compromised registry, or anyone on a plain-http path to one.  Every
request is forwarded unchanged, except ``GET /v1/agents/{victim}/prekeys``, whose answer
is replaced according to :attr:`LyingRegistry.mode`:

* ``swap`` — the attacker's whole bundle (its own Ed25519 key, X25519 key and signed
  pre-key, correctly signed: only the DID binding can tell);
* ``x25519`` — the victim's bundle with the attacker's X25519 identity key in it (the
  signature over the signed pre-key still verifies);
* ``honest`` — nothing rewritten.

Runs in a thread (``http.server``) on 127.0.0.1; ``rewritten`` counts the lies told.
"""

from __future__ import annotations

import http.server
import json
import threading
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote

_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "accept-encoding"}


class LyingRegistry:
    def __init__(self, upstream: str, victim: str, attacker: str, mode: str = "swap") -> None:
        self.upstream = upstream.rstrip("/")
        self.victim = victim
        self.attacker = attacker
        self.mode = mode
        self.rewritten = 0
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def _fetch(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[int, bytes, dict[str, str]]:
        req = urllib.request.Request(self.upstream + path, data=body, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.read(), dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read(), dict(err.headers)

    def _lie(self, path: str, status: int, body: bytes) -> bytes:
        if self.mode == "honest" or status != 200 or path != f"/v1/agents/{quote(self.victim)}/prekeys":
            return body
        real: dict[str, Any] = json.loads(body)
        _, fake_body, _ = self._fetch("GET", f"/v1/agents/{quote(self.attacker)}/prekeys", None, {})
        fake: dict[str, Any] = json.loads(fake_body)
        if self.mode == "swap":
            out = fake
        elif self.mode == "x25519":
            out = {**real, "identity_key": fake["identity_key"]}
        else:  # pragma: no cover
            raise AssertionError(self.mode)
        self.rewritten += 1
        return json.dumps(out).encode()

    def start(self) -> LyingRegistry:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                status, data, rheaders = proxy._fetch(self.command, self.path, body, headers)
                data = proxy._lie(self.path, status, data)
                self.send_response(status)
                for k, v in rheaders.items():
                    if k.lower() not in _HOP and k.lower() not in ("server", "date"):
                        self.send_header(k, v)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = _any

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
