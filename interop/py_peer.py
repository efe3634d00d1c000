#!/usr/bin/env python3
"""A Python interop peer: one ``agt_mesh`` ``MeshClient`` behind the line-based JSON control
protocol of ``interop/README.md`` (run it with the SDK's interpreter, ``.venv/bin/python``).

stdin: one JSON command per line; stdout: replies (``{"id":..,"ok":true,..}``) and events
(``{"event":"message",..}``); stderr: logs.

The identity is written to ``<state_dir>/identity.json`` and the client is built from that
file, so ``restart`` (a new ``MeshClient`` for the same identity file and state directory)
behaves like a process restart: whatever the client keeps on disk survives, everything in
memory is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from control import emit, serve

from agt_mesh.core.identity import Identity
from agt_mesh.shell.client import MeshClient
from agt_mesh.shell.identity_file import save_identity

log = logging.getLogger("py_peer")


class Peer:
    def __init__(self) -> None:
        self.cfg: dict[str, Any] = {}
        self.client: MeshClient | None = None
        self.identity: Identity | None = None
        self.identity_path: Path | None = None
        self.state_dir: Path | None = None
        self.errors: list[dict[str, Any]] = []
        self.knocks: list[dict[str, Any]] = []
        self.disconnects: list[dict[str, Any]] = []
        self.stash: list[Any] = []  # drained messages from other senders
        self.generation = 0
        self.restarts = 0
        self.held: list[dict[str, Any]] | None = None

    # -- client construction ----------------------------------------------------------

    def _new_client(self) -> MeshClient:
        assert self.identity_path is not None
        cfg = self.cfg
        self.generation += 1
        gen = self.generation

        async def policy(peer: str, intent: Any) -> bool:
            verdict = not cfg.get("reject_knocks", False)
            self.knocks.append({"from": peer, "verdict": verdict})
            emit({"event": "knock", "from": peer, "intent": intent, "verdict": verdict})
            return verdict

        kwargs: dict[str, Any] = {
            "relay_url": cfg["relay"],
            "registry_url": cfg["registry"],
            "state_dir": self.state_dir,
            "display_name": cfg.get("name") or "py-peer",
            "profile": cfg.get("profile", "current"),
            "policy": policy,
            "connect_timeout": float(cfg.get("connect_timeout", 10)),
            "heartbeat_interval": 20.0,
        }
        params = inspect.signature(MeshClient).parameters
        if "durable" in params and "durable" in cfg:
            kwargs["durable"] = bool(cfg["durable"])
        client = MeshClient(self.identity_path, **kwargs)

        def on_message(msg: Any) -> None:
            if gen == self.generation:
                emit({"event": "message", "from": msg.sender, "payload": msg.payload, "plaintext": msg.plaintext})

        def on_error(kind: str, peer: str | None, detail: str) -> None:
            if gen == self.generation:
                e = {"kind": kind, "peer": peer, "detail": detail, "t": time.time()}
                self.errors.append(e)
                emit({"event": "error", **e})

        def on_disconnect(reason: str, code: int | None) -> None:
            if gen == self.generation:
                self.disconnects.append({"reason": reason, "code": code})
                emit({"event": "disconnect", "reason": reason, "code": code})

        client.on_message(on_message)
        client.on_error(on_error)
        client.on_disconnect(on_disconnect)
        return client

    @property
    def durable(self) -> bool:
        return self.client is not None and getattr(self.client, "store", None) is not None

    def _need(self) -> MeshClient:
        if self.client is None:
            raise RuntimeError("init first")
        return self.client

    # -- commands -----------------------------------------------------------------------

    async def cmd_init(self, a: dict[str, Any]) -> dict[str, Any]:
        if not a.get("relay") or not a.get("registry"):
            raise ValueError("init needs relay and registry")
        if self.client is not None:
            await self.cmd_quit_client(a)
        self.cfg = dict(a)
        seed = bytes.fromhex(a["seed"]) if a.get("seed") else os.urandom(32)
        self.identity = Identity.from_seed(seed)
        base = Path(a["state_dir"]) if a.get("state_dir") else Path(tempfile.mkdtemp(prefix="py-peer-"))
        self.state_dir = base / self.identity.did.replace(":", "_")
        self.state_dir.mkdir(parents=True, mode=0o700, exist_ok=True)
        self.identity_path = self.state_dir / "identity.json"
        if not self.identity_path.exists():
            save_identity(self.identity_path, self.identity)
        self.client = self._new_client()
        return {
            "did": self.identity.did,
            "profile": self.cfg.get("profile", "current"),
            "state_dir": str(self.state_dir),
            "durable": self.durable,
        }

    async def cmd_connect(self, a: dict[str, Any]) -> dict[str, Any]:
        client = self._need()
        await client.connect()
        return {"connected": client.is_connected, "durable": self.durable}

    async def cmd_send(self, a: dict[str, Any]) -> dict[str, Any]:
        client = self._need()
        established = client.protocol.needs_session(a["to"])
        mid = await client.send(a["to"], a["payload"])
        return {"established": established, "message_id": mid}

    async def cmd_send_overtaken(self, a: dict[str, Any]) -> dict[str, Any]:
        """KNOCK + first message, written to the relay message-first (it overtakes its KNOCK)."""
        client = self._need()
        to = a["to"]
        bundle = await client.registry.fetch_bundle(to)
        async with client._lock:
            knock_step = client.protocol.establish(to, bundle, time.time(), os.urandom)
            msg_step, mid = client.protocol.send(to, a["payload"], time.time(), os.urandom)
        transport = client.transport
        assert transport is not None
        frames = msg_step.frames + knock_step.frames
        for frame in frames:
            await transport.send(frame)
        return {"order": [f["type"] for f in frames], "message_id": mid}

    async def cmd_send_reversed(self, a: dict[str, Any]) -> dict[str, Any]:
        """Encrypt several messages on the existing session and write the frames in reverse."""
        client = self._need()
        to = a["to"]
        if client.protocol.needs_session(to):
            raise RuntimeError("send_reversed needs an established session")
        frames: list[dict[str, Any]] = []
        async with client._lock:
            for payload in a["payloads"]:
                step, _ = client.protocol.send(to, payload, time.time(), os.urandom)
                frames.extend(step.frames)
        transport = client.transport
        assert transport is not None
        for frame in reversed(frames):
            await transport.send(frame)
        return {"frames": len(frames)}

    async def cmd_expect(self, a: dict[str, Any]) -> dict[str, Any]:
        client = self._need()
        n = int(a.get("count", 1))
        deadline = time.monotonic() + float(a.get("within", 10))
        got: list[Any] = []
        while len(got) < n:
            remaining = deadline - time.monotonic()
            try:
                msg = await client.wait_for(from_=a.get("from"), timeout=max(0.01, remaining))
            except TimeoutError:
                raise TimeoutError(f"timeout: {len(got)}/{n} messages from {a.get('from') or 'anyone'}", got) from None
            got.append(msg.payload)
        return {"payloads": got}

    async def cmd_drain(self, a: dict[str, Any]) -> dict[str, Any]:
        client = self._need()
        if a.get("wait"):
            await asyncio.sleep(float(a["wait"]))
        out = []
        for msg in client.drain():
            if a.get("from") in (None, msg.sender):
                out.append(msg.payload)
            else:
                self.stash.append({"from": msg.sender, "payload": msg.payload})
        return {"payloads": out}

    async def cmd_disconnect(self, a: dict[str, Any]) -> dict[str, Any]:
        await self._need().disconnect()
        return {}

    async def cmd_restart(self, a: dict[str, Any]) -> dict[str, Any]:
        """A process restart: a new MeshClient for the same identity file and state directory."""
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.disconnect()
        self.restarts += 1
        if a.get("wipe") and self.state_dir is not None:
            # the disk is lost too: only the identity file survives
            for f in self.state_dir.iterdir():
                if f.name != "identity.json" and not f.name.startswith(".") and f.is_file():
                    f.unlink()
        if a.get("pause"):
            await asyncio.sleep(float(a["pause"]))
        self.client = self._new_client()
        await self.client.connect()
        return {"connected": self.client.is_connected, "durable": self.durable, "sessions": self.client.sessions()}

    async def cmd_hold(self, a: dict[str, Any]) -> dict[str, Any]:
        """Fault injection: keep every frame the client writes until ``release``."""
        client = self._need()
        transport = client.transport
        if transport is None:
            raise RuntimeError("not connected")
        held: list[dict[str, Any]] = []
        self.held = held

        async def send(frame: dict[str, Any]) -> None:
            held.append(frame)

        transport.send = send  # type: ignore[method-assign]
        return {}

    async def cmd_release(self, a: dict[str, Any]) -> dict[str, Any]:
        client = self._need()
        transport = client.transport
        if transport is None or self.held is None:
            raise RuntimeError("not holding")
        del transport.send  # the class's method again
        held, self.held = self.held, None
        for frame in held:
            await transport.send(frame)
        return {"released": len(held)}

    async def cmd_heartbeat(self, a: dict[str, Any]) -> dict[str, Any]:
        client = self._need()
        if client.transport is not None:
            await client.transport.send({"v": 1, "type": "heartbeat", "from": client.did})
        return {}

    async def cmd_session(self, a: dict[str, Any]) -> dict[str, Any]:
        client = self._need()
        for s in client.sessions():
            if s["peer"] == a["peer"]:
                return {"exists": True, **{k: v for k, v in s.items() if k != "ratchet"}}
        return {"exists": False}

    async def cmd_report(self, a: dict[str, Any]) -> dict[str, Any]:
        client = self.client
        return {
            "did": client.did if client else None,
            "connected": bool(client and client.is_connected),
            "sessions": [{k: v for k, v in s.items() if k != "ratchet"} for s in (client.sessions() if client else [])],
            "errors": self.errors,
            "knocks": self.knocks,
            "disconnects": self.disconnects,
            "durable": self.durable,
            "restarts": self.restarts,
        }

    async def cmd_quit_client(self, a: dict[str, Any]) -> dict[str, Any]:
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.disconnect()
        self.client = None
        self.generation += 1
        return {}

    async def cmd_quit(self, a: dict[str, Any]) -> dict[str, Any]:
        await self.cmd_quit_client(a)
        raise SystemExit(0)


async def main() -> int:
    logging.basicConfig(
        level=os.environ.get("PY_PEER_LOG", "WARNING").upper(),
        stream=sys.stderr,
        format="[py-peer %(name)s] %(levelname)s %(message)s",
    )
    return await serve(Peer())


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
