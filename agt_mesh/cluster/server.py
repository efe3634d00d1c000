"""``agt-mesh relay --nats URL[,URL...]``: run a relay and/or registry replica."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TextIO

from agt_mesh.cluster.registry import ClusterRegistry
from agt_mesh.cluster.relay import ClusterRelay

__all__ = ["serve_cluster"]


async def serve_cluster(args: argparse.Namespace, out: TextIO | None = None) -> None:
    """Run the replicas ``args.serve`` asks for until cancelled; print their URLs."""
    stream = out if out is not None else sys.stdout
    servers = [u.strip() for u in args.nats.split(",") if u.strip()]
    relay = registry = None
    try:
        if args.serve in ("both", "registry"):
            registry = ClusterRegistry(
                servers,
                args.host,
                args.registry_port,
                replicas=args.replicas,
                allow_legacy=args.allow_legacy,
            )
            await registry.start()
        if args.serve in ("both", "relay"):
            relay = ClusterRelay(
                servers,
                args.host,
                args.relay_port,
                require_pop=not args.no_pop,
                token=args.token,
                replicas=args.replicas,
                idle_timeout=args.idle_timeout,
                max_queue_per_recipient=args.max_queue_per_recipient,
                max_store_bytes=args.max_store_bytes,
                ttl=args.ttl,
                consumer_heartbeat=args.consumer_heartbeat,
                **({} if args.stale_after is None else {"stale_after": args.stale_after}),
            )
            await relay.start()
        if relay is not None:
            print(f"relay: {relay.url}", file=stream)
        if registry is not None:
            print(f"registry: {registry.url}", file=stream)
        stream.flush()
        await asyncio.Event().wait()
    finally:
        if relay is not None:
            await relay.stop()
        if registry is not None:
            await registry.stop()
