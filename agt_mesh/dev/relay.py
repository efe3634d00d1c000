"""A small development relay that speaks the AgentMesh relay protocol.

It reproduces what the official AgentMesh (AGT) relay does on the wire
(``servers.md`` §6, ``wire.md`` §5) closely enough that clients written against it
work against the real one, and it adds the few things the real relay lacks that a
client needs (``fetch_pending`` is answered) or that tests want (fault knobs,
introspection).  It is for development and tests; production uses the AgentMesh relay.

The logic lives in :class:`RelayState`, a plain class with no I/O (connect checks,
routing decisions, the store-and-forward inbox, liveness bookkeeping, statistics).
:class:`DevRelay` is the thin asyncio shell around it: a ``websockets`` server that
reads frames, applies the state's decisions and writes frames.

Protocol summary (one WebSocket endpoint, ``/ws``, JSON text frames):

* The first frame must be ``connect`` within ``connect_timeout``.  With proof of
  possession on (the default), it must carry ``public_key`` (standard base64 Ed25519),
  ``timestamp`` (ISO-8601 with an offset, within ±5 min) and ``signature`` (Ed25519
  over the UTF-8 timestamp), and ``from`` must be the key's ``did:mesh:`` DID.
  Failures send ``{"type":"error","detail":...}`` and close with the AGT codes
  (4001 not connect, 4002 no ``from``, 4005 proof failed, 4003 bad token).
* A second connection for the same DID replaces the first, which is closed with
  4006 ``session_replaced`` (AGT HEAD; released AGT versions use 1000).
* Stored frames are pushed one by one right after connect, oldest first, and stay
  stored until the recipient acks each ``id``.
* ``message`` and ``knock*`` frames are delivered live when the recipient is
  connected and not stale, and stored otherwise.
* ``GET /health`` on the same port returns the AGT health document.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import hmac
import json
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from enum import Enum
from http import HTTPStatus
from types import TracebackType
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from agt_mesh.core.encoding import b64_decode, compact_json
from agt_mesh.core.frames import DEFAULT_MAX_FRAME_BYTES, decode_frame
from agt_mesh.core.identity import did_from_ed25519
from agt_mesh.core.primitives import ed25519_verify
from agt_mesh.errors import MeshProtocolError

__all__ = [
    "CLOSE_AUTH_FAILED",
    "CLOSE_IDLE",
    "CLOSE_INVALID_JSON",
    "CLOSE_NOT_CONNECT",
    "CLOSE_NO_FROM",
    "CLOSE_POP_FAILED",
    "CLOSE_SESSION_REPLACED",
    "CLOSE_UNSUPPORTED_DATA",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_MAX_BYTES_PER_RECIPIENT",
    "DEFAULT_MAX_BYTES_PER_SENDER",
    "DEFAULT_MAX_FRAMES_PER_SENDER",
    "DEFAULT_MAX_QUEUE_PER_RECIPIENT",
    "DEFAULT_MAX_STORE_BYTES",
    "DEFAULT_STALE_AFTER",
    "DEFAULT_TTL",
    "POP_WINDOW",
    "ROUTED_TYPES",
    "WS_PATH",
    "Accept",
    "Ack",
    "DevRelay",
    "Disconnect",
    "Heartbeat",
    "OutKind",
    "Outgoing",
    "Reject",
    "RelayConn",
    "RelayFrontEnd",
    "RelayServer",
    "RelayState",
    "Reply",
    "Route",
    "StoreResult",
    "StoredFrame",
]

logger = logging.getLogger("agt_mesh.dev.relay")

#: The WebSocket endpoint path (the TypeScript client appends ``/ws`` to the relay URL).
WS_PATH = "/ws"

# Close codes.  The 4xxx codes are the AGT relay's; 1003/1007 are the standard codes
# this relay uses where AGT just drops the TCP connection (the client would see 1006).
CLOSE_NORMAL = 1000
#: A binary frame (the protocol is JSON text only).
CLOSE_UNSUPPORTED_DATA = 1003
#: A text frame that is not a JSON object.
CLOSE_INVALID_JSON = 1007
#: The first frame was not ``connect``, or no frame arrived within the connect timeout.
CLOSE_NOT_CONNECT = 4001
#: The ``connect`` frame has no ``from``.
CLOSE_NO_FROM = 4002
#: The shared-secret ``token`` is missing or wrong.
CLOSE_AUTH_FAILED = 4003
#: No frame at all arrived for ``idle_timeout`` seconds.
CLOSE_IDLE = 4004
#: The DID proof of possession failed.
CLOSE_POP_FAILED = 4005
#: Another connection authenticated as the same DID (AGT HEAD's code).
CLOSE_SESSION_REPLACED = 4006

#: The AGT relay's connect-frame timeout: a client that opens a socket and says nothing
#: holds a slot for at most this long.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: The AGT relay's idle timeout: a connection that sends no frame at all (clients should
#: send ``heartbeat`` every 30 s) is closed with 4004 so dead peers do not hold their slot.
DEFAULT_IDLE_TIMEOUT = 90.0
#: The AGT relay's staleness threshold: a peer that sent no ``heartbeat`` for this long is
#: treated as offline for live delivery (three missed 30 s heartbeats); frames for it are
#: stored instead and pushed when it reconnects.
DEFAULT_STALE_AFTER = 90.0
#: The AGT inbox TTL (72 h): long enough to ride out a weekend offline, short enough that
#: an abandoned DID's mail does not live forever.  Checked lazily, as AGT does.
DEFAULT_TTL = 72 * 3600.0
#: Per-recipient cap on stored frames.  AGT has none; a cap keeps one runaway sender from
#: exhausting a development machine's memory.  When it is reached new frames for that
#: recipient are refused (older ones, such as the KNOCK that opens a session, are kept).
DEFAULT_MAX_QUEUE_PER_RECIPIENT = 10_000
#: Cap on the total size of all stored frames (256 MiB), for the same reason.
DEFAULT_MAX_STORE_BYTES = 256 * 1024 * 1024
#: Per-recipient cap on stored bytes: a quarter of the store, so that one recipient's
#: backlog (or a flood aimed at it) cannot take the whole store from everyone else.
DEFAULT_MAX_BYTES_PER_RECIPIENT = DEFAULT_MAX_STORE_BYTES // 4
#: Per-sender cap on frames stored for others: one client (one DID) flooding offline
#: recipients runs into its own quota long before the store is full.
DEFAULT_MAX_FRAMES_PER_SENDER = 10_000
#: Per-sender cap on stored bytes, a quarter of the store for the same reason (a single
#: client needs four DIDs — four proofs of possession — to fill the store).
DEFAULT_MAX_BYTES_PER_SENDER = DEFAULT_MAX_STORE_BYTES // 4
#: Live frames waiting to be written to one slow connection before further frames for
#: it are stored instead (so one stalled reader cannot make the relay buffer unboundedly).
DEFAULT_MAX_OUTBOX = 1024
#: Replay window for the connect proof (AGT: ±5 minutes).
POP_WINDOW = 300.0
#: Frame types the relay routes to ``to`` (everything else is relay-bound).
ROUTED_TYPES = frozenset({"message", "knock", "knock_accept", "knock_reject"})

_MAX_DID_LEN = 512
_MAX_ID_LEN = 256
_MAX_TS_LEN = 64
_MAX_TYPE_ECHO = 64

H = TypeVar("H")


# --------------------------------------------------------------------------------------
# sans-I/O state
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accept:
    """The connect frame was accepted for ``did``."""

    did: str
    #: Whether the DID was proven by a valid signature (POP on).
    pop_verified: bool


@dataclass(frozen=True, slots=True)
class Reject:
    """The connect frame was refused: send ``{"type":"error","detail":detail}``, close ``code``."""

    code: int
    detail: str


@dataclass(frozen=True, slots=True)
class Route:
    """Deliver ``text`` (a whole frame) to ``recipient``, live or stored."""

    recipient: str
    frame_id: str
    frame_type: str
    text: str
    #: The authenticated DID of the connection that sent the frame.
    sender: str = ""


@dataclass(frozen=True, slots=True)
class Ack:
    """The recipient acknowledged the stored frame ``frame_id`` (it may be deleted)."""

    frame_id: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A ``heartbeat`` frame: the connection is fresh for live delivery again."""


