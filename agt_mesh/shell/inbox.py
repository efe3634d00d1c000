"""The application inbox: received messages, bounded in messages and bytes, fair per sender.

Messages wait in one queue per sender.  :meth:`Inbox.get` (and so ``messages()`` and
``wait_for()``) serves the senders in turn, each sender's messages in the order they
arrived, so one peer that sent ten thousand messages delays another peer's next message
by one message, not by ten thousand.  :meth:`Inbox.peek` and :meth:`Inbox.drain` list
messages in arrival order.

The client asks :meth:`Inbox.admits` before it processes a sender's next frame: a sender
gets at most a fair share of the capacity (the capacity divided by the number of senders
with messages waiting), so a flood from one peer is held back — at that peer only — while
every other peer's messages keep coming in.  See ``MeshClient`` for what happens to the
frames held back.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from agt_mesh.core.encoding import compact_json

__all__ = ["DEFAULT_INBOX_BYTES", "DEFAULT_INBOX_SIZE", "InboundMessage", "Inbox"]

#: Messages the inbox holds (the application has not read them yet).
DEFAULT_INBOX_SIZE = 10_000
#: Payload bytes the inbox holds: 64 MiB of JSON text.  Decoded Python values take up to
#: about 20x their text in the worst case (many tiny containers), so the count and this
#: byte bound together keep a stalled application's inbox within a few hundred MiB.
DEFAULT_INBOX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A message the application has not consumed yet."""

    sender: str
    payload: Any
    message_id: str
    received_at: float
    plaintext: bool = False
    sender_name: str | None = field(default=None)

    def to_json(self) -> dict[str, Any]:
        return {
            "from": self.sender,
            "from_name": self.sender_name,
            "payload": self.payload,
            "id": self.message_id,
            "received_at": self.received_at,
            "plaintext": self.plaintext,
        }


def payload_size(msg: InboundMessage) -> int:
    """Bytes a message is counted for when its JSON text is not at hand."""
    try:
        return len(compact_json(msg.payload))
    except (TypeError, ValueError, RecursionError):
        return 0


