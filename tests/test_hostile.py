"""Hostile peers, end to end through the dev relay.

The attacker is a raw ``websockets`` connection with its own POP-authenticated identity
(or, on a ``require_pop=False`` relay — what pre-5.0 AGT relays do — one that writes any
``from``).  Frames the relay refuses to forward are also injected straight into the
victim's inbound path (``MeshClient._on_frame``), as a malicious relay would deliver them.
After every attack a valid message still arrives both ways, no forged payload reaches the
application, and the victim's state stays within its caps.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect

from agt_mesh.core import frames as fr
from agt_mesh.core.identity import Identity
from agt_mesh.core.protocol import _MAX_AWAITING_VERDICT, _MAX_PENDING_KNOCKS
from agt_mesh.core.ratchet import MAX_SKIPPED_KEYS
from agt_mesh.core.session import MAX_CANDIDATES
from agt_mesh.dev.server import DevMesh
from agt_mesh.errors import MeshProtocolError
from agt_mesh.shell.client import MeshClient
from agt_mesh.shell.relay import RelayTransport

FUZZ_EXAMPLES = int(os.environ.get("AGT_FUZZ_EXAMPLES", "300"))


def _ts() -> str:
    return fr.iso_timestamp(time.time())


def _b64(n: int) -> str:
    return base64.b64encode(os.urandom(n)).decode()


class Attacker:
    """A raw relay connection: ``send`` writes any frame text."""

    def __init__(self, mesh: DevMesh, identity: Identity | None = None) -> None:
        self.mesh = mesh
        self.identity = identity or Identity.generate(os.urandom)
        self.did = self.identity.did
        self.ws: ClientConnection | None = None
        self.received: list[str] = []
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Attacker:
        self.ws = await connect(self.mesh.relay.ws_url, max_size=None, ping_interval=None)
        await self.ws.send(fr.encode_frame(fr.connect_frame(self.did, identity=self.identity, timestamp=_ts())))
        self._reader = asyncio.create_task(self._read())
        await asyncio.sleep(0.05)
        return self

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for m in self.ws:
                self.received.append(m if isinstance(m, str) else m.decode())
        except Exception:
            pass

    async def send(self, frame: dict[str, Any] | str) -> None:
        assert self.ws is not None
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def __aexit__(self, *exc: object) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()


class Victims:
    """alice and bob with an established session; everything bob's application sees."""

    def __init__(self, mesh: DevMesh, **bob_kw: Any) -> None:
        self.mesh = mesh
        self.a = self._client("alice")
        self.b = self._client("bob", **bob_kw)
        self.seen: list[tuple[str, Any]] = []
        self.errors: list[tuple[str, str | None, str]] = []
        self.b.on_message(lambda m: self.seen.append((m.sender, m.payload)))
        self.b.on_error(lambda kind, peer, detail: self.errors.append((kind, peer, detail)))
        self.a_frames: list[dict[str, Any]] = []
        self.a.frame_tap = self.a_frames.append
        self.rounds = 0

    def _client(self, name: str, **kw: Any) -> MeshClient:
        return MeshClient(
            Identity.generate(os.urandom),
            relay_url=self.mesh.relay_url,
            registry_url=self.mesh.registry_url,
            display_name=f"{name}-{os.urandom(3).hex()}",
            connect_timeout=5,
            **kw,
        )

    async def start(self) -> Victims:
        await self.a.connect()
        await self.b.connect()
        await self.still_works()
        return self

    async def still_works(self) -> None:
        """A valid message arrives both ways (and nothing forged reached bob's app)."""
        self.rounds += 1
        token = f"ok-{self.rounds}-{os.urandom(3).hex()}"
        await self.a.send(self.b.did, {"ok": token})
        got = await self.b.wait_for(from_=self.a.did, timeout=10, predicate=lambda m: m.payload == {"ok": token})
        assert got.payload == {"ok": token}
        await self.b.send(self.a.did, {"back": token})
        assert (await self.a.wait_for(from_=self.b.did, timeout=10)).payload == {"back": token}
        forged = [p for s, p in self.seen if not (isinstance(p, dict) and ("ok" in p))]
        assert forged == [], forged

    def bob_state(self) -> bytes:
        return self.b.protocol.sessions[self.a.did].to_bytes()

    async def stop(self) -> None:
        await self.a.disconnect()
        await self.b.disconnect()


@pytest.fixture
async def mesh() -> AsyncIterator[DevMesh]:
    async with DevMesh() as m:
        yield m


