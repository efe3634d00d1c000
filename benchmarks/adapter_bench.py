#!/usr/bin/env python3
"""Tool overhead: ``mesh_send`` through the canonical tool layer vs raw ``MeshClient.send``.

Two agents on the embedded development relay (loopback).  Each round times ``--messages``
fire-and-forget sends of the same text three ways, interleaved so machine noise hits all
alike: raw ``MeshClient.send(did, payload)``, the ``mesh_send`` tool addressed by DID, and
``mesh_send`` addressed by display name.  The tool adds argument checks, name resolution
(cached), the ``task_request`` envelope and the result dict.  Printed: the median per-call
time of each, and the overhead (tool median − raw median) and ratio.  Target: overhead
< 1 ms median.  The Hermes plugin adds one hop to its loop thread on top (also measured).

Usage: ``python benchmarks/adapter_bench.py [--messages 300] [--rounds 5] [--json OUT]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from agt_mesh.adapters import AdapterConfig, MeshTools
from agt_mesh.adapters.hermes import LoopThread
from agt_mesh.core.identity import Identity
from agt_mesh.dev.server import DevMesh
from agt_mesh.shell.client import MeshClient

TARGET_OVERHEAD_MS = 1.0


async def _run(messages: int, rounds: int) -> dict[str, Any]:
    text = "benchmark message " + "x" * 200
    async with DevMesh() as mesh:
        clients = [
            MeshClient(
                Identity.generate(os.urandom),
                relay_url=mesh.relay_url,
                registry_url=mesh.registry_url,
                display_name=f"{who}-{os.urandom(3).hex()}",
                heartbeat_interval=None,
            )
            for who in ("sender", "receiver")
        ]
        for c in clients:
            await c.connect()
        sender, receiver = clients
        assert receiver.display_name is not None
        tmp = Path(tempfile.mkdtemp())
        tools = MeshTools(sender, AdapterConfig(incoming_dir=tmp / "a", files_root=tmp / "a-out"))
        tools.start()
        rtools = MeshTools(receiver, AdapterConfig(incoming_dir=tmp / "b", files_root=tmp / "b-out"))
        rtools.start()
        did, name = receiver.did, receiver.display_name
        await sender.send(did, "warm-up")  # KNOCK + session before timing
        await tools.call("mesh_send", {"to": name, "content": "warm-up"})
        samples: dict[str, list[float]] = {"raw_send": [], "tool_by_did": [], "tool_by_name": []}

        async def raw() -> None:
            await sender.send(did, {"type": "task_request", "content": text, "request_id": "r"})

        async def by_did() -> None:
            result = await tools.call("mesh_send", {"to": did, "content": text})
            assert result["status"] == "delivered_via_agt_relay", result

        async def by_name() -> None:
            result = await tools.call("mesh_send", {"to": name, "content": text})
            assert result["status"] == "delivered_via_agt_relay", result

        ops = {"raw_send": raw, "tool_by_did": by_did, "tool_by_name": by_name}
        for _ in range(rounds):
            for _ in range(messages):
                for key, op in ops.items():
                    t0 = time.perf_counter()
                    await op()
                    samples[key].append(time.perf_counter() - t0)
            while len(receiver.inbox) < 3 * messages:  # let the receiver keep up between rounds
                await asyncio.sleep(0.01)
            receiver.drain()
        # the Hermes path: a synchronous handler hopping to the plugin's loop thread
        loop = LoopThread("bench-loop")
        try:

            async def noop() -> dict[str, Any]:
                return {}

            hop: list[float] = []
            for _ in range(messages * rounds):
                t0 = time.perf_counter()
                loop.submit(noop(), 10)
                hop.append(time.perf_counter() - t0)
        finally:
            loop.stop()
        await tools.close()
        await rtools.close()
        for c in clients:
            await c.disconnect()
    med = {k: statistics.median(v) * 1000 for k, v in samples.items()}
    out: dict[str, Any] = {
        "messages_per_round": messages,
        "rounds": rounds,
        "median_ms": {k: round(v, 4) for k, v in med.items()},
        "p90_ms": {k: round(statistics.quantiles(v, n=10)[-1] * 1000, 4) for k, v in samples.items()},
        "overhead_ms": {k: round(med[k] - med["raw_send"], 4) for k in ("tool_by_did", "tool_by_name")},
        "ratio_to_raw": {k: round(med[k] / med["raw_send"], 3) for k in ("tool_by_did", "tool_by_name")},
        "hermes_loop_hop_median_ms": round(statistics.median(hop) * 1000, 4),
        "target_overhead_ms": TARGET_OVERHEAD_MS,
    }
    out["meets_target"] = all(v < TARGET_OVERHEAD_MS for v in out["overhead_ms"].values())
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = ap.parse_args(argv)
    result = asyncio.run(_run(args.messages, args.rounds))
    med = result["median_ms"]
    print(f"{'path':<14} {'median ms':>10} {'p90 ms':>10} {'overhead ms':>12} {'ratio':>7}")
    for key in ("raw_send", "tool_by_did", "tool_by_name"):
        over = result["overhead_ms"].get(key)
        ratio = result["ratio_to_raw"].get(key)
        print(
            f"{key:<14} {med[key]:>10.4f} {result['p90_ms'][key]:>10.4f} "
            f"{'' if over is None else f'{over:.4f}':>12} {'' if ratio is None else f'{ratio:.3f}':>7}"
        )
    print(f"hermes loop-thread hop median: {result['hermes_loop_hop_median_ms']:.4f} ms")
    print(f"target: overhead < {TARGET_OVERHEAD_MS} ms median -> {'met' if result['meets_target'] else 'NOT met'}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["meets_target"] else 1


if __name__ == "__main__":
    sys.exit(main())
