"""The development relay and registry (``agt_mesh.dev``): protocol behaviour over loopback,
plus a cross-check of close codes and error frames against the real AGT core 5.0.0 relay."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import identity
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from agt_mesh.core.encoding import b64url_encode
from agt_mesh.core.frames import (
    ack_frame,
    connect_frame,
    disconnect_frame,
    encode_frame,
    fetch_pending_frame,
    heartbeat_frame,
    iso_timestamp,
)
from agt_mesh.core.identity import Identity
from agt_mesh.core.registry_codec import (
    agent_path,
    auth_header,
    discover_path,
    prekeys_path,
    register_body_legacy,
    register_body_pop,
)
from agt_mesh.dev import DevMesh, DevRegistry, DevRelay, RelayState
from agt_mesh.dev.relay import StoreResult
from agt_mesh.dev.server import main, serve

WAIT = 2.0  # generous upper bound for anything that should happen "now" on loopback


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def now_ts(offset: float = 0.0) -> str:
    return iso_timestamp(time.time() + offset)


def pop_connect(ident: Identity, *, ts: str | None = None, token: str | None = None) -> str:
    return encode_frame(connect_frame(ident.did, identity=ident, timestamp=ts or now_ts(), token=token))


def msg(sender: str | None, to: str, frame_id: str, ftype: str = "message") -> str:
    frame: dict[str, Any] = {"v": 1, "type": ftype}
    if sender is not None:
        frame["from"] = sender
    frame.update({"to": to, "id": frame_id, "ts": now_ts(), "ciphertext": "AAAA"})
    return json.dumps(frame)


async def recv_json(ws: ClientConnection, timeout: float = WAIT) -> dict[str, Any]:
    async with asyncio.timeout(timeout):
        raw = await ws.recv()
    obj = json.loads(raw)
    assert isinstance(obj, dict)
    return obj


async def silence(ws: ClientConnection, seconds: float = 0.25) -> None:
    """Assert that nothing arrives for ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            raw = await ws.recv()
    except TimeoutError:
        return
    raise AssertionError(f"unexpected frame: {raw!r}")


async def closed_with(ws: ClientConnection, timeout: float = WAIT) -> tuple[list[Any], int, str]:
    """Read until the server closes; return (frames before the close, code, reason)."""
    frames: list[Any] = []
    try:
        async with asyncio.timeout(timeout):
            while True:
                frames.append(json.loads(await ws.recv()))
    except ConnectionClosed as exc:
        assert exc.rcvd is not None, "the server dropped the connection without a close frame"
        return frames, exc.rcvd.code, exc.rcvd.reason
    raise AssertionError("unreachable")


async def online(url: str, ident: Identity, **kw: Any) -> ClientConnection:
    """Connect with POP, send fetch_pending, and wait for the (empty) pending_messages reply.

    The reply proves the connect was accepted.  No stored frame may arrive before it; use
    :func:`online_with_pushed` when some are expected.
    """
    ws, pushed = await online_with_pushed(url, ident, **kw)
    assert pushed == [], pushed
    return ws


async def online_with_pushed(url: str, ident: Identity, **kw: Any) -> tuple[ClientConnection, list[dict[str, Any]]]:
    ws = await connect(url)
    await ws.send(pop_connect(ident, **kw))
    await ws.send(encode_frame(fetch_pending_frame(ident.did)))
    pushed: list[dict[str, Any]] = []
    while True:
        frame = await recv_json(ws)
        if frame.get("type") == "pending_messages":
            assert frame["messages"] == []
            return ws, pushed
        pushed.append(frame)


@pytest.fixture
async def relay() -> AsyncIterator[DevRelay]:
    # AGT semantics (a live-delivered frame is not kept) so these tests compare like for like
    async with DevRelay(hold_until_ack=False) as r:
        yield r


@pytest.fixture
async def alice() -> Identity:
    return identity("dev-alice")


@pytest.fixture
async def bob() -> Identity:
    return identity("dev-bob")


# --------------------------------------------------------------------------------------
# relay: connect
# --------------------------------------------------------------------------------------


async def test_pop_connect_is_accepted(relay: DevRelay, alice: Identity) -> None:
    ws = await online(relay.ws_url, alice)
    assert relay.connected_dids == {alice.did}
    await ws.close()


async def test_connect_with_z_and_offset_timestamps(relay: DevRelay, alice: Identity) -> None:
    for ts in (
        now_ts(),
        dt.datetime.now(dt.UTC).isoformat(),
        dt.datetime.now(dt.timezone(dt.timedelta(hours=5))).isoformat(),
    ):
        ws = await online(relay.ws_url, alice, ts=ts)
        await ws.close()