@pytest.fixture
async def open_mesh() -> AsyncIterator[DevMesh]:
    """A relay that forwards ``from`` as written (pre-5.0 AGT behaviour)."""
    async with DevMesh(require_pop=False) as m:
        yield m


@pytest.fixture
async def victims(mesh: DevMesh) -> AsyncIterator[Victims]:
    v = await Victims(mesh).start()
    yield v
    await v.stop()


@pytest.fixture
async def open_victims(open_mesh: DevMesh) -> AsyncIterator[Victims]:
    v = await Victims(open_mesh).start()
    yield v
    await v.stop()


async def _settle(seconds: float = 0.3) -> None:
    await asyncio.sleep(seconds)


# ----------------------------------------------------------------------------------
# forged frames
# ----------------------------------------------------------------------------------


async def test_forged_plaintext_from_unlisted_peer(victims: Victims) -> None:
    async with Attacker(victims.mesh) as m:
        for i in range(5):
            await m.send(fr.plaintext_message_frame(m.did, victims.b.did, str(uuid.uuid4()), _ts(), {"evil": i}))
        await _settle()
    assert not any(p == {"evil": 0} for _, p in victims.seen)
    assert any(m.did == peer for _, peer, _ in victims.errors)
    await victims.still_works()


async def test_spoofed_plaintext_from_verified_peer(open_victims: Victims) -> None:
    """Even allow-listed, a peer that was ever E2E-verified cannot be downgraded to plaintext."""
    v = open_victims
    v.b.add_plaintext_peer(v.a.did)
    before = v.bob_state()
    async with Attacker(v.mesh) as m:
        await m.send(fr.plaintext_message_frame(v.a.did, v.b.did, str(uuid.uuid4()), _ts(), {"evil": "downgrade"}))
        await _settle()
    assert not any(p == {"evil": "downgrade"} for _, p in v.seen)
    assert v.bob_state() == before
    await v.still_works()


async def test_spoofed_from_with_forged_ciphertext(open_victims: Victims) -> None:
    v = open_victims
    before = v.bob_state()
    async with Attacker(v.mesh) as m:
        for n in (0, 1, 5, 99):
            header = {"dh": _b64(32), "pn": 0, "n": n}
            frame = {"v": 1, "type": "message", "from": v.a.did, "to": v.b.did, "id": str(uuid.uuid4())}
            await m.send({**frame, "ts": _ts(), "header": header, "ciphertext": _b64(80)})
        # the current chain's own dh, with a forged tag
        cur = v.b.protocol.sessions[v.a.did].primary
        assert cur is not None and cur.dhr is not None
        header = {"dh": base64.b64encode(cur.dhr).decode(), "pn": 0, "n": cur.nr}
        await m.send({**frame, "id": str(uuid.uuid4()), "header": header, "ciphertext": _b64(80)})
        await _settle()
    assert v.bob_state() == before  # transactional: failed decryptions change nothing
    await v.still_works()


async def test_forged_knock_reject(open_victims: Victims) -> None:
    """A spoofed knock_reject naming our KNOCK does not tear down a working session."""
    v = open_victims
    knock_ids = [f["id"] for f in v.a_frames if f.get("type") == "knock"]
    assert knock_ids
    async with Attacker(v.mesh) as m:
        for kid in [*knock_ids, "not-a-knock"]:
            await m.send(fr.knock_reject_frame(v.b.did, v.a.did, str(uuid.uuid4()), kid, _ts()))
        # and from the attacker's own DID (no session with it)
        await m.send(fr.knock_reject_frame(m.did, v.a.did, str(uuid.uuid4()), knock_ids[0], _ts()))
        await _settle()
    assert v.a.sessions() and v.a.sessions()[0]["peer"] == v.b.did
    await v.still_works()


async def test_replayed_knock_and_messages(open_victims: Victims) -> None:
    v = open_victims
    for i in range(5):
        await v.a.send(v.b.did, {"ok": f"pre-{i}"})
    for i in range(5):
        await v.b.wait_for(from_=v.a.did, timeout=10, predicate=lambda m, i=i: m.payload == {"ok": f"pre-{i}"})
    count = len(v.seen)
    ek = v.b.protocol.sessions[v.a.did].establishment_ek
    captured = [f for f in v.a_frames if f.get("type") in ("knock", "message")]
    assert any(f["type"] == "knock" for f in captured)
    async with Attacker(v.mesh) as m:
        for _ in range(2):
            for f in captured:
                await m.send(f)  # byte-identical replay, spoofed from alice
            # and the same frames with fresh ids (de-duplication by id cannot catch these)
            for f in captured:
                await m.send({**f, "id": str(uuid.uuid4())})
        await _settle(0.8)
    assert len(v.seen) == count  # nothing delivered twice
    assert v.b.protocol.sessions[v.a.did].establishment_ek == ek  # no re-keying by replay
    await v.still_works()


