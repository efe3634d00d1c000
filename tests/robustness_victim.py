"""A victim process for the memory-bound attacks (``test_attacks_robustness.py``).

Usage::

    python robustness_victim.py STATE_DIR RELAY REGISTRY

Creates an identity in STATE_DIR, connects a durable ``MeshClient`` and prints one JSON
line ``{"did": ...}``.  Then it answers JSON commands on stdin, one JSON line each:

* ``{"cmd": "reset_peak"}`` — reset the kernel's peak-RSS counter (``VmHWM``) and report;
* ``{"cmd": "report"}`` — ``{"rss_kb", "hwm_kb", "health", "errors"}``;
* ``{"cmd": "wait", "token": T, "timeout": S}`` — wait for a message whose payload is
  ``{"t": T}``; ``{"ok": bool, "elapsed": seconds}``;
* ``{"cmd": "quit"}``.

Run in its own process so its peak RSS is its own: the relay and the attacker live in
the test process.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from agt_mesh.core.identity import Identity
from agt_mesh.shell.client import MeshClient
from agt_mesh.shell.identity_file import save_identity


def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return {"rss_kb": out["VmRSS"], "hwm_kb": out["VmHWM"]}


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def main(state: Path, relay: str, registry: str) -> None:
    state.mkdir(mode=0o700, exist_ok=True)
    save_identity(state / "identity.json", Identity.generate(os.urandom))
    client = MeshClient(state / "identity.json", relay_url=relay, registry_url=registry, connect_timeout=10)
    errors: list[str] = []
    client.on_error(lambda kind, peer, detail: errors.append(kind))
    await client.connect()
    _emit({"did": client.did, **_status()})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while line := await reader.readline():
            cmd = json.loads(line)
            if cmd["cmd"] == "reset_peak":
                gc.collect()
                Path("/proc/self/clear_refs").write_text("5")
                _emit(_status())
            elif cmd["cmd"] == "report":
                _emit({**_status(), "health": client.health.to_json(), "errors": len(errors)})
            elif cmd["cmd"] == "wait":
                started = time.monotonic()
                want = {"t": cmd["token"]}
                try:
                    await client.wait_for(timeout=cmd["timeout"], predicate=want.__eq__)
                    ok = True
                except TimeoutError:
                    ok = False
                _emit({"ok": ok, "elapsed": time.monotonic() - started})
            elif cmd["cmd"] == "quit":
                break
    finally:
        await client.disconnect()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2], sys.argv[3]))
