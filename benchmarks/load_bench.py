#!/usr/bin/env python3
"""Load benchmark: N agents on one relay, each sending to random peers at a steady rate.

    python benchmarks/load_bench.py                      # 200 agents, 60 s, dev relay, + AGT 5.0.0, + TS
    python benchmarks/load_bench.py --quick              # 50 agents, 10 s (smoke run)
    python benchmarks/load_bench.py --agents 10 --seconds 3 --no-agt --no-ts --json out.json

Per run it reports messages/s delivered, p50/p99 end-to-end latency (the send time travels
in the payload), client CPU per message (``time.process_time`` of the agent processes over
the run, divided by messages sent — each message is one encrypt and one decrypt), relay CPU
per message (``/proc/<pid>/stat``), memory per session (RSS growth of the agent processes
while the sessions were made, divided by the session endpoints) and the loss check: every
(sender, receiver) pair's sent count against its received count, plus duplicates.

Agents run in ``--processes`` worker subprocesses (1 or 2) talking JSON lines to this
parent; the relay is a subprocess too (``tests/servers.py``).  With the TS comparison,
``--ts-agents`` npm 4.0.0 clients (``interop/ts_peer.js``, one Node process each) and as
many of our agents send at the same rate through the same dev relay in the same run
(ts↔ts and py↔py), and the report gives our/TS ratios for throughput and p99.

Everything is on 127.0.0.1 and bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

TS_PEER = ROOT / "interop" / "ts_peer.js"


def seed_for(label: str, i: int) -> bytes:
    return hashlib.sha256(f"agt-mesh-load/{label}/{i}".encode()).digest()


def did_for(label: str, i: int) -> str:
    from agt_mesh.core.identity import Identity

    return Identity.from_seed(seed_for(label, i)).did


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def proc_cpu(pid: int) -> float:
    """utime + stime of a process, seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(p / 100 * len(s)) - 1))]


# ----------------------------------------------------------------------------------
# worker: a group of MeshClients in one process, driven by JSON lines on stdin
# ----------------------------------------------------------------------------------


