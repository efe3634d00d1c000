"""Relay transport: one WebSocket to an AgentMesh relay, kept alive and reconnected.

It only moves JSON text: the protocol core decides what to send.  What it adds over the
TypeScript SDK's socket handling (``wire.md`` §5):

* ``connect()`` waits for the relay's verdict and fails with a typed error instead of
  resolving on socket open: close 4005 (proof of possession failed) and 4003 (token
  refused) become :class:`~agt_mesh.errors.MeshAuthError`; an unreachable relay fails
  within ``connect_timeout``.  The relays send no welcome frame; the first frame after
  ``connect`` + ``fetch_pending`` (AGT relays answer ``fetch_pending`` with an ``error``
  frame, the dev relay with ``pending_messages``) or a short quiet period means accepted.
* Heartbeats every ``heartbeat_interval`` (30 s): AGT relays close idle sockets at 90 s and
  stop live delivery to peers without heartbeats.
* Reconnection with exponential backoff and jitter (1 s doubling to 60 s, ±20 %), but never
  after close 4006 / ``session_replaced`` (another process took over this DID — two clients
  would evict each other forever) nor after an authentication refusal.
* The connect frame always carries the proof of possession (AGT 5.x relays require it;
  3.x relays ignore the extra fields), the shared-secret or Entra ``token`` when one is
  configured; the token source is called again on every reconnect so rotation works.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random as _random
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from agt_mesh.core import frames as fr
from agt_mesh.core.identity import Identity
from agt_mesh.errors import MeshAuthError, MeshConfigError, MeshTransportError

__all__ = ["RelayTransport", "SessionReplacedError", "relay_ws_url"]

log = logging.getLogger("agt_mesh.relay")

#: close codes of the AGT relay (``servers.md`` §6)
CLOSE_NOT_CONNECT = 4001
CLOSE_NO_FROM = 4002
CLOSE_AUTH_FAILED = 4003
CLOSE_IDLE = 4004
CLOSE_POP_FAILED = 4005
CLOSE_SESSION_REPLACED = 4006

FrameHandler = Callable[[str], Awaitable[None]]
#: WebSocket frames websockets may buffer before it pauses reading the socket (its
#: default is 16, i.e. up to 16 maximal frames = 256 MiB).
_WS_MAX_QUEUE = 4


class SessionReplacedError(MeshTransportError):
    """Another connection authenticated as this DID; this one was closed and will not reconnect."""


def relay_ws_url(url: str) -> str:
    """``http://h:p`` → ``ws://h:p/ws`` (as the TypeScript SDK does); ``ws(s)://`` URLs keep their path."""
    parts = urlsplit(url.strip())
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise MeshConfigError(f"relay URL must be http(s):// or ws(s)://host[:port], got {url!r}")
    path = parts.path.rstrip("/")
    if parts.scheme in ("http", "https") or not path:
        path = path + "/ws"
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def _close_error(code: int | None, reason: str, url: str) -> Exception:
    if code == CLOSE_POP_FAILED:
        return MeshAuthError(
            f"relay {url} refused our proof of possession (close 4005: {reason or 'DID proof failed'}); "
            "check the system clock (±5 min) and that the identity file matches its DID"
        )
    if code == CLOSE_AUTH_FAILED:
        return MeshAuthError(
            f"relay {url} refused our credentials (close 4003: {reason or 'authentication failed'}); "
            "set the relay token (AGENTMESH_RELAY_TOKEN on the relay) or a valid Entra token"
        )
    if code == CLOSE_SESSION_REPLACED or reason == "session_replaced":
        return SessionReplacedError(
            f"relay {url} closed this connection because another connection authenticated as the "
            "same DID (session replaced); not reconnecting — stop the other process first"
        )
    if code in (CLOSE_NOT_CONNECT, CLOSE_NO_FROM):
        return MeshTransportError(f"relay {url} rejected the connect frame (close {code}: {reason})")
    return MeshTransportError(f"relay {url} closed the connection (code {code}: {reason or 'no reason'})")