@pytest.mark.parametrize(
    ("case", "detail"),
    [
        ("no_pop", "DID proof failed: connect frame missing did/public_key/timestamp/signature"),
        ("wrong_did", "DID proof failed: DID does not match public_key (sha256 mismatch)"),
        ("stale", "DID proof failed: timestamp outside replay window"),
        ("future", "DID proof failed: timestamp outside replay window"),
        ("naive", "DID proof failed: timestamp must include timezone offset"),
        ("bad_sig", "DID proof failed: invalid signature"),
        ("bad_key", "DID proof failed: public_key must be 32 bytes"),
    ],
)
async def test_pop_failures_close_4005(relay: DevRelay, alice: Identity, case: str, detail: str) -> None:
    frame = connect_frame(alice.did, identity=alice, timestamp=now_ts())
    if case == "no_pop":
        frame = connect_frame(alice.did)
    elif case == "wrong_did":
        frame["from"] = identity("someone-else").did
    elif case == "stale":
        frame = connect_frame(alice.did, identity=alice, timestamp=now_ts(-301))
    elif case == "future":
        frame = connect_frame(alice.did, identity=alice, timestamp=now_ts(+301))
    elif case == "naive":
        naive = dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat()
        frame = connect_frame(alice.did, identity=alice, timestamp=naive)
    elif case == "bad_sig":
        frame["signature"] = connect_frame(alice.did, identity=alice, timestamp=now_ts(-1))["signature"]
    elif case == "bad_key":
        frame["public_key"] = "AAAA"
    async with connect(relay.ws_url) as ws:
        await ws.send(encode_frame(frame))
        frames, code, _ = await closed_with(ws)
    assert frames == [{"type": "error", "detail": detail}]
    assert code == 4005
    assert relay.connected_dids == frozenset()


async def test_first_frame_not_connect_closes_4001(relay: DevRelay, alice: Identity) -> None:
    async with connect(relay.ws_url) as ws:
        await ws.send(encode_frame(heartbeat_frame(alice.did, now_ts())))
        frames, code, _ = await closed_with(ws)
    assert frames == [{"type": "error", "detail": "First frame must be 'connect'"}]
    assert code == 4001


async def test_connect_without_from_closes_4002(relay: DevRelay) -> None:
    async with connect(relay.ws_url) as ws:
        await ws.send(json.dumps({"v": 1, "type": "connect"}))
        frames, code, _ = await closed_with(ws)
    assert frames == [{"type": "error", "detail": "Missing 'from' field"}]
    assert code == 4002


async def test_connect_timeout_closes_4001(alice: Identity) -> None:
    async with DevRelay(connect_timeout=0.2) as relay, connect(relay.ws_url) as ws:
        frames, code, reason = await closed_with(ws)
    assert (frames, code, reason) == ([], 4001, "connect timeout")


async def test_token_required(alice: Identity) -> None:
    async with DevRelay(token="s3cret") as relay:
        for token in (None, "wrong", "s3cre", "s3cret\u00e9"):
            async with connect(relay.ws_url) as ws:
                await ws.send(pop_connect(alice, token=token))
                frames, code, _ = await closed_with(ws)
            assert frames == [{"type": "error", "detail": "Authentication failed"}]
            assert code == 4003
        ws = await online(relay.ws_url, alice, token="s3cret")
        await ws.close()


async def test_pop_is_checked_before_the_token(alice: Identity) -> None:
    async with DevRelay(token="s3cret") as relay, connect(relay.ws_url) as ws:
        await ws.send(encode_frame(connect_frame(alice.did, token="s3cret")))
        _, code, _ = await closed_with(ws)
    assert code == 4005


async def test_legacy_connect_without_pop(alice: Identity, bob: Identity) -> None:
    async with DevRelay(require_pop=False) as relay:
        a = await connect(relay.ws_url)
        await a.send(encode_frame(connect_frame(alice.did)))
        b = await connect(relay.ws_url)
        await b.send(encode_frame(connect_frame(bob.did)))
        await b.send(encode_frame(fetch_pending_frame(bob.did)))
        assert (await recv_json(b))["type"] == "pending_messages"
        # Without POP the relay forwards `from` as written (AGT 5.0.0 behaviour).
        await a.send(msg("did:mesh:whoever", bob.did, "m1"))
        got = await recv_json(b)
        assert (got["from"], got["id"]) == ("did:mesh:whoever", "m1")
        await a.close()
        await b.close()


async def test_session_replace_closes_old_socket_4006(relay: DevRelay, alice: Identity, bob: Identity) -> None:
    old = await online(relay.ws_url, bob)
    new = await online(relay.ws_url, bob)
    frames, code, reason = await closed_with(old)
    assert (frames, code, reason) == ([], 4006, "session_replaced")
    a = await online(relay.ws_url, alice)
    await a.send(msg(alice.did, bob.did, "after-replace"))
    assert (await recv_json(new))["id"] == "after-replace"
    assert relay.connected_dids == {alice.did, bob.did}
    for ws in (a, new):
        await ws.close()


# --------------------------------------------------------------------------------------
# relay: routing and store-and-forward
# --------------------------------------------------------------------------------------


async def test_live_routing_preserves_order(relay: DevRelay, alice: Identity, bob: Identity) -> None:
    a = await online(relay.ws_url, alice)
    b = await online(relay.ws_url, bob)
    kinds = ["knock", "message", "knock_accept", "knock_reject", "message"]
    for i, kind in enumerate(kinds):
        await a.send(msg(alice.did, bob.did, f"id-{i}", kind))
    got = [await recv_json(b) for _ in kinds]
    assert [g["id"] for g in got] == [f"id-{i}" for i in range(len(kinds))]
    assert [g["type"] for g in got] == kinds
    assert all(g["from"] == alice.did and g["ciphertext"] == "AAAA" for g in got)
    assert relay.stats["messages_routed"] == len(kinds)
    assert relay.stored_count(bob.did) == 0
    await a.close()
    await b.close()


