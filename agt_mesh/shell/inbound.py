"""Pieces of ``MeshClient``'s receive path: the byte-bounded frame queue, the per-peer
holding area for frames of a peer over its inbox share, and the health report.

The receive path is: relay socket → :class:`FrameQueue` (bounded in bytes: when it is
full the socket reader waits, so the relay's socket — not our memory — holds the rest) →
one processing task → inbox.  A peer that has its fair share of the inbox waiting gets
its further ``message`` frames set aside in :class:`Parking` (not processed, not
acknowledged) until the application reads some of its messages; other peers' frames go
on being processed meanwhile.  Parking is bounded in bytes too: beyond it a frame is
dropped *unacknowledged* (so a relay that stored it delivers it again, and an
``agt_mesh`` sender re-sends it when its receipt does not come) — an acknowledged message
is never dropped.
"""

from __future__ import annotations

import asyncio
import collections
import sys
from dataclasses import asdict, dataclass
from typing import Any

__all__ = [
    "INBOUND_QUEUE_BYTES",
    "INBOUND_QUEUE_FRAMES",
    "PARKED_BYTES",
    "PARKED_PEER_BYTES",
    "FrameQueue",
    "Health",
    "Parking",
    "frame_size",
]

_MiB = 1024 * 1024
#: Bytes of frame text waiting between the socket reader and the processing task: two
#: maximal (16 MiB) frames.  A relay connection negotiates no compression (see
#: ``RelayTransport``), so these are also the bytes that came over the wire.
INBOUND_QUEUE_BYTES = 32 * _MiB
#: Frames waiting there (small frames: bounds the per-frame bookkeeping).
INBOUND_QUEUE_FRAMES = 1024
#: Bytes of frames set aside for one peer over its inbox share: one maximal frame.
PARKED_PEER_BYTES = 16 * _MiB
#: Bytes of frames set aside for all peers together; beyond it the peer with the most
#: set aside loses its newest frame first.
PARKED_BYTES = 32 * _MiB


def frame_size(text: str | bytes) -> int:
    """Bytes of memory a frame's text takes (what the queue counts)."""
    return sys.getsizeof(text)


def object_size(obj: Any) -> int:
    """Approximate bytes of a decoded frame (its strings dominate)."""
    if isinstance(obj, dict):
        return 256 + sum(object_size(v) for v in obj.values())
    if isinstance(obj, str):
        return 49 + len(obj)
    if isinstance(obj, list):
        return 56 + sum(object_size(v) for v in obj)
    return 32


class FrameQueue:
    """FIFO of inbound frame texts, bounded in bytes and frames (one reader, one writer).

    ``put`` waits while the queue is full, except that an empty queue always takes one
    frame (a frame can be as large as the whole byte bound).  :meth:`kick` wakes a waiting
    ``get`` with ``None`` (the processor then looks at parked frames).
    """

    def __init__(self, max_bytes: int = INBOUND_QUEUE_BYTES, max_frames: int = INBOUND_QUEUE_FRAMES) -> None:
        self.max_bytes = max_bytes
        self.max_frames = max_frames
        self._items: collections.deque[tuple[str, int]] = collections.deque()
        self._bytes = 0
        self._stopped = False
        self._kicked = False
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    def _has_room(self, size: int) -> bool:
        if not self._items:
            return True
        return len(self._items) < self.max_frames and self._bytes + size <= self.max_bytes

    async def put(self, text: str) -> None:
        size = frame_size(text)
        while not self._has_room(size):
            self._writable.clear()
            await self._writable.wait()
        self._items.append((text, size))
        self._bytes += size
        self._readable.set()

    def stop(self) -> None:
        """Mark the end: ``get`` returns what is queued, then raises ``EOFError``."""
        self._stopped = True
        self._readable.set()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def reset(self) -> None:
        """Allow a new run after ``stop`` (the same client connecting again)."""
        self._stopped = False

    def kick(self) -> None:
        self._kicked = True
        self._readable.set()

    async def get(self, limit: int) -> list[str] | None:
        """Up to ``limit`` frames (waiting for the first); ``None`` when kicked.

        Raises:
            EOFError: stopped and empty.
        """
        while not (self._items or self._stopped or self._kicked):
            self._readable.clear()
            await self._readable.wait()
        kicked, self._kicked = self._kicked, False
        if not self._items:
            if kicked:
                return None
            raise EOFError
        out: list[str] = []
        while self._items and len(out) < limit:
            text, size = self._items.popleft()
            self._bytes -= size
            out.append(text)
        self._writable.set()
        return out


