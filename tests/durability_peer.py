"""A sender or receiver process for the crash tests (``test_durability.py``).

Usage::

    python durability_peer.py recv STATE_DIR RELAY REGISTRY OUT COUNT
    python durability_peer.py send STATE_DIR RELAY REGISTRY PROGRESS COUNT PEER_DID RUN_ID

Both use a durable ``MeshClient`` (identity and state in STATE_DIR).  The receiver records
each message it handles in OUT (one JSON line, fsynced) *before* consuming it, and skips
ids it already recorded — the application-side half of at-least-once delivery with stable
ids.  The sender records each index it has sent in PROGRESS and resumes after the last
one, re-sending an index whose record is missing with the same message id (the receiver
de-duplicates by id).  Each process prints ``READY <session establishment ek>`` once
connected and ``ERROR ...`` lines for every error the client reports.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
import uuid
from pathlib import Path

from agt_mesh.shell.client import MeshClient


def _append(path: Path, line: str) -> None:
    with path.open("a") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line.strip()]


def _session_ek(client: MeshClient) -> str:
    ses = next(iter(client.protocol.sessions.values()), None)
    return ses.establishment_ek.hex() if ses is not None else "-"


async def recv(state: Path, relay: str, registry: str, out: Path, count: int) -> None:
    client = MeshClient(
        state / "identity.json", relay_url=relay, registry_url=registry, connect_timeout=10, receipt_timeout=2.0
    )
    client.on_error(lambda kind, peer, detail: print(f"ERROR {kind} {detail}", flush=True))
    seen = set()
    for line in _lines(out):
        try:
            seen.add(json.loads(line)["id"])
        except (ValueError, KeyError):
            continue  # a torn last line from a kill mid-write
    await client.connect()
    print(f"READY {_session_ek(client)}", flush=True)
    while len(seen) < count:
        msg = await client.wait_for(timeout=60, consume=False)
        if msg.message_id not in seen:
            _append(out, json.dumps({"id": msg.message_id, "from": msg.sender, "payload": msg.payload}))
            seen.add(msg.message_id)
        client.consume(msg)
    print(f"DONE {_session_ek(client)}", flush=True)
    await asyncio.sleep(0.5)  # let the last acks go out
    await client.disconnect()


async def send(state: Path, relay: str, registry: str, progress: Path, count: int, peer: str, run: str) -> None:
    client = MeshClient(
        state / "identity.json", relay_url=relay, registry_url=registry, connect_timeout=10, receipt_timeout=2.0
    )
    client.on_error(lambda kind, peer, detail: print(f"ERROR {kind} {detail}", flush=True))
    done = [int(x) for x in _lines(progress) if x.strip().isdigit()]
    start = max(done) + 1 if done else 0
    await client.connect()
    print(f"READY {_session_ek(client)}", flush=True)
    for i in range(start, count):
        mid = str(uuid.UUID(bytes=hashlib.sha256(f"{run}/{i}".encode()).digest()[:16], version=4))
        await client.send(peer, {"i": i}, message_id=mid)
        _append(progress, str(i))
        await asyncio.sleep(0.004)
    for _ in range(600):  # until the receiver confirmed everything (re-sending what it lost)
        if client.protocol.unconfirmed(peer) == 0:
            break
        await asyncio.sleep(0.1)
    print(f"DONE {_session_ek(client)}", flush=True)
    await asyncio.sleep(0.5)
    await client.disconnect()


def main() -> None:
    role, state, relay, registry, path, count = sys.argv[1:7]
    if role == "recv":
        asyncio.run(recv(Path(state), relay, registry, Path(path), int(count)))
    else:
        asyncio.run(send(Path(state), relay, registry, Path(path), int(count), sys.argv[7], sys.argv[8]))


if __name__ == "__main__":
    main()