class RelayTransport:
    """A self-healing WebSocket to one relay for one DID."""

    def __init__(
        self,
        url: str,
        identity: Identity,
        *,
        on_frame: FrameHandler,
        did: str | None = None,
        pop: bool = True,
        token: Callable[[], str | None] | None = None,
        connect_timeout: float = 10.0,
        verdict_quiet: float = 1.5,
        heartbeat_interval: float | None = 30.0,
        reconnect: bool = True,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        max_frame_bytes: int = fr.DEFAULT_MAX_FRAME_BYTES,
        clock: Callable[[], float] = time.time,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        on_disconnect: Callable[[str, int | None], Awaitable[None]] | None = None,
        on_error: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        self.url = relay_ws_url(url)
        self.identity = identity
        self.did = did or identity.did
        self._on_frame = on_frame
        self._pop = pop
        self._token = token
        self.connect_timeout = connect_timeout
        self.verdict_quiet = verdict_quiet
        self.heartbeat_interval = heartbeat_interval
        self.reconnect_enabled = reconnect
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_frame_bytes = max_frame_bytes
        self._clock = clock
        self._on_connect = on_connect
        self._on_disconnect = on_disconnect
        self._on_error = on_error
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._reconnector: asyncio.Task[None] | None = None
        self._closing = False
        self._connected = asyncio.Event()
        self._jitter = _random.Random()
        self.attempts = 0
        self.last_close: tuple[int | None, str] | None = None
        self.fatal: Exception | None = None
        self.connect_count = 0
        #: how long close() keeps reading after sending ``disconnect``
        self.close_grace = 2.0
        #: optional tap called with every frame we send (diagnostics, demos)
        self.on_send: Callable[[dict[str, Any]], None] | None = None

    @property
    def is_connected(self) -> bool:
        return self._ws is not None and self._connected.is_set()

    async def wait_connected(self, timeout: float | None = None) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- connect ----------------------------------------------------------------------

    async def connect(self) -> None:
        """Open the socket, authenticate and wait for the relay's verdict.

        Raises:
            MeshAuthError: the relay refused the proof of possession or the token.
            MeshTransportError: unreachable, timed out, or closed during the handshake.
        """
        if self.is_connected:
            return
        self._closing = False
        self.fatal = None
        try:
            await asyncio.wait_for(self._open(), self.connect_timeout)
        except TimeoutError:
            await self._drop_socket()
            raise MeshTransportError(
                f"relay {self.url} did not accept the connection within {self.connect_timeout:g} s"
            ) from None

    async def _open(self) -> None:
        try:
            ws = await connect(
                self.url,
                max_size=self.max_frame_bytes,
                # No permessage-deflate: with it a few hundred KB on the wire inflate to
                # GiBs of frames (each up to max_size), and one socket read can hold many.
                # Uncompressed, the bytes we buffer are the bytes that came over the wire.
                compression=None,
                # frames websockets buffers before it stops reading the socket (each at
                # most max_size); our own queue behind it is bounded in bytes
                max_queue=_WS_MAX_QUEUE,
                open_timeout=None,
                ping_interval=20,
                ping_timeout=20,
                close_timeout=2,
                user_agent_header="kars-agt-mesh",
            )
        except (OSError, InvalidHandshake, InvalidURI) as exc:
            raise MeshTransportError(f"cannot reach relay {self.url}: {exc}") from None
        ts = fr.iso_timestamp(self._clock())
        token = self._token() if self._token else None
        connect_frame = fr.connect_frame(
            self.did, identity=self.identity if self._pop else None, timestamp=ts, token=token
        )
        verdict: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._ws = ws
        try:
            await ws.send(fr.encode_frame(connect_frame))
            await ws.send(fr.encode_frame(fr.fetch_pending_frame(self.did)))
        except ConnectionClosed as exc:
            self._ws = None
            raise _close_error(
                exc.rcvd.code if exc.rcvd else None, exc.rcvd.reason if exc.rcvd else "", self.url
            ) from None
        self._reader = asyncio.create_task(self._read_loop(ws, verdict), name="agt-mesh-relay-reader")
        try:
            await asyncio.wait_for(asyncio.shield(verdict), self.verdict_quiet)
        except TimeoutError:
            pass  # a relay that says nothing after connect has accepted it
        except Exception:
            await self._drop_socket()
            raise
        if ws.state.name != "OPEN":
            # closed right after the quiet period: surface why
            code = ws.close_code
            await self._drop_socket()
            raise _close_error(code, ws.close_reason or "", self.url)
        self.attempts = 0
        self.connect_count += 1
        self._connected.set()
        if self.heartbeat_interval:
            self._heartbeat = asyncio.create_task(self._heartbeat_loop(ws), name="agt-mesh-heartbeat")
        if self._on_connect is not None:
            await self._on_connect()

    async def _read_loop(self, ws: ClientConnection, verdict: asyncio.Future[None]) -> None:
        code: int | None = None
        reason = ""
        try:
            async for message in ws:
                text = message if isinstance(message, str) else message.decode("utf-8", "replace")
                if not verdict.done():
                    if _is_connect_refusal(text):
                        # the close with the reason follows; let it decide the error
                        continue
                    verdict.set_result(None)
                if _is_fetch_pending_reply(text):
                    continue  # AGT relays do not know fetch_pending; their reply is noise
                try:
                    await self._on_frame(text)
                except Exception as exc:  # a handler bug must not kill the connection
                    log.exception("frame handler failed")
                    await self._emit_error("frame", f"handler error: {type(exc).__name__}: {exc}")
        except ConnectionClosed:
            pass
        except Exception as exc:  # pragma: no cover - unexpected socket errors
            await self._emit_error("ws", f"{type(exc).__name__}: {exc}")
        finally:
            code = ws.close_code
            reason = ws.close_reason or ""
            if not verdict.done():
                verdict.set_exception(_close_error(code, reason, self.url))
                verdict.exception()  # mark retrieved
        if self._ws is ws:
            await self._handle_close(code, reason)

    async def _handle_close(self, code: int | None, reason: str) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._ws = None
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        self.last_close = (code, reason)
        by_client = self._closing
        if was_connected and self._on_disconnect is not None:
            await self._on_disconnect("client" if by_client or (code == 1000 and not reason) else "server", code)
        if by_client or not was_connected:
            return
        err = _close_error(code, reason, self.url)
        if isinstance(err, MeshAuthError | SessionReplacedError) or (code == 1000 and reason == "session_replaced"):
            self.fatal = err
            await self._emit_error("ws", str(err))
            return
        if code == 1000:
            return  # the relay ended the session on purpose (we sent disconnect)
        if self.reconnect_enabled:
            self._schedule_reconnect()

    def _schedule_reconnect(self) -> None:
        if self._reconnector is None or self._reconnector.done():
            self._reconnector = asyncio.create_task(self._reconnect_loop(), name="agt-mesh-reconnect")

    def backoff_delay(self, attempt: int) -> float:
        """``min(base·2^attempt, max)`` with ±20 % jitter."""
        base = min(self.backoff_base * (2**attempt), self.backoff_max)
        return float(base * (0.8 + 0.4 * self._jitter.random()))

    async def _reconnect_loop(self) -> None:
        while not self._closing and not self.is_connected:
            delay = self.backoff_delay(self.attempts)
            self.attempts += 1
            await asyncio.sleep(delay)
            if self._closing:
                return
            try:
                await self.connect()
            except (MeshAuthError, SessionReplacedError) as exc:
                self.fatal = exc
                await self._emit_error("ws", f"reconnect refused: {exc}")
                return
            except MeshTransportError as exc:
                await self._emit_error("ws", f"reconnect failed: {exc}")

    async def _heartbeat_loop(self, ws: ClientConnection) -> None:
        assert self.heartbeat_interval
        with contextlib.suppress(ConnectionClosed, asyncio.CancelledError):
            while True:
                await asyncio.sleep(self.heartbeat_interval)
                await ws.send(fr.encode_frame(fr.heartbeat_frame(self.did, fr.iso_timestamp(self._clock()))))

    async def _emit_error(self, kind: str, detail: str) -> None:
        if self._on_error is not None:
            try:
                await self._on_error(kind, detail)
            except Exception:  # pragma: no cover
                log.exception("error hook failed")

    # -- sending / closing ------------------------------------------------------------

    async def send(self, frame: dict[str, Any]) -> None:
        """Send one frame.

        Raises:
            MeshTransportError: if not connected (the frame was not sent).
        """
        ws = self._ws  # set from the moment the connect frame is sent, so acks for frames
        # the relay pushes while its verdict is pending are not lost
        if ws is None:
            raise MeshTransportError(f"not connected to relay {self.url}")
        try:
            await ws.send(fr.encode_frame(frame))
        except ConnectionClosed as exc:
            raise MeshTransportError(f"relay connection closed while sending: {exc}") from None
        if self.on_send is not None:
            self.on_send(frame)

    async def send_heartbeat(self) -> None:
        await self.send(fr.heartbeat_frame(self.did, fr.iso_timestamp(self._clock())))

    async def _drop_socket(self) -> None:
        ws, self._ws = self._ws, None
        self._connected.clear()
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()
        for task in (self._reader, self._heartbeat):
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._reader = self._heartbeat = None

    async def close(self) -> None:
        """Send ``disconnect``, read until the relay closes, then close and stop reconnecting.

        Every frame the relay wrote before it saw our ``disconnect`` is still read and
        handed to ``on_frame``: AGT relays forget a frame once it is written to the socket.
        """
        self._closing = True
        if self._reconnector is not None:
            self._reconnector.cancel()
            with contextlib.suppress(BaseException):
                await self._reconnector
            self._reconnector = None
        ws = self._ws
        reader = self._reader
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.send(fr.encode_frame(fr.disconnect_frame(self.did)))
            if reader is not None:  # the relay answers disconnect by closing (code 1000)
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(asyncio.shield(reader), self.close_grace)
            with contextlib.suppress(Exception):
                await ws.close(1000, "client disconnect")
        if reader is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(reader, 3)
        await self._drop_socket()

    async def drop_connection(self) -> None:
        """Test hook: close the socket abruptly, as a network failure would."""
        ws = self._ws
        if ws is not None and ws.transport is not None:
            ws.transport.abort()


def _error_detail(text: str) -> str | None:
    """The ``detail`` of a relay ``error`` frame, or ``None`` for any other frame."""
    if len(text) > 4096 or '"error"' not in text[:64]:
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("type") != "error":
        return None
    detail = obj.get("detail")
    return detail if isinstance(detail, str) else ""


def _is_fetch_pending_reply(text: str) -> bool:
    detail = _error_detail(text)
    return detail is not None and "fetch_pending" in detail


def _is_connect_refusal(text: str) -> bool:
    detail = _error_detail(text)
    return detail is not None and "fetch_pending" not in detail
