"""The end-to-end demo behind ``make demo`` / ``agt-mesh demo``.

It starts the embedded development relay and registry on 127.0.0.1, creates two
identities in a temporary state directory, and lets two ``MeshClient``s talk: alice
KNOCKs bob by display name (X3DH inside the KNOCK), they exchange encrypted messages
both ways, bob goes offline while alice keeps writing, and bob's replay arrives when he
is back.  The transcript shows every frame the relay saw next to what the agents read.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path
from typing import Any, TextIO

from agt_mesh.core.identity import Identity
from agt_mesh.dev.server import DevMesh
from agt_mesh.shell.client import MeshClient
from agt_mesh.shell.identity_file import save_identity

_WIDTH = 118


def _short(frame: dict[str, Any]) -> str:
    """A one-line view of a frame: what the relay can read of it."""
    kind = frame.get("type", "?")
    parts = [f"{kind:<12}"]
    if "to" in frame:
        parts.append(f"to={str(frame['to'])[9:17]}…")
    if kind == "knock" and isinstance(frame.get("establishment"), dict):
        est = frame["establishment"]
        parts.append(f"ik={est.get('ik', '')[:10]}… ek={est.get('ek', '')[:10]}… otk={est.get('otk')}")
    if isinstance(frame.get("header"), dict):
        h = frame["header"]
        parts.append(f"dh={h.get('dh', '')[:10]}… pn={h.get('pn')} n={h.get('n')}")
    if "ciphertext" in frame:
        ct = str(frame["ciphertext"])
        parts.append(f"ciphertext={ct[:16]}… ({len(ct)} b64 chars)")
    if kind in ("ack", "knock_accept", "knock_reject"):
        parts.append(f"id={str(frame.get('knock_id') or frame.get('id'))[:8]}…")
    text = " ".join(parts)
    return text if len(text) <= _WIDTH else text[: _WIDTH - 1] + "…"


async def _demo(out: TextIO, as_json: bool) -> int:
    transcript: list[dict[str, Any]] = []

    def log(kind: str, **data: Any) -> None:
        transcript.append({"kind": kind, **data})
        if as_json:
            return
        if kind == "frame":
            out.write(f"  relay saw   {data['sender']:>5} → {_short(data['frame'])}\n")
        elif kind == "read":
            out.write(f"  {data['reader']:>5} read  {json.dumps(data['payload'], ensure_ascii=False)}\n")
        else:
            out.write(f"\n== {data['text']}\n")

    with tempfile.TemporaryDirectory(prefix="agt-mesh-demo-") as tmp:
        async with DevMesh() as mesh:
            clients = {}
            for name in ("alice", "bob"):
                state = Path(tmp) / name
                state.mkdir(mode=0o700)
                save_identity(state / "identity.json", Identity.generate(os.urandom))
                c = MeshClient(
                    state / "identity.json",
                    relay_url=mesh.relay_url,
                    registry_url=mesh.registry_url,
                    display_name=f"demo-{name}",
                )
                clients[name] = c
            alice, bob = clients["alice"], clients["bob"]

            def tap(name: str) -> Any:
                def on_send(frame: dict[str, Any]) -> None:
                    if frame.get("type") not in ("heartbeat",):
                        log("frame", sender=name, frame=frame)

                return on_send

            if not as_json:
                out.write(f"embedded relay {mesh.relay_url}, registry {mesh.registry_url}\n")
            log("step", text="alice and bob register, publish pre-keys and connect (proof of possession)")
            for name, c in clients.items():
                c.frame_tap = tap(name)
                await c.connect()
                if not as_json:
                    out.write(f"  {name:>5} is {c.did}\n")

            log("step", text="alice → bob by display name: KNOCK (X3DH establishment inside) + first message")
            await alice.send("demo-bob", {"text": "hello bob", "n": 1})
            m = await bob.wait_for(from_=alice.did, timeout=10)
            log("read", reader="bob", payload=m.payload)

            log("step", text="bob answers; the ratchet turns over (a new DH key in every reply)")
            await bob.send(alice.did, {"text": "hello alice ✓", "n": 2})
            m = await alice.wait_for(from_=bob.did, timeout=10)
            log("read", reader="alice", payload=m.payload)
            await alice.send(bob.did, {"text": "ping", "n": 3})
            log("read", reader="bob", payload=(await bob.wait_for(timeout=10)).payload)

            log("step", text="bob goes offline; alice writes three messages (the relay stores them)")
            await bob.disconnect()
            for i in range(3):
                await alice.send(bob.did, {"text": f"while you were away #{i + 1}", "n": 4 + i})
            log("step", text="bob reconnects: the relay replays, bob decrypts and acknowledges")
            await bob.connect()
            for _ in range(3):
                log("read", reader="bob", payload=(await bob.wait_for(from_=alice.did, timeout=10)).payload)
            await bob.send(alice.did, {"text": "got all three", "n": 7})
            log("read", reader="alice", payload=(await alice.wait_for(timeout=10)).payload)
            sessions = {name: c.sessions()[0] for name, c in clients.items()}
            for c in clients.values():
                await c.disconnect()

    if as_json:
        out.write(json.dumps({"transcript": transcript, "sessions": sessions}, ensure_ascii=False) + "\n")
        return 0
    out.write("\n== sessions (counters only, never key material)\n")
    for name, s in sessions.items():
        r = s["ratchet"]
        out.write(
            f"  {name:>5}: role={s['role']}, kdf={s['kdf_profile']}, sent={r['send_n']}, "
            f"received={r['recv_n']}, skipped keys={r['skipped_keys']}\n"
        )
    out.write("\nThe relay saw DIDs, ratchet headers and ciphertext only; every message was read by its recipient.\n")
    return 0


def run_demo(out: TextIO, *, as_json: bool = False) -> int:
    return asyncio.run(_demo(out, as_json))