# ----------------------------------------------------------------------------------
# floods: memory stays within the caps
# ----------------------------------------------------------------------------------


def _knock(from_did: str, to_did: str, ik: bytes | None = None) -> dict[str, Any]:
    """A KNOCK with a fresh ephemeral key; ``ik`` the sender's identity key (a random key
    does not belong to ``from_did`` and is refused before the policy is asked)."""
    return {
        "v": 1,
        "type": "knock",
        "from": from_did,
        "to": to_did,
        "id": str(uuid.uuid4()),
        "ts": _ts(),
        "intent": {"action": "chat"},
        "establishment": {"ik": base64.b64encode(ik).decode() if ik else _b64(32), "ek": _b64(32)},
    }


async def test_knock_flood_from_one_peer_keeps_candidates_bounded(victims: Victims) -> None:
    v = victims
    async with Attacker(v.mesh) as m:
        for _ in range(200):
            await m.send(_knock(m.did, v.b.did, m.identity.x25519_public))
        await _settle(1.0)
        sess = v.b.protocol.sessions.get(m.did)
        assert sess is None or len(sess.candidates) <= MAX_CANDIDATES
        assert len(v.b.protocol._pending_knocks) <= _MAX_PENDING_KNOCKS
    await v.still_works()


async def test_knock_flood_from_many_spoofed_dids_is_bounded(open_mesh: DevMesh) -> None:
    """3,000 KNOCKs from 3,000 DIDs while the policy hook is slow: queued verdicts stay capped."""
    release = asyncio.Event()

    async def slow_policy(peer: str, intent: object) -> bool:
        await release.wait()
        return False

    v = await Victims(open_mesh).start()
    try:
        v.b.on_knock(slow_policy)
        async with Attacker(open_mesh) as m:
            for i in range(3000):
                sybil = Identity(hashlib.sha256(f"sybil-{i}".encode()).digest())  # fresh identities cost nothing
                await m.send(_knock(sybil.did, v.b.did, sybil.x25519_public))
            await _settle(2.0)
            proto = v.b.protocol
            assert len(proto._pending_knocks) <= max(_MAX_PENDING_KNOCKS, _MAX_AWAITING_VERDICT)
            assert len(proto._buffer) <= proto.config.max_buffered_peers
            assert len(v.b._tasks) <= _MAX_PENDING_KNOCKS + 10
            print(
                f"\nsybil knock flood: sessions={len(proto.sessions)} pending={len(proto._pending_knocks)} "
                f"tasks={len(v.b._tasks)} buffer={len(proto._buffer)}"
            )
            release.set()
            await _settle(1.0)
        v.b.on_knock(lambda peer, intent: asyncio.sleep(0, True))  # type: ignore[arg-type,return-value]
        await v.still_works()
    finally:
        release.set()
        await v.stop()


async def test_skipped_key_gaps_are_capped(victims: Victims) -> None:
    """A peer with a real session skips 99 keys per message, 40 times: the cache stays ≤ 2,000."""
    v = victims
    mallory = v._client("mallory", receipt_timeout=3600)
    await mallory.connect()
    try:
        await mallory.send(v.b.did, {"ok": "mallory-hello"})
        await v.b.wait_for(from_=mallory.did, timeout=10)
        assert mallory.transport is not None
        for _ in range(40):
            frame = None
            for _ in range(100):  # encrypt 100, send only the last
                async with mallory._lock:
                    step, _mid = mallory.protocol.send(v.b.did, {"ok": "gap"}, time.time(), os.urandom)
                frame = step.frames[-1]
            assert frame is not None
            await mallory.transport.send(frame)
        await _settle(1.5)
        primary = v.b.protocol.sessions[mallory.did].primary
        assert primary is not None
        assert 1000 <= primary.skipped_count <= MAX_SKIPPED_KEYS
        # a header far ahead (n = 2^32-1) is refused, not iterated
        async with mallory._lock:
            step, _mid = mallory.protocol.send(v.b.did, {"ok": "far"}, time.time(), os.urandom)
        far = dict(step.frames[-1])
        far["header"] = {**far["header"], "n": 2**32 - 1}
        t0 = time.monotonic()
        await mallory.transport.send(far)
        await _settle(0.5)
        assert time.monotonic() - t0 < 5
        assert primary.skipped_count <= MAX_SKIPPED_KEYS
        # a failed decryption waits in the small pre-KNOCK buffer (3 s) before it is given up
        for _ in range(60):
            if any("skipped" in d.lower() for _, peer, d in v.errors if peer == mallory.did):
                break
            await asyncio.sleep(0.1)
        assert any("skipped" in d.lower() for _, peer, d in v.errors if peer == mallory.did), v.errors
        assert len(v.b.protocol._buffer.get(mallory.did, ())) <= v.b.protocol.config.pre_knock_buffer_size
    finally:
        await mallory.disconnect()
    await v.still_works()


