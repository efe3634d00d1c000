"""Loopback fault injection between a client and a relay (or registry), for tests.

* :class:`WsFaultProxy` — WebSocket-aware: a ``websockets`` server that opens one upstream
  connection per client connection and forwards text frames both ways, applying faults
  per frame: ``delay`` (the frame is written ``delay_s`` later, so later frames overtake
  it), ``reorder`` (held back and written right after the next frame), ``duplicate``
  (written twice).  ``cut_all()`` aborts every connection (both sides see a TCP reset).
* :class:`TcpFaultProxy` — raw TCP: forwards bytes; ``arm_cut(n)`` closes both sides
  after ``n`` more bytes from upstream, i.e. in the middle of a WebSocket frame.
* :class:`FakeHttpServer` — a minimal HTTP/1.1 server answering every request with a
  fixed status and body, or never answering (``hang=True``).

Everything binds 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

#: client→relay frames never faulted (the relay must see the handshake intact)
_HANDSHAKE = {"connect", "fetch_pending", "disconnect", "heartbeat"}


@dataclass
class FaultCounts:
    frames: int = 0
    delayed: int = 0
    reordered: int = 0
    duplicated: int = 0
    cuts: int = 0
    connections: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


def _frame_type(text: str) -> str:
    try:
        obj = json.loads(text)
    except ValueError:
        return "?"
    return str(obj.get("type")) if isinstance(obj, dict) else "?"


class WsFaultProxy:
    """``proxy.url`` stands in for the relay's ``http://127.0.0.1:port``."""

    def __init__(
        self,
        upstream_ws: str,
        *,
        fault_rate: float = 0.0,
        faults: tuple[str, ...] = ("delay", "reorder", "duplicate"),
        delay_s: float = 0.2,
        seed: int = 1,
        max_frame_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.upstream_ws = upstream_ws
        self.fault_rate = fault_rate
        self.faults = faults
        self.delay_s = delay_s
        self.rng = random.Random(seed)
        self.max_frame_bytes = max_frame_bytes
        self.counts = FaultCounts()
        self._server: Server | None = None
        self._pairs: set[tuple[ServerConnection, ClientConnection]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> WsFaultProxy:
        self._server = await serve(
            self._handler, "127.0.0.1", self.port, max_size=self.max_frame_bytes, ping_interval=None
        )
        self.port = int(next(iter(self._server.sockets)).getsockname()[1])
        return self

    async def stop(self) -> None:
        await self.cut_all()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
        for t in list(self._tasks):
            t.cancel()

    async def cut_all(self) -> int:
        """Abort every proxied connection (TCP reset on both sides); returns how many."""
        n = 0
        for down, up in list(self._pairs):
            for ws in (down, up):
                if ws.transport is not None:
                    ws.transport.abort()
            n += 1
        self.counts.cuts += n
        return n

    async def _handler(self, down: ServerConnection) -> None:
        path = down.request.path if down.request is not None else "/ws"
        try:
            up = await connect(
                self.upstream_ws.rsplit("/ws", 1)[0] + path,
                max_size=self.max_frame_bytes,
                ping_interval=None,
                open_timeout=5,
            )
        except Exception:
            await down.close(1011, "upstream unreachable")
            return
        pair = (down, up)
        self._pairs.add(pair)
        self.counts.connections += 1
        try:
            a = asyncio.create_task(self._pump(down, up, upstream=True))
            b = asyncio.create_task(self._pump(up, down, upstream=False))
            _, pending = await asyncio.wait({a, b}, return_when=asyncio.FIRST_COMPLETED)
            for t in pending:
                t.cancel()
        finally:
            self._pairs.discard(pair)
            for ws in (down, up):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 2)

    def _later(self, ws: Any, text: str, delay: float) -> None:
        async def go() -> None:
            await asyncio.sleep(delay)
            with contextlib.suppress(Exception):
                await ws.send(text)

        t = asyncio.create_task(go())
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def _pump(self, src: Any, dst: Any, *, upstream: bool) -> None:
        held: list[str] = []  # at most one frame, swapped with the next one

        async def flush_later(text: str) -> None:
            await asyncio.sleep(self.delay_s)
            if held and held[0] is text:  # no frame came to overtake it
                held.clear()
                with contextlib.suppress(Exception):
                    await dst.send(text)

        with contextlib.suppress(ConnectionClosed, asyncio.CancelledError):
            async for msg in src:
                text = msg if isinstance(msg, str) else msg.decode("utf-8", "replace")
                self.counts.frames += 1
                ftype = _frame_type(text)
                self.counts.by_type[ftype] = self.counts.by_type.get(ftype, 0) + 1
                eligible = not (upstream and ftype in _HANDSHAKE)
                fault = None
                if eligible and self.fault_rate and self.rng.random() < self.fault_rate:
                    fault = self.rng.choice(self.faults)
                if fault == "delay":
                    self.counts.delayed += 1
                    self._later(dst, text, self.delay_s)
                    continue
                if fault == "reorder" and not held:
                    self.counts.reordered += 1
                    held.append(text)
                    t = asyncio.create_task(flush_later(text))
                    self._tasks.add(t)
                    t.add_done_callback(self._tasks.discard)
                    continue
                await dst.send(text)
                if held:
                    await dst.send(held.pop())
                if fault == "duplicate":
                    self.counts.duplicated += 1
                    await dst.send(text)


class TcpFaultProxy:
    """A byte-level TCP proxy; ``arm_cut(n)`` closes after ``n`` more upstream→client bytes."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._server: asyncio.Server | None = None
        self._cut_after: int | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0
        self.cuts = 0
        self.connections = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> TcpFaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def arm_cut(self, n_bytes: int) -> None:
        self._cut_after = n_bytes

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            cw.close()
            return
        self.connections += 1
        self._writers.update((cw, uw))

        async def up() -> None:
            while data := await cr.read(65536):
                uw.write(data)
                await uw.drain()

        async def down() -> None:
            while data := await ur.read(65536):
                if self._cut_after is not None:
                    if len(data) >= self._cut_after:
                        cw.write(data[: self._cut_after])
                        await cw.drain()
                        self._cut_after = None
                        self.cuts += 1
                        return
                    self._cut_after -= len(data)
                cw.write(data)
                await cw.drain()

        tasks = [asyncio.create_task(up()), asyncio.create_task(down())]
        with contextlib.suppress(Exception):
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        for w in (cw, uw):
            w.transport.abort()
            self._writers.discard(w)


class FakeHttpServer:
    """Answers every HTTP request with ``status`` and ``body`` — or never (``hang``)."""

    def __init__(self, status: int = 500, body: bytes = b'{"detail":"boom"}', *, hang: bool = False) -> None:
        self.status = status
        self.body = body
        self.hang = hang
        self.requests = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeHttpServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        for w in list(self._writers):
            w.transport.abort()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self._writers.add(w)
        try:
            while True:
                head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 30)
                self.requests += 1
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                if length:
                    await r.readexactly(length)
                if self.hang:
                    await asyncio.sleep(30)
                    return
                w.write(
                    b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                    % (self.status, len(self.body), self.body)
                )
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError, asyncio.LimitOverrunError):
            pass
        finally:
            self._writers.discard(w)
            w.transport.abort()
