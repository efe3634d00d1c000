"""The application inbox: a bounded FIFO of received messages with selective waiting."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["InboundMessage", "Inbox"]


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


class Inbox:
    """Bounded FIFO.  ``put`` waits while full (backpressure toward the relay: unacked
    frames stay with the relay), so nothing is dropped; ``get`` can select by predicate
    without disturbing the order of the other messages."""

    def __init__(self, maxsize: int = 10_000) -> None:
        if maxsize <= 0:
            raise ValueError("inbox size must be positive")
        self.maxsize = maxsize
        self._items: collections.deque[InboundMessage] = collections.deque()
        self._changed = asyncio.Condition()

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: InboundMessage) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: len(self._items) < self.maxsize)
            self._items.append(item)
            self._changed.notify_all()

    def put_nowait(self, item: InboundMessage) -> bool:
        """Append unless full; returns whether it was added."""
        if len(self._items) >= self.maxsize:
            return False
        self._items.append(item)
        return True

    async def notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def peek(self, limit: int | None = None) -> list[InboundMessage]:
        items = list(self._items)
        return items if limit is None else items[:limit]

    def drain(self, predicate: Callable[[InboundMessage], bool] | None = None) -> list[InboundMessage]:
        """Remove and return every message (matching ``predicate``), in order, without waiting."""
        if predicate is None:
            out = list(self._items)
            self._items.clear()
        else:
            out = [m for m in self._items if predicate(m)]
            keep = [m for m in self._items if not predicate(m)]
            self._items = collections.deque(keep)
        if out:
            with contextlib.suppress(RuntimeError):  # no running loop: nobody can be waiting
                asyncio.get_running_loop().create_task(self.notify())
        return out

    async def get(
        self, predicate: Callable[[InboundMessage], bool] | None = None, timeout: float | None = None
    ) -> InboundMessage:
        """Remove and return the first (matching) message, waiting up to ``timeout``.

        Raises:
            TimeoutError: if nothing matched in time.
        """

        def find() -> InboundMessage | None:
            for m in self._items:
                if predicate is None or predicate(m):
                    return m
            return None

        async def wait() -> InboundMessage:
            async with self._changed:
                await self._changed.wait_for(lambda: find() is not None)
                found = find()
                assert found is not None
                self._items.remove(found)
                self._changed.notify_all()
                return found

        return await asyncio.wait_for(wait(), timeout)

    async def __aiter__(self) -> AsyncIterator[InboundMessage]:
        while True:
            yield await self.get()