class Inbox:
    """Bounded, per-sender fair queue of received messages.

    ``put`` waits while the inbox is full (backpressure for callers that want it);
    ``add`` never waits (the client checks :meth:`admits` before it processes a frame,
    so it never has to block the receive path).  ``get`` can select by predicate without
    disturbing the order of the other messages.
    """

    def __init__(self, maxsize: int = DEFAULT_INBOX_SIZE, max_bytes: int = DEFAULT_INBOX_BYTES) -> None:
        if maxsize <= 0 or max_bytes <= 0:
            raise ValueError("inbox size and bytes must be positive")
        self.maxsize = maxsize
        self.max_bytes = max_bytes
        # per sender: (arrival number, message, bytes), oldest first
        self._queues: dict[str, collections.deque[tuple[int, InboundMessage, int]]] = {}
        # senders with messages, in the order they are served next
        self._turn: collections.deque[str] = collections.deque()
        self._bytes: dict[str, int] = {}
        self._count = 0
        self._total_bytes = 0
        self._arrivals = itertools.count()
        self._changed = asyncio.Condition()
        #: called (without arguments) whenever messages leave the inbox
        self.on_removed: Callable[[], None] | None = None

    # -- size and shares --------------------------------------------------------------

    def __len__(self) -> int:
        return self._count

    @property
    def bytes(self) -> int:
        """Payload bytes waiting."""
        return self._total_bytes

    def usage(self, sender: str) -> tuple[int, int]:
        """``(messages, bytes)`` waiting from ``sender``."""
        queue = self._queues.get(sender)
        return (len(queue), self._bytes.get(sender, 0)) if queue else (0, 0)

    def senders(self) -> list[str]:
        return list(self._turn)

    def admits(self, sender: str, extra_messages: int = 0, extra_bytes: int = 0) -> bool:
        """Whether a further message from ``sender`` may come in now.

        ``extra_*`` count messages from it already admitted but not yet added.  A sender
        may hold a fair share (the capacity divided by the number of senders with
        messages waiting, itself included) while the inbox has room; a sender with
        nothing waiting also gets in while the inbox is at most a tenth (in messages) or
        a quarter (in bytes) over its capacity, so a newcomer is not locked out by a
        flood that filled the inbox.
        """
        count, size = self.usage(sender)
        count += extra_messages
        size += extra_bytes
        active = len(self._turn) + (0 if sender in self._queues else 1)
        if count >= max(1, self.maxsize // active) or size >= max(1, self.max_bytes // active):
            return False
        total, total_bytes = self._count + extra_messages, self._total_bytes + extra_bytes
        if total < self.maxsize and total_bytes < self.max_bytes:
            return True
        return count == 0 and total < self.maxsize + self.maxsize // 10 and total_bytes < self.max_bytes * 5 // 4

    # -- adding -------------------------------------------------------------------------

    def add(self, item: InboundMessage, size: int | None = None) -> None:
        """Append without waiting, whatever the fill (the caller decided admission)."""
        n = payload_size(item) if size is None else size
        queue = self._queues.get(item.sender)
        if queue is None:
            queue = self._queues[item.sender] = collections.deque()
            self._turn.append(item.sender)
        queue.append((next(self._arrivals), item, n))
        self._bytes[item.sender] = self._bytes.get(item.sender, 0) + n
        self._count += 1
        self._total_bytes += n

    async def put(self, item: InboundMessage, size: int | None = None) -> None:
        """Append, waiting while the inbox is full."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._count < self.maxsize and self._total_bytes < self.max_bytes)
            self.add(item, size)
            self._changed.notify_all()

    def put_nowait(self, item: InboundMessage, size: int | None = None) -> bool:
        """Append unless full; returns whether it was added."""
        if self._count >= self.maxsize:
            return False
        self.add(item, size)
        return True

    async def notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # -- removing -----------------------------------------------------------------------

    def _remove(self, sender: str, index: int) -> InboundMessage:
        queue = self._queues[sender]
        if index == 0:
            _, msg, n = queue.popleft()
        else:
            _, msg, n = queue[index]
            del queue[index]
        self._bytes[sender] -= n
        self._count -= 1
        self._total_bytes -= n
        if not queue:
            del self._queues[sender]
            del self._bytes[sender]
            self._turn.remove(sender)
        return msg

    def _removed(self) -> None:
        if self.on_removed is not None:
            self.on_removed()

    def _ordered(self) -> list[tuple[int, InboundMessage, int]]:
        return list(heapq.merge(*self._queues.values(), key=lambda e: e[0]))

    def peek(self, limit: int | None = None) -> list[InboundMessage]:
        """Waiting messages in arrival order."""
        items = [m for _, m, _ in self._ordered()]
        return items if limit is None else items[:limit]

    def drain(self, predicate: Callable[[InboundMessage], bool] | None = None) -> list[InboundMessage]:
        """Remove and return every message (matching ``predicate``), in arrival order, without waiting."""
        gone_all: list[tuple[int, InboundMessage, int]] = []
        for sender in list(self._queues):
            queue = self._queues[sender]
            picked = [predicate is None or predicate(e[1]) for e in queue]
            gone = [e for e, p in zip(queue, picked, strict=True) if p]
            if not gone:
                continue
            gone_all.extend(gone)
            n = sum(e[2] for e in gone)
            self._count -= len(gone)
            self._total_bytes -= n
            if len(gone) < len(queue):
                self._queues[sender] = collections.deque(e for e, p in zip(queue, picked, strict=True) if not p)
                self._bytes[sender] -= n
            else:
                del self._queues[sender]
                del self._bytes[sender]
                self._turn.remove(sender)
        if not gone_all:
            return []
        self._removed()
        with contextlib.suppress(RuntimeError):  # no running loop: nobody can be waiting
            asyncio.get_running_loop().create_task(self.notify())
        return [m for _, m, _ in sorted(gone_all, key=lambda e: e[0])]

    def _find(self, predicate: Callable[[InboundMessage], bool] | None) -> tuple[str, int] | None:
        """The next message to hand out: senders in turn, each sender's in order."""
        for sender in self._turn:
            queue = self._queues[sender]
            if predicate is None:
                return sender, 0
            for i, (_, m, _) in enumerate(queue):
                if predicate(m):
                    return sender, i
        return None

    async def get(
        self, predicate: Callable[[InboundMessage], bool] | None = None, timeout: float | None = None
    ) -> InboundMessage:
        """Remove and return the next (matching) message, waiting up to ``timeout``.

        Senders are served in turn; each sender's messages come in arrival order.

        Raises:
            TimeoutError: if nothing matched in time.
        """

        async def wait() -> InboundMessage:
            async with self._changed:
                await self._changed.wait_for(lambda: self._find(predicate) is not None)
                found = self._find(predicate)
                assert found is not None
                sender, index = found
                msg = self._remove(sender, index)
                if sender in self._queues:  # its turn is over: the others go first
                    self._turn.remove(sender)
                    self._turn.append(sender)
                self._changed.notify_all()
            self._removed()
            return msg

        return await asyncio.wait_for(wait(), timeout)

    async def __aiter__(self) -> AsyncIterator[InboundMessage]:
        while True:
            yield await self.get()