@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``frame`` back to the connection that sent the frame."""

    frame: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client said goodbye: close with 1000."""


@dataclass(slots=True)
class StoredFrame:
    """One frame held for an offline (or stale) recipient."""

    id: str
    text: str
    stored_at: float
    expires_at: float
    #: The authenticated DID that sent it ("" when unknown); counts against its quota.
    sender: str = ""


class StoreResult(Enum):
    STORED = "stored"
    #: A frame with the same id is already queued for this recipient.
    DUPLICATE = "duplicate"
    #: The recipient's queue is at ``max_queue_per_recipient`` or ``max_bytes_per_recipient``.
    QUEUE_FULL = "queue_full"
    #: All stored frames together are at ``max_store_bytes``.
    STORE_FULL = "store_full"
    #: The sender has ``max_frames_per_sender`` frames or ``max_bytes_per_sender`` bytes stored.
    SENDER_FULL = "sender_full"


@dataclass(slots=True)
class _Session(Generic[H]):
    handle: H
    pop_verified: bool
    last_heartbeat: float


@dataclass(slots=True)
class _Stats:
    messages_routed: int = 0
    messages_stored: int = 0
    messages_delivered: int = 0
    # Not in the AGT health document; kept for tests and logs (``dropped_spoofed`` is
    # counted by the front end).
    dropped_full: int = 0


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