async def test_live_frames_are_forwarded_verbatim(relay: DevRelay, alice: Identity, bob: Identity) -> None:
    a = await online(relay.ws_url, alice)
    b = await online(relay.ws_url, bob)
    text = msg(alice.did, bob.did, "verbatim").replace('"ts"', '"extra": {"k": [1, 2]}, "ts"')
    await a.send(text)
    async with asyncio.timeout(WAIT):
        assert await b.recv() == text
    await a.close()
    await b.close()


async def test_frames_without_to_or_id_are_ignored(relay: DevRelay, alice: Identity, bob: Identity) -> None:
    a = await online(relay.ws_url, alice)
    b = await online(relay.ws_url, bob)
    await a.send(json.dumps({"type": "message", "from": alice.did, "to": bob.did}))
    await a.send(json.dumps({"type": "message", "from": alice.did, "id": "x"}))
    await a.send(json.dumps({"type": "message", "from": alice.did, "to": bob.did, "id": 7}))
    await silence(b)
    await silence(a)  # no error either
    await a.close()
    await b.close()


async def test_offline_store_push_on_reconnect_and_ack(relay: DevRelay, alice: Identity, bob: Identity) -> None:
    carol = identity("dev-carol")
    a = await online(relay.ws_url, alice)
    c = await online(relay.ws_url, carol)
    for i in range(3):
        await a.send(msg(alice.did, bob.did, f"off-{i}"))
    await a.send(encode_frame(fetch_pending_frame(alice.did)))  # a round trip: all routed
    assert (await recv_json(a))["type"] == "pending_messages"
    assert relay.stored_count(bob.did) == 3
    # Acks from anyone but the recipient are ignored (AGT HEAD hardening).
    await a.send(encode_frame(ack_frame("off-0")))
    await c.send(encode_frame(ack_frame("off-1")))
    for ws in (a, c):
        await ws.send(encode_frame(fetch_pending_frame("x")))
        await recv_json(ws)
    assert relay.stored_count(bob.did) == 3

    # Pushed one by one, oldest first, before the fetch_pending reply; kept until acked.
    b, pushed = await online_with_pushed(relay.ws_url, bob)
    assert [p["id"] for p in pushed] == ["off-0", "off-1", "off-2"]
    assert all(p["from"] == alice.did for p in pushed)
    await b.close()
    b, pushed = await online_with_pushed(relay.ws_url, bob)
    assert [p["id"] for p in pushed] == ["off-0", "off-1", "off-2"]
    await b.send(encode_frame(ack_frame("off-0")))
    await b.send(encode_frame(ack_frame("off-2")))
    await b.send(encode_frame(fetch_pending_frame(bob.did)))
    await recv_json(b)
    assert relay.stored_count(bob.did) == 1
    await b.close()
    b, pushed = await online_with_pushed(relay.ws_url, bob)
    assert [p["id"] for p in pushed] == ["off-1"]
    assert relay.stats["messages_stored"] == 3
    assert relay.stats["messages_delivered"] == 7
    for ws in (a, b, c):
        await ws.close()


async def test_store_dedupes_by_id_per_recipient(relay: DevRelay, alice: Identity, bob: Identity) -> None:
    carol = identity("dev-carol")
    a = await online(relay.ws_url, alice)
    for _ in range(3):
        await a.send(msg(alice.did, bob.did, "same-id"))
    await a.send(msg(alice.did, carol.did, "same-id"))  # another recipient's queue
    await a.send(encode_frame(fetch_pending_frame(alice.did)))
    await recv_json(a)
    assert relay.stored_count(bob.did) == 1
    assert relay.stored_count(carol.did) == 1
    assert relay.stats["messages_stored"] == 2
    await a.close()


async def test_live_delivery_is_not_deduplicated(relay: DevRelay, alice: Identity, bob: Identity) -> None:
    a = await online(relay.ws_url, alice)
    b = await online(relay.ws_url, bob)
    await a.send(msg(alice.did, bob.did, "dup"))
    await a.send(msg(alice.did, bob.did, "dup"))
    assert [(await recv_json(b))["id"] for _ in range(2)] == ["dup", "dup"]
    await a.close()
    await b.close()


async def test_recipient_queue_cap(alice: Identity, bob: Identity) -> None:
    async with DevRelay(max_queue_per_recipient=2) as relay:
        a = await online(relay.ws_url, alice)
        for i in range(4):
            await a.send(msg(alice.did, bob.did, f"q{i}"))
        await a.send(encode_frame(fetch_pending_frame(alice.did)))
        await recv_json(a)
        assert [f.id for f in relay.state.pending(bob.did)] == ["q0", "q1"]
        assert relay.stats["dropped_full"] == 2
        await a.close()


async def test_from_spoofing_is_dropped_and_missing_from_is_stamped(
    relay: DevRelay, alice: Identity, bob: Identity
) -> None:
    a = await online(relay.ws_url, alice)
    b = await online(relay.ws_url, bob)
    await a.send(msg(identity("dev-carol").did, bob.did, "spoofed"))
    await silence(b)
    assert relay.stats["dropped_spoofed"] == 1
    await a.send(msg(None, bob.did, "stamped"))
    got = await recv_json(b)
    assert (got["id"], got["from"]) == ("stamped", alice.did)
    assert list(got)[:3] == ["v", "type", "from"]
    await a.close()
    await b.close()


