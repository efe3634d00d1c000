"""A bare mesh peer for the attack tests: the SDK's sans-I/O core over a raw socket.

Two uses:

* a **legacy peer** — a DID that is not derived from its key (npm 4.0.0 clients use any
  ``agentDid`` verbatim), registered with the pre-POP body and connected without proof of
  possession: what agentmesh-platform 3.7.0 and the dev relay with ``--no-pop
  --allow-legacy`` accept.  Peers like it fall back to trust on first use;
* an **attacker** — connected as itself (with POP where the relay wants it), writing any
  ``from`` into the frames it sends (:meth:`RawPeer.forger`).

KNOCKs to it are accepted, messages collected in :attr:`received`, errors in :attr:`errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from agt_mesh.core import frames as fr
from agt_mesh.core import registry_codec as codec
from agt_mesh.core.encoding import b64url_encode
from agt_mesh.core.events import ErrorEvent, KnockDecision, MessageReceived
from agt_mesh.core.identity import Identity
from agt_mesh.core.protocol import MeshProtocol, ProtocolConfig, Step
from agt_mesh.core.x3dh import KdfProfile, PreKeyStore


class RawPeer:
    def __init__(
        self,
        relay_url: str,
        registry_url: str,
        *,
        did: str | None = None,
        identity: Identity | None = None,
        pop: bool = True,
    ) -> None:
        self.identity = identity or Identity.generate(os.urandom)
        self.did = did or self.identity.did
        self.relay_url = relay_url
        self.registry_url = registry_url.rstrip("/")
        self.pop = pop and self.did == self.identity.did
        self.prekeys = PreKeyStore(self.identity)
        self.prekeys.generate_signed_pre_key(os.urandom, created_at=time.time())
        self.prekeys.generate_one_time_pre_keys(10, os.urandom)
        self.proto = self._protocol(self.did)
        self.received: list[MessageReceived] = []
        self.errors: list[ErrorEvent] = []
        self.frames_in: list[dict[str, Any]] = []
        self.ws: ClientConnection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.http = httpx.AsyncClient(timeout=10)

    def _protocol(self, did: str) -> MeshProtocol:
        config = ProtocolConfig(did=did, receipts=False, initiator_profile=KdfProfile.SPEC)
        return MeshProtocol(config, self.prekeys, new_id=lambda: str(uuid.uuid4()))

    def forger(self, as_did: str) -> MeshProtocol:
        """A protocol that writes ``as_did`` into ``from`` but holds only our own keys."""
        return self._protocol(as_did)

    # -- registry ------------------------------------------------------------------------

    async def register_legacy(self, name: str) -> int:
        body = codec.register_body_legacy(self.did, self.identity, [name], {"display_name": name})
        r = await self.http.post(self.registry_url + "/v1/agents", json=body)
        return r.status_code

    async def register_pop(self, name: str) -> int:
        body = codec.register_body_pop(self.identity, fr.iso_timestamp(time.time()), [name], {"display_name": name})
        r = await self.http.post(self.registry_url + "/v1/agents", json=body)
        return r.status_code

    async def upload_prekeys(self, *, as_did: str | None = None) -> httpx.Response:
        """PUT our bundle under ``as_did`` (default our DID), authenticated as ourselves."""
        spk = self.prekeys.signed_pre_key
        assert spk is not None
        body = codec.prekey_upload_body(self.identity, spk, self.prekeys.one_time_pre_keys)
        target = as_did or self.did
        headers = {"authorization": codec.auth_header(self.identity, self.identity.did, fr.iso_timestamp(time.time()))}
        return await self.http.put(self.registry_url + codec.prekeys_path(target), json=body, headers=headers)

    async def fetch_bundle(self, did: str) -> Any:
        r = await self.http.get(self.registry_url + codec.prekeys_path(did))
        r.raise_for_status()
        return codec.parse_bundle(r.json(), did=did)

    # -- relay ---------------------------------------------------------------------------

    async def connect(self) -> RawPeer:
        url = self.relay_url.replace("http", "ws", 1) + "/ws"
        self.ws = await connect(url, max_size=None, ping_interval=None)
        ident = self.identity if self.pop else None
        frame = fr.connect_frame(self.did, identity=ident, timestamp=fr.iso_timestamp(time.time()))
        await self.ws.send(json.dumps(frame))
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._tick())]
        await asyncio.sleep(0.2)
        return self

    async def send_raw(self, frame: dict[str, Any]) -> None:
        assert self.ws is not None
        await self.ws.send(json.dumps(frame))

    async def _apply(self, step: Step) -> None:
        for f in step.frames:
            await self.send_raw(f)
        for e in step.events:
            if isinstance(e, MessageReceived):
                self.received.append(e)
            elif isinstance(e, ErrorEvent):
                self.errors.append(e)
            elif isinstance(e, KnockDecision):
                await self._apply(self.proto.resolve_knock(e.knock_id, True, time.time(), os.urandom))
        for ack in step.ack_frames():
            await self.send_raw(ack)

    async def _read(self) -> None:
        assert self.ws is not None
        with contextlib.suppress(Exception):
            async for text in self.ws:
                with contextlib.suppress(ValueError):
                    self.frames_in.append(json.loads(text))
                await self._apply(self.proto.receive_text(text, time.time(), os.urandom, max_bytes=1 << 24))

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            await self._apply(self.proto.tick(time.time(), os.urandom))

    async def send(self, to: str, payload: Any) -> str:
        if self.proto.needs_session(to):
            await self._apply(self.proto.establish(to, await self.fetch_bundle(to), time.time(), os.urandom))
        step, mid = self.proto.send(to, payload, time.time(), os.urandom)
        await self._apply(step)
        return mid

    async def wait_for(self, sender: str, payload: Any, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(m.peer == sender and m.payload == payload for m in self.received):
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"{payload!r} from {sender} did not arrive; errors: {self.errors}")

    @property
    def x25519(self) -> str:
        return b64url_encode(self.identity.x25519_public)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await self.ws.close()
        await self.http.aclose()
