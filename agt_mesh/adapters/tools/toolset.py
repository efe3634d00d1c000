""":class:`MeshTools`: the canonical tools bound to one connected client.

It composes the parts of the tool surface, each in its own module — the argument
declarations (:mod:`.args`), the tools (:mod:`.handlers`), inbound routing
(:mod:`.routing`) with the fair file queue (:mod:`.receipt`), names and views
(:mod:`.views`), and the hooks a host adds (:mod:`.hooks`) — and owns their lifecycle and
the background tasks they start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterable
from typing import TYPE_CHECKING, Any

from agt_mesh.adapters.files import FileReceiver
from agt_mesh.adapters.paths import FileRoots, default_file_dirs
from agt_mesh.adapters.tools.config import AdapterConfig
from agt_mesh.adapters.tools.handlers import tool_specs
from agt_mesh.adapters.tools.hooks import Arrivals, EventListener, Events, Listener
from agt_mesh.adapters.tools.receipt import FileIntake
from agt_mesh.adapters.tools.routing import Interceptor, Router
from agt_mesh.adapters.tools.spec import ToolSpec, error_for, error_result
from agt_mesh.adapters.tools.views import Views, is_did, is_visible
from agt_mesh.errors import MeshConfigError
from agt_mesh.shell.inbox import InboundMessage

if TYPE_CHECKING:
    import collections

    from agt_mesh.shell.client import MeshClient

__all__ = ["MeshTools"]

log = logging.getLogger("agt_mesh.adapters")


class MeshTools:
    """The canonical tools bound to one ``MeshClient`` (call :meth:`start` once connected).

    Args:
        client: the mesh client (connected, or connected before :meth:`start`).
        config: adapter settings; the file directories are filled in with their defaults
            and created (0700).

    Raises:
        MeshConfigError: a file directory lies inside the state directory (or another
            protected path) or cannot be created; a roster source is not a DID.
    """

    def __init__(self, client: MeshClient, config: AdapterConfig | None = None) -> None:
        self.client = client
        self.config = cfg = config or AdapterConfig()
        bad = sorted(s for s in cfg.roster_sources if not is_did(s))
        if bad:
            raise MeshConfigError(
                f"roster sources must be DIDs (display names are claims anyone can register): {', '.join(bad)}"
            )
        outbox, incoming = default_file_dirs(client.state_dir)
        protected = [*cfg.protected_paths, *([client.state_dir] if client.state_dir is not None else [])]
        self.roots = FileRoots(
            cfg.files_root or outbox, cfg.incoming_dir or incoming, tuple(protected), cfg.allow_hidden_files
        )
        self.roots.prepare()
        cfg.files_root, cfg.incoming_dir = self.roots.outbox, self.roots.incoming
        self.receiver = FileReceiver(
            self.roots.incoming, max_bytes=cfg.max_file_bytes, limits=cfg.transfer_limits, roots=self.roots
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._started = False
        self.events = Events()
        self.arrivals = Arrivals()
        self.views = Views(client, cfg)
        self.intake = FileIntake(client, self.receiver, self.events, self.arrivals, self.spawn)
        self.router = Router(client, cfg, self.views, self.events, self.arrivals, self.intake)
        self._specs = {spec.name: spec for spec in tool_specs(self)}

    # -- lifecycle ----------------------------------------------------------------------------

    @property
    def self_name(self) -> str | None:
        return self.client.display_name

    @property
    def file_stats(self) -> collections.Counter[str]:
        """Inbound file outcomes by kind (``received``, ``queue_full``, ``evicted`` ...)."""
        return self.intake.stats

    def start(self) -> None:
        """Hook into the client and route what already waits in its inbox (idempotent).

        Must run on the client's event loop.
        """
        if self._started:
            return
        self._started = True
        self.arrivals.start()
        self.client.on_message(self.router.on_message)
        for msg in self.client.inbox.peek():
            self.router.on_message(msg)

    async def close(self) -> None:
        """Stop routing and cancel background work (the client is left as it is)."""
        self.router.closed = True
        self.intake.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        await asyncio.to_thread(self.receiver.close)

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` in the background until it ends or the tools close."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("adapter task %s failed", task.get_name(), exc_info=task.exception())

    # -- hooks --------------------------------------------------------------------------------

    def add_interceptor(self, interceptor: Interceptor) -> None:
        """``interceptor(msg, envelope) -> bool``: return True to take the message (it leaves the
        in-memory inbox; consuming it durably is then the interceptor's job)."""
        self.router.add_interceptor(interceptor)

    def add_listener(self, listener: Listener) -> None:
        """``listener(msg)`` for each message the tools will show, as it arrives."""
        self.arrivals.add(listener)

    def add_event_listener(self, listener: EventListener) -> None:
        """``listener(kind, peer, detail)`` for local events (refused or dropped file
        transfers, refused roster updates, requests the responder would not answer)."""
        self.events.add(listener)

    def event(self, kind: str, peer: str | None, detail: str) -> None:
        """Report a local event: logged (WARNING, then DEBUG past a few a minute per peer)
        and passed to the event listeners.  ``detail`` must never contain message text."""
        self.events.emit(kind, peer, detail)

    def remember_request(self, request_id: str) -> None:
        """Record a request id we sent (so a reflected copy is never auto-answered)."""
        self.router.remember_request(request_id)

    def is_own_request(self, request_id: str | None) -> bool:
        return self.router.is_own_request(request_id)

    # -- the tool set -------------------------------------------------------------------------

    def specs(self) -> list[ToolSpec]:
        return list(self._specs.values())

    def spec(self, name: str) -> ToolSpec:
        return self._specs[name]

    async def call(self, name: str, args: Any) -> dict[str, Any]:
        """Run tool ``name``; never raises (except cancellation) — errors come back as results."""
        spec = self._specs.get(name)
        if spec is None:
            return error_result("unknown_tool", f"no tool named {name!r}; tools: {', '.join(self._specs)}")
        if args is None:
            args = {}
        if not isinstance(args, dict):
            return error_result("invalid_argument", "arguments must be a JSON object")
        try:
            return await spec.handler(args)
        except Exception as exc:
            return error_for(exc, name)

    # -- names and views (for the hosts and the responder) -----------------------------------

    def is_visible(self, msg: InboundMessage) -> bool:
        """Whether the tools show this message (internal envelopes are hidden)."""
        return is_visible(msg)

    def name_of(self, did: str) -> str | None:
        """The registry-verified display name of ``did``, if known."""
        return self.views.name_of(did)

    async def learn_names(self, dids: Iterable[str], timeout: float = 3.0) -> None:
        """Look up unknown senders' display names in the registry (cached, failures too)."""
        await self.views.learn_names(dids, timeout)

    def view(self, msg: InboundMessage) -> dict[str, Any]:
        """What the model sees of a message: sender, type, text — never file contents."""
        return self.views.view(msg)

    def with_roster(self, content: str, recipient: str | None) -> str:
        """``content`` with the ``Peer roster:`` block prepended (see :class:`~.views.Views`)."""
        return self.views.with_roster(content, recipient)

    async def resolve(self, to: str) -> tuple[str, str | None]:
        """(DID, display name) of a recipient given by name or DID."""
        return await self.views.resolve(to)