async def test_relay_frames_and_errors(relay: DevRelay, alice: Identity) -> None:
    a = await online(relay.ws_url, alice)
    await a.send(json.dumps({"type": "bogus"}))
    assert await recv_json(a) == {"type": "error", "detail": "Unknown frame type: bogus"}
    await a.send(json.dumps({"no": "type"}))
    assert await recv_json(a) == {"type": "error", "detail": "Unknown frame type: None"}
    await a.send(encode_frame(connect_frame(alice.did)))  # a second connect is just unknown
    assert await recv_json(a) == {"type": "error", "detail": "Unknown frame type: connect"}
    await a.send(encode_frame(heartbeat_frame(alice.did, now_ts())))
    await a.send(encode_frame(ack_frame("nothing-stored")))
    await silence(a)
    await a.send(encode_frame(disconnect_frame(alice.did)))
    frames, code, _ = await closed_with(a)
    assert (frames, code) == ([], 1000)
    assert relay.connected_dids == frozenset()


@pytest.mark.parametrize(
    ("payload", "code"),
    [("{not json", 1007), ("[1, 2]", 1007), (b'{"type":"heartbeat"}', 1003)],
)
async def test_garbage_closes_the_connection(relay: DevRelay, alice: Identity, payload: str | bytes, code: int) -> None:
    a = await online(relay.ws_url, alice)
    await a.send(payload)
    frames, got, _ = await closed_with(a)
    assert (frames, got) == ([], code)


async def test_oversized_frame_closes_1009(alice: Identity, bob: Identity) -> None:
    async with DevRelay(max_frame_bytes=4096) as relay:
        a = await online(relay.ws_url, alice)
        await a.send(msg(alice.did, bob.did, "big").replace("AAAA", "A" * 8192))
        _, code, _ = await closed_with(a)
        assert code == 1009


async def test_idle_timeout_closes_4004(alice: Identity) -> None:
    async with DevRelay(idle_timeout=0.3) as relay:
        a = await online(relay.ws_url, alice)
        started = time.monotonic()
        frames, code, _ = await closed_with(a)
        assert (frames, code) == ([], 4004)
        assert 0.2 < time.monotonic() - started < 1.5
        # Any frame resets the idle timer.
        a = await online(relay.ws_url, alice)
        for _ in range(4):
            await asyncio.sleep(0.15)
            await a.send(encode_frame(ack_frame("keepalive")))
        assert relay.connected_dids == {alice.did}
        await a.close()


async def test_stale_recipient_gets_frames_stored(alice: Identity, bob: Identity) -> None:
    async with DevRelay(stale_after=0.3, hold_until_ack=False) as relay:
        a = await online(relay.ws_url, alice)
        b = await online(relay.ws_url, bob)
        await asyncio.sleep(0.45)  # bob sends no heartbeat: stale
        await a.send(msg(alice.did, bob.did, "while-stale"))
        await silence(b)
        assert relay.stored_count(bob.did) == 1
        await b.send(encode_frame(heartbeat_frame(bob.did, now_ts())))
        await b.send(encode_frame(fetch_pending_frame(bob.did)))
        await recv_json(b)
        await a.send(msg(alice.did, bob.did, "fresh-again"))
        assert (await recv_json(b))["id"] == "fresh-again"
        assert relay.stored_count(bob.did) == 1  # the stale-time frame waits for a reconnect
        await a.close()
        await b.close()


async def test_knock_delay_lets_the_message_overtake(alice: Identity, bob: Identity) -> None:
    async with DevRelay(knock_delay=0.3) as relay:
        a = await online(relay.ws_url, alice)
        b = await online(relay.ws_url, bob)
        await a.send(msg(alice.did, bob.did, "k1", "knock"))
        await a.send(msg(alice.did, bob.did, "m1"))
        got = [await recv_json(b) for _ in range(2)]
        assert [(g["type"], g["id"]) for g in got] == [("message", "m1"), ("knock", "k1")]
        await a.close()
        await b.close()


async def test_delayed_knock_to_offline_peer_is_stored(alice: Identity, bob: Identity) -> None:
    async with DevRelay(knock_delay=0.1) as relay:
        a = await online(relay.ws_url, alice)
        await a.send(msg(alice.did, bob.did, "k1", "knock"))
        await asyncio.sleep(0.3)
        assert relay.stored_count(bob.did) == 1
        await a.close()


async def test_reorder_window_reverses_batches(alice: Identity, bob: Identity) -> None:
    async with DevRelay(reorder_window=3, reorder_hold=0.2) as relay:
        a = await online(relay.ws_url, alice)
        b = await online(relay.ws_url, bob)
        for i in range(5):
            await a.send(msg(alice.did, bob.did, f"r{i}"))
        got = [(await recv_json(b))["id"] for _ in range(5)]
        assert got == ["r2", "r1", "r0", "r4", "r3"]
        await a.close()
        await b.close()


async def test_unsent_frames_of_a_replaced_session_are_rerouted(alice: Identity, bob: Identity) -> None:
    # A long reorder hold keeps frames queued on bob's first socket when it is replaced.
    async with DevRelay(reorder_window=10, reorder_hold=5.0, hold_until_ack=False) as relay:
        a = await online(relay.ws_url, alice)
        old = await online(relay.ws_url, bob)
        await a.send(msg(alice.did, bob.did, "queued"))
        await a.send(encode_frame(fetch_pending_frame(alice.did)))
        await recv_json(a)
        new, pushed = await online_with_pushed(relay.ws_url, bob)
        assert pushed == []
        _, code, _ = await closed_with(old)
        assert code == 4006
        # The frame was re-routed to the new session (held there by the same knob).
        await asyncio.sleep(0.1)
        await new.close()
        await asyncio.sleep(0.1)
        assert relay.stored_count(bob.did) == 1
        await a.close()