class RelayFrontEnd:
    """The relay's wire contract without I/O or storage: connect checks and frame decisions.

    Shared by the development relay (:class:`RelayState`, everything in memory) and the
    cluster relay (``agt_mesh.cluster``, storage in NATS JetStream), so both judge
    connect frames and classify the frames that follow exactly the same way.
    ``now`` is an injectable clock (aware UTC ``datetime``) for the proof's replay window.
    """

    def __init__(
        self,
        *,
        require_pop: bool = True,
        token: str | None = None,
        pop_window: float = POP_WINDOW,
        now: Callable[[], _dt.datetime] = _utcnow,
    ) -> None:
        if pop_window <= 0:
            raise ValueError("pop_window must be positive")
        self.require_pop = require_pop
        self._token = token.encode() if token is not None else None
        self.pop_window = pop_window
        self._now = now
        #: Frames dropped because their ``from`` was not the sender's DID.
        self.dropped_spoofed = 0

    # -- connect ---------------------------------------------------------------------

    def check_connect(self, frame: dict[str, Any]) -> Accept | Reject:
        """Judge the first frame of a connection, in the AGT relay's order of checks."""
        if frame.get("type") != "connect":
            return Reject(CLOSE_NOT_CONNECT, "First frame must be 'connect'")
        did = frame.get("from")
        if not did:
            return Reject(CLOSE_NO_FROM, "Missing 'from' field")
        if not isinstance(did, str) or len(did) > _MAX_DID_LEN:
            return Reject(CLOSE_NO_FROM, "Invalid 'from' field")
        if self.require_pop:
            reason = self._pop_failure(frame, did)
            if reason is not None:
                return Reject(CLOSE_POP_FAILED, f"DID proof failed: {reason}")
        if self._token is not None:
            token = frame.get("token")
            if not isinstance(token, str) or not hmac.compare_digest(
                token.encode("utf-8", "surrogatepass"), self._token
            ):
                return Reject(CLOSE_AUTH_FAILED, "Authentication failed")
        return Accept(did, self.require_pop)

    def _pop_failure(self, frame: dict[str, Any], did: str) -> str | None:
        """Why the connect proof of possession fails (AGT's reason strings), or ``None``."""
        pub_text = frame.get("public_key")
        ts_text = frame.get("timestamp")
        sig_text = frame.get("signature")
        if not (isinstance(pub_text, str) and isinstance(ts_text, str) and isinstance(sig_text, str)):
            return "connect frame missing did/public_key/timestamp/signature"
        try:
            pub = b64_decode(pub_text)
        except ValueError:
            return "invalid public_key encoding"
        if len(pub) != 32:
            return "public_key must be 32 bytes"
        if did != did_from_ed25519(pub):
            return "DID does not match public_key (sha256 mismatch)"
        if len(ts_text) > _MAX_TS_LEN:
            return "invalid timestamp format"
        try:
            ts = _dt.datetime.fromisoformat(ts_text.replace("Z", "+00:00"))
        except ValueError:
            return "invalid timestamp format"
        if ts.tzinfo is None:
            return "timestamp must include timezone offset"
        if abs((self._now() - ts).total_seconds()) > self.pop_window:
            return "timestamp outside replay window"
        try:
            sig = b64_decode(sig_text)
        except ValueError:
            return "signature verification failed"
        if len(sig) != 64:
            return "signature verification failed"
        if not ed25519_verify(pub, sig, ts_text.encode("utf-8", "surrogatepass")):
            return "invalid signature"
        return None

    # -- frames after connect --------------------------------------------------------

    def classify(
        self, did: str, frame: dict[str, Any], text: str
    ) -> Route | Ack | Heartbeat | Reply | Disconnect | None:
        """Decide what a frame from ``did``'s connection asks for; ``None``: nothing."""
        ftype = frame.get("type")
        if ftype in ROUTED_TYPES:
            assert isinstance(ftype, str)
            return self._route(did, ftype, frame, text)
        if ftype == "ack":
            frame_id = frame.get("id")
            return Ack(frame_id) if isinstance(frame_id, str) else None
        if ftype == "heartbeat":
            return Heartbeat()
        if ftype == "disconnect":
            return Disconnect()
        if ftype == "fetch_pending":
            # Stored frames are pushed one by one at connect; the empty batch tells a
            # client its connect was accepted.
            return Reply({"type": "pending_messages", "messages": []})
        if isinstance(ftype, str):
            shown = ftype[:_MAX_TYPE_ECHO]
        elif ftype is None or isinstance(ftype, int | float):
            shown = str(ftype)  # AGT echoes Python's str(): "Unknown frame type: None"
        else:
            shown = type(ftype).__name__
        return Reply({"type": "error", "detail": f"Unknown frame type: {shown}"})

    def _route(self, did: str, ftype: str, frame: dict[str, Any], text: str) -> Route | None:
        to, frame_id = frame.get("to"), frame.get("id")
        if not (isinstance(to, str) and to and len(to) <= _MAX_DID_LEN):
            return None
        if not (isinstance(frame_id, str) and frame_id and len(frame_id) <= _MAX_ID_LEN):
            return None
        sender = frame.get("from")
        if sender is None:
            # Stamp the authenticated DID (AGT HEAD does this with POP on; doing it
            # without POP too is harmless: the DID is the one the socket connected as).
            stamped: dict[str, Any] = {}
            for key, value in frame.items():
                stamped[key] = value
                if key == "type":
                    stamped["from"] = did
            stamped.setdefault("from", did)
            text = compact_json(stamped)
        elif self.require_pop and sender != did:
            self.dropped_spoofed += 1
            logger.warning("dropping %s %s: from %r is not the sender %s", ftype, frame_id, sender, did)
            return None
        return Route(to, frame_id, ftype, text, did)