async def worker(cfg: dict[str, Any]) -> None:
    from agt_mesh.core.identity import Identity
    from agt_mesh.shell.client import MeshClient

    label, mine, group = cfg["label"], cfg["mine"], cfg["group"]
    dids = {i: did_for(label, i) for i in group}
    index = {d: i for i, d in dids.items()}
    rng = random.Random(hash((label, tuple(mine))))
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def out(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    async def cmd() -> dict[str, Any]:
        line = await asyncio.wait_for(reader.readline(), 600)
        return dict(json.loads(line))

    received: dict[tuple[int, int], set[int]] = {}
    dups = 0
    latencies: list[float] = []
    clients: dict[int, MeshClient] = {}
    mesh_errors: list[tuple[int, str, str | None, str]] = []

    def hook_for(r: int) -> Any:
        def on_message(msg: Any) -> None:
            nonlocal dups
            p = msg.payload
            if not isinstance(p, dict) or "q" not in p:
                return
            latencies.append(time.time() - p["t"])
            seen = received.setdefault((p["s"], r), set())
            if p["q"] in seen:
                dups += 1
            seen.add(p["q"])

        return on_message

    for i in mine:
        # several relay/registry replicas: agent i uses replica i mod n (a conversation
        # between agents of different parity crosses replicas)
        relays, registries = cfg["relay"].split(","), cfg["registry"].split(",")
        c = MeshClient(
            Identity.from_seed(seed_for(label, i)),
            relay_url=relays[i % len(relays)],
            registry_url=registries[i % len(registries)],
            connect_timeout=60,
            registry_timeout=60,
            send_timeout=60,
            inbox_size=10**7,
            one_time_prekeys=cfg.get("otks", 20),
        )
        c.on_message(hook_for(i))
        c.on_error(lambda kind, peer, detail, i=i: mesh_errors.append((i, kind, peer, detail[:160])))
        clients[i] = c
    sem = asyncio.Semaphore(16)

    async def connect(c: MeshClient) -> None:
        async with sem:
            await c.connect()

    await asyncio.gather(*(connect(c) for c in clients.values()))
    rss_ready = rss_bytes()
    out({"ready": len(clients)})
    go = await cmd()
    t0 = go["t0"]
    cpu0 = time.process_time()
    sent: dict[tuple[int, int], int] = {}
    errors: list[str] = []
    rate, seconds = cfg["rate"], cfg["seconds"]

    async def sender(i: int) -> None:
        c = clients[i]
        peers = [j for j in group if j != i]
        k = 0
        start = t0 + rng.random() / rate  # spread the agents over the first period
        while True:
            due = start + k / rate
            if due - t0 >= seconds:
                return
            delay = due - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            j = rng.choice(peers)
            q = sent.get((i, j), 0)
            try:
                await c.send(dids[j], {"t": time.time(), "s": i, "q": q})
                sent[(i, j)] = q + 1
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
            k += 1

    await asyncio.gather(*(sender(i) for i in mine))
    out({"sent": [[s, r, n] for (s, r), n in sent.items()], "errors": errors[:20], "send_errors": len(errors)})
    expect = {int(k): v for k, v in (await cmd())["expect"].items()}  # receiver -> count
    deadline = time.monotonic() + cfg.get("drain", 30)

    def got(r: int) -> int:
        return sum(len(v) for (s, rr), v in received.items() if rr == r)

    while time.monotonic() < deadline and any(got(r) < n for r, n in expect.items()):
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    cpu = time.process_time() - cpu0
    rss_after = rss_bytes()
    sessions = sum(len(c.protocol.sessions) for c in clients.values())
    skipped = sum(s.primary.skipped_count for c in clients.values() for s in c.protocol.sessions.values() if s.primary)
    out(
        {
            "received": [[s, r, len(v)] for (s, r), v in received.items()],
            "received_q": {f"{s},{r}": sorted(v) for (s, r), v in received.items()},
            "error_kinds": {k: sum(1 for e in mesh_errors if e[1] == k) for k in {e[1] for e in mesh_errors}},
            "error_samples": [[i, kind, index.get(peer or "", peer), d] for i, kind, peer, d in mesh_errors[:30]],
            "dups": dups,
            "latencies": [round(x, 5) for x in latencies],
            "cpu_s": cpu,
            "rss_ready": rss_ready,
            "rss_after": rss_after,
            "sessions": sessions,
            "skipped_keys": skipped,
        }
    )
    await cmd()  # "stop"
    await asyncio.gather(*(c.disconnect() for c in clients.values()), return_exceptions=True)


# ----------------------------------------------------------------------------------
# parent
# ----------------------------------------------------------------------------------


class Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def spawn(cls, cfg: dict[str, Any]) -> Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--worker",
            json.dumps(cfg),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=1 << 26,
        )
        return cls(proc)

    async def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError(f"worker exited ({await self.proc.wait()})")
        return dict(json.loads(line))

    async def write(self, obj: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(obj) + "\n").encode())
        await self.proc.stdin.drain()

    async def finish(self) -> None:
        try:
            await self.write({"stop": True})
            await asyncio.wait_for(self.proc.wait(), 60)
        except Exception:
            if self.proc.returncode is None:
                self.proc.kill()
                await self.proc.wait()