async def test_frames_for_a_vanished_peer_are_stored_not_lost(relay: DevRelay, alice: Identity, bob: Identity) -> None:
    a = await online(relay.ws_url, alice)
    b = await online(relay.ws_url, bob)
    b.transport.abort()  # no close handshake: the relay learns of it from the socket
    for i in range(3):
        await a.send(msg(alice.did, bob.did, f"lost-{i}"))
    await asyncio.sleep(0.2)
    assert relay.connected_dids == {alice.did}
    assert [f.id for f in relay.state.pending(bob.did)] == ["lost-0", "lost-1", "lost-2"]
    await a.close()


def test_relay_state_ttl_caps_and_staleness() -> None:
    """The sans-I/O state with a fake clock: lazy TTL expiry, byte cap, staleness."""
    clock = [1000.0]
    state: RelayState[object] = RelayState(ttl=10.0, max_store_bytes=10, stale_after=5.0, clock=lambda: clock[0])
    assert state.store("bob", "a", "12345") is StoreResult.STORED
    clock[0] += 6
    assert state.store("bob", "b", "12345") is StoreResult.STORED
    assert state.store("bob", "c", "1") is StoreResult.STORE_FULL
    assert state.store("bob", "a", "12345") is StoreResult.DUPLICATE
    clock[0] += 5  # "a" is now older than the TTL
    assert [f.id for f in state.pending("bob")] == ["b"]
    assert state.stored_bytes == 5
    assert state.ack("carol", "b") is False
    assert state.ack("bob", "b") is True
    assert state.stored_bytes == 0
    handle = object()
    assert state.attach("bob", handle) is None
    assert state.live("bob") is handle
    clock[0] += 6
    assert state.live("bob") is None and state.session("bob") is handle
    state.heartbeat("bob", handle)
    assert state.live("bob") is handle
    newer = object()
    assert state.attach("bob", newer) is handle
    assert state.detach("bob", handle) is False  # the replaced handle cannot evict the new one
    assert state.detach("bob", newer) is True


async def test_health_endpoint(relay: DevRelay, alice: Identity, bob: Identity) -> None:
    a = await online(relay.ws_url, alice)
    b = await online(relay.ws_url, bob)
    await a.send(msg(alice.did, bob.did, "h1"))
    await recv_json(b)
    async with httpx.AsyncClient() as http:
        r = await http.get(relay.url + "/health")
        assert r.status_code == 200
        assert r.headers["content-type"] == "application/json"
        assert r.json() == {
            "status": "healthy",
            "service": "agentmesh-relay",
            "connected_agents": 2,
            "verified_agents": 2,
            "entra_verify_enabled": False,
            "stats": {"messages_routed": 1, "messages_stored": 0, "messages_delivered": 0},
        }
        r = await http.get(relay.url + "/nope")
        assert (r.status_code, r.json()) == (404, {"detail": "Not Found"})
    await a.close()
    await b.close()


# --------------------------------------------------------------------------------------
# relay: cross-check against the real AGT core 5.0.0 relay
# --------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def agt_relay_url(agt_core_python: Path) -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            str(agt_core_python),
            "-m",
            "agentmesh.relay",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the AGT relay exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=0.5) as resp:
                    resp.read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("the AGT relay did not become healthy")
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


CROSS_CASES = {
    "no_pop": (4005, "DID proof failed: connect frame missing did/public_key/timestamp/signature"),
    "wrong_did": (4005, "DID proof failed: DID does not match public_key (sha256 mismatch)"),
    "stale_pop": (4005, "DID proof failed: timestamp outside replay window"),
    "not_connect": (4001, "First frame must be 'connect'"),
    "no_from": (4002, "Missing 'from' field"),
}


@pytest.mark.parametrize("case", sorted(CROSS_CASES))
@pytest.mark.parametrize("server", ["dev", "agt-core-5.0.0"])
async def test_close_codes_match_the_agt_relay(request: pytest.FixtureRequest, server: str, case: str) -> None:
    alice = identity("dev-cross")
    frame: dict[str, Any]
    if case == "no_pop":
        frame = connect_frame(alice.did)
    elif case == "wrong_did":
        frame = connect_frame(alice.did, identity=alice, timestamp=now_ts())
        frame["from"] = identity("dev-cross-other").did
    elif case == "stale_pop":
        frame = connect_frame(alice.did, identity=alice, timestamp=now_ts(-3600))
    elif case == "not_connect":
        frame = heartbeat_frame(alice.did, now_ts())
    else:
        frame = {"v": 1, "type": "connect"}
    expected_code, expected_detail = CROSS_CASES[case]

    async def run(ws_url: str) -> None:
        async with connect(ws_url) as ws:
            await ws.send(encode_frame(frame))
            frames, code, _ = await closed_with(ws, timeout=5)
        assert frames == [{"type": "error", "detail": expected_detail}]
        assert code == expected_code

    if server == "dev":
        async with DevRelay() as relay:
            await run(relay.ws_url)
    else:
        url: str = request.getfixturevalue("agt_relay_url")
        await run("ws" + url[len("http") :] + "/ws")