# ----------------------------------------------------------------------------------
# oversized frames, JSON bombs, huge integers
# ----------------------------------------------------------------------------------


async def test_oversized_frame_refused_before_allocation() -> None:
    """A 'relay' announces a 1 GiB text frame: the client closes (1009) after reading a few KiB."""
    got: list[str] = []
    sent = {"bytes": 0}
    inbound = bytearray()

    async def _collect(r: asyncio.StreamReader) -> None:
        with contextlib.suppress(Exception):
            while data := await r.read(65536):
                inbound.extend(data)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        reader_task = asyncio.create_task(_collect(r))
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key")
        )
        accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
        w.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        ok = b'{"type":"pending_messages","messages":[]}'
        w.write(bytes([0x81, len(ok)]) + ok)
        await w.drain()
        await asyncio.sleep(0.3)  # connected
        w.write(bytes([0x81, 127]) + (2**30).to_bytes(8, "big"))  # announces 1 GiB
        try:
            for _ in range(64):  # then trickles 64 x 16 KiB at most
                w.write(b"A" * 16384)
                await w.drain()
                sent["bytes"] += 16384
                await asyncio.sleep(0.005)
        except (ConnectionError, OSError):
            pass
        await asyncio.sleep(0.3)
        reader_task.cancel()
        w.transport.abort()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]

    async def on_frame(text: str) -> None:
        got.append(text)

    t = RelayTransport(f"http://127.0.0.1:{port}", Identity.generate(os.urandom), on_frame=on_frame, reconnect=False)
    tracemalloc.start()
    try:
        await t.connect()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if not t.is_connected:
                break
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await t.close()
        server.close()
    assert not t.is_connected
    assert _client_close_codes(bytes(inbound)) == [1009]  # "message too big", sent by the client
    assert all(len(x) < 100 for x in got)
    assert peak < 4 * 1024 * 1024, peak  # never buffered the announced frame


def _client_close_codes(data: bytes) -> list[int]:
    """Close codes in a stream of masked client frames."""
    codes, i = [], 0
    while i + 2 <= len(data):
        op, ln = data[i] & 0x0F, data[i + 1] & 0x7F
        i += 2
        if ln == 126:
            ln, i = int.from_bytes(data[i : i + 2], "big"), i + 2
        elif ln == 127:
            ln, i = int.from_bytes(data[i : i + 8], "big"), i + 8
        mask, i = data[i : i + 4], i + 4
        payload = bytes(b ^ mask[k % 4] for k, b in enumerate(data[i : i + ln]))
        i += ln
        if op == 0x8 and len(payload) >= 2:
            codes.append(int.from_bytes(payload[:2], "big"))
    return codes


async def test_oversized_frame_to_relay_does_not_reach_victim(victims: Victims) -> None:
    v = victims
    v.mesh.relay.max_frame_bytes = 1 << 20  # the relay's own limit (AGT/uvicorn: 16 MiB)
    async with Attacker(v.mesh) as m:
        big = fr.plaintext_message_frame(m.did, v.b.did, str(uuid.uuid4()), _ts(), "x" * (2 << 20))
        with contextlib.suppress(Exception):
            await m.send(big)
        await _settle()
    await v.still_works()


def _bomb(depth: int) -> str:
    return '{"v":1,"type":"message","intent":' + "[" * depth + "]" * depth + "}"


async def test_json_bombs(victims: Victims) -> None:
    v = victims
    deep = _bomb(200_000)
    with pytest.raises(MeshProtocolError, match="too deeply"):
        fr.decode_frame(deep)
    # through the relay: an attacker's deep KNOCK intent
    async with Attacker(v.mesh) as m:
        k = _knock(m.did, v.b.did)
        k["intent"] = json.loads("[" * 500 + "]" * 500)
        await m.send(k)
        with_bomb = json.dumps(k)[:-1] + ',"x":' + "[" * 200_000 + "]" * 200_000 + "}"
        with contextlib.suppress(Exception):
            await m.send(with_bomb)
        await _settle()
    # straight into bob's inbound path (a hostile relay): many bombs of different shapes
    for text in (deep, "{" + '"a":{' * 50_000 + "}" * 50_001, "[" * 10**6, '{"type":"message","from":' + "[" * 50_000):
        await v.b._on_frame(text)
    await _settle()
    assert v.b.is_connected
    assert any("too deeply" in d or "not valid JSON" in d for _, _, d in v.errors)
    await v.still_works()