class RelayState(RelayFrontEnd, Generic[H]):
    """The development relay's logic without I/O: the front end plus sessions, the
    in-memory store-and-forward inbox with its quotas, liveness and statistics.

    ``H`` is whatever the I/O shell uses to reach a connection; the state only stores it
    and hands it back.  Time comes from two injectable clocks: ``clock`` (monotonic
    seconds, for TTL and staleness) and ``now`` (aware UTC ``datetime``, for the connect
    proof's replay window).

    The per-DID quotas (frames and bytes per recipient and per sender) exist so that one
    client cannot exhaust a development machine; this relay is not for production.
    """

    def __init__(
        self,
        *,
        require_pop: bool = True,
        token: str | None = None,
        stale_after: float = DEFAULT_STALE_AFTER,
        ttl: float = DEFAULT_TTL,
        max_queue_per_recipient: int = DEFAULT_MAX_QUEUE_PER_RECIPIENT,
        max_bytes_per_recipient: int = DEFAULT_MAX_BYTES_PER_RECIPIENT,
        max_frames_per_sender: int = DEFAULT_MAX_FRAMES_PER_SENDER,
        max_bytes_per_sender: int = DEFAULT_MAX_BYTES_PER_SENDER,
        max_store_bytes: int = DEFAULT_MAX_STORE_BYTES,
        pop_window: float = POP_WINDOW,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], _dt.datetime] = _utcnow,
    ) -> None:
        super().__init__(require_pop=require_pop, token=token, pop_window=pop_window, now=now)
        if stale_after <= 0 or ttl <= 0:
            raise ValueError("stale_after and ttl must be positive")
        limits = (
            max_queue_per_recipient,
            max_bytes_per_recipient,
            max_frames_per_sender,
            max_bytes_per_sender,
            max_store_bytes,
        )
        if min(limits) < 1:
            raise ValueError("the store quotas must be positive")
        self.stale_after = stale_after
        self.ttl = ttl
        self.max_queue_per_recipient = max_queue_per_recipient
        self.max_bytes_per_recipient = max_bytes_per_recipient
        self.max_frames_per_sender = max_frames_per_sender
        self.max_bytes_per_sender = max_bytes_per_sender
        self.max_store_bytes = max_store_bytes
        self._clock = clock
        self._sessions: dict[str, _Session[H]] = {}
        self._inbox: dict[str, OrderedDict[str, StoredFrame]] = {}
        self._recipient_bytes: dict[str, int] = {}
        #: sender DID -> [stored frames, stored bytes]
        self._sender_use: dict[str, list[int]] = {}
        self._stored_bytes = 0
        self._stats = _Stats()

    # -- sessions --------------------------------------------------------------------

    def attach(self, did: str, handle: H, *, pop_verified: bool = False) -> H | None:
        """Make ``handle`` the session for ``did``; return the session it replaces, if any."""
        old = self._sessions.get(did)
        self._sessions[did] = _Session(handle, pop_verified, self._clock())
        return old.handle if old is not None else None

    def detach(self, did: str, handle: H) -> bool:
        """Forget ``did``'s session if it is still ``handle`` (not a newer replacement)."""
        current = self._sessions.get(did)
        if current is not None and current.handle is handle:
            del self._sessions[did]
            return True
        return False

    def session(self, did: str) -> H | None:
        """``did``'s current connection, stale or not."""
        current = self._sessions.get(did)
        return current.handle if current is not None else None

    def live(self, did: str) -> H | None:
        """``did``'s connection if it is connected and not stale (live delivery target)."""
        current = self._sessions.get(did)
        if current is None:
            return None
        if self._clock() - current.last_heartbeat > self.stale_after:
            return None
        return current.handle

    def heartbeat(self, did: str, handle: H) -> None:
        """A ``heartbeat`` frame arrived on ``handle``: the session is fresh again."""
        current = self._sessions.get(did)
        if current is not None and current.handle is handle:
            current.last_heartbeat = self._clock()

    @property
    def connected_dids(self) -> frozenset[str]:
        return frozenset(self._sessions)

    # -- frames after connect --------------------------------------------------------

    def handle_frame(self, did: str, handle: H, frame: dict[str, Any], text: str) -> Route | Reply | Disconnect | None:
        """Decide what to do with a frame from ``did``'s connection ``handle``.

        ``ack`` and ``heartbeat`` are applied here; the other outcomes are returned for
        the shell to carry out.  ``None`` means nothing further to do.
        """
        action = self.classify(did, frame, text)
        if isinstance(action, Ack):
            self.ack(did, action.frame_id)
            return None
        if isinstance(action, Heartbeat):
            self.heartbeat(did, handle)
            return None
        return action

    # -- inbox -----------------------------------------------------------------------

    def store(self, recipient: str, frame_id: str, text: str, sender: str = "") -> StoreResult:
        """Queue a frame for ``recipient`` (FIFO; a repeated ``frame_id`` is dropped).

        ``sender`` is the authenticated DID of the connection the frame came from; its
        stored frames count against the per-sender quotas.  When a quota is reached new
        frames are refused and older ones kept (the KNOCK that opens a session stays).
        """
        queue = self._inbox.get(recipient)
        if queue is None:
            queue = self._inbox[recipient] = OrderedDict()
        else:
            self._expire(recipient, queue)
        if frame_id in queue:
            return StoreResult.DUPLICATE
        size = len(text)
        use = self._sender_use.get(sender, [0, 0])
        verdict = StoreResult.STORED
        recipient_bytes = self._recipient_bytes.get(recipient, 0) + size
        if len(queue) >= self.max_queue_per_recipient or recipient_bytes > self.max_bytes_per_recipient:
            verdict = StoreResult.QUEUE_FULL
        elif use[0] >= self.max_frames_per_sender or use[1] + size > self.max_bytes_per_sender:
            verdict = StoreResult.SENDER_FULL
        elif self._stored_bytes + size > self.max_store_bytes:
            verdict = StoreResult.STORE_FULL
        if verdict is not StoreResult.STORED:
            if not queue:
                del self._inbox[recipient]
            self._stats.dropped_full += 1
            logger.warning("not storing %s from %s for %s: %s", frame_id, sender, recipient, verdict.value)
            return verdict
        now = self._clock()
        queue[frame_id] = StoredFrame(frame_id, text, now, now + self.ttl, sender)
        self._account(recipient, sender, 1, size)
        self._stats.messages_stored += 1
        return StoreResult.STORED

    def _account(self, recipient: str, sender: str, frames: int, size: int) -> None:
        """Add (or, negative, remove) stored frames to the totals and the per-DID quotas."""
        self._stored_bytes += size
        left = self._recipient_bytes.get(recipient, 0) + size
        if left > 0:
            self._recipient_bytes[recipient] = left
        else:
            self._recipient_bytes.pop(recipient, None)
        use = self._sender_use.setdefault(sender, [0, 0])
        use[0] += frames
        use[1] += size
        if use[0] <= 0:
            del self._sender_use[sender]

    def pending(self, did: str) -> list[StoredFrame]:
        """The unexpired frames stored for ``did``, oldest first (they stay stored)."""
        queue = self._inbox.get(did)
        if queue is None:
            return []
        self._expire(did, queue)
        return list(queue.values())

    def ack(self, did: str, frame_id: str) -> bool:
        """Delete ``frame_id`` from ``did``'s own queue (acks never touch other inboxes)."""
        queue = self._inbox.get(did)
        if queue is None:
            return False
        stored = queue.pop(frame_id, None)
        if stored is None:
            return False
        self._account(did, stored.sender, -1, -len(stored.text))
        if not queue:
            del self._inbox[did]
        return True

    def stored_count(self, did: str) -> int:
        """How many unexpired frames are stored for ``did``."""
        return len(self.pending(did))

    def sender_usage(self, did: str) -> tuple[int, int]:
        """``(frames, bytes)`` that ``did`` has stored for others (its quota use)."""
        use = self._sender_use.get(did, [0, 0])
        return use[0], use[1]

    @property
    def stored_bytes(self) -> int:
        return self._stored_bytes

    def _expire(self, did: str, queue: OrderedDict[str, StoredFrame]) -> None:
        now = self._clock()
        while queue:
            first = next(iter(queue.values()))
            if first.expires_at > now:
                break
            queue.popitem(last=False)
            self._account(did, first.sender, -1, -len(first.text))
        if not queue:
            self._inbox.pop(did, None)

    # -- statistics ------------------------------------------------------------------

    def note_routed(self) -> None:
        """A frame was written to its recipient live."""
        self._stats.messages_routed += 1

    def note_delivered(self) -> None:
        """A stored frame was pushed to its recipient."""
        self._stats.messages_delivered += 1

    @property
    def stats(self) -> dict[str, int]:
        """The AGT counters plus ``dropped_spoofed`` and ``dropped_full``."""
        s = self._stats
        return {
            "messages_routed": s.messages_routed,
            "messages_stored": s.messages_stored,
            "messages_delivered": s.messages_delivered,
            "dropped_spoofed": self.dropped_spoofed,
            "dropped_full": s.dropped_full,
        }

    def health(self) -> dict[str, Any]:
        """The ``GET /health`` document, shaped like AGT core 5.0.0's.

        ``verified_agents`` counts POP-verified connections (AGT counts Entra-verified
        ones, which a development relay never has).
        """
        s = self._stats
        return {
            "status": "healthy",
            "service": "agentmesh-relay",
            "connected_agents": len(self._sessions),
            "verified_agents": sum(1 for x in self._sessions.values() if x.pop_verified),
            "entra_verify_enabled": False,
            "stats": {
                "messages_routed": s.messages_routed,
                "messages_stored": s.messages_stored,
                "messages_delivered": s.messages_delivered,
            },
        }


