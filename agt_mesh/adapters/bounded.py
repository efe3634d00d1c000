"""Per-peer bookkeeping of a fixed size: rate windows and sets of recent keys.

Peers choose how many identities they use, so anything the adapters remember per peer (or
per message, or per transfer) is kept in a structure that forgets its oldest entries past a
fixed count: a flood of strangers costs a bounded amount of memory, never more.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Hashable

__all__ = ["MAX_TRACKED_PEERS", "RateWindow", "RecentKeys"]

#: Per-peer counters of a rate window are forgotten beyond this many peers (the least
#: recently seen first).
MAX_TRACKED_PEERS = 4096


class RateWindow:
    """At most ``limit`` events per key in any ``window`` seconds, for at most
    :data:`MAX_TRACKED_PEERS` keys (``limit=1``: once per window)."""

    def __init__(self, limit: int, window: float = 60.0) -> None:
        self.limit = limit
        self.window = window
        self._hits: collections.OrderedDict[Hashable, collections.deque[float]] = collections.OrderedDict()

    def allow(self, key: Hashable, now: float | None = None) -> bool:
        """Count an event for ``key`` if the window has room; whether it had."""
        now = time.monotonic() if now is None else now
        hits = self._hits.get(key)
        if hits is None:
            hits = self._hits[key] = collections.deque()
            while len(self._hits) > MAX_TRACKED_PEERS:
                self._hits.popitem(last=False)
        self._hits.move_to_end(key)
        while hits and now - hits[0] >= self.window:
            hits.popleft()
        if len(hits) >= self.limit:
            return False
        hits.append(now)
        return True


class RecentKeys:
    """The last ``size`` keys added (insertion order; the oldest are forgotten first)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._keys: collections.OrderedDict[Hashable, None] = collections.OrderedDict()

    def add(self, key: Hashable) -> None:
        self._keys[key] = None
        while len(self._keys) > self.size:
            self._keys.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)