async def test_huge_integers(victims: Victims) -> None:
    v = victims
    a, b = v.a, v.b
    before = v.bob_state()
    base = {"v": 1, "type": "message", "from": a.did, "to": b.did, "ts": _ts(), "ciphertext": _b64(64)}
    dh = base64.b64encode(os.urandom(32)).decode()
    texts = [
        json.dumps({**base, "id": "h1", "header": {"dh": dh, "pn": 0, "n": 2**32}}),
        json.dumps({**base, "id": "h2", "header": {"dh": dh, "pn": -1, "n": 0}}),
        json.dumps({**base, "id": "h3", "header": {"dh": dh, "pn": 0, "n": 1e308}}),
        json.dumps({**base, "id": "h4", "header": {"dh": dh, "pn": 0, "n": True}}),
        json.dumps({**base, "id": "h5", "header": {"dh": dh, "pn": 0, "n": 0}})[:-1] + ',"v2":' + "9" * 5000 + "}",
        json.dumps({**base, "id": "h6", "header": {"dh": dh, "pn": 0, "n": 0}, "v": 10**300}),
        json.dumps({**base, "id": "h7", "header": {"dh": dh, "pn": 0, "n": 0}}).replace('"n": 0', '"n": ' + "9" * 4000),
        json.dumps({**_knock(a.did, b.did), "establishment": {"ik": _b64(32), "ek": _b64(32), "otk": 2**64}}),
    ]
    for t in texts:
        assert len(t) < 20_000
        await b._on_frame(t)
    await _settle()
    assert b.is_connected
    assert v.bob_state() == before
    await v.still_works()


# ----------------------------------------------------------------------------------
# fuzz: decode_frame / parse_frame never raise anything but MeshProtocolError
# ----------------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
_types = st.sampled_from(
    [
        "message",
        "knock",
        "knock_accept",
        "knock_reject",
        "ack",
        "pending_messages",
        "heartbeat",
        "disconnect",
        "fetch_pending",
        "connect",
        "error",
        "x",
    ]
)
_fields = st.sampled_from(
    [
        "from",
        "to",
        "id",
        "ts",
        "header",
        "ciphertext",
        "establishment",
        "knock_id",
        "reason",
        "messages",
        "detail",
        "public_key",
        "signature",
        "token",
        "plaintext",
        "intent",
        "rr",
    ]
)
_frame_like = st.builds(
    lambda t, extra, header: {"type": t, **extra, **({"header": header} if header is not None else {})},
    _types,
    st.dictionaries(_fields, _json | st.text(alphabet="ABCDEFabcdef0123456789+/=", max_size=60), max_size=8),
    st.none() | st.fixed_dictionaries({"dh": st.text(max_size=50) | _json, "pn": _json, "n": _json}),
)
_FUZZ_COUNT = {"inputs": 0, "crashes": 0}


def _check(text: str | bytes) -> None:
    _FUZZ_COUNT["inputs"] += 1
    try:
        obj = fr.decode_frame(text, max_bytes=4096)
    except MeshProtocolError:
        return
    try:
        fr.parse_frame(obj)
    except MeshProtocolError:
        return
    except Exception:
        _FUZZ_COUNT["crashes"] += 1
        raise


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(max_size=300) | st.binary(max_size=300))
def test_fuzz_decode_arbitrary_text_and_bytes(data: str | bytes) -> None:
    _check(data)


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(_frame_like, st.sampled_from(["json", "bytes", "truncate"]))
def test_fuzz_parse_frame_like_objects(obj: dict[str, Any], how: str) -> None:
    text = json.dumps(obj)
    if how == "bytes":
        _check(text.encode())
    elif how == "truncate":
        _check(text[: max(1, len(text) // 2)])
    _check(text)
    with contextlib.suppress(MeshProtocolError):
        fr.parse_frame(obj)


def test_fuzz_report() -> None:
    """Printed for the README (run with ``-s``; ``AGT_FUZZ_EXAMPLES`` scales it)."""
    print(
        f"\nframe fuzz: {_FUZZ_COUNT['inputs']} inputs ({FUZZ_EXAMPLES} examples per property), "
        f"{_FUZZ_COUNT['crashes']} crashes"
    )
    assert _FUZZ_COUNT["crashes"] == 0
