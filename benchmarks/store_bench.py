#!/usr/bin/env python3
"""Durable-state overhead: receive throughput with the SQLite store on vs off, and bytes per session.

The receive path measured is what ``MeshClient`` does per frame: decode + decrypt in the
protocol core, then (durable) one transaction holding the new session state, the
plaintext in the inbox and the message id — per frame, or per batch of frames under load.

Usage: ``python benchmarks/store_bench.py [--messages 3000] [--rounds 5] [--json OUT]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from agt_mesh.core import events as ev
from agt_mesh.core.frames import encode_frame
from agt_mesh.core.identity import Identity
from agt_mesh.core.protocol import MeshProtocol, ProtocolConfig, Step
from agt_mesh.core.x3dh import PreKeyStore
from agt_mesh.shell.inbox import InboundMessage
from agt_mesh.shell.store import PeerMeta, StateStore


def _party() -> MeshProtocol:
    ident = Identity.generate(os.urandom)
    keys = PreKeyStore(ident)
    keys.generate_signed_pre_key(os.urandom)
    keys.generate_one_time_pre_keys(5, os.urandom)
    return MeshProtocol(ProtocolConfig(did=ident.did), keys, new_id=lambda: str(uuid.uuid4()))


def _frames(n: int) -> tuple[MeshProtocol, list[str]]:
    """An established receiver and ``n`` encrypted 200-byte messages for it."""
    a, b = _party(), _party()
    step = a.establish(b.did, b.prekeys.public_bundle(0), time.time(), os.urandom)
    out = b.receive(json.loads(encode_frame(step.frames[0])), time.time(), os.urandom)
    (decision,) = [e for e in out.events if isinstance(e, ev.KnockDecision)]
    b.resolve_knock(decision.knock_id, True, time.time(), os.urandom)
    texts = []
    for i in range(n):
        s, _ = a.send(b.did, {"i": i, "text": "x" * 180}, time.time(), os.urandom)
        texts.append(encode_frame(s.frames[0]))
    return b, texts


def _persist(store: StateStore, proto: MeshProtocol, step: Step) -> None:
    msgs = [
        InboundMessage(e.peer, e.payload, e.message_id, time.time(), e.plaintext)
        for e in step.events
        if isinstance(e, ev.MessageReceived)
    ]
    store.commit(
        sessions={p: proto.sessions.get(p) for p in step.changed},
        peers=[PeerMeta(p, proto.peer_profiles.get(p), None, p in proto.e2e_verified) for p in step.changed],
        inbox=msgs,
        seen=step.seen,
        prekeys=proto.prekeys,
    )


def run_mode(n: int, batch: int | None) -> float:
    """Messages per second received (``batch=None``: no store)."""
    proto, texts = _frames(n)
    with tempfile.TemporaryDirectory() as tmp:
        store = None
        if batch is not None:
            d = Path(tmp) / "state"
            store = StateStore(d, did=proto.did).open()
        start = time.perf_counter()
        for i in range(0, n, batch or 1):
            step = Step()
            for text in texts[i : i + (batch or 1)]:
                step.extend(proto.receive_text(text, time.time(), os.urandom, max_bytes=1 << 20))
            if store is not None:
                _persist(store, proto, step)
        elapsed = time.perf_counter() - start
        if store is not None:
            store.close()
    return n / elapsed


def disk_per_session(sessions: int = 1000) -> float:
    """Bytes of ``state.db`` per stored established session (after a checkpoint)."""
    with tempfile.TemporaryDirectory() as tmp:
        owner = _party()
        store = StateStore(Path(tmp) / "state", did=owner.did).open()
        empty = store.path.stat().st_size
        for _ in range(sessions):
            peer = _party()
            step = peer.establish(owner.did, owner.prekeys.public_bundle(), time.time(), os.urandom)
            store.commit(sessions={owner.did + peer.did[-8:]: peer.sessions[owner.did]})
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = store.path.stat().st_size
        store.close()
        del step
    return (size - empty) / sessions


def _established() -> tuple[MeshProtocol, MeshProtocol]:
    """Two parties after a KNOCK, its acceptance and one message each way."""
    a, b = _party(), _party()

    def deliver(frames: list[dict[str, object]], to: MeshProtocol) -> Step:
        out = Step()
        for f in frames:
            out.extend(to.receive(json.loads(encode_frame(f)), time.time(), os.urandom))
        return out

    out = deliver(a.establish(b.did, b.prekeys.public_bundle(0), time.time(), os.urandom).frames, b)
    (decision,) = [e for e in out.events if isinstance(e, ev.KnockDecision)]
    deliver(b.resolve_knock(decision.knock_id, True, time.time(), os.urandom).frames, a)
    deliver(a.send(b.did, "hello", time.time(), os.urandom)[0].frames, b)
    deliver(b.send(a.did, "hello back", time.time(), os.urandom)[0].frames, a)
    return a, b


def disk_per_established_session(pairs: int = 500) -> tuple[float, float]:
    """``(state bytes, state.db bytes)`` per established session (both sides of each pair)."""
    with tempfile.TemporaryDirectory() as tmp:
        store = StateStore(Path(tmp) / "state", did=_party().did).open()
        empty = store.path.stat().st_size
        blob = 0
        for i in range(pairs):
            a, b = _established()
            sessions = {f"a{i}": a.sessions[b.did], f"b{i}": b.sessions[a.did]}
            blob += sum(len(s.to_bytes()) for s in sessions.values() if s is not None)
            store.commit(sessions=sessions)
        store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        size = store.path.stat().st_size
        store.close()
    return blob / (2 * pairs), (size - empty) / (2 * pairs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args(argv)
    modes = {"in-memory": None, "durable, commit per frame": 1, "durable, batches of 64": 64}
    results: dict[str, list[float]] = {m: [] for m in modes}
    for _ in range(args.rounds):
        for name, batch in modes.items():  # interleaved rounds: noise hits all modes alike
            results[name].append(run_mode(args.messages, batch))
    base = statistics.median(results["in-memory"])
    print(f"{'receive path':28} {'msgs/s':>10} {'vs in-memory':>13}")
    table = []
    for name in modes:
        med = statistics.median(results[name])
        table.append({"mode": name, "msgs_per_s": med, "ratio": med / base})
        print(f"{name:28} {med:10,.0f} {med / base:12.0%}")
    per_session = disk_per_session()
    state_bytes, per_established = disk_per_established_session()
    print(f"disk per stored session: {per_session:,.0f} bytes (KNOCK pending)")
    print(f"established session: {state_bytes:,.0f} bytes of state, {per_established:,.0f} bytes of disk")
    print(f"(medians of {args.rounds} rounds of {args.messages} messages of 200 bytes)")
    if args.json:
        result = {
            "rows": table,
            "disk_bytes_per_session": per_session,
            "established_state_bytes": state_bytes,
            "established_disk_bytes": per_established,
        }
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