@pytest.mark.parametrize("server", ["dev", "agt-core-5.0.0"])
async def test_pop_connect_and_routing_match_the_agt_relay(request: pytest.FixtureRequest, server: str) -> None:
    """A valid POP connect is accepted and a message is routed live by both relays."""
    alice, bob = identity("dev-cross-a"), identity("dev-cross-b")

    async def run(ws_url: str) -> None:
        async with connect(ws_url) as a, connect(ws_url) as b:
            await a.send(pop_connect(alice))
            await b.send(pop_connect(bob))
            await b.send(encode_frame(heartbeat_frame(bob.did, now_ts())))
            await silence(b, 0.3)  # no error frame, no close: connected
            await a.send(msg(alice.did, bob.did, "cross-1"))
            got = await recv_json(b)
            assert (got["id"], got["from"], got["ciphertext"]) == ("cross-1", alice.did, "AAAA")

    if server == "dev":
        async with DevRelay() as relay:
            await run(relay.ws_url)
    else:
        url: str = request.getfixturevalue("agt_relay_url")
        await run("ws" + url[len("http") :] + "/ws")


# --------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------


@pytest.fixture
async def registry() -> AsyncIterator[DevRegistry]:
    async with DevRegistry() as r:
        yield r


@pytest.fixture
async def http(registry: DevRegistry) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=registry.url) as client:
        yield client


def auth(ident: Identity, *, offset: float = 0.0, did: str | None = None) -> dict[str, str]:
    return {"authorization": auth_header(ident, did or ident.did, now_ts(offset))}


def bundle(ident: Identity, otk_ids: list[int]) -> dict[str, Any]:
    key = b64url_encode(ident.x25519_public)
    return {
        "identity_key": key,
        "identity_key_ed": b64url_encode(ident.ed25519_public),
        "signed_pre_key": {"key_id": 0, "public_key": key, "signature": b64url_encode(ident.sign(b"spk"))},
        "one_time_pre_keys": [{"key_id": i, "public_key": key} for i in otk_ids],
    }


async def register(http: httpx.AsyncClient, ident: Identity, caps: list[str] | None = None) -> httpx.Response:
    body = register_body_pop(ident, now_ts(), caps or [], {"display_name": "x"})
    return await http.post("/v1/agents", json=body)


async def test_register_pop(http: httpx.AsyncClient, registry: DevRegistry, alice: Identity) -> None:
    r = await register(http, alice, ["chat"])
    assert (r.status_code, r.json()) == (201, {"did": alice.did, "status": "registered"})
    r = await register(http, alice)
    assert (r.status_code, r.json()) == (409, {"detail": "Agent already registered"})
    r = await http.get(agent_path(alice.did))
    assert "%3A" in agent_path(alice.did)
    body = r.json()
    assert r.status_code == 200
    assert body["did"] == alice.did
    assert body["capabilities"] == ["chat"]
    assert body["metadata"] == {"display_name": "x"}
    assert (body["reputation_score"], body["tier"]) == (0.5, "anonymous")
    assert dt.datetime.fromisoformat(body["registered_at"]).tzinfo is not None
    assert {"last_seen", "total_sessions", "completion_rate", "verified_at"} <= set(body)
    r = await http.get(agent_path(identity("nobody").did))
    assert (r.status_code, r.json()) == (404, {"detail": "Agent not found"})
    assert registry.state.dids == [alice.did]