# --------------------------------------------------------------------------------------
# asyncio shell
# --------------------------------------------------------------------------------------


class OutKind(Enum):
    LIVE = "live"  # routed frame; re-routed (usually stored) if it cannot be written
    PENDING = "pending"  # a stored frame being pushed; it stays stored until acked
    CONTROL = "control"  # relay reply (error, pending_messages); dropped if unsendable


@dataclass(slots=True)
class Outgoing:
    """One frame queued for a connection."""

    kind: OutKind
    text: str
    frame_id: str = ""
    #: Where the frame is stored, for storage backends that need it (JetStream sequence).
    ref: int = 0
    #: The routed frame type (``message``, ``knock``, ...); "" for replies.
    frame_type: str = ""


@dataclass(eq=False)
class RelayConn:
    """One authenticated connection and its outbound queue (written by one task)."""

    ws: ServerConnection
    did: str
    pop_verified: bool = False
    outbox: deque[Outgoing] = field(default_factory=deque)
    inflight: list[Outgoing] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    writer: asyncio.Task[None] | None = None
    closed: bool = False

    def push(self, item: Outgoing) -> None:
        self.outbox.append(item)
        self.wake.set()

    def leading_live(self, limit: int) -> int:
        n = 0
        for item in self.outbox:
            if item.kind is not OutKind.LIVE or n >= limit:
                break
            n += 1
        return n


C = TypeVar("C", bound=RelayConn)


