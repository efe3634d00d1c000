#!/usr/bin/env python3
"""An interop peer built on the AGT Python ``agentmesh.encryption`` (X3DH + Double Ratchet,
spec KDF) — the second, independent implementation of the spec-KDF wire.

Run it with the interpreter of the ``core-5.0.0`` venv (``python interop/agt_venvs.py ensure
core-5.0.0``).  AGT Python has no relay client, so this file has a minimal one: the relay
connect frame with the DID proof of possession, the POP registration and the
``Ed25519-Timestamp``-authenticated pre-key upload, and the KNOCK / message / ack frames
exactly as ``wire.md`` §4.2 and §5.3 describe them (standard base64 in relay frames,
base64url in the registry).  All cryptography is ``SecureChannel`` / ``X3DHKeyManager``.

Session behaviour mirrors the TypeScript ``MeshClient`` (``wire.md`` §4): the KNOCK carries
the establishment, a KNOCK that arrives while a session exists is accepted but its
establishment ignored, frames that arrive before their KNOCK wait in a 5-frame / 3-second
buffer, a decryption failure tears the session down (``session_desync``), and a message is
acknowledged only once it was decrypted.  Processed message ids are remembered so a relay
redelivery never reaches the (non-transactional) AGT ratchet twice.

Same line-based JSON control protocol as the other peers (``interop/README.md``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import sys
import time
import uuid
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from control import emit, serve

warnings.filterwarnings("ignore")

import httpx  # noqa: E402
import websockets  # noqa: E402
from agentmesh.encryption.channel import ChannelEstablishment, SecureChannel  # noqa: E402
from agentmesh.encryption.ratchet import EncryptedMessage, MessageHeader  # noqa: E402
from agentmesh.encryption.x3dh import PreKeyBundle, X3DHKeyManager  # noqa: E402
from nacl.signing import SigningKey  # noqa: E402

log = logging.getLogger("agt_peer")

HEARTBEAT = 20.0
PRE_KNOCK_BUFFER = 5
PRE_KNOCK_TTL = 3.0
OTK_COUNT = 20


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def b64d(text: str) -> bytes:
    """Lenient base64: standard or url-safe alphabet, padding optional (like Node's Buffer)."""
    t = text.replace("-", "+").replace("_", "/")
    return base64.b64decode(t + "=" * (-len(t) % 4))


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat()


def compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


@dataclass
class Session:
    channel: SecureChannel
    role: str
    received: int = 0
    sent: int = 0


@dataclass
class Buffered:
    frame: dict[str, Any]
    expires: float


@dataclass
class State:
    sessions: dict[str, Session] = field(default_factory=dict)
    buffer: dict[str, list[Buffered]] = field(default_factory=dict)
    knock_accepted: set[str] = field(default_factory=set)
    seen: OrderedDict[str, None] = field(default_factory=OrderedDict)


class AgtPeer:
    def __init__(self) -> None:
        self.cfg: dict[str, Any] = {}
        self.seed = b""
        self.pub = b""
        self.did = ""
        self.km: X3DHKeyManager | None = None
        self.st = State()
        self.ws: Any = None
        self.reader: asyncio.Task[None] | None = None
        self.hb: asyncio.Task[None] | None = None
        self.sweeper: asyncio.Task[None] | None = None
        self.http: httpx.AsyncClient | None = None
        self.inbox: list[dict[str, Any]] = []
        self.inbox_changed = asyncio.Event()
        self.errors: list[dict[str, Any]] = []
        self.knocks: list[dict[str, Any]] = []
        self.closes: list[dict[str, Any]] = []
        self.relay_errors: list[str] = []
        self.lock = asyncio.Lock()
        self.registered = False
        self.held: list[dict[str, Any]] | None = None

    # -- helpers --------------------------------------------------------------------------

    def error(self, kind: str, peer: str | None, detail: str) -> None:
        e = {"kind": kind, "peer": peer, "detail": detail}
        self.errors.append(e)
        emit({"event": "error", **e})

    @property
    def ws_url(self) -> str:
        return "ws" + self.cfg["relay"][len("http") :].rstrip("/") + "/ws"

    def _auth(self) -> str:
        ts = now_iso()
        sig = SigningKey(self.seed).sign(ts.encode()).signature
        return f"Ed25519-Timestamp {self.did} {ts} {b64u(sig)}"

    async def send_frame(self, frame: dict[str, Any]) -> None:
        if self.held is not None:
            self.held.append(frame)
            return
        if self.ws is None:
            raise RuntimeError("not connected to the relay")
        await self.ws.send(compact(frame))

    # -- registry ---------------------------------------------------------------------------

    async def register(self) -> int:
        assert self.http is not None
        caps = [self.cfg.get("name") or "agt-peer"]
        meta = {"display_name": caps[0], "runtime": "python", "library": "agentmesh.encryption 5.0.0"}
        if self.cfg.get("mode", "pop") == "pop":
            ts = now_iso()
            pk = b64u(self.pub)
            proof = SigningKey(self.seed).sign((pk + ts).encode()).signature
            body = {
                "public_key": pk,
                "proof": b64u(proof),
                "proof_timestamp": ts,
                "capabilities": caps,
                "metadata": meta,
            }
        else:
            body = {"did": self.did, "public_key": b64u(self.pub), "capabilities": caps, "metadata": meta}
        r = await self.http.post(self.cfg["registry"] + "/v1/agents", json=body)
        if r.status_code not in (200, 201, 409):
            raise RuntimeError(f"register failed: {r.status_code} {r.text[:500]}")
        return r.status_code

    async def upload_prekeys(self) -> None:
        assert self.http is not None and self.km is not None
        spk = self.km.generate_signed_pre_key()
        otks = self.km.generate_one_time_pre_keys(OTK_COUNT)
        body = {
            "identity_key": b64u(self.km.identity_key.public_key),
            "identity_key_ed": b64u(self.pub),
            "signed_pre_key": {
                "key_id": spk.key_id,
                "public_key": b64u(spk.key_pair.public_key),
                "signature": b64u(spk.signature),
            },
            "one_time_pre_keys": [{"key_id": o.key_id, "public_key": b64u(o.key_pair.public_key)} for o in otks],
        }
        r = await self.http.put(
            f"{self.cfg['registry']}/v1/agents/{self.did}/prekeys", json=body, headers={"authorization": self._auth()}
        )
        if r.status_code // 100 != 2:
            raise RuntimeError(f"pre-key upload failed: {r.status_code} {r.text[:500]}")

    async def fetch_bundle(self, did: str) -> PreKeyBundle:
        assert self.http is not None
        r = await self.http.get(f"{self.cfg['registry']}/v1/agents/{did}/prekeys")
        if r.status_code != 200:
            raise RuntimeError(f"no pre-key bundle for {did}: {r.status_code} {r.text[:300]}")
        j = r.json()
        otk = j.get("one_time_pre_key")
        return PreKeyBundle(
            identity_key=b64d(j["identity_key"]),
            identity_key_ed=b64d(j["identity_key_ed"]),
            signed_pre_key=b64d(j["signed_pre_key"]["public_key"]),
            signed_pre_key_signature=b64d(j["signed_pre_key"]["signature"]),
            signed_pre_key_id=int(j["signed_pre_key"]["key_id"]),
            one_time_pre_key=b64d(otk["public_key"]) if otk else None,
            one_time_pre_key_id=int(otk["key_id"]) if otk else None,
        )

    # -- relay ------------------------------------------------------------------------------

    async def connect_relay(self) -> None:
        if self.ws is not None:
            return
        ws = await websockets.connect(self.ws_url, max_size=2**24)
        ts = now_iso()
        await ws.send(
            compact(
                {
                    "v": 1,
                    "type": "connect",
                    "from": self.did,
                    "public_key": b64(self.pub),
                    "timestamp": ts,
                    "signature": b64(SigningKey(self.seed).sign(ts.encode()).signature),
                }
            )
        )
        self.ws = ws
        self.reader = asyncio.create_task(self._read_loop(ws))
        # The relays send no welcome frame: a refusal is an error frame and a close within
        # a moment; silence means accepted.
        await asyncio.sleep(0.3)
        if self.ws is None:
            last = self.closes[-1] if self.closes else {}
            raise RuntimeError(f"relay refused the connection: close {last.get('code')} {self.relay_errors[-1:]}")
        self.hb = asyncio.create_task(self._heartbeat(ws))

    async def _heartbeat(self, ws: Any) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            try:
                await ws.send(compact({"v": 1, "type": "heartbeat", "from": self.did, "ts": now_iso()}))
            except Exception:
                return

    async def _read_loop(self, ws: Any) -> None:
        try:
            async for raw in ws:
                try:
                    frame = json.loads(raw)
                except ValueError:
                    self.error("frame", None, "malformed frame (not JSON)")
                    continue
                if not isinstance(frame, dict):
                    continue
                try:
                    async with self.lock:
                        await self.on_frame(frame)
                except Exception as exc:
                    log.exception("frame handler failed")
                    self.error("frame", frame.get("from"), f"handler error: {exc!r}")
        except websockets.ConnectionClosed:
            pass
        finally:
            code = getattr(ws, "close_code", None)
            reason = getattr(ws, "close_reason", "") or ""
            self.closes.append({"code": code, "reason": reason})
            emit({"event": "close", "code": code, "reason": reason})
            if self.ws is ws:
                self.ws = None
                if self.hb is not None:
                    self.hb.cancel()

    async def disconnect_relay(self) -> None:
        ws, self.ws = self.ws, None
        if self.hb is not None:
            self.hb.cancel()
            self.hb = None
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.send(compact({"v": 1, "type": "disconnect", "from": self.did}))
            await ws.close(1000, "client disconnect")
        if self.reader is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(self.reader, 5)
            self.reader = None

    # -- inbound ----------------------------------------------------------------------------

    async def on_frame(self, f: dict[str, Any]) -> None:
        t = f.get("type")
        if t == "message":
            await self.on_message(f)
        elif t == "knock":
            await self.on_knock(f)
        elif t == "knock_accept":
            self.st.knock_accepted.add(f.get("from", ""))
            emit({"event": "knock_accept", "from": f.get("from")})
        elif t == "knock_reject":
            peer = f.get("from", "")
            self.st.sessions.pop(peer, None)
            self.st.knock_accepted.discard(peer)
            emit({"event": "knock_reject", "from": peer, "reason": f.get("reason")})
            self.error("knock", peer, f"peer rejected our KNOCK ({f.get('reason')})")
        elif t == "pending_messages":
            for entry in f.get("messages") or []:
                if isinstance(entry, dict):
                    await self.on_frame(entry)
        elif t == "error":
            self.relay_errors.append(str(f.get("detail")))
            emit({"event": "relay_error", "detail": f.get("detail")})

    async def on_knock(self, f: dict[str, Any]) -> None:
        peer = f.get("from", "")
        verdict = not self.cfg.get("reject_knocks", False)
        self.knocks.append({"from": peer, "verdict": verdict})
        emit({"event": "knock", "from": peer, "intent": f.get("intent"), "verdict": verdict})
        est = f.get("establishment")
        if verdict and isinstance(est, dict) and peer not in self.st.sessions:
            try:
                assert self.km is not None
                otk = est.get("otk")
                establishment = ChannelEstablishment(
                    initiator_identity_key=b64d(est["ik"]),
                    ephemeral_public_key=b64d(est["ek"]),
                    used_one_time_key_id=otk if isinstance(otk, int) else None,
                )
                channel = SecureChannel.create_receiver(
                    self.km, establishment, associated_data=f"{peer}|{self.did}".encode()
                )
                self.st.sessions[peer] = Session(channel, "responder")
            except Exception as exc:
                self.error("knock", peer, f"failed to bootstrap responder from KNOCK: {exc!r}")
                verdict = False
        reply: dict[str, Any] = {
            "v": 1,
            "type": "knock_accept" if verdict else "knock_reject",
            "from": self.did,
            "to": peer,
            "id": str(uuid.uuid4()),
            "knock_id": f.get("id"),
        }
        if not verdict:
            reply["reason"] = "policy_denied"
        reply["ts"] = now_iso()
        await self.send_frame(reply)
        buffered = self.st.buffer.pop(peer, [])
        if verdict:
            self.st.knock_accepted.add(peer)
            for b in buffered:
                await self.on_message(b.frame)

    async def on_message(self, f: dict[str, Any]) -> None:
        peer, fid = f.get("from", ""), f.get("id")
        if fid in self.st.seen:
            await self.send_frame({"v": 1, "type": "ack", "id": fid})
            return
        session = self.st.sessions.get(peer)
        if session is None:
            queue = self.st.buffer.setdefault(peer, [])
            if len(queue) >= PRE_KNOCK_BUFFER:
                queue.pop(0)
            queue.append(Buffered(f, time.monotonic() + PRE_KNOCK_TTL))
            return
        try:
            h = f["header"]
            msg = EncryptedMessage(
                header=MessageHeader(b64d(h["dh"]), int(h["pn"]), int(h["n"])), ciphertext=b64d(f["ciphertext"])
            )
            plaintext = session.channel.receive(msg)
            payload = json.loads(plaintext.decode())
        except Exception as exc:
            # as the TypeScript client does: the ratchet is out of step; tear the session down
            self.st.sessions.pop(peer, None)
            self.st.knock_accepted.discard(peer)
            self.error("session_desync", peer, f"{type(exc).__name__}: {exc}".rstrip(": "))
            return
        session.received += 1
        self.st.seen[fid] = None
        if len(self.st.seen) > 10_000:
            self.st.seen.popitem(last=False)
        await self.send_frame({"v": 1, "type": "ack", "id": fid})
        self.inbox.append({"from": peer, "payload": payload})
        emit({"event": "message", "from": peer, "payload": payload, "plaintext": False})
        self.inbox_changed.set()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for peer in list(self.st.buffer):
                keep = [b for b in self.st.buffer[peer] if b.expires > now]
                if keep:
                    self.st.buffer[peer] = keep
                else:
                    del self.st.buffer[peer]

    # -- outbound ---------------------------------------------------------------------------

    async def _ensure_session(self, to: str) -> tuple[list[dict[str, Any]], bool]:
        """The KNOCK frame to send first (if a session had to be made)."""
        if to in self.st.sessions:
            return [], False
        assert self.km is not None
        bundle = await self.fetch_bundle(to)
        channel, est = SecureChannel.create_sender(self.km, bundle, associated_data=f"{self.did}|{to}".encode())
        self.st.sessions[to] = Session(channel, "initiator")
        establishment: dict[str, Any] = {"ik": b64(est.initiator_identity_key), "ek": b64(est.ephemeral_public_key)}
        if est.used_one_time_key_id is not None:
            establishment["otk"] = est.used_one_time_key_id
        knock = {
            "v": 1,
            "type": "knock",
            "from": self.did,
            "to": to,
            "id": str(uuid.uuid4()),
            "ts": now_iso(),
            "intent": {"action": "establish_session"},
            "establishment": establishment,
        }
        return [knock], True

    def _encrypt(self, to: str, payload: Any) -> dict[str, Any]:
        session = self.st.sessions[to]
        m = session.channel.send(compact(payload).encode())
        session.sent += 1
        return {
            "v": 1,
            "type": "message",
            "from": self.did,
            "to": to,
            "id": str(uuid.uuid4()),
            "ts": now_iso(),
            "header": {
                "dh": b64(m.header.dh_public_key),
                "pn": m.header.previous_chain_length,
                "n": m.header.message_number,
            },
            "ciphertext": b64(m.ciphertext),
        }

    # -- commands ---------------------------------------------------------------------------

    async def cmd_init(self, a: dict[str, Any]) -> dict[str, Any]:
        if not a.get("relay") or not a.get("registry"):
            raise ValueError("init needs relay and registry")
        await self.cmd_quit_client(a)
        self.cfg = dict(a)
        self.seed = bytes.fromhex(a["seed"]) if a.get("seed") else os.urandom(32)
        self.pub = bytes(SigningKey(self.seed).verify_key)
        self.did = "did:mesh:" + hashlib.sha256(self.pub).hexdigest()[:32]
        self.http = httpx.AsyncClient(timeout=10)
        self.st = State()
        self.registered = False
        self.sweeper = asyncio.create_task(self._sweep())
        return {"did": self.did, "impl": "agentmesh.encryption (agent-governance-toolkit-core 5.0.0)"}

    async def cmd_connect(self, a: dict[str, Any]) -> dict[str, Any]:
        status = None
        if not self.registered:
            self.km = X3DHKeyManager.from_ed25519_keys(self.seed + self.pub, self.pub)
            status = await self.register()
            await self.upload_prekeys()
            self.registered = True
        await self.connect_relay()
        return {"connected": self.ws is not None, "register_status": status}

    async def cmd_send(self, a: dict[str, Any]) -> dict[str, Any]:
        to = a["to"]
        async with self.lock:
            frames, established = await self._ensure_session(to)
            frames.append(self._encrypt(to, a["payload"]))
        for frame in frames:
            await self.send_frame(frame)
        return {"established": established}

    async def cmd_send_overtaken(self, a: dict[str, Any]) -> dict[str, Any]:
        to = a["to"]
        async with self.lock:
            self.st.sessions.pop(to, None)
            frames, _ = await self._ensure_session(to)
            frames.insert(0, self._encrypt(to, a["payload"]))  # the message overtakes its KNOCK
        for frame in frames:
            await self.send_frame(frame)
        return {"order": [f["type"] for f in frames]}

    async def cmd_send_reversed(self, a: dict[str, Any]) -> dict[str, Any]:
        to = a["to"]
        async with self.lock:
            if to not in self.st.sessions:
                raise RuntimeError("send_reversed needs an established session")
            frames = [self._encrypt(to, p) for p in a["payloads"]]
        for frame in reversed(frames):
            await self.send_frame(frame)
        return {"frames": len(frames)}

    def _take(self, sender: str | None, n: float) -> list[Any]:
        out: list[Any] = []
        keep: list[dict[str, Any]] = []
        for m in self.inbox:
            if len(out) < n and sender in (None, m["from"]):
                out.append(m["payload"])
            else:
                keep.append(m)
        self.inbox = keep
        return out

    async def cmd_expect(self, a: dict[str, Any]) -> dict[str, Any]:
        sender, n = a.get("from"), int(a.get("count", 1))
        deadline = time.monotonic() + float(a.get("within", 10))

        def have() -> int:
            return sum(1 for m in self.inbox if sender in (None, m["from"]))

        while have() < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                got = [m["payload"] for m in self.inbox if sender in (None, m["from"])]
                raise TimeoutError(f"timeout: {len(got)}/{n} messages from {sender or 'anyone'}", got)
            self.inbox_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.inbox_changed.wait(), remaining)
        return {"payloads": self._take(sender, n)}

    async def cmd_drain(self, a: dict[str, Any]) -> dict[str, Any]:
        if a.get("wait"):
            await asyncio.sleep(float(a["wait"]))
        return {"payloads": self._take(a.get("from"), float("inf"))}

    async def cmd_disconnect(self, a: dict[str, Any]) -> dict[str, Any]:
        await self.disconnect_relay()
        return {}

    async def cmd_restart(self, a: dict[str, Any]) -> dict[str, Any]:
        await self.disconnect_relay()
        self.st = State()
        self.registered = False
        if a.get("pause"):
            await asyncio.sleep(float(a["pause"]))
        return await self.cmd_connect(a)

    async def cmd_hold(self, a: dict[str, Any]) -> dict[str, Any]:
        """Fault injection: keep every frame until ``release``."""
        self.held = []
        return {}

    async def cmd_release(self, a: dict[str, Any]) -> dict[str, Any]:
        held, self.held = self.held or [], None
        for frame in held:
            await self.send_frame(frame)
        return {"released": len(held)}

    async def cmd_heartbeat(self, a: dict[str, Any]) -> dict[str, Any]:
        await self.send_frame({"v": 1, "type": "heartbeat", "from": self.did, "ts": now_iso()})
        return {}

    async def cmd_session(self, a: dict[str, Any]) -> dict[str, Any]:
        s = self.st.sessions.get(a["peer"])
        return {"exists": s is not None, **({"role": s.role, "received": s.received, "sent": s.sent} if s else {})}

    async def cmd_report(self, a: dict[str, Any]) -> dict[str, Any]:
        return {
            "did": self.did,
            "connected": self.ws is not None,
            "sessions": [
                {"peer": p, "role": s.role, "received": s.received, "sent": s.sent} for p, s in self.st.sessions.items()
            ],
            "errors": self.errors,
            "knocks": self.knocks,
            "closes": self.closes,
            "relay_errors": self.relay_errors,
            "durable": False,
        }

    async def cmd_quit_client(self, a: dict[str, Any]) -> dict[str, Any]:
        await self.disconnect_relay()
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        if self.http is not None:
            await self.http.aclose()
            self.http = None
        return {}

    async def cmd_quit(self, a: dict[str, Any]) -> dict[str, Any]:
        await self.cmd_quit_client(a)
        raise SystemExit(0)


async def main() -> int:
    logging.basicConfig(level=os.environ.get("AGT_PEER_LOG", "WARNING").upper(), stream=sys.stderr)
    return await serve(AgtPeer())


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