async def test_register_rejections(http: httpx.AsyncClient, alice: Identity) -> None:
    good = register_body_pop(alice, now_ts(), [], {})
    r = await http.post("/v1/agents", json={k: v for k, v in good.items() if k not in ("proof", "proof_timestamp")})
    assert r.status_code == 422
    assert [e["loc"] for e in r.json()["detail"]] == [["body", "proof"], ["body", "proof_timestamp"]]
    bad_sig = dict(good, proof=register_body_pop(alice, now_ts(-5), [], {})["proof"])
    r = await http.post("/v1/agents", json=bad_sig)
    assert (r.status_code, r.json()) == (401, {"detail": "Invalid proof-of-possession"})
    stale = register_body_pop(alice, now_ts(-400), [], {})
    r = await http.post("/v1/agents", json=stale)
    assert (r.status_code, r.json()) == (401, {"detail": "Proof timestamp outside replay window"})
    r = await http.post("/v1/agents", json=dict(good, public_key="AAAA"))
    assert (r.status_code, r.json()) == (400, {"detail": "public_key must be 32 bytes"})
    r = await http.post("/v1/agents", json=dict(good, capabilities="chat"))
    assert r.status_code == 422
    r = await http.post("/v1/agents", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 422
    # The legacy shape is refused by default (like AGT core 5.0.0).
    legacy = register_body_legacy(alice.did, alice, [], {})
    r = await http.post("/v1/agents", json=legacy)
    assert r.status_code == 422
    # Nothing was registered by any of the above.
    assert (await register(http, alice)).status_code == 201


async def test_legacy_registration_when_allowed(alice: Identity) -> None:
    async with DevRegistry(allow_legacy=True) as registry, httpx.AsyncClient(base_url=registry.url) as http:
        r = await http.post("/v1/agents", json=register_body_legacy("did:mesh:zz", alice, ["chat"], {}))
        assert (r.status_code, r.json()) == (201, {"did": "did:mesh:zz", "status": "registered"})
        r = await http.post("/v1/agents", json=register_body_legacy("did:mesh:zz", alice, [], {}))
        assert r.status_code == 409
        # Like platform 3.7.0: no authentication for a legacy agent's records.
        r = await http.put(prekeys_path("did:mesh:zz"), json=bundle(alice, [1]))
        assert (r.status_code, r.json()) == (200, {"did": "did:mesh:zz", "otk_count": 1})
        r = await http.post("/v1/agents/did:mesh:zz/heartbeat")
        assert r.status_code == 200
        # POP registration still works and still needs auth.
        bob = identity("dev-bob")
        assert (await register(http, bob)).status_code == 201
        r = await http.put(prekeys_path(bob.did), json=bundle(bob, []))
        assert r.status_code == 422
        r = await http.delete(agent_path("did:mesh:zz"))
        assert r.status_code == 204


async def test_prekey_upload_auth(
    http: httpx.AsyncClient, registry: DevRegistry, alice: Identity, bob: Identity
) -> None:
    await register(http, alice)
    await register(http, bob)
    path = prekeys_path(alice.did)
    r = await http.put(path, json=bundle(alice, [1, 2]))
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"] == ["header", "Authorization"]
    r = await http.put(path, json=bundle(alice, [1, 2]), headers=auth(alice, offset=-400))
    assert (r.status_code, r.json()) == (401, {"detail": "Timestamp outside replay window"})
    forged = {"authorization": auth_header(bob, alice.did, now_ts())}
    r = await http.put(path, json=bundle(alice, [1, 2]), headers=forged)
    assert (r.status_code, r.json()) == (401, {"detail": "Invalid signature"})
    r = await http.put(path, json=bundle(alice, [1, 2]), headers=auth(bob))
    assert (r.status_code, r.json()) == (403, {"detail": "DID mismatch"})
    r = await http.put(path, json=bundle(alice, [1, 2]), headers={"authorization": "Bearer x"})
    assert r.status_code == 401
    assert registry.otk_count(alice.did) == 0
    r = await http.put(path, json=bundle(alice, [1, 2]), headers=auth(alice))
    assert (r.status_code, r.json()) == (200, {"did": alice.did, "otk_count": 2})
    r = await http.put(prekeys_path(identity("nobody").did), json=bundle(alice, []), headers=auth(alice))
    assert r.status_code == 404
    bad = bundle(alice, [])
    bad["signed_pre_key"] = {"key_id": 0}
    r = await http.put(path, json=bad, headers=auth(alice))
    assert r.status_code == 400
    assert registry.otk_count(alice.did) == 2


async def test_prekey_fetch_pops_otks_fifo(http: httpx.AsyncClient, registry: DevRegistry, alice: Identity) -> None:
    r = await http.get(prekeys_path(alice.did))
    assert (r.status_code, r.json()) == (404, {"detail": "Pre-key bundle not found"})
    await register(http, alice)
    r = await http.get(prekeys_path(alice.did))
    assert r.status_code == 404  # registered, but no bundle yet
    await http.put(prekeys_path(alice.did), json=bundle(alice, [7, 3]), headers=auth(alice))
    got = [(await http.get(prekeys_path(alice.did))).json() for _ in range(3)]
    assert [g["one_time_pre_key"] and g["one_time_pre_key"]["key_id"] for g in got] == [7, 3, None]
    assert got[0]["identity_key_ed"] == b64url_encode(alice.ed25519_public)
    assert got[0]["signed_pre_key"]["key_id"] == 0
    assert registry.otk_count(alice.did) == 0
    # A new upload replaces the whole bundle.
    await http.put(prekeys_path(alice.did), json=bundle(alice, [9]), headers=auth(alice))
    assert registry.otk_count(alice.did) == 1


async def test_delete(http: httpx.AsyncClient, alice: Identity, bob: Identity) -> None:
    await register(http, alice)
    await register(http, bob)
    assert (await http.delete(agent_path(alice.did))).status_code == 422
    assert (await http.delete(agent_path(alice.did), headers=auth(bob))).status_code == 403
    r = await http.delete(agent_path(alice.did), headers=auth(alice))
    assert (r.status_code, r.content) == (204, b"")
    assert (await http.get(agent_path(alice.did))).status_code == 404


async def test_discover(http: httpx.AsyncClient, alice: Identity, bob: Identity) -> None:
    await register(http, alice, ["chat", "search"])
    await register(http, bob, ["chat"])
    await register(http, identity("dev-carol"), ["chat2"])
    r = await http.get(discover_path("chat", 50))
    body = r.json()
    assert body["total"] == 2
    assert [x["did"] for x in body["results"]] == [alice.did, bob.did]
    assert set(body["results"][0]) == {"did", "capabilities", "reputation_score", "last_seen"}
    assert (await http.get(discover_path("chat", 1))).json()["total"] == 1
    assert (await http.get(discover_path("search", 200))).json()["total"] == 1
    assert (await http.get(discover_path("cha", 5))).json() == {"results": [], "total": 0}
    for bad in (
        "/v1/discover",
        "/v1/discover?capability=chat&limit=0",
        "/v1/discover?capability=chat&limit=201",
        "/v1/discover?capability=chat&limit=x",
    ):
        assert (await http.get(bad)).status_code == 422, bad


async def test_presence_and_heartbeat(alice: Identity, bob: Identity) -> None:
    async with DevRegistry(heartbeat_interval=0.3) as registry, httpx.AsyncClient(base_url=registry.url) as http:
        await register(http, alice)
        await register(http, bob)
        r = await http.get(agent_path(alice.did) + "/presence")
        assert r.status_code == 200
        assert (r.json()["did"], r.json()["online"]) == (alice.did, True)
        assert (await http.get(agent_path("did:mesh:0") + "/presence")).status_code == 404
        hb = agent_path(alice.did) + "/heartbeat"
        r = await http.post(hb)
        assert (r.status_code, r.json()) == (401, {"detail": "Missing or invalid Authorization header"})
        assert (await http.post(hb, headers=auth(bob))).status_code == 403
        r = await http.post(hb, headers=auth(alice))
        assert r.status_code == 200
        assert r.json()["did"] == alice.did
        r = await http.post(hb, headers=auth(alice))
        assert (r.status_code, r.json()) == (429, {"detail": "Heartbeat throttled; retry after 0.3s"})
        await asyncio.sleep(0.35)
        assert (await http.post(hb, headers=auth(alice))).status_code == 200


async def test_default_heartbeat_throttle_message(http: httpx.AsyncClient, alice: Identity) -> None:
    await register(http, alice)
    hb = agent_path(alice.did) + "/heartbeat"
    assert (await http.post(hb, headers=auth(alice))).status_code == 200
    r = await http.post(hb, headers=auth(alice))
    assert (r.status_code, r.json()) == (429, {"detail": "Heartbeat throttled; retry after 10s"})


async def test_keep_alive_and_routing_errors(http: httpx.AsyncClient, registry: DevRegistry) -> None:
    for _ in range(5):
        r = await http.get("/health")
        assert r.json() == {"status": "healthy", "service": "agentmesh-registry", "entra_verify_enabled": False}
    assert (await http.get("/nope")).status_code == 404
    assert (await http.post("/health")).status_code == 405
    assert (await http.get("/v1/agents")).status_code == 405
    assert registry.connections_accepted == 1


async def test_body_too_large_is_413(http: httpx.AsyncClient, registry: DevRegistry) -> None:
    r = await http.post("/v1/agents", content=b"x" * (1024 * 1024 + 1))
    assert r.status_code == 413
    assert r.headers["connection"] == "close"
    assert (await http.get("/health")).status_code == 200  # a fresh connection
    assert registry.connections_accepted == 2


async def test_raw_http_connection_close_and_bad_requests(registry: DevRegistry) -> None:
    async def exchange(data: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", registry.port)
        writer.write(data)
        async with asyncio.timeout(WAIT):
            out = await reader.read()  # the server closes the connection
        writer.close()
        return out

    out = await exchange(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert b"connection: close" in head
    assert json.loads(body)["service"] == "agentmesh-registry"
    assert (await exchange(b"garbage\r\n\r\n")).startswith(b"HTTP/1.1 400")
    out = await exchange(b"POST /v1/agents HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 501")
    out = await exchange(b"GET /health HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200")
    big = b"GET /health HTTP/1.1\r\nX: " + b"a" * (70 * 1024) + b"\r\n\r\n"
    assert (await exchange(big)).startswith(b"HTTP/1.1 431")


# --------------------------------------------------------------------------------------
# both together
# --------------------------------------------------------------------------------------


async def test_dev_mesh(alice: Identity) -> None:
    async with DevMesh(idle_timeout=5, allow_legacy=True) as mesh:
        assert mesh.relay.idle_timeout == 5
        assert mesh.registry.state.allow_legacy
        async with httpx.AsyncClient() as http:
            assert (await http.get(mesh.relay_url + "/health")).status_code == 200
            assert (await http.get(mesh.registry_url + "/health")).status_code == 200
        ws = await online(mesh.relay.ws_url, alice)
        await ws.close()


async def test_serve_prints_urls_and_stops_on_cancel() -> None:
    out = io.StringIO()
    task = asyncio.create_task(serve("127.0.0.1", 0, 0, out=out, require_pop=False))
    for _ in range(100):
        if out.getvalue().count("\n") == 2:
            break
        await asyncio.sleep(0.02)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("relay: http://127.0.0.1:")
    assert lines[1].startswith("registry: http://127.0.0.1:")
    async with httpx.AsyncClient() as http:
        r = await http.get(lines[1].split(" ", 1)[1] + "/health")
        assert r.status_code == 200
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_main_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--idle-timeout", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["--bogus"])


async def test_hold_until_ack_redelivers_frames_a_dead_recipient_never_read(alice: Identity, bob: Identity) -> None:
    """With the default hold_until_ack, a frame written live but never acked comes back."""
    async with DevRelay() as relay:
        a = await online(relay.ws_url, alice)
        b = await online(relay.ws_url, bob)
        await a.send(msg(alice.did, bob.did, "live-1", "message"))
        assert (await recv_json(b))["id"] == "live-1"
        assert relay.stored_count(bob.did) == 1  # kept until acked
        await b.close()  # "crashed" before acking
        b2, pushed = await online_with_pushed(relay.ws_url, bob)
        assert [f["id"] for f in pushed] == ["live-1"]
        await b2.send(json.dumps({"v": 1, "type": "ack", "id": "live-1"}))
        await asyncio.sleep(0.1)
        assert relay.stored_count(bob.did) == 0
        await a.close()
        await b2.close()
