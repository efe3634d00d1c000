"""Run the development relay and registry together (``agt-mesh relay``).

* :class:`DevMesh` — both servers on free loopback ports, as an async context manager
  (handy in tests and notebooks).
* :func:`serve` — both servers on fixed ports until cancelled, printing their URLs.
* :func:`main` — the command-line entry point (logs to stderr, URLs on stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from types import TracebackType
from typing import Any, TextIO

from agt_mesh.dev.registry import DevRegistry
from agt_mesh.dev.relay import DEFAULT_IDLE_TIMEOUT, DEFAULT_MAX_QUEUE_PER_RECIPIENT, DEFAULT_TTL, DevRelay

__all__ = ["DEFAULT_REGISTRY_PORT", "DEFAULT_RELAY_PORT", "DevMesh", "main", "serve"]

#: The AGT servers' default ports.
DEFAULT_RELAY_PORT = 8083
DEFAULT_REGISTRY_PORT = 8082

#: Options that go to :class:`DevRegistry`; every other option goes to :class:`DevRelay`.
_REGISTRY_OPTIONS = frozenset(
    {
        "allow_legacy",
        "heartbeat_interval",
        "max_body_bytes",
        "max_header_bytes",
        "keep_alive_timeout",
        "request_timeout",
    }
)

logger = logging.getLogger("agt_mesh.dev")


class DevMesh:
    """A development relay and registry: ``async with DevMesh() as mesh: mesh.relay.url``.

    ``relay_port``/``registry_port`` default to 0 (free ports).  Keyword options are
    passed to :class:`DevRegistry` (``allow_legacy``, ``heartbeat_interval``,
    ``max_body_bytes``, ``max_header_bytes``, ``keep_alive_timeout``,
    ``request_timeout``) or else to :class:`DevRelay`.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        *,
        relay_port: int = 0,
        registry_port: int = 0,
        **opts: Any,
    ) -> None:
        registry_opts = {k: v for k, v in opts.items() if k in _REGISTRY_OPTIONS}
        relay_opts = {k: v for k, v in opts.items() if k not in _REGISTRY_OPTIONS}
        self.relay = DevRelay(host, relay_port, **relay_opts)
        self.registry = DevRegistry(host, registry_port, **registry_opts)

    @property
    def relay_url(self) -> str:
        return self.relay.url

    @property
    def registry_url(self) -> str:
        return self.registry.url

    async def start(self) -> None:
        await self.registry.start()
        try:
            await self.relay.start()
        except BaseException:
            await self.registry.stop()
            raise

    async def stop(self) -> None:
        try:
            await self.relay.stop()
        finally:
            await self.registry.stop()

    async def __aenter__(self) -> DevMesh:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


