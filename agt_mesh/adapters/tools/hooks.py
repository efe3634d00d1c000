"""What a host can hook into: messages as they become visible, and local events.

:class:`Arrivals` tells listeners (Hermes' message injection, the bridge) about each message
the tools will show, and wakes ``mesh_await``.  :class:`Events` reports what happened
locally — refused or dropped file transfers, refused roster updates, requests the responder
would not answer — to the log and to event listeners; an event's ``detail`` never holds
message text.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from agt_mesh.adapters.bounded import RateWindow
from agt_mesh.shell.inbox import InboundMessage

__all__ = ["Arrivals", "EventListener", "Events", "Listener"]

log = logging.getLogger("agt_mesh.adapters")

#: ``listener(message)`` for every message the tools can see, as it arrives.
Listener = Callable[[InboundMessage], None]
#: ``listener(kind, peer, detail)`` for local events: ``file_refused``, ``file_dropped``,
#: ``roster_refused``, ``responder_refused``.  ``detail`` never holds message text.
EventListener = Callable[[str, str | None, str], None]

#: Local event log lines per (kind, peer) per minute at WARNING; the rest go to DEBUG.
_EVENT_LOGS_PER_MINUTE = 5


class Arrivals:
    """Listeners of visible messages, and the signal ``mesh_await`` waits on."""

    def __init__(self) -> None:
        self._listeners: list[Listener] = []
        self._signal: asyncio.Event | None = None

    def start(self) -> None:
        """Create the signal (on the event loop the tools run on)."""
        self._signal = asyncio.Event()

    @property
    def signal(self) -> asyncio.Event:
        """Set at the next arrival: take it *before* looking at the inbox, then wait on it."""
        assert self._signal is not None, "the tools are not started"
        return self._signal

    def add(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def announce(self, msg: InboundMessage) -> None:
        """``msg`` is visible now: wake the waiters and tell the listeners."""
        if self._signal is not None:
            self._signal.set()
            self._signal = asyncio.Event()
        for listener in list(self._listeners):
            try:
                listener(msg)
            except Exception:
                log.exception("message listener failed")


class Events:
    """Local events: logged (WARNING, then DEBUG past a few a minute per kind and peer) and
    passed to the event listeners."""

    def __init__(self) -> None:
        self._listeners: list[EventListener] = []
        self._logs = RateWindow(_EVENT_LOGS_PER_MINUTE)

    def add(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    def emit(self, kind: str, peer: str | None, detail: str) -> None:
        """Report an event; ``detail`` must never contain message text."""
        level = logging.WARNING if self._logs.allow((kind, peer)) else logging.DEBUG
        log.log(level, "%s from %s: %s", kind, peer, detail)
        for listener in list(self._listeners):
            try:
                listener(kind, peer, detail)
            except Exception:
                log.exception("event listener failed")