class RelayServer(Generic[C]):
    """The asyncio WebSocket shell every relay of this package shares.

    It owns the socket side of the wire contract: the ``/ws`` endpoint and ``GET
    /health``, the connect timeout, frame decoding and the close codes for garbage, the
    connect checks of a :class:`RelayFrontEnd`, the 4004 idle rule, and one writer task
    per connection.  Subclasses decide where frames go (:meth:`_route`), what an ``ack``
    or ``heartbeat`` does, what happens when a session starts or ends, and what
    ``/health`` reports.
    """

    front: RelayFrontEnd

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float,
        idle_timeout: float,
        max_frame_bytes: int,
        ping_interval: float | None,
        ping_timeout: float | None,
        reorder_window: int = 0,
        reorder_hold: float = 0.05,
    ) -> None:
        if connect_timeout <= 0 or idle_timeout <= 0:
            raise ValueError("connect_timeout and idle_timeout must be positive")
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be positive")
        if reorder_window < 0 or reorder_hold < 0:
            raise ValueError("reorder_window and reorder_hold must be >= 0")
        self._host = host
        self._requested_port = port
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_frame_bytes = max_frame_bytes
        self.reorder_window = reorder_window
        self.reorder_hold = reorder_hold
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._server: Server | None = None
        self._port: int | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- what subclasses provide -----------------------------------------------------

    def _new_conn(self, ws: ServerConnection, verdict: Accept) -> C:
        raise NotImplementedError

    async def _attach(self, conn: C) -> None:
        """The connection authenticated: register it and queue its stored frames."""
        raise NotImplementedError

    async def _route(self, conn: C, route: Route) -> None:
        raise NotImplementedError

    async def _ack(self, conn: C, frame_id: str) -> None:
        raise NotImplementedError

    def _heartbeat(self, conn: C) -> None:
        raise NotImplementedError

    def _written(self, conn: C, item: Outgoing) -> None:
        """``item`` was written to ``conn``'s socket."""

    async def _detach(self, conn: C, unsent: list[Outgoing]) -> None:
        """The connection is gone; ``unsent`` are the frames it did not (surely) write."""
        raise NotImplementedError

    def health(self) -> dict[str, Any]:
        raise NotImplementedError

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> str:
        """Start listening; return the relay's base URL (``http://host:port``)."""
        if self._server is not None:
            return self.url
        self._server = await serve(
            self._handler,
            self._host,
            self._requested_port,
            process_request=self._process_request,
            max_size=self.max_frame_bytes,
            ping_interval=self._ping_interval,
            ping_timeout=self._ping_timeout,
        )
        # ``sockets`` is typed Iterable in websockets 13 and a tuple later: iterate it.
        first = next(iter(self._server.sockets))
        self._port = int(first.getsockname()[1])
        logger.info("relay listening on %s (ws: %s)", self.url, self.ws_url)
        return self.url

    async def stop(self) -> None:
        """Close every connection (1001 going away) and stop listening."""
        server, self._server = self._server, None
        if server is None:
            return
        for task in list(self._tasks):
            task.cancel()
        server.close()
        await server.wait_closed()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- introspection ---------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the relay is not started")
        return self._port

    @property
    def url(self) -> str:
        """``http://host:port`` — what TypeScript clients take as ``relayUrl``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """``ws://host:port/ws``."""
        return "ws" + self.url[len("http") :] + WS_PATH

    # -- HTTP ------------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path == WS_PATH:
            return None
        if path == "/health":
            return _json_response(connection, HTTPStatus.OK, self.health())
        return _json_response(connection, HTTPStatus.NOT_FOUND, {"detail": "Not Found"})

    # -- WebSocket -------------------------------------------------------------------

    async def _handler(self, ws: ServerConnection) -> None:
        try:
            async with asyncio.timeout(self.connect_timeout):
                raw = await ws.recv()
        except TimeoutError:
            await ws.close(CLOSE_NOT_CONNECT, "connect timeout")
            return
        except ConnectionClosed:
            return
        frame = await self._decode(ws, raw, None)
        if frame is None:
            return
        verdict = self.front.check_connect(frame)
        if isinstance(verdict, Reject):
            logger.info("refusing connect (%d): %s", verdict.code, verdict.detail)
            with contextlib.suppress(ConnectionClosed):
                await ws.send(compact_json({"type": "error", "detail": verdict.detail}))
            await ws.close(verdict.code)
            return
        conn = self._new_conn(ws, verdict)
        conn.writer = asyncio.create_task(self._writer(conn))
        try:
            await self._attach(conn)
            logger.info("agent connected: %s", verdict.did)
            await self._read_loop(conn)
        except ConnectionClosed:
            pass
        finally:
            await self._teardown(conn)

    async def _read_loop(self, conn: C) -> None:
        ws = conn.ws
        while True:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    raw = await ws.recv()
            except TimeoutError:
                logger.info("idle timeout for %s; closing", conn.did)
                await ws.close(CLOSE_IDLE, "idle timeout")
                return
            frame = await self._decode(ws, raw, conn.did)
            if frame is None:
                return
            assert isinstance(raw, str)  # _decode closed the connection on binary frames
            action = self.front.classify(conn.did, frame, raw)
            if isinstance(action, Route):
                await self._route(conn, action)
            elif isinstance(action, Ack):
                await self._ack(conn, action.frame_id)
            elif isinstance(action, Heartbeat):
                self._heartbeat(conn)
            elif isinstance(action, Reply):
                conn.push(Outgoing(OutKind.CONTROL, compact_json(action.frame)))
            elif isinstance(action, Disconnect):
                await self._teardown(conn)
                await ws.close(CLOSE_NORMAL)
                return

    async def _decode(self, ws: ServerConnection, raw: str | bytes, did: str | None) -> dict[str, Any] | None:
        """Parse a frame; on garbage close the connection and return ``None``.

        AGT drops the TCP connection on invalid JSON (the client sees 1006); closing
        with 1003 (binary frame) or 1007 (not a JSON object) tells the client why.
        """
        if isinstance(raw, bytes):
            logger.info("binary frame from %s; closing", did or "unauthenticated peer")
            await ws.close(CLOSE_UNSUPPORTED_DATA, "frames must be JSON text")
            return None
        try:
            obj = decode_frame(raw, max_bytes=self.max_frame_bytes)
        except MeshProtocolError as exc:
            logger.info("invalid frame from %s: %s; closing", did or "unauthenticated peer", exc)
            await ws.close(CLOSE_INVALID_JSON, "frame is not a JSON object")
            return None
        assert isinstance(obj, dict)
        return obj

    async def _writer(self, conn: C) -> None:
        """Write ``conn``'s outbox in order (or reversed batches with ``reorder_window``)."""
        while True:
            if not conn.outbox:
                conn.wake.clear()
                await conn.wake.wait()
                continue
            if self.reorder_window > 1 and conn.outbox[0].kind is OutKind.LIVE:
                await self._hold_batch(conn)
                n = conn.leading_live(self.reorder_window)
                batch = [conn.outbox.popleft() for _ in range(n)]
                batch.reverse()
            else:
                batch = [conn.outbox.popleft()]
            conn.inflight = batch
            while conn.inflight:
                item = conn.inflight[0]
                try:
                    await conn.ws.send(item.text)
                except ConnectionClosed:
                    # The read loop sees the close too; _teardown hands back what is left.
                    return
                conn.inflight.pop(0)
                self._written(conn, item)

    async def _hold_batch(self, conn: C) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reorder_hold
        while conn.leading_live(self.reorder_window) < self.reorder_window:
            if conn.leading_live(self.reorder_window) < len(conn.outbox):
                return  # a non-live frame is queued behind the batch
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            conn.wake.clear()
            try:
                async with asyncio.timeout(remaining):
                    await conn.wake.wait()
            except TimeoutError:
                return

    async def _teardown(self, conn: C) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.writer is not None:
            conn.writer.cancel()
            try:
                await conn.writer
            except asyncio.CancelledError:
                pass
            except Exception:  # a writer bug must not lose the frames still queued
                logger.exception("writer for %s failed", conn.did)
        # Frames that were not (known to be) written go back to the subclass: an
        # interrupted write may mean a duplicate, never a loss.
        unsent = [*conn.inflight, *conn.outbox]
        conn.inflight.clear()
        conn.outbox.clear()
        await self._detach(conn, unsent)
        logger.info("agent disconnected: %s", conn.did)

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class DevRelay(RelayServer[RelayConn]):
    """The development relay server: ``async with DevRelay() as relay: ...``.

    Args:
        host: interface to bind (loopback by default; the relay has no TLS).
        port: TCP port; 0 picks a free one (read it back from :attr:`port`).
        require_pop: demand the connect proof of possession (AGT's default).  ``False``
            accepts legacy ``{"type":"connect","from":DID}`` frames and forwards ``from``
            as written, like ``AGENTMESH_RELAY_ALLOW_UNAUTHED_DID=1``.
        token: shared secret the connect frame must carry as ``token`` (close 4003
            otherwise), like ``AGENTMESH_RELAY_TOKEN``.
        connect_timeout: seconds to wait for the first frame (AGT: 10).
        idle_timeout: seconds without any frame before closing with 4004 (AGT: 90).
        stale_after: seconds without a ``heartbeat`` after which live delivery to the
            peer stops and its frames are stored (AGT: 90).
        ttl: lifetime of a stored frame in seconds (AGT: 72 h).
        max_queue_per_recipient: stored frames per recipient (AGT: unlimited).
        max_bytes_per_recipient: stored bytes per recipient (AGT: unlimited).
        max_frames_per_sender: frames one sender may have stored for others.
        max_bytes_per_sender: bytes one sender may have stored for others.
        max_store_bytes: total bytes of stored frames (AGT: unlimited).
        max_frame_bytes: largest inbound frame; bigger ones close the sender with 1009
            (AGT/uvicorn: 16 MiB).
        max_outbox: live frames queued for one connection before more are stored.
        knock_delay: fault knob — hold each ``knock`` frame this many seconds before
            routing it, so a message sent right after it overtakes it (it is still
            delivered, later).
        reorder_window: fault knob — when 2 or more, a recipient's live frames are
            written in reverse order in batches of up to this many.  A batch is
            written once it is full, once a non-live frame is queued behind it, or
            ``reorder_hold`` seconds after its first frame was queued.
        reorder_hold: see ``reorder_window``.
        ping_interval, ping_timeout: WebSocket keepalive (uvicorn's defaults, 20 s).
        hold_until_ack: also keep live-delivered frames stored until the recipient acks
            them, and push them again when it reconnects (at-least-once delivery).  AGT
            relays drop a frame once it is written to the socket, so a recipient that
            dies before reading it loses it; this relay does not.  ``False`` gives the
            AGT behaviour.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        require_pop: bool = True,
        token: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        stale_after: float = DEFAULT_STALE_AFTER,
        ttl: float = DEFAULT_TTL,
        max_queue_per_recipient: int = DEFAULT_MAX_QUEUE_PER_RECIPIENT,
        max_bytes_per_recipient: int = DEFAULT_MAX_BYTES_PER_RECIPIENT,
        max_frames_per_sender: int = DEFAULT_MAX_FRAMES_PER_SENDER,
        max_bytes_per_sender: int = DEFAULT_MAX_BYTES_PER_SENDER,
        max_store_bytes: int = DEFAULT_MAX_STORE_BYTES,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_outbox: int = DEFAULT_MAX_OUTBOX,
        knock_delay: float = 0.0,
        reorder_window: int = 0,
        reorder_hold: float = 0.05,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        hold_until_ack: bool = True,
    ) -> None:
        super().__init__(
            host,
            port,
            connect_timeout=connect_timeout,
            idle_timeout=idle_timeout,
            max_frame_bytes=max_frame_bytes,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            reorder_window=reorder_window,
            reorder_hold=reorder_hold,
        )
        if max_outbox < 1:
            raise ValueError("max_outbox must be positive")
        if knock_delay < 0:
            raise ValueError("knock_delay must be >= 0")
        self.state: RelayState[RelayConn] = RelayState(
            require_pop=require_pop,
            token=token,
            stale_after=stale_after,
            ttl=ttl,
            max_queue_per_recipient=max_queue_per_recipient,
            max_bytes_per_recipient=max_bytes_per_recipient,
            max_frames_per_sender=max_frames_per_sender,
            max_bytes_per_sender=max_bytes_per_sender,
            max_store_bytes=max_store_bytes,
        )
        self.front = self.state
        self.max_outbox = max_outbox
        self.knock_delay = knock_delay
        self.hold_until_ack = hold_until_ack

    async def __aenter__(self) -> DevRelay:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- introspection ---------------------------------------------------------------

    @property
    def connected_dids(self) -> frozenset[str]:
        return self.state.connected_dids

    def stored_count(self, did: str) -> int:
        return self.state.stored_count(did)

    @property
    def stats(self) -> dict[str, int]:
        return self.state.stats

    def health(self) -> dict[str, Any]:
        return self.state.health()

    # -- the in-memory store ---------------------------------------------------------

    def _new_conn(self, ws: ServerConnection, verdict: Accept) -> RelayConn:
        return RelayConn(ws, verdict.did, verdict.pop_verified)

    async def _attach(self, conn: RelayConn) -> None:
        replaced = self.state.attach(conn.did, conn, pop_verified=conn.pop_verified)
        if replaced is not None:
            logger.info("session for %s replaced; closing the old one", conn.did)
            self._spawn(replaced.ws.close(CLOSE_SESSION_REPLACED, "session_replaced"))
        # Stored frames first; live frames routed from now on queue up behind them.
        for stored in self.state.pending(conn.did):
            conn.push(Outgoing(OutKind.PENDING, stored.text, stored.id))

    async def _route(self, conn: RelayConn, route: Route) -> None:
        if route.frame_type == "knock" and self.knock_delay > 0:
            self._spawn(self._route_later(route, self.knock_delay))
        else:
            self._deliver(route)

    async def _ack(self, conn: RelayConn, frame_id: str) -> None:
        self.state.ack(conn.did, frame_id)

    def _heartbeat(self, conn: RelayConn) -> None:
        self.state.heartbeat(conn.did, conn)

    def _written(self, conn: RelayConn, item: Outgoing) -> None:
        if item.kind is OutKind.LIVE:
            self.state.note_routed()
        elif item.kind is OutKind.PENDING:
            self.state.note_delivered()

    async def _detach(self, conn: RelayConn, unsent: list[Outgoing]) -> None:
        self.state.detach(conn.did, conn)
        # Live frames not (known to be) written go to the replacement session or into
        # the store.
        for item in unsent:
            if item.kind is OutKind.LIVE:
                self._deliver(Route(conn.did, item.frame_id, item.frame_type, item.text))

    def _deliver(self, route: Route) -> None:
        """Queue a frame for live delivery, or store it if the recipient is not reachable.

        ``message`` frames are also kept stored until acked when ``hold_until_ack`` is on
        (KNOCK frames are not: TypeScript clients never acknowledge them, and replaying an
        old KNOCK to a restarted TypeScript peer would make it build a stale session).
        """
        recipient, frame_id, text = route.recipient, route.frame_id, route.text
        conn = self.state.live(recipient)
        if conn is not None and not conn.closed and len(conn.outbox) < self.max_outbox:
            if self.hold_until_ack and route.frame_type == "message":
                self.state.store(recipient, frame_id, text, route.sender)
            conn.push(Outgoing(OutKind.LIVE, text, frame_id, frame_type=route.frame_type))
            return
        self.state.store(recipient, frame_id, text, route.sender)

    async def _route_later(self, route: Route, delay: float) -> None:
        await asyncio.sleep(delay)
        self._deliver(route)


def _json_response(connection: ServerConnection, status: HTTPStatus, body: Any) -> Response:
    response = connection.respond(status, json.dumps(body, separators=(",", ":")))
    del response.headers["Content-Type"]
    response.headers["Content-Type"] = "application/json"
    return response