async def serve(
    host: str = "127.0.0.1",
    relay_port: int = DEFAULT_RELAY_PORT,
    registry_port: int = DEFAULT_REGISTRY_PORT,
    *,
    out: TextIO | None = None,
    **opts: Any,
) -> None:
    """Run the relay and the registry until cancelled; print their URLs to ``out`` (stdout).

    The output is two lines, ``relay: http://HOST:PORT`` and ``registry: http://HOST:PORT``
    (the relay's WebSocket endpoint is the relay URL with ``ws`` and ``/ws``).
    """
    stream = out if out is not None else sys.stdout
    async with DevMesh(host, relay_port=relay_port, registry_port=registry_port, **opts) as mesh:
        print(f"relay: {mesh.relay_url}", file=stream)
        print(f"registry: {mesh.registry_url}", file=stream, flush=True)
        await asyncio.Event().wait()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="agt-mesh relay",
        description="Run a development AgentMesh relay and registry (not for production), "
        "or with --nats a replica of the cluster relay/registry on NATS JetStream.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default %(default)s)")
    parser.add_argument(
        "--relay-port", type=int, default=DEFAULT_RELAY_PORT, help="relay port, 0 for a free one (default %(default)s)"
    )
    parser.add_argument(
        "--registry-port",
        type=int,
        default=DEFAULT_REGISTRY_PORT,
        help="registry port, 0 for a free one (default %(default)s)",
    )
    parser.add_argument("--no-pop", action="store_true", help="accept connect frames without DID proof of possession")
    parser.add_argument("--token", default=None, help="shared secret the relay's connect frames must carry")
    parser.add_argument(
        "--idle-timeout",
        type=float,
        default=DEFAULT_IDLE_TIMEOUT,
        help="close relay connections idle this many seconds (default %(default)s)",
    )
    parser.add_argument(
        "--stale-after",
        type=float,
        default=None,
        help="seconds without a heartbeat after which live delivery to a peer stops (default 90)",
    )
    parser.add_argument(
        "--knock-delay",
        type=float,
        default=0.0,
        help="fault knob: hold each knock frame this many seconds, so the first message overtakes it",
    )
    parser.add_argument(
        "--reorder-window",
        type=int,
        default=0,
        help="fault knob: write each recipient's live frames in reversed batches of up to N (N >= 2)",
    )
    parser.add_argument(
        "--reorder-hold",
        type=float,
        default=0.05,
        help="with --reorder-window: seconds a partial batch waits for more frames (default %(default)s)",
    )
    parser.add_argument(
        "--allow-legacy",
        action="store_true",
        help="let the registry accept pre-POP registrations (platform 3.7.0 style)",
    )
    cluster = parser.add_argument_group(
        "cluster mode",
        "with --nats, run stateless replicas that keep frames, sessions and records in NATS JetStream "
        "(see the README section 'Cluster relay'); start as many as needed, each on its own ports",
    )
    cluster.add_argument(
        "--nats",
        metavar="URL[,URL...]",
        default=None,
        help="NATS servers (JetStream enabled), e.g. nats://127.0.0.1:4222,nats://127.0.0.1:4223",
    )
    cluster.add_argument(
        "--serve",
        choices=["both", "relay", "registry"],
        default="both",
        help="with --nats: which replica(s) this process runs (default %(default)s)",
    )
    cluster.add_argument(
        "--replicas",
        type=int,
        default=3,
        help="with --nats: JetStream replicas of the stream and buckets (default %(default)s)",
    )
    cluster.add_argument(
        "--ttl",
        type=float,
        default=DEFAULT_TTL,
        help="with --nats: seconds a stored frame is kept (default %(default)s, AGT's 72 h)",
    )
    cluster.add_argument(
        "--max-queue-per-recipient",
        type=int,
        default=DEFAULT_MAX_QUEUE_PER_RECIPIENT,
        help="with --nats: stored frames per recipient (default %(default)s)",
    )
    cluster.add_argument(
        "--consumer-heartbeat",
        type=float,
        default=1.0,
        help="with --nats: seconds between idle heartbeats of each connection's JetStream consumer; a NATS node "
        "failure is noticed after two missed ones (default %(default)s; ~10 for 100,000 agents)",
    )
    cluster.add_argument(
        "--max-store-bytes",
        type=int,
        default=-1,
        help="with --nats: total stored bytes, -1 for no limit as on AGT (default %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="stderr log level (default %(default)s)",
    )
    return parser


async def _run(args: argparse.Namespace) -> None:
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
    if args.nats:
        from agt_mesh.cluster.server import serve_cluster

        with contextlib.suppress(asyncio.CancelledError):
            await serve_cluster(args)
        return
    with contextlib.suppress(asyncio.CancelledError):
        await serve(
            args.host,
            args.relay_port,
            args.registry_port,
            require_pop=not args.no_pop,
            token=args.token,
            idle_timeout=args.idle_timeout,
            allow_legacy=args.allow_legacy,
            knock_delay=args.knock_delay,
            reorder_window=args.reorder_window,
            reorder_hold=args.reorder_hold,
            **({} if args.stale_after is None else {"stale_after": args.stale_after}),
        )


def main(argv: Sequence[str] | None = None) -> int:
    """``agt-mesh relay``: run both servers until Ctrl-C or SIGTERM; return the exit status."""
    args = _build_parser().parse_args(argv)
    if args.idle_timeout <= 0:
        print("agt-mesh relay: --idle-timeout must be positive", file=sys.stderr)
        return 2
    if args.stale_after is not None and args.stale_after <= 0:
        print("agt-mesh relay: --stale-after must be positive", file=sys.stderr)
        return 2
    if args.knock_delay < 0 or args.reorder_window < 0 or args.reorder_hold < 0:
        print("agt-mesh relay: --knock-delay, --reorder-window and --reorder-hold must be >= 0", file=sys.stderr)
        return 2
    if args.nats is None and args.serve != "both":
        print("agt-mesh relay: --serve needs --nats (the development servers always run both)", file=sys.stderr)
        return 2
    if args.nats is not None:
        if args.knock_delay or args.reorder_window:
            print("agt-mesh relay: the fault knobs are for the development relay, not --nats", file=sys.stderr)
            return 2
        if args.replicas < 1 or args.ttl <= 0 or args.max_queue_per_recipient < 1 or args.consumer_heartbeat <= 0:
            print(
                "agt-mesh relay: --replicas, --ttl, --max-queue-per-recipient and --consumer-heartbeat "
                "must be positive",
                file=sys.stderr,
            )
            return 2
        try:
            import nats  # noqa: F401
        except ImportError:
            print("agt-mesh relay: --nats needs the extra: pip install 'kars-agt-mesh[cluster]'", file=sys.stderr)
            return 2
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.no_pop:
        logger.warning("DID proof of possession is OFF: any client can connect as any DID")
    if args.allow_legacy:
        logger.warning("legacy registration is ON: legacy agents' records are unauthenticated")
    try:
        asyncio.run(_run(args))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"agt-mesh relay: cannot listen: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
