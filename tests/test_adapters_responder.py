"""The Hermes API backend of the auto-responder, against a local OpenAI-compatible test server
that the test starts (no LLM is available here), and `agt-mesh bridge hermes` end to end."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from test_adapters_support import agents

from agt_mesh.adapters.responder import AutoResponder, HermesAPIBackend, HermesAPIError, TaskRequest

KEY = "test-key-123"


class FakeHermes:
    """A minimal OpenAI-compatible server: ``GET /health`` and ``POST /v1/chat/completions``
    (streaming SSE with Hermes' ``hermes.tool.progress`` events, or one JSON answer)."""

    def __init__(self, *, pieces: list[str] | None = None, delay: float = 0.0, key: str = KEY) -> None:
        self.pieces = pieces or ["Hello", " from", " Hermes"]
        self.delay = delay
        self.key = key
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.cancelled = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def __aenter__(self) -> FakeHermes:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await reader.readline()).decode()
            method, path, _ = line.split(" ", 2)
            headers: dict[str, str] = {}
            while (h := (await reader.readline()).decode().strip()) != "":
                k, _, v = h.partition(":")
                headers[k.strip().lower()] = v.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if method == "GET" and path == "/health":
                await self._json(writer, 200, {"status": "ok", "platform": "hermes-agent"})
                return
            if headers.get("authorization") != f"Bearer {self.key}":
                await self._json(
                    writer, 401, {"error": {"message": "Invalid API key", "type": "invalid_request_error"}}
                )
                return
            if method == "GET" and path == "/v1/models":
                await self._json(writer, 200, {"object": "list", "data": [{"id": "hermes-agent"}]})
                return
            if method != "POST" or path != "/v1/chat/completions":
                await self._json(writer, 404, {"error": "not found"})
                return
            request = json.loads(body)
            self.requests.append(request)
            self.headers.append(headers)
            question = request["messages"][-1]["content"]
            if not request.get("stream"):
                await asyncio.sleep(self.delay * len(self.pieces))
                answer = "".join(self.pieces) + f" (re: {question})"
                await self._json(
                    writer,
                    200,
                    {
                        "object": "chat.completion",
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}],
                    },
                )
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            writer.write(b'event: hermes.tool.progress\ndata: {"tool": "terminal", "label": "ls"}\n\n')
            for piece in [*self.pieces, f" (re: {question})"]:
                if reader.at_eof():  # the client hung up (its request was cancelled)
                    self.cancelled += 1
                    return
                chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}}]}
                writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await writer.drain()
                await asyncio.sleep(self.delay)
            writer.write(b"data: [DONE]\n\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.cancelled += 1
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            writer.close()

    @staticmethod
    async def _json(writer: asyncio.StreamWriter, status: int, obj: Any) -> None:
        body = json.dumps(obj).encode()
        reason = {200: "OK", 401: "Unauthorized", 404: "Not Found"}[status]
        writer.write(
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n".encode()
            + body
        )
        await writer.drain()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(content: str = "what's up?") -> TaskRequest:
    return TaskRequest("did:mesh:" + "ab" * 16, "alice", content, "r-1", "alice", "m-1", {})


async def _no_progress(stage: str, text: str) -> None:
    return None


async def test_backend_streams_and_reports_progress(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("API_SERVER_KEY", KEY)
    ticks: list[tuple[str, str]] = []

    async def progress(stage: str, text: str) -> None:
        ticks.append((stage, text))

    async with FakeHermes() as server:
        backend = HermesAPIBackend(server.url, session_per_peer=True)
        try:
            assert (await backend.health())["status"] == "ok"
            answer = await backend(_request(), progress)
            assert answer == "Hello from Hermes (re: what's up?)"
            assert ("tool", "terminal") in ticks and ticks[-1] == ("streaming", answer)
            (sent,) = server.requests
            assert sent["model"] == "hermes-agent" and sent["stream"] is True
            assert sent["messages"][0]["role"] == "system" and "alice" in sent["messages"][0]["content"]
            assert sent["messages"][-1] == {"role": "user", "content": "what's up?"}
            assert server.headers[0]["x-hermes-session-id"] == "agt-mesh-" + "ab" * 16
            backend.stream = False
            assert await backend(_request("plain"), _no_progress) == "Hello from Hermes (re: plain)"
        finally:
            await backend.aclose()


async def test_backend_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    # connection refused
    backend = HermesAPIBackend(f"http://127.0.0.1:{_free_port()}", api_key="x")
    with pytest.raises(HermesAPIError) as exc:
        await backend.health()
    assert exc.value.kind == "connection_refused" and "API_SERVER_ENABLED=true" in str(exc.value)
    # the real commands and requirements (checked against Hermes itself in test_hosts_hermes.py)
    for fact in ("`hermes gateway run`", "`hermes gateway start`", "at least 16 characters", "aiohttp"):
        assert fact in str(exc.value), fact
    with pytest.raises(HermesAPIError) as exc:
        await backend(_request(), _no_progress)
    assert exc.value.kind == "connection_refused"
    await backend.aclose()
    async with FakeHermes(delay=0.5) as server:
        # 401: no key, then a wrong key
        monkeypatch.delenv("MY_HERMES_KEY", raising=False)
        backend = HermesAPIBackend(server.url, api_key_env="MY_HERMES_KEY")
        with pytest.raises(HermesAPIError) as exc:
            await backend(_request(), _no_progress)
        assert exc.value.kind == "unauthorized" and "$MY_HERMES_KEY is not set" in str(exc.value)
        monkeypatch.setenv("MY_HERMES_KEY", "wrong")
        with pytest.raises(HermesAPIError) as exc:
            await backend(_request(), _no_progress)
        assert "does not match" in str(exc.value) and "401" in str(exc.value)
        await backend.aclose()
        # a read timeout
        backend = HermesAPIBackend(server.url, api_key=KEY, read_timeout=0.2)
        with pytest.raises(HermesAPIError) as exc:
            await backend(_request(), _no_progress)
        assert exc.value.kind == "timeout"
        await backend.aclose()


async def test_responder_over_the_mesh_with_progress_timeout_and_cancel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("API_SERVER_KEY", KEY)
    async with (
        FakeHermes(pieces=["a", "b", "c", "d", "e", "f"], delay=0.2) as server,
        agents(tmp_path, "asker", "hermes") as (_, [asker, hermes]),
    ):
        backend = HermesAPIBackend(server.url)
        responder = AutoResponder(hermes.tools, backend, allow=[asker.client.did], progress_interval=0.1, heartbeat=0.3)
        responder.attach()
        try:
            # 1.2 s of streaming against a 0.5 s idle timeout: progress ticks keep the asker waiting
            r = await asker.tools.call(
                "mesh_send", {"to": hermes.name, "content": "go", "await_reply": True, "timeout_seconds": 0.5}
            )
            assert r["status"] == "delivered_and_replied", r
            assert r["reply"] == "abcdef (re: go)" and r["ok"] is True and r["progress_updates"] >= 3
            assert server.requests[0]["messages"][0]["content"].count(asker.name) == 1

            # the responder's own timeout cancels the HTTP request and answers WORKER_TIMEOUT
            responder.timeout = 0.5
            r = await asker.tools.call(
                "mesh_send", {"to": hermes.name, "content": "slow", "await_reply": True, "timeout_seconds": 5}
            )
            assert r["ok"] is False and r["reply"].startswith("WORKER_TIMEOUT")
            for _ in range(60):
                if server.cancelled:
                    break
                await asyncio.sleep(0.05)
            assert server.cancelled == 1

            # a wrong key comes back as an ok:false answer, not silence; what went wrong (the
            # upstream's 401) is in the local log under the reference, never in the answer
            responder.timeout = 30
            monkeypatch.setenv("API_SERVER_KEY", "nope")
            caplog.set_level("INFO", logger="agt_mesh.adapters.responder")
            r = await asker.tools.call(
                "mesh_send", {"to": hermes.name, "content": "x", "await_reply": True, "timeout_seconds": 5}
            )
            assert r["ok"] is False and r["reply"].startswith("WORKER_ERROR: the request could not be answered (ref ")
            assert "401" not in r["reply"] and server.url not in r["reply"] and "API_SERVER_KEY" not in r["reply"]
            ref = r["reply"].rsplit("ref ", 1)[1].rstrip(")")
            assert any(ref in rec.getMessage() and "401" in rec.getMessage() for rec in caplog.records)
        finally:
            await backend.aclose()


async def test_bridge_cli_end_to_end(tmp_path: Path) -> None:
    async with FakeHermes() as server, agents(tmp_path, "asker") as (mesh, [asker]):
        name = f"bridged-{os.urandom(3).hex()}"
        env = {**os.environ, "BRIDGE_KEY": KEY}
        code = (
            "import sys; from agt_mesh.adapters.cli import main_bridge_hermes; "
            "sys.exit(main_bridge_hermes(sys.argv[1:]))"
        )
        args = [
            "--state-dir",
            str(tmp_path / "bridge-state"),
            "--relay",
            mesh.relay_url,
            "--registry",
            mesh.registry_url,
            "--name",
            name,
            "--api-url",
            server.url,
            "--api-key-env",
        ]
        # without an allow list the bridge does not start: it would spend the key on anyone's text
        bad = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, *args, "BRIDGE_KEY", env=env, stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(bad.communicate(), 30)
        assert bad.returncode == 1 and b"--allow DID" in err
        args += ["BRIDGE_KEY", "--allow", asker.client.did]
        # a refused key is reported before the bridge joins the mesh
        bad = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, *args[:-3], "NO_SUCH_VAR", *args[-2:], stderr=asyncio.subprocess.PIPE
        )
        _, err = await asyncio.wait_for(bad.communicate(), 30)
        assert bad.returncode == 4 and b"NO_SUCH_VAR" in err
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", code, *args, env=env, stderr=asyncio.subprocess.PIPE
        )
        try:
            assert proc.stderr is not None
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            while b"allowed peer(s) through" not in line:
                line = await asyncio.wait_for(proc.stderr.readline(), 30)
            r = await asker.tools.call(
                "mesh_send", {"to": name, "content": "ping", "await_reply": True, "timeout_seconds": 20}
            )
            assert r["status"] == "delivered_and_replied" and r["reply"] == "Hello from Hermes (re: ping)"
        finally:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), 30)
        assert proc.returncode == 0
