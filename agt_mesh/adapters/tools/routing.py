"""Where each inbound message goes.

The router is the client's ``on_message`` hook.  By envelope type:

* ``task_progress`` ticks keep the matching ``mesh_send`` waiting (they reset its idle
  timeout) and are consumed;
* a ``task_response`` that a ``mesh_send`` waits for is handed to it and consumed (any other
  stays in the inbox, to be read with ``mesh_inbox`` / ``mesh_await``);
* ``file_transfer_ack`` s go to the ``mesh_transfer_file`` waiting for them;
* file envelopes go to the fair file queue (:mod:`.receipt`), which puts a short notice in
  the inbox in their place;
* a ``peers_update`` replaces the roster only when it comes end-to-end encrypted from a DID
  configured as a roster source; any other is refused (an event) and shown as a message;
* everything else is offered to the interceptors (the auto-responder), then stays in the
  inbox and is announced (:class:`~.hooks.Arrivals`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agt_mesh.adapters import envelopes as envs
from agt_mesh.adapters.bounded import RecentKeys
from agt_mesh.adapters.tools.config import AdapterConfig
from agt_mesh.adapters.tools.hooks import Arrivals, Events
from agt_mesh.adapters.tools.receipt import FileIntake
from agt_mesh.adapters.tools.views import Views
from agt_mesh.shell.inbox import InboundMessage

if TYPE_CHECKING:
    from agt_mesh.shell.client import MeshClient

__all__ = ["AckWaiter", "Interceptor", "ReplyWaiter", "Router"]

log = logging.getLogger("agt_mesh.adapters")

#: ``interceptor(message, envelope) -> True`` to take a message out of the tools' view.
Interceptor = Callable[[InboundMessage, dict[str, Any]], bool]

#: Request ids we sent that are remembered (a reflected copy is never auto-answered).
_OWN_REQUEST_MEMORY = 4096


@dataclass
class ReplyWaiter:
    """A ``mesh_send`` waiting for the answer to ``request_id`` from ``peer``."""

    peer: str
    request_id: str
    future: asyncio.Future[tuple[InboundMessage, dict[str, Any]]]
    last_activity: float
    progress: int = 0
    last_stage: str | None = None


@dataclass
class AckWaiter:
    """A ``mesh_transfer_file`` waiting for the acknowledgement of its transfer."""

    peer: str
    transfer_id: str
    file_name: str
    future: asyncio.Future[dict[str, Any]]


@dataclass(eq=False, repr=False)
class Router:
    """Routes the inbound messages of one client (see the module docstring)."""

    client: MeshClient
    config: AdapterConfig
    views: Views
    events: Events
    arrivals: Arrivals
    intake: FileIntake
    closed: bool = False
    _interceptors: list[Interceptor] = field(default_factory=list, init=False)
    _replies: dict[str, ReplyWaiter] = field(default_factory=dict, init=False)
    _acks: list[AckWaiter] = field(default_factory=list, init=False)
    _own_requests: RecentKeys = field(default_factory=lambda: RecentKeys(_OWN_REQUEST_MEMORY), init=False)

    def add_interceptor(self, interceptor: Interceptor) -> None:
        self._interceptors.append(interceptor)

    def remember_request(self, request_id: str) -> None:
        """Record a request id we sent (so a reflected copy is never auto-answered)."""
        self._own_requests.add(request_id)

    def is_own_request(self, request_id: str | None) -> bool:
        return request_id is not None and request_id in self._own_requests

    # -- waiters ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def expecting_reply(self, peer: str, request_id: str) -> Iterator[ReplyWaiter]:
        """Catch the reply to ``request_id`` (and its progress ticks) while inside."""
        waiter = ReplyWaiter(peer, request_id, asyncio.get_running_loop().create_future(), time.monotonic())
        self._replies[request_id] = waiter
        try:
            yield waiter
        finally:
            self._replies.pop(request_id, None)

    async def wait_reply(
        self, waiter: ReplyWaiter, idle: float, hard_deadline: float
    ) -> tuple[InboundMessage, dict[str, Any]] | None:
        """The reply, or None after ``idle`` seconds without progress (or at the deadline)."""
        while True:
            now = time.monotonic()
            until = min(waiter.last_activity + idle, hard_deadline)
            if until <= now:
                return None
            try:
                return await asyncio.wait_for(asyncio.shield(waiter.future), until - now)
            except TimeoutError:
                continue  # a progress tick may have moved last_activity: re-check

    @contextlib.contextmanager
    def expecting_ack(self, peer: str, transfer_id: str, file_name: str) -> Iterator[AckWaiter]:
        """Catch the acknowledgement of a transfer while inside."""
        waiter = AckWaiter(peer, transfer_id, file_name, asyncio.get_running_loop().create_future())
        self._acks.append(waiter)
        try:
            yield waiter
        finally:
            self._acks.remove(waiter)

    # -- routing ------------------------------------------------------------------------------

    def take(self, msg: InboundMessage, *, consume: bool = True) -> None:
        """Take ``msg`` out of the in-memory inbox (and, unless told not to, consume it)."""
        self.client.inbox.drain(lambda m: m is msg)
        if consume:
            self.client.consume(msg.message_id)

    def on_message(self, msg: InboundMessage) -> None:
        """The client's ``on_message`` hook."""
        if self.closed:
            return
        self.views.note_sender(msg)
        env = envs.parse_envelope(msg.payload)
        if env is None:
            self.arrivals.announce(msg)
            return
        env = envs.unwrap_file_transfer(env)
        kind = env["type"]
        sender = msg.sender
        if kind == envs.TASK_PROGRESS:
            self._touch(sender, envs.correlation_id(env), env)
            self.take(msg)
        elif kind == envs.TASK_RESPONSE and self._resolve_reply(sender, env, msg):
            self.take(msg)
        elif kind == envs.FILE_ACK:
            self._resolve_ack(sender, env)
            self.take(msg)
        elif kind in (envs.FILE_TRANSFER, envs.FILE_CHUNK):
            self.take(msg)
            self.intake.queue(msg, env)
        elif kind == envs.PEERS_UPDATE and self._is_roster_source(msg):
            self._update_roster(env)
            self.take(msg)
        else:
            if kind == envs.PEERS_UPDATE:
                self.events.emit(
                    "roster_refused",
                    sender,
                    "peers_update ignored: the sender is not a configured roster source"
                    + (" (it came in plaintext)" if msg.plaintext else ""),
                )
            if self._intercepted(msg, env):
                self.take(msg, consume=False)
                return
            self.arrivals.announce(msg)

    def _intercepted(self, msg: InboundMessage, env: dict[str, Any]) -> bool:
        for interceptor in list(self._interceptors):
            try:
                if interceptor(msg, env):
                    return True
            except Exception:
                log.exception("interceptor failed")
        return False

    def _touch(self, sender: str, cid: str | None, env: dict[str, Any]) -> None:
        now = time.monotonic()
        stage = env.get("stage") if isinstance(env.get("stage"), str) else None
        for waiter in self._replies.values():
            if waiter.peer == sender and (cid is None or cid == waiter.request_id):
                waiter.last_activity = now
                waiter.progress += 1
                waiter.last_stage = stage

    def _resolve_reply(self, sender: str, env: dict[str, Any], msg: InboundMessage) -> bool:
        cid = envs.correlation_id(env)
        candidates = ([self._replies[cid]] if cid is not None and cid in self._replies else []) or (
            [w for w in self._replies.values() if w.peer == sender] if cid is None else []
        )
        for waiter in candidates:
            if waiter.peer == sender and not waiter.future.done():
                waiter.future.set_result((msg, env))
                return True
        return False

    def _resolve_ack(self, sender: str, env: dict[str, Any]) -> None:
        tid = env.get("transfer_id") if isinstance(env.get("transfer_id"), str) else None
        for waiter in self._acks:
            if waiter.peer != sender or waiter.future.done():
                continue
            if tid == waiter.transfer_id or (tid is None and env.get("file_name") == waiter.file_name):
                waiter.future.set_result(env)
                return

    def _is_roster_source(self, msg: InboundMessage) -> bool:
        """Only the configured DIDs, and only end-to-end encrypted: a display name is a claim
        anyone can register, and a plaintext frame's sender rests on the relay's word."""
        return not msg.plaintext and msg.sender in self.config.roster_sources

    def _update_roster(self, env: dict[str, Any]) -> None:
        peers = env.get("peers")
        if not isinstance(peers, list):
            return
        roster: dict[str, str] = {}
        for entry in peers:
            if isinstance(entry, str):
                roster[entry] = ""
            elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
                role = entry.get("role")
                roster[entry["name"]] = role if isinstance(role, str) else ""
        self.config.roster = roster