class Parking:
    """Frames of peers over their inbox share, per peer in arrival order, bounded in bytes."""

    def __init__(self, peer_bytes: int = PARKED_PEER_BYTES, total_bytes: int = PARKED_BYTES) -> None:
        self.peer_bytes = peer_bytes
        self.total_bytes = total_bytes
        self._frames: dict[str, collections.deque[tuple[dict[str, Any], int]]] = {}
        self._bytes: dict[str, int] = {}
        #: ids parked per peer: a sender re-sending an unconfirmed frame is parked once
        self._ids: dict[str, set[str]] = {}
        #: frames dropped (unacknowledged) because parking was full
        self.dropped = 0

    def __contains__(self, peer: str) -> bool:
        return peer in self._frames

    def __len__(self) -> int:
        return sum(len(q) for q in self._frames.values())

    @property
    def bytes(self) -> int:
        return sum(self._bytes.values())

    def peers(self) -> list[str]:
        return list(self._frames)

    def park(self, peer: str, obj: dict[str, Any], size: int) -> list[tuple[str, dict[str, Any]]]:
        """Set ``obj`` aside for ``peer``; returns ``(peer, frame)`` pairs dropped to make
        room (possibly ``obj`` itself).  Dropped frames must not be acknowledged."""
        dropped: list[tuple[str, dict[str, Any]]] = []
        fid = obj.get("id")
        if isinstance(fid, str) and fid in self._ids.get(peer, ()):
            return []  # the same frame again (a re-send): already waiting here
        if size > self.peer_bytes or self._bytes.get(peer, 0) + size > self.peer_bytes:
            self.dropped += 1
            return [(peer, obj)]
        while self.bytes + size > self.total_bytes:
            biggest = max(self._bytes, key=self._bytes.__getitem__)
            if biggest == peer or self._bytes[biggest] < self._bytes.get(peer, 0) + size:
                self.dropped += 1
                return [*dropped, (peer, obj)]  # the newcomer is the biggest: it pays
            victim, vsize = self._frames[biggest].pop()  # its newest frame
            self._forget(biggest, victim, vsize)
            self.dropped += 1
            dropped.append((biggest, victim))
        self._frames.setdefault(peer, collections.deque()).append((obj, size))
        self._bytes[peer] = self._bytes.get(peer, 0) + size
        if isinstance(fid, str):
            self._ids.setdefault(peer, set()).add(fid)
        return dropped

    def _forget(self, peer: str, obj: dict[str, Any], size: int) -> None:
        self._bytes[peer] -= size
        fid = obj.get("id")
        if isinstance(fid, str):
            self._ids.get(peer, set()).discard(fid)
        if not self._frames[peer]:
            del self._frames[peer], self._bytes[peer]
            self._ids.pop(peer, None)

    def head(self, peer: str) -> tuple[dict[str, Any], int] | None:
        queue = self._frames.get(peer)
        return queue[0] if queue else None

    def pop(self, peer: str) -> dict[str, Any]:
        obj, size = self._frames[peer].popleft()
        self._forget(peer, obj, size)
        return obj

    def take_all(self) -> list[dict[str, Any]]:
        """Every parked frame, each peer's in order (at shutdown)."""
        out = [obj for q in self._frames.values() for obj, _ in q]
        self._frames.clear()
        self._bytes.clear()
        self._ids.clear()
        return out


@dataclass(frozen=True, slots=True)
class Health:
    """What ``MeshClient.health()`` reports: is anything being received?

    ``inbound`` is ``"running"`` (frames are processed as they come), ``"stalled"``
    (committing to the state store fails; frames wait, nothing is acknowledged or
    delivered until it works again — ``detail`` says why), ``"restarting"`` (the
    processing task failed and is being restarted) or ``"stopped"`` (not running:
    not connected, or disconnected).  ``ok`` is true only when connected and running.
    """

    connected: bool
    inbound: str
    detail: str | None
    #: times the processing task failed and was restarted
    restarts: int
    #: frames dropped because processing them raised an unexpected error
    internal_errors: int
    queued_frames: int
    queued_bytes: int
    #: frames of peers over their inbox share, set aside (not yet acknowledged)
    parked_frames: int
    parked_bytes: int
    #: frames dropped, unacknowledged, because parking was full
    parked_dropped: int
    #: bytes of frames waiting in the pre-KNOCK buffer
    buffered_bytes: int
    inbox_messages: int
    inbox_bytes: int

    @property
    def ok(self) -> bool:
        return self.connected and self.inbound == "running"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}
