"""Inbound files: a fair queue in front of the :class:`~agt_mesh.adapters.files.FileReceiver`.

File envelopes (``file_transfer``, ``file_transfer_chunk``) wait in one queue per peer and
are processed one envelope per peer in turn, so a peer with a long backlog never delays
another peer's file; each peer's backlog and the total are bounded in bytes, and past the
bound an envelope is refused at once ("busy") instead of piling up in memory.

A saved file is acknowledged to the sender (its name relative to the incoming directory)
and announced in the inbox by a short ``file_received`` notice — once, however often a
duplicate arrives.  A refused or dropped transfer is reported to the sender (a generic
reason, at most a few times a minute), to the local log and the event listeners (the
details), and to the model (a short ``file_transfer_failed`` notice, rate-limited).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agt_mesh.adapters import envelopes as envs
from agt_mesh.adapters.bounded import RateWindow, RecentKeys
from agt_mesh.adapters.files import FileReceiver, ReceivedFile
from agt_mesh.adapters.tools.hooks import Arrivals, Events
from agt_mesh.errors import FileTransferError, MeshError
from agt_mesh.shell.inbox import InboundMessage

if TYPE_CHECKING:
    from agt_mesh.shell.client import MeshClient

__all__ = [
    "FAILURE_ACKS_PER_MINUTE",
    "FAILURE_NOTICES_PER_MINUTE",
    "MAX_QUEUED_FILE_BYTES_PER_PEER",
    "MAX_QUEUED_FILE_BYTES_TOTAL",
    "FileIntake",
]

log = logging.getLogger("agt_mesh.adapters")

_MiB = 1024 * 1024
#: Bytes of file envelopes one peer may have waiting for the receiver; more are refused at
#: once ("busy") instead of piling up in memory.  Two maximum-size single-message files.
MAX_QUEUED_FILE_BYTES_PER_PEER = 64 * _MiB
#: Bytes of file envelopes waiting in total.  A peer with nothing waiting is always admitted
#: one envelope, so a flood from others never shuts an honest peer out.
MAX_QUEUED_FILE_BYTES_TOTAL = 256 * _MiB
#: Failure acknowledgements sent to one peer per minute: a flood of refused transfers is not
#: answered envelope by envelope (the rest are logged and dropped).
FAILURE_ACKS_PER_MINUTE = 20
#: ``file_transfer_failed`` notices put in the inbox per peer per minute, so a flood cannot
#: bury the model's inbox in notices.
FAILURE_NOTICES_PER_MINUTE = 5
#: Failed transfers remembered, so their later chunks are dropped without another report.
_FAILED_MEMORY = 256
#: Saved transfers remembered, so a duplicate is acknowledged again but announced once.
_ANNOUNCED_MEMORY = 1024

Spawn = Callable[[Awaitable[Any], str], "asyncio.Task[Any]"]


def _transfer_id(env: dict[str, Any]) -> str | None:
    tid = env.get("transfer_id")
    return tid if isinstance(tid, str) else None


def _envelope_bytes(env: dict[str, Any]) -> int:
    """What a queued envelope costs: its payload, plus a fixed share for the rest."""
    data = env.get("data") if env.get("type") == envs.FILE_CHUNK else env.get("file_data")
    return (len(data) if isinstance(data, str) else 0) + 1024


@dataclass(eq=False, repr=False)
class FileIntake:
    """The fair queue of inbound file envelopes and what follows their receipt.

    Args:
        client: sends the acknowledgements, holds the inbox the notices go to.
        receiver: checks and saves the files.
        events: where refused and dropped transfers are reported.
        arrivals: announces the notices put in the inbox.
        spawn: runs a background task that the tools cancel when they close.
    """

    client: MeshClient
    receiver: FileReceiver
    events: Events
    arrivals: Arrivals
    spawn: Spawn
    #: inbound file outcomes by kind (``received``, ``queue_full``, ``evicted`` ...)
    stats: collections.Counter[str] = field(default_factory=collections.Counter, init=False)
    closed: bool = field(default=False, init=False)
    _queues: dict[str, collections.deque[tuple[InboundMessage, dict[str, Any], int]]] = field(
        default_factory=dict, init=False
    )
    _turns: collections.deque[str] = field(default_factory=collections.deque, init=False)
    _queued: dict[str, int] = field(default_factory=dict, init=False)
    _queued_total: int = field(default=0, init=False)
    _worker: asyncio.Task[None] | None = field(default=None, init=False)
    _failure_acks: RateWindow = field(default_factory=lambda: RateWindow(FAILURE_ACKS_PER_MINUTE), init=False)
    _failure_notices: RateWindow = field(default_factory=lambda: RateWindow(FAILURE_NOTICES_PER_MINUTE), init=False)
    _failed: RecentKeys = field(default_factory=lambda: RecentKeys(_FAILED_MEMORY), init=False)
    _announced: RecentKeys = field(default_factory=lambda: RecentKeys(_ANNOUNCED_MEMORY), init=False)

    def close(self) -> None:
        """Drop what waits (the receiver is closed by its owner)."""
        self.closed = True
        self._queues.clear()
        self._turns.clear()

    # -- the queue ----------------------------------------------------------------------------

    def queue(self, msg: InboundMessage, env: dict[str, Any]) -> None:
        """Queue a file envelope for its peer's turn, or refuse it at once when the peer's
        backlog (or everyone's) is full."""
        sender = msg.sender
        size = _envelope_bytes(env)
        queued = self._queued.get(sender, 0)
        full = queued + size > MAX_QUEUED_FILE_BYTES_PER_PEER or (
            queued > 0 and self._queued_total + size > MAX_QUEUED_FILE_BYTES_TOTAL
        )
        if full:
            self.stats["queue_full"] += 1
            self.spawn(
                self._refuse(msg, env, FileTransferError("busy", "the peer's backlog of file envelopes is full")),
                "agt-mesh-file-refused",
            )
            return
        q = self._queues.get(sender)
        if q is None:
            q = self._queues[sender] = collections.deque()
            self._turns.append(sender)
        q.append((msg, env, size))
        self._queued[sender] = queued + size
        self._queued_total += size
        if self._worker is None or self._worker.done():
            self._worker = self.spawn(self._loop(), "agt-mesh-files")

    async def _loop(self) -> None:
        """One envelope per peer in turn: a peer with a long backlog waits its turn like
        everyone else, so another peer's file is never stuck behind it."""
        while self._turns and not self.closed:
            sender = self._turns.popleft()
            q = self._queues.get(sender)
            if not q:
                self._queues.pop(sender, None)
                continue
            msg, env, size = q.popleft()
            self._queued[sender] -= size
            self._queued_total -= size
            if q:
                self._turns.append(sender)
            else:
                del self._queues[sender]
                self._queued.pop(sender, None)
            try:
                await self._receive(msg, env)
            except Exception as exc:  # one bad envelope must not stop everyone's files
                log.warning("file envelope from %s failed: %s", sender, type(exc).__name__)
                log.debug("file envelope failure", exc_info=True)

    # -- receipt ------------------------------------------------------------------------------

    async def _receive(self, msg: InboundMessage, env: dict[str, Any]) -> None:
        sender = msg.sender
        tid = _transfer_id(env)
        if tid is not None and (sender, tid) in self._failed:
            return
        try:
            if env["type"] == envs.FILE_TRANSFER:
                result: ReceivedFile | None = await asyncio.to_thread(self.receiver.accept_single, sender, env)
            else:
                result = await asyncio.to_thread(self.receiver.accept_chunk, sender, env)
        except FileTransferError as exc:
            await self._refuse(msg, env, exc)
            return
        finally:
            self._report_dropped()
        if result is None:
            return
        self.stats["received"] += 1
        log.info("file transfer %r from %s saved (%d bytes)", tid or msg.message_id, sender, result.size)
        self.spawn(
            self._send_quietly(
                sender,
                envs.file_ack(
                    transfer_id=tid,
                    file_name=result.file_name,
                    success=True,
                    saved_as=result.saved_as,
                    # relative to the receiver's incoming directory: the absolute path is ours
                    saved_to=result.saved_as,
                    size_bytes=result.size,
                    sha256=result.sha256,
                ),
            ),
            "agt-mesh-file-ack",
        )
        key = (sender, tid or f"msg:{msg.message_id}")
        if key in self._announced:
            return  # a duplicate: acknowledged again, announced once
        self._announced.add(key)
        notice = {"type": envs.FILE_RECEIVED, **result.summary()}
        if result.from_agent:
            notice["from_agent"] = result.from_agent
        await self._notice(msg, notice, f"file-{tid or msg.message_id}")

    def _report_dropped(self) -> None:
        """Report the transfers the receiver gave up (evicted for a fairer share, or idle)."""
        for dropped in self.receiver.take_dropped():
            self._mark_failed(dropped.sender, dropped.transfer_id)
            self.stats[dropped.reason] += 1
            self.events.emit(
                "file_dropped",
                dropped.sender,
                f"transfer {dropped.transfer_id!r} {dropped.reason}: "
                + (
                    "a peer holding fewer transfers needed the slot"
                    if dropped.reason == "evicted"
                    else "no new chunk in time"
                ),
            )
            if self._failure_acks.allow(dropped.sender):
                why = FileTransferError(dropped.reason, dropped.reason)
                self.spawn(
                    self._send_quietly(
                        dropped.sender,
                        envs.file_ack(
                            transfer_id=dropped.transfer_id,
                            file_name=dropped.file_name,
                            success=False,
                            error=why.peer_message,
                        ),
                    ),
                    "agt-mesh-file-ack",
                )

    def _mark_failed(self, sender: str, tid: str | None) -> None:
        if tid is not None:
            self._failed.add((sender, tid))

    async def _refuse(self, msg: InboundMessage, env: dict[str, Any], exc: FileTransferError) -> None:
        """Tell the sender (a generic reason, at most a few times a minute), the local log
        and the event listeners (the details), and the model (a short notice, rate-limited)."""
        sender = msg.sender
        tid = _transfer_id(env)
        raw_name = env.get("file_name")
        name = raw_name if isinstance(raw_name, str) else "file"
        self._mark_failed(sender, tid)
        self.stats[exc.kind] += 1
        self.events.emit("file_refused", sender, f"transfer {tid or msg.message_id!r} refused ({exc.kind}): {exc}")
        if self._failure_acks.allow(sender):
            await self._send_quietly(
                sender, envs.file_ack(transfer_id=tid, file_name=name, success=False, error=exc.peer_message)
            )
        if self._failure_notices.allow(sender):
            await self._notice(
                msg,
                {"type": envs.FILE_FAILED, "file_name": name, "error": exc.peer_message, "kind": exc.kind},
                f"file-failed-{tid or uuid.uuid4()}",
            )

    async def _notice(self, msg: InboundMessage, payload: dict[str, Any], message_id: str) -> None:
        """Put a local notice about ``msg`` in the inbox (from the same sender) and announce it."""
        notice = InboundMessage(msg.sender, payload, message_id, time.time(), msg.plaintext, msg.sender_name)
        if not self.client.inbox.put_nowait(notice):
            log.warning("inbox full: %s notice from %s dropped", payload.get("type"), msg.sender)
            return
        await self.client.inbox.notify()
        self.arrivals.announce(notice)

    async def _send_quietly(self, to: str, payload: dict[str, Any]) -> None:
        try:
            await self.client.send(to, payload)
        except MeshError as exc:
            log.warning("could not send %s to %s: %s", payload.get("type"), to, exc)
