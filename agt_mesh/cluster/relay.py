"""A relay replica whose store and routing live in NATS JetStream.

The WebSocket side (connect checks, frame classification, close codes, the idle rule,
the writer) is :class:`agt_mesh.dev.relay.RelayServer` with the same
:class:`~agt_mesh.dev.relay.RelayFrontEnd` the development relay uses.  What differs is
where frames go:

* A routed frame is published to the stream ``MESH_RELAY`` under
  ``mesh.relay.inbox.<token(recipient)>`` and the sender's replica waits for JetStream's
  acknowledgement (the frame is then on a quorum of NATS nodes).  The publish carries a
  message id derived from (recipient, frame id), so a retried publish is stored once.
* The replica a recipient is connected to reads its subject with an ordered consumer from
  the first stored frame on: frames stored before the connect are pushed first (AGT's
  replay), frames published later follow live.  Nothing is deleted by reading: a
  ``message`` frame is deleted when the recipient acks its id — the relay ack is a
  JetStream delete, so a frame is never lost between replicas and an acked frame never
  comes back.  A live ``knock*`` frame is deleted once written to the socket (TypeScript
  clients never ack them, and replaying an old KNOCK to a restarted peer would make it
  build a stale session); a stored one stays until acked or expired, as on AGT.
* The connection that owns a DID is a KV entry (``mesh_relay_sessions``); its revision
  orders connections cluster-wide, and every replica watches the bucket and closes its
  own connection with 4006 when a newer one appears anywhere.

Retention (72 h), the per-recipient cap and the total size are JetStream stream limits
(``max_age``, ``max_msgs_per_subject`` with discard-new-per-subject, ``max_bytes``), so they
hold across all replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any
from urllib.parse import quote, unquote

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy, DiscardPolicy, KeyValueConfig, StreamConfig
from nats.js.kv import KeyValue
from websockets.asyncio.server import ServerConnection

from agt_mesh.cluster.jetstream import (
    REQUEST_TIMEOUT,
    TRANSIENT,
    connect,
    ensure_kv,
    ensure_stream,
    file_storage,
    retrying,
    token,
)
from agt_mesh.core.frames import DEFAULT_MAX_FRAME_BYTES
from agt_mesh.dev.relay import (
    CLOSE_SESSION_REPLACED,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_OUTBOX,
    DEFAULT_MAX_QUEUE_PER_RECIPIENT,
    DEFAULT_STALE_AFTER,
    DEFAULT_TTL,
    Accept,
    Outgoing,
    OutKind,
    RelayConn,
    RelayFrontEnd,
    RelayServer,
    Route,
)

__all__ = ["DEFAULT_STREAM", "ClusterRelay"]

logger = logging.getLogger("agt_mesh.cluster.relay")

DEFAULT_STREAM = "MESH_RELAY"
DEFAULT_SUBJECT_PREFIX = "mesh.relay"
DEFAULT_SESSIONS_BUCKET = "mesh_relay_sessions"
#: Window in which JetStream drops a second publish with the same message id: long enough
#: to cover a publish retried across a NATS node failover (RETRY_FOR).
DUPLICATE_WINDOW = 120.0
#: Close code when the store cannot be reached for a new connection (RFC 6455 "try
#: again later"): the client reconnects with backoff.
CLOSE_TRY_AGAIN = 1013
#: Ids acked before this connection pushed them (pushed by a previous connection on
#: another replica), remembered so the replay skips them.  Bounded: an ack for an id
#: that is never pushed must not grow memory.
MAX_EARLY_ACKS = 4096
#: Bytes of stored frames one connection's consumer may hold in the client library
#: before the server is made to wait (flow control); at least two maximal frames.
CONSUMER_PENDING_BYTES = 8 * 1024 * 1024
#: Acks are gathered this long before the store is told: deleting one frame is a replicated
#: JetStream API request (~1.7 ms of NATS CPU on three nodes, measured), so the acked
#: prefix of a recipient's subject is removed with one purge instead.  An ack lost in
#: this window (the replica dies) means one redelivery, never a loss.
ACK_FLUSH_DELAY = 0.02
#: How long a new connection's frame loop waits for the stored frames to be queued, so
#: that (as on AGT) they are pushed before any reply to the client's first frames.
REPLAY_WAIT = 5.0
#: Idle heartbeat of the per-connection ordered consumers: after two missed ones the
#: consumer is recreated (a NATS node died), so delivery resumes within ~2 s.  It costs one
#: NATS message per idle connection per interval: a mesh of 100,000 agents wants ~10 s.
CONSUMER_HEARTBEAT = 1.0

_HDR_ID = "Mesh-Id"
_HDR_TYPE = "Mesh-Type"


@dataclass(eq=False)
class ClusterConn(RelayConn):
    """A connection plus its JetStream cursor and the bookkeeping for acks."""

    tok: str = ""
    conn_id: str = ""
    #: KV revision of this connection's session entry (orders connections cluster-wide).
    revision: int = 0
    #: Frames with a stream sequence up to this were stored before the connect.
    replay_until: int = 0
    last_heartbeat: float = field(default_factory=time.monotonic)
    sub: Subscription | None = None
    #: frame id -> stream sequence of frames pushed on this connection, not yet acked.
    pushed: OrderedDict[str, int] = field(default_factory=OrderedDict)
    early_acks: OrderedDict[str, None] = field(default_factory=OrderedDict)
    #: Stream sequences this connection has seen, in order, until they are deleted.
    seen: deque[int] = field(default_factory=deque)
    #: Those of ``seen`` that may be deleted (acked, or a KNOCK written live).
    done: set[int] = field(default_factory=set)
    deleter: asyncio.Task[None] | None = None
    space: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set once the frames stored before the connect are queued for writing.
    replayed: asyncio.Event = field(default_factory=asyncio.Event)


class ClusterRelay(RelayServer[ClusterConn]):
    """A stateless relay replica: ``async with ClusterRelay(["nats://..."]) as relay``.

    Args:
        nats_servers: NATS URLs (any node of the cluster; the client fails over).
        host, port: where to listen (port 0: a free one).
        require_pop, token: as :class:`agt_mesh.dev.relay.DevRelay`.
        replicas: JetStream replicas of the stream and bucket (3 survives one NATS node).
        ttl: stored-frame lifetime (AGT: 72 h), enforced by JetStream ``max_age``.
        max_queue_per_recipient: stored frames per recipient (``max_msgs_per_subject``;
            new frames are refused when full, as on the development relay).
        max_store_bytes: total stored bytes (``max_bytes``; -1: no limit, as on AGT).
        max_frame_bytes: largest frame (capped to the NATS server's ``max_payload``).
        stale_after, connect_timeout, idle_timeout, max_outbox, ping_*: as the dev relay.
        stream, subject_prefix, sessions_bucket: JetStream names (one set per mesh).
        consumer_heartbeat: idle heartbeat of each connection's consumer (seconds); a
            NATS node failure is noticed after two missed ones.
    """

    def __init__(
        self,
        nats_servers: Sequence[str],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        require_pop: bool = True,
        token: str | None = None,
        replicas: int = 3,
        ttl: float = DEFAULT_TTL,
        max_queue_per_recipient: int = DEFAULT_MAX_QUEUE_PER_RECIPIENT,
        max_store_bytes: int = -1,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        stale_after: float = DEFAULT_STALE_AFTER,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        max_outbox: int = DEFAULT_MAX_OUTBOX,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        stream: str = DEFAULT_STREAM,
        subject_prefix: str = DEFAULT_SUBJECT_PREFIX,
        sessions_bucket: str = DEFAULT_SESSIONS_BUCKET,
        consumer_heartbeat: float = CONSUMER_HEARTBEAT,
    ) -> None:
        super().__init__(
            host,
            port,
            connect_timeout=connect_timeout,
            idle_timeout=idle_timeout,
            max_frame_bytes=max_frame_bytes,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
        )
        if not nats_servers:
            raise ValueError("at least one NATS server URL is needed")
        if replicas < 1 or ttl <= 0 or stale_after <= 0 or max_queue_per_recipient < 1 or max_outbox < 1:
            raise ValueError("replicas, ttl, stale_after, max_queue_per_recipient and max_outbox must be positive")
        self.front = RelayFrontEnd(require_pop=require_pop, token=token)
        self.nats_servers = list(nats_servers)
        self.replicas = replicas
        self.ttl = ttl
        self.max_queue_per_recipient = max_queue_per_recipient
        self.max_store_bytes = max_store_bytes
        self.stale_after = stale_after
        self.max_outbox = max_outbox
        self.stream = stream
        self.subject_prefix = subject_prefix
        self.sessions_bucket = sessions_bucket
        if consumer_heartbeat <= 0:
            raise ValueError("consumer_heartbeat must be positive")
        self.consumer_heartbeat = consumer_heartbeat
        self.replica_id = os.urandom(6).hex()
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._watch: Subscription | None = None
        self._conns: dict[str, ClusterConn] = {}
        self._stats = {"messages_routed": 0, "messages_stored": 0, "messages_delivered": 0, "dropped_full": 0}

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> str:
        if self._nc is None:
            self._nc = await connect(self.nats_servers, f"agt-mesh-relay-{self.replica_id}")
            self._js = self._nc.jetstream(timeout=REQUEST_TIMEOUT)
            # A frame must fit in one NATS message (the server's max_payload, 1 MiB by
            # default; raise it to 16 MiB for AGT's frame limit): larger ones close the
            # sender with 1009 like any oversized frame.
            self.max_frame_bytes = min(self.max_frame_bytes, self._nc.max_payload - 1024)
            await ensure_stream(
                self._js,
                StreamConfig(
                    name=self.stream,
                    subjects=[f"{self.subject_prefix}.inbox.*"],
                    storage=file_storage(),
                    num_replicas=self.replicas,
                    max_age=self.ttl,
                    max_bytes=self.max_store_bytes,
                    max_msgs_per_subject=self.max_queue_per_recipient,
                    discard=DiscardPolicy.NEW,
                    discard_new_per_subject=True,
                    duplicate_window=DUPLICATE_WINDOW,
                    allow_direct=True,
                ),
            )
            self._kv = await ensure_kv(
                self._js,
                KeyValueConfig(bucket=self.sessions_bucket, history=1, replicas=self.replicas, storage=file_storage()),
            )
            self._watch = await self._js.subscribe(
                f"$KV.{self.sessions_bucket}.>",
                cb=self._on_session_entry,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.NEW,
                idle_heartbeat=CONSUMER_HEARTBEAT,
            )
        return await super().start()

    async def stop(self) -> None:
        await super().stop()
        nc, self._nc = self._nc, None
        if nc is not None:
            # Nothing to flush: every accepted frame was acknowledged by JetStream.
            with contextlib.suppress(Exception):
                await nc.close()

    async def __aenter__(self) -> ClusterRelay:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise RuntimeError("the relay is not started")
        return self._js

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("the relay is not started")
        return self._kv

    def _subject(self, did: str) -> str:
        return f"{self.subject_prefix}.inbox.{token(did)}"

    # -- introspection ---------------------------------------------------------------

    @property
    def connected_dids(self) -> frozenset[str]:
        return frozenset(c.did for c in self._conns.values())

    @property
    def stats(self) -> dict[str, int]:
        return {**self._stats, "dropped_spoofed": self.front.dropped_spoofed}

    def health(self) -> dict[str, Any]:
        """AGT's health document; the counts are this replica's."""
        return {
            "status": "healthy" if self._nc is not None and self._nc.is_connected else "degraded",
            "service": "agentmesh-relay",
            "connected_agents": len(self._conns),
            "verified_agents": sum(1 for c in self._conns.values() if c.pop_verified),
            "entra_verify_enabled": False,
            "stats": {k: self._stats[k] for k in ("messages_routed", "messages_stored", "messages_delivered")},
            "store": "nats-jetstream",
            "replica": self.replica_id,
        }

    async def stored_count(self, did: str) -> int:
        """Frames stored for ``did`` in JetStream (across all replicas)."""
        info = await self.js.stream_info(self.stream, subjects_filter=self._subject(did))
        subjects = info.state.subjects or {}
        return int(subjects.get(self._subject(did), 0))

    # -- sessions --------------------------------------------------------------------

    def _new_conn(self, ws: ServerConnection, verdict: Accept) -> ClusterConn:
        conn = ClusterConn(ws, verdict.did, verdict.pop_verified)
        conn.tok = token(verdict.did)
        conn.conn_id = f"{self.replica_id}-{os.urandom(6).hex()}"
        return conn

    async def _attach(self, conn: ClusterConn) -> None:
        value = json.dumps({"replica": self.replica_id, "conn": conn.conn_id}).encode()
        try:
            conn.revision = await retrying("session entry", lambda: self.kv.put(conn.tok, value))
            conn.replay_until = await self._last_stored(conn.did)
        except TRANSIENT as exc:
            logger.warning("store unavailable for %s: %s", conn.did, exc)
            await conn.ws.close(CLOSE_TRY_AGAIN, "store unavailable")
            raise
        old = self._conns.get(conn.tok)
        self._conns[conn.tok] = conn
        if old is not None:
            self._replace(old)

        async def on_stored(msg: Msg) -> None:
            await self._on_stored(conn, msg)

        try:
            conn.sub = await retrying(
                "consumer",
                lambda: self.js.subscribe(
                    self._subject(conn.did),
                    stream=self.stream,
                    cb=on_stored,
                    ordered_consumer=True,
                    deliver_policy=DeliverPolicy.ALL,
                    idle_heartbeat=self.consumer_heartbeat,
                    pending_msgs_limit=self.max_outbox,
                    pending_bytes_limit=max(CONSUMER_PENDING_BYTES, 2 * self.max_frame_bytes),
                ),
            )
        except TRANSIENT as exc:
            logger.warning("cannot read the store for %s: %s", conn.did, exc)
            await conn.ws.close(CLOSE_TRY_AGAIN, "store unavailable")
            raise
        if conn.replay_until == 0:
            conn.replayed.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REPLAY_WAIT):
                await conn.replayed.wait()

    async def _last_stored(self, did: str) -> int:
        """Stream sequence of the newest frame stored for ``did`` (0: none)."""
        try:
            msg = await self.js.get_last_msg(self.stream, self._subject(did), direct=True)
        except nats.js.errors.NotFoundError:
            return 0
        return int(msg.seq or 0)

    def _replace(self, old: ClusterConn) -> None:
        """A newer connection owns ``old``'s DID: close ``old`` with 4006."""
        if self._conns.get(old.tok) is old:
            del self._conns[old.tok]
        logger.info("session for %s replaced; closing the old one", old.did)
        self._spawn(old.ws.close(CLOSE_SESSION_REPLACED, "session_replaced"))

    async def _on_session_entry(self, msg: Msg) -> None:
        """Every replica sees every session change; a newer one closes ours (4006)."""
        tok = msg.subject.rsplit(".", 1)[-1]
        conn = self._conns.get(tok)
        if conn is None or (msg.headers and msg.headers.get("KV-Operation")):
            return
        revision = msg.metadata.sequence.stream
        try:
            owner = json.loads(msg.data).get("conn")
        except ValueError:
            return
        if owner != conn.conn_id and revision > conn.revision:
            self._replace(conn)

    async def _detach(self, conn: ClusterConn, unsent: list[Outgoing]) -> None:
        # Nothing to re-route: every frame is still in the stream until acked.
        if conn.sub is not None:
            with contextlib.suppress(Exception):
                await conn.sub.unsubscribe()
        conn.space.set()
        if conn.deleter is not None and not conn.deleter.done():
            conn.deleter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await conn.deleter
        await self._delete_done(conn, wait=False)  # the acks received so far
        if self._conns.get(conn.tok) is conn:
            del self._conns[conn.tok]
            if conn.revision:
                # Only if the entry is still ours: a newer connection elsewhere keeps its own.
                with contextlib.suppress(Exception):
                    await self.kv.delete(conn.tok, last=conn.revision)

    def _heartbeat(self, conn: ClusterConn) -> None:
        conn.last_heartbeat = time.monotonic()

    def _stale(self, conn: ClusterConn) -> bool:
        return time.monotonic() - conn.last_heartbeat > self.stale_after

    # -- frames ----------------------------------------------------------------------

    async def _route(self, conn: ClusterConn, route: Route) -> None:
        headers = {
            # One stored copy per (recipient, id) even when the publish is retried.
            "Nats-Msg-Id": token(f"{route.recipient}\x00{route.frame_id}"),
            _HDR_ID: quote(route.frame_id, safe=""),
            _HDR_TYPE: route.frame_type,
        }
        subject = self._subject(route.recipient)
        data = route.text.encode("utf-8", "surrogatepass")
        try:
            ack = await retrying("publish", lambda: self.js.publish(subject, data, stream=self.stream, headers=headers))
        except nats.js.errors.APIError as exc:
            # A stream limit (the recipient's queue, the total size): refused like the
            # development relay refuses a full queue; older frames are kept.
            self._stats["dropped_full"] += 1
            logger.warning("not storing %s for %s: %s", route.frame_id, route.recipient, exc.description)
            return
        except (*TRANSIENT, nats.errors.Error) as exc:  # type: ignore[misc]
            # JetStream stayed unreachable for RETRY_FOR: the frame is refused (the sender's
            # end-to-end receipts, where it has them, re-send it).
            self._stats["dropped_full"] += 1
            logger.error("could not store %s for %s: %r", route.frame_id, route.recipient, exc)
            return
        if not ack.duplicate:
            self._stats["messages_stored"] += 1

    async def _on_stored(self, conn: ClusterConn, msg: Msg) -> None:
        """A frame from the recipient's subject: push it, skip it or drop it."""
        if conn.closed:
            return
        headers = msg.headers or {}
        frame_id = unquote(headers.get(_HDR_ID, ""))
        ftype = headers.get(_HDR_TYPE, "message")
        seq = msg.metadata.sequence.stream
        conn.seen.append(seq)
        if frame_id in conn.early_acks:
            del conn.early_acks[frame_id]
            self._mark_done(conn, seq)
            if seq >= conn.replay_until or msg.metadata.num_pending == 0:
                conn.replayed.set()
            return
        stored = seq <= conn.replay_until
        if not stored and self._stale(conn):
            # AGT: a stale peer gets nothing live; the frame stays stored for its next connect.
            return
        while len(conn.outbox) >= self.max_outbox and not conn.closed:
            # Backpressure: this callback not returning holds the consumer (flow control).
            conn.space.clear()
            await conn.space.wait()
        if conn.closed:
            return
        if seq >= conn.replay_until or msg.metadata.num_pending == 0:
            conn.replayed.set()
        if ftype == "message" or stored:
            conn.pushed[frame_id] = seq
            while len(conn.pushed) > self.max_queue_per_recipient:
                conn.pushed.popitem(last=False)
        conn.push(
            Outgoing(
                OutKind.PENDING if stored else OutKind.LIVE,
                msg.data.decode("utf-8", "surrogatepass"),
                frame_id,
                ref=seq,
                frame_type=ftype,
            )
        )

    def _written(self, conn: ClusterConn, item: Outgoing) -> None:
        if len(conn.outbox) < self.max_outbox:
            conn.space.set()
        if item.kind is OutKind.LIVE:
            self._stats["messages_routed"] += 1
            if item.frame_type != "message":
                self._mark_done(conn, item.ref)
        elif item.kind is OutKind.PENDING:
            self._stats["messages_delivered"] += 1

    async def _ack(self, conn: ClusterConn, frame_id: str) -> None:
        seq = conn.pushed.pop(frame_id, None)
        if seq is None:
            # Pushed by an earlier connection (perhaps on another replica) and not yet
            # replayed here: delete it when the replay reaches it.
            conn.early_acks[frame_id] = None
            while len(conn.early_acks) > MAX_EARLY_ACKS:
                conn.early_acks.popitem(last=False)
            return
        self._mark_done(conn, seq)

    def _mark_done(self, conn: ClusterConn, seq: int) -> None:
        conn.done.add(seq)
        if conn.deleter is None or conn.deleter.done():
            conn.deleter = asyncio.get_running_loop().create_task(self._delete_done(conn))

    async def _delete_done(self, conn: ClusterConn, *, wait: bool = True) -> None:
        """Remove what ``conn`` may delete: the done prefix of its subject with one purge,
        done frames behind a frame still needed (a stored KNOCK never acked, a frame
        kept for a stale connection) one by one."""
        while conn.done:
            if wait:
                await asyncio.sleep(ACK_FLUSH_DELAY)
            upto = 0
            while conn.seen and conn.seen[0] in conn.done:
                upto = conn.seen.popleft()
                conn.done.discard(upto)
            behind = [seq for seq in conn.seen if seq in conn.done]
            for seq in behind:
                conn.done.discard(seq)
            if behind:
                conn.seen = deque(seq for seq in conn.seen if seq not in set(behind))
            if upto:
                await self._purge_upto(conn.did, upto)
            for seq in behind:
                await self._delete(seq)

    async def _purge_upto(self, did: str, seq: int) -> None:
        """Delete every frame stored for ``did`` with a stream sequence up to ``seq``."""
        try:
            await retrying("purge", lambda: self.js.purge_stream(self.stream, subject=self._subject(did), seq=seq + 1))
        except (nats.js.errors.APIError, *TRANSIENT) as exc:  # type: ignore[misc]
            logger.warning("could not remove acked frames of %s: %s", did, exc)

    async def _delete(self, seq: int) -> None:
        try:
            await retrying("delete", lambda: self.js.delete_msg(self.stream, seq))
        except nats.js.errors.NotFoundError:
            pass  # already deleted (a duplicate ack) or expired
        except (nats.js.errors.APIError, *TRANSIENT) as exc:  # type: ignore[misc]
            # Not lost, at worst delivered again on the next connect (and deduplicated).
            logger.warning("could not delete stored frame %d: %s", seq, exc)