class TsAgent:
    """One ``interop/ts_peer.js`` process (npm 4.0.0 with the POP shims)."""

    def __init__(self, proc: asyncio.subprocess.Process, index: int) -> None:
        self.proc, self.index = proc, index
        self.did = ""
        self._next = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.messages: list[tuple[float, Any]] = []
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def spawn(cls, index: int) -> TsAgent:
        proc = await asyncio.create_subprocess_exec(
            "node",
            str(TS_PEER),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            cwd=ROOT,
            limit=1 << 24,
        )
        return cls(proc, index)

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if obj.get("event") == "message":
                self.messages.append((time.time(), obj.get("payload")))
            elif "id" in obj and obj["id"] in self._waiting:
                self._waiting.pop(obj["id"]).set_result(obj)

    async def call(self, cmd: str, timeout: float = 60, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self._next += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = fut
        self.proc.stdin.write((json.dumps({"id": self._next, "cmd": cmd, **args}) + "\n").encode())
        await self.proc.stdin.drain()
        reply = await asyncio.wait_for(fut, timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"ts_peer {cmd}: {reply.get('error')}")
        return reply

    async def stop(self) -> None:
        with contextlib.suppress(Exception):
            await self.call("quit", timeout=10)
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        self.reader.cancel()


async def run_python(
    kind: str,
    relay_url: str,
    registry_url: str,
    relay_pids: list[int],
    agents: int,
    seconds: float,
    rate: float,
    processes: int,
    label: str,
    cpu_groups: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """One load run.  ``relay_url``/``registry_url`` may list replicas (comma-separated);
    ``cpu_groups`` adds ``<name>_cpu_us_per_message`` for more processes (NATS nodes)."""
    group = list(range(agents))
    cpu_groups = cpu_groups or {}
    shares = [group[k::processes] for k in range(processes)]
    cfgs = [
        {
            "label": label,
            "mine": share,
            "group": group,
            "relay": relay_url,
            "registry": registry_url,
            "rate": rate,
            "seconds": seconds,
        }
        for share in shares
    ]
    workers = [await Worker.spawn(c) for c in cfgs]
    try:
        t_setup = time.monotonic()
        for w in workers:
            await w.read(600)
        setup_s = time.monotonic() - t_setup
        relay_cpu0 = sum(proc_cpu(p) for p in relay_pids)
        group_cpu0 = {name: sum(proc_cpu(p) for p in pids) for name, pids in cpu_groups.items()}
        t0 = time.time() + 0.5
        for w in workers:
            await w.write({"t0": t0})
        sent_rows: list[list[int]] = []
        send_errors = 0
        errors: list[str] = []
        for w in workers:
            s = await w.read(seconds + 600)
            sent_rows += s["sent"]
            send_errors += s["send_errors"]
            errors += s["errors"]
        send_wall = time.time() - t0
        per_receiver: dict[int, int] = {}
        for _s, r, n in sent_rows:
            per_receiver[r] = per_receiver.get(r, 0) + n
        for w, share in zip(workers, shares, strict=True):
            await w.write({"expect": {str(r): per_receiver.get(r, 0) for r in share}})
        results = [await w.read(120) for w in workers]
        relay_cpu = sum(proc_cpu(p) for p in relay_pids) - relay_cpu0
        group_cpu = {name: sum(proc_cpu(p) for p in pids) - group_cpu0[name] for name, pids in cpu_groups.items()}
    finally:
        for w in workers:
            await w.finish()
    sent = {(s, r): n for s, r, n in sent_rows}
    got: dict[tuple[int, int], int] = {}
    lat: list[float] = []
    for res in results:
        for s, r, n in res["received"]:
            got[(s, r)] = got.get((s, r), 0) + n
        lat += res["latencies"]
    total_sent = sum(sent.values())
    total_got = sum(min(n, sent.get(k, 0)) for k, n in got.items())
    lost_pairs = sorted((k for k, n in sent.items() if got.get(k, 0) < n))
    rq: dict[str, list[int]] = {}
    for res in results:
        rq.update(res["received_q"])
    missing = {f"{s}->{r}": sorted(set(range(sent[(s, r)])) - set(rq.get(f"{s},{r}", []))) for s, r in lost_pairs}
    kinds: dict[str, int] = {}
    for res in results:
        for k, v in res["error_kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
    sessions = sum(r["sessions"] for r in results)
    rss_growth = sum(r["rss_after"] - r["rss_ready"] for r in results)
    cpu = sum(r["cpu_s"] for r in results)
    return {
        "relay": kind,
        "clients": "python",
        "agents": agents,
        "processes": processes,
        "seconds": seconds,
        "rate_per_agent": rate,
        "setup_s": round(setup_s, 1),
        "sent": total_sent,
        "received": total_got,
        "duplicated": sum(r["dups"] for r in results),
        "lost": total_sent - total_got,
        "lost_pairs": [list(k) for k in lost_pairs[:20]],
        "missing_messages": dict(list(missing.items())[:20]),
        "mesh_error_kinds": kinds,
        "mesh_error_samples": [e for res in results for e in res["error_samples"]][:20],
        "pairs": len(sent),
        "send_errors": send_errors,
        "send_error_samples": errors[:5],
        "messages_per_s": round(total_got / send_wall, 1),
        "latency_ms": {
            "p50": round(1000 * (pct(lat, 50) or 0), 2),
            "p99": round(1000 * (pct(lat, 99) or 0), 2),
            "max": round(1000 * max(lat or [0]), 2),
            "mean": round(1000 * statistics.fmean(lat), 2) if lat else None,
        },
        "client_cpu_us_per_message": round(1e6 * cpu / max(1, total_sent), 1),
        "relay_cpu_us_per_message": round(1e6 * relay_cpu / max(1, total_sent), 1),
        **{f"{name}_cpu_us_per_message": round(1e6 * c / max(1, total_sent), 1) for name, c in group_cpu.items()},
        "session_endpoints": sessions,
        "rss_growth_per_session_bytes": round(rss_growth / max(1, sessions)),
        "skipped_keys_at_end": sum(r["skipped_keys"] for r in results),
    }


async def run_ts(relay_url: str, registry_url: str, agents: int, seconds: float, rate: float) -> dict[str, Any]:
    ts = [await TsAgent.spawn(i) for i in range(agents)]
    try:
        for a in ts:
            seed = hashlib.sha256(f"agt-mesh-load/ts/{a.index}/{os.getpid()}/{time.time()}".encode()).hexdigest()
            a.did = (
                await a.call(
                    "init", relay=relay_url, registry=registry_url, mode="pop", name=f"ts-load-{a.index}", seed=seed
                )
            )["did"]
        await asyncio.gather(*(a.call("connect", timeout=120) for a in ts))
        cpu0 = {a.index: proc_cpu(a.proc.pid) for a in ts}
        sent: dict[tuple[int, int], int] = {}
        errors: list[str] = []
        rng = random.Random(7)
        t0 = time.time() + 0.5

        async def sender(a: TsAgent) -> None:
            peers = [b for b in ts if b is not a]
            k = 0
            start = t0 + rng.random() / rate
            while True:
                due = start + k / rate
                if due - t0 >= seconds:
                    return
                if (d := due - time.time()) > 0:
                    await asyncio.sleep(d)
                b = rng.choice(peers)
                q = sent.get((a.index, b.index), 0)
                try:
                    await a.call("send", to=b.did, payload={"t": time.time(), "s": a.index, "q": q})
                    sent[(a.index, b.index)] = q + 1
                except Exception as exc:
                    errors.append(str(exc)[:200])
                k += 1

        await asyncio.gather(*(sender(a) for a in ts))
        send_wall = time.time() - t0
        total_sent = sum(sent.values())
        deadline = time.monotonic() + 30

        def received() -> int:
            return sum(len(a.messages) for a in ts)

        while time.monotonic() < deadline and received() < total_sent:
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)
        cpu = sum(proc_cpu(a.proc.pid) - cpu0[a.index] for a in ts)
        got: dict[tuple[int, int], set[int]] = {}
        dups = 0
        lat: list[float] = []
        for a in ts:
            for at, p in a.messages:
                if not isinstance(p, dict) or "q" not in p:
                    continue
                lat.append(at - p["t"])
                seen = got.setdefault((p["s"], a.index), set())
                dups += p["q"] in seen
                seen.add(p["q"])
        total_got = sum(min(len(v), sent.get(k, 0)) for k, v in got.items())
        return {
            "relay": "dev",
            "clients": "ts (npm 4.0.0, one Node process each)",
            "agents": agents,
            "seconds": seconds,
            "rate_per_agent": rate,
            "sent": total_sent,
            "received": total_got,
            "duplicated": dups,
            "lost": total_sent - total_got,
            "send_errors": len(errors),
            "send_error_samples": errors[:5],
            "messages_per_s": round(total_got / send_wall, 1),
            "latency_ms": {
                "p50": round(1000 * (pct(lat, 50) or 0), 2),
                "p99": round(1000 * (pct(lat, 99) or 0), 2),
                "max": round(1000 * max(lat or [0]), 2),
            },
            "client_cpu_us_per_message": round(1e6 * cpu / max(1, total_sent), 1),
        }
    finally:
        await asyncio.gather(*(a.stop() for a in ts), return_exceptions=True)


def _print(run: dict[str, Any]) -> None:
    lat = run["latency_ms"]
    print(
        f"  {run['clients'][:6]:6} {run['relay']:10} agents={run['agents']:4} sent={run['sent']:6} "
        f"recv={run['received']:6} lost={run['lost']} dup={run['duplicated']} {run['messages_per_s']:8.1f} msg/s "
        f"p50={lat['p50']:.1f} ms p99={lat['p99']:.1f} ms cpu={run['client_cpu_us_per_message']} us/msg"
        + (f" relay={run['relay_cpu_us_per_message']} us/msg" if "relay_cpu_us_per_message" in run else "")
        + (f" mem/session={run['rss_growth_per_session_bytes']} B" if "rss_growth_per_session_bytes" in run else ""),
        file=sys.stderr,
        flush=True,
    )


async def main(args: argparse.Namespace) -> dict[str, Any]:
    from servers import ServerPair

    runs: list[dict[str, Any]] = []
    comparison: dict[str, Any] | None = None
    label = f"{os.getpid()}-{time.time()}"
    dev = ServerPair("dev").start()
    try:
        print(f"dev relay: {args.agents} agents x {args.rate}/s for {args.seconds} s", file=sys.stderr, flush=True)
        run = await run_python(
            "dev",
            dev.relay_url,
            dev.registry_url,
            [dev.procs[0].pid],
            args.agents,
            args.seconds,
            args.rate,
            args.processes,
            label + "-dev",
        )
        runs.append(run)
        _print(run)
        if not args.no_ts:
            k = args.ts_agents
            print(
                f"TS comparison: {k} py agents, then {k} TS agents, {args.rate}/s, {args.ts_seconds} s",
                file=sys.stderr,
                flush=True,
            )
            py = await run_python(
                "dev",
                dev.relay_url,
                dev.registry_url,
                [dev.procs[0].pid],
                k,
                args.ts_seconds,
                args.rate,
                1,
                label + "-cmp",
            )
            py["clients"] = "python (comparison group)"
            _print(py)
            ts = await run_ts(dev.relay_url, dev.registry_url, k, args.ts_seconds, args.rate)
            _print(ts)
            runs += [py, ts]
            comparison = {
                "agents_each": k,
                "throughput_ratio_py_over_ts": round(py["messages_per_s"] / max(ts["messages_per_s"], 1e-9), 2),
                "p99_ratio_py_over_ts": round(py["latency_ms"]["p99"] / max(ts["latency_ms"]["p99"], 1e-9), 3),
                "cpu_ratio_ts_over_py": round(
                    ts["client_cpu_us_per_message"] / max(py["client_cpu_us_per_message"], 1e-9), 2
                ),
            }
            if args.ts_saturate_rate:
                py2 = await run_python(
                    "dev",
                    dev.relay_url,
                    dev.registry_url,
                    [dev.procs[0].pid],
                    k,
                    args.ts_seconds,
                    args.ts_saturate_rate,
                    1,
                    label + "-cmp2",
                )
                py2["clients"] = "python (comparison group, high rate)"
                _print(py2)
                ts2 = await run_ts(dev.relay_url, dev.registry_url, k, args.ts_seconds, args.ts_saturate_rate)
                _print(ts2)
                runs += [py2, ts2]
                comparison["high_rate"] = {
                    "rate_per_agent": args.ts_saturate_rate,
                    "throughput_ratio_py_over_ts": round(py2["messages_per_s"] / max(ts2["messages_per_s"], 1e-9), 2),
                    "p99_ratio_py_over_ts": round(py2["latency_ms"]["p99"] / max(ts2["latency_ms"]["p99"], 1e-9), 3),
                }
    finally:
        dev.stop()
    if not args.no_agt:
        agt = ServerPair("agt-5.0.0").start()
        try:
            n = args.agt_agents or args.agents
            print(f"AGT 5.0.0 relay: {n} agents x {args.agt_rate}/s for {args.seconds} s", file=sys.stderr, flush=True)
            run = await run_python(
                "agt-5.0.0",
                agt.relay_url,
                agt.registry_url,
                [agt.procs[0].pid],
                n,
                args.seconds,
                args.agt_rate,
                args.processes,
                label + "-agt",
            )
            runs.append(run)
            _print(run)
        finally:
            agt.stop()
    return {
        "schema": "agt-mesh-load/1",
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}",
        "args": {k: v for k, v in vars(args).items() if k not in ("worker", "json")},
        "runs": runs,
        "ts_comparison": comparison,
        "parent_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agents", type=int, default=200)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--rate", type=float, default=1.0, help="messages per second per agent")
    ap.add_argument("--processes", type=int, choices=(1, 2), default=1)
    ap.add_argument("--agt-agents", type=int, default=0, help="agents on the AGT relay (default: --agents)")
    ap.add_argument("--agt-rate", type=float, default=1.0)
    ap.add_argument("--ts-agents", type=int, default=10)
    ap.add_argument("--ts-seconds", type=float, default=20)
    ap.add_argument("--ts-saturate-rate", type=float, default=0.0, help="also compare at this per-agent rate")
    ap.add_argument("--no-agt", action="store_true")
    ap.add_argument("--no-ts", action="store_true")
    ap.add_argument("--quick", action="store_true", help="50 agents, 10 s, 5 TS agents for 10 s")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.agents, args.seconds, args.ts_agents, args.ts_seconds = 50, 10, 5, 10
    return args


if __name__ == "__main__":
    a = parse()
    if a.worker:
        asyncio.run(worker(json.loads(a.worker)))
        sys.exit(0)
    result = asyncio.run(main(a))
    text = json.dumps(result, indent=1) + "\n"
    if a.json:
        a.json.write_text(text)
    else:
        print(text)
