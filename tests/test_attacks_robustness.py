"""Attack suite, issue #12 part B: a receive path that cannot die, byte limits, safe files.

End to end through the dev relay (and, for the transport's compression, the real AGT
relays).  The victim is a durable ``MeshClient`` (state in a directory), so every
accepted payload also goes through the SQLite store — where the JSON text ``NaN`` used
to stop the receive path for good.  Each attack is followed by an honest message that
must arrive; ``MeshClient.health`` must report the pipeline truthfully throughout.

Figures printed with ``-s`` (``FIGURES:`` lines) are the ones in the README's limits table.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servers import ServerPair
from websockets.asyncio.client import connect

from agt_mesh.core import frames as fr
from agt_mesh.core.identity import Identity
from agt_mesh.core.strict_json import loads_strict
from agt_mesh.dev.server import DevMesh
from agt_mesh.errors import MalformedJsonError, MeshStateError
from agt_mesh.shell import client as client_module
from agt_mesh.shell.client import MeshClient
from agt_mesh.shell.identity_file import save_identity
from agt_mesh.shell.inbound import PARKED_PEER_BYTES
from agt_mesh.shell.relay import RelayTransport

HERE = Path(__file__).resolve().parent
FUZZ_EXAMPLES = int(os.environ.get("AGT_FUZZ_EXAMPLES", "150"))
MiB = 1024 * 1024


def _ts() -> str:
    return fr.iso_timestamp(time.time())


def figure(text: str) -> None:
    print(f"\nFIGURES: {text}")


def _durable(mesh: DevMesh, state: Path, name: str, **kw: Any) -> MeshClient:
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    save_identity(state / "identity.json", Identity.generate(os.urandom))
    return MeshClient(
        state / "identity.json",
        relay_url=mesh.relay_url,
        registry_url=mesh.registry_url,
        display_name=f"{name}-{os.urandom(3).hex()}",
        connect_timeout=5,
        **kw,
    )


def _ephemeral(mesh: DevMesh, name: str, **kw: Any) -> MeshClient:
    return MeshClient(
        Identity.generate(os.urandom),
        relay_url=mesh.relay_url,
        registry_url=mesh.registry_url,
        display_name=f"{name}-{os.urandom(3).hex()}",
        connect_timeout=5,
        **kw,
    )


async def raw_send(sender: MeshClient, to: str, plaintext: bytes, *, seq: int | None = None) -> str:
    """Encrypt ``plaintext`` (any bytes, not necessarily JSON) on the live session and send it."""
    async with sender._lock:
        session = sender.protocol.sessions[to]
        assert session.primary is not None
        header, blob = session.primary.encrypt(plaintext, os.urandom)
        fid = f"raw-{uuid.uuid4()}"
        frame = fr.message_frame(sender.did, to, fid, _ts(), header, blob)
        if seq is not None:
            frame["rr"], frame["sq"] = 1, seq
    assert sender.transport is not None
    await sender.transport.send(frame)
    return fid


class Pair:
    """alice (ephemeral) → bob (durable victim) with an established session."""

    def __init__(self, mesh: DevMesh, state: Path, **bob_kw: Any) -> None:
        self.mesh = mesh
        self.a = _ephemeral(mesh, "alice", receipt_timeout=1.0)
        self.b = _durable(mesh, state, "bob", **bob_kw)
        self.errors: list[tuple[str, str | None, str]] = []
        self.b.on_error(lambda kind, peer, detail: self.errors.append((kind, peer, detail)))
        self.n = 0

    async def start(self) -> Pair:
        await self.a.connect()
        await self.b.connect()
        await self.honest()
        await self.b.send(self.a.did, "hello alice")  # both sides proven
        await self.a.wait_for(from_=self.b.did, timeout=10)
        return self

    async def honest(self, timeout: float = 10) -> float:
        """An honest message from alice arrives at bob's application; returns the latency."""
        self.n += 1
        token = f"ok-{self.n}-{os.urandom(3).hex()}"
        started = time.monotonic()
        await self.a.send(self.b.did, {"ok": token})
        got = await self.b.wait_for(from_=self.a.did, timeout=timeout, predicate=lambda m: m.payload == {"ok": token})
        assert got.payload == {"ok": token}
        return time.monotonic() - started

    async def stop(self) -> None:
        await self.a.disconnect()
        await self.b.disconnect()


@pytest.fixture
async def mesh() -> AsyncIterator[DevMesh]:
    async with DevMesh() as m:
        yield m


@pytest.fixture
async def pair(mesh: DevMesh, tmp_path: Path) -> AsyncIterator[Pair]:
    p = await Pair(mesh, tmp_path / "bob").start()
    yield p
    await p.stop()


async def _until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        await asyncio.sleep(0.02)


# ----------------------------------------------------------------------------------
# poison payloads: receiving continues, the next honest message arrives
# ----------------------------------------------------------------------------------

#: payloads that are not strict JSON or exceed a limit, each refused on its own
POISONS: dict[str, bytes] = {
    "NaN": b"NaN",
    "Infinity": b"Infinity",
    "-Infinity": b"-Infinity",
    "NaN inside an object": b'{"x": NaN}',
    "1e400": b"1e400",
    "-1e400 inside an array": b"[1, -1e400]",
    "10^5-digit integer": b"9" * 100_000,
    "4301-digit integer": b"1" * 4301,
    "129 levels deep": b"[" * 129 + b"]" * 129,
    "10^5 levels deep": b"[" * 100_000 + b"]" * 100_000,
    "5000 nested objects": b'{"a":' * 5000 + b"1" + b"}" * 5000,
    "invalid UTF-8": b"\xff\xfe\x00garbage",
    "UTF-16 JSON": '{"x": 1}'.encode("utf-16"),
    "UTF-8 BOM": b"\xef\xbb\xbf{}",
    "encoded surrogate (CESU-8)": b'"\xed\xa0\x80"',
    "not JSON": b"hello, world",
    "empty": b"",
    "truncated": b'{"a": [1, 2',
    "control payload with NaN": b'{"agt_mesh_control": {"receipts": [NaN]}}',
}

#: edge values that *are* strict JSON within the limits: delivered and stored as sent
ACCEPTED: dict[str, tuple[bytes, Any]] = {
    "128 levels deep": (b"[" * 128 + b"]" * 128, json.loads("[" * 128 + "]" * 128)),
    "4300-digit integer": (b"7" * 4300, None),
    "1e308": (b"1e308", 1e308),
    "1e-400 (underflows to 0)": (b"1e-400", 0.0),
    "lone surrogate escape": (b'"\\ud800"', "\ud800"),
    "whitespace around": (b'  {"a" : [1, 2.5, null]}  ', {"a": [1, 2.5, None]}),
}


async def test_poison_payloads_are_refused_one_by_one(pair: Pair) -> None:
    a, b = pair.a, pair.b
    assert b.store is not None
    for name, plaintext in POISONS.items():
        for seq in (None, a.protocol.sessions[b.did].send_seq + 2):  # plain, and as a held-back gap
            before = len(pair.errors)
            await raw_send(a, b.did, plaintext, seq=seq)
            await pair.honest()
            new = pair.errors[before:]
            assert [kind for kind, _, _ in new] == ["decrypt"], (name, new)
            assert new[0][1] == a.did and "payload" in new[0][2], (name, new)
            health = b.health
            assert health.ok and health.inbound == "running", (name, health)
            assert health.internal_errors == 0 and health.restarts == 0, (name, health)
    assert b.inbox.drain() == []  # nothing poisonous reached the application
    for name, (plaintext, value) in ACCEPTED.items():
        await raw_send(a, b.did, plaintext)
        got = await b.wait_for(from_=a.did, timeout=10)
        expect = int(plaintext) if value is None else value
        assert got.payload == expect, name
    # accepted values survive the store: they are written as received and read back
    await raw_send(a, b.did, b'{"kept": "\\ud800", "n": 1e308}')
    got = await b.wait_for(from_=a.did, timeout=10, consume=False)
    (stored,) = [m for m in b.store.load_inbox() if m.message_id == got.message_id]
    assert stored.payload == {"kept": "\ud800", "n": 1e308}
    await pair.honest()
    assert b.health.ok
    figure(f"poison payloads: {len(POISONS)} kinds x 2 (plain, held gap), each refused alone; next message arrives")


async def test_poison_plaintext_frames_and_frames(mesh: DevMesh, tmp_path: Path) -> None:
    """Plaintext messages from an allow-listed plaintext peer, and whole frames that are not
    strict JSON — through the relay and straight into the inbound path (a hostile relay)."""
    pair = await Pair(mesh, tmp_path / "bob").start()
    try:
        b = pair.b
        mallory = Identity.generate(os.urandom)
        b.add_plaintext_peer(mallory.did)
        async with connect(mesh.relay.ws_url, ping_interval=None) as ws:
            await ws.send(fr.encode_frame(fr.connect_frame(mallory.did, identity=mallory, timestamp=_ts())))
            for plaintext in POISONS.values():
                frame = fr.plaintext_message_frame(mallory.did, b.did, str(uuid.uuid4()), _ts(), "x")
                frame["ciphertext"] = base64.b64encode(plaintext).decode()
                await ws.send(json.dumps(frame))
            await asyncio.sleep(0.5)
        texts = [
            '{"v":1,"type":"message","from":"' + mallory.did + '","to":"' + b.did + '","id":"f1","ts":NaN}',
            '{"type":"knock","from":"x","id":"k1","intent":[1e400]}',
            '{"type":"pending_messages","messages":[{"type":"message","id":-Infinity}]}',
            '{"type":"message","id":"' + "9" * 5000 + '"}',
            "[" * 10**5,
            "\ufeff{}",
        ]
        for text in texts:
            await b._on_frame(text)
        await pair.honest()
        # plaintext frames carry Latin-1 text (as the TypeScript SDK writes them): what is
        # strict JSON read that way is delivered, everything else refused
        valid = {}
        for plaintext in POISONS.values():
            with contextlib.suppress(MalformedJsonError):
                valid[plaintext] = loads_strict(plaintext.decode("latin-1"), max_bytes=1 << 20)
        assert [m.payload for m in b.inbox.drain()] == list(valid.values())
        assert b.health.ok and b.health.internal_errors == 0
        plaintext_refusals = [e for e in pair.errors if e[1] == mallory.did and "plaintext payload" in e[2]]
        assert len(plaintext_refusals) == len(POISONS) - len(valid)
    finally:
        await pair.stop()


# ----------------------------------------------------------------------------------
# property: arbitrary plaintexts through an established session
# ----------------------------------------------------------------------------------

_ATOMS = st.one_of(
    st.sampled_from(["NaN", "Infinity", "-Infinity", "null", "true", "false", "1e400", "-1e400", "1e-400", "-0"]),
    st.integers().map(str),
    st.integers(min_value=1, max_value=6000).map(lambda n: "9" * n),
    st.text(max_size=20).map(json.dumps),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
)
_JSONISH = st.recursive(
    _ATOMS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.dictionaries(st.text(max_size=5).map(json.dumps), inner, max_size=4).map(
            lambda d: "{" + ",".join(f"{k}:{v}" for k, v in d.items()) + "}"
        ),
    ),
    max_leaves=12,
)
_DEEP = st.tuples(st.integers(min_value=100, max_value=5000), _ATOMS).map(lambda t: "[" * t[0] + t[1] + "]" * t[0])
PLAINTEXTS = st.one_of(
    st.binary(max_size=400),
    st.text(max_size=200).map(str.encode),
    _JSONISH.map(str.encode),
    _DEEP.map(str.encode),
    _JSONISH.map(lambda s: s.encode("utf-16")),
    st.tuples(_JSONISH, st.binary(min_size=1, max_size=4)).map(lambda t: t[0].encode() + t[1]),
)


class _LoopThread:
    """An event loop in a thread, so a synchronous hypothesis test can drive async clients."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[_LoopThread, Pair]]:
    lt = _LoopThread()
    mesh = DevMesh()
    lt.run(mesh.start())
    pair = lt.run(Pair(mesh, tmp_path_factory.mktemp("prop") / "bob").start())
    try:
        yield lt, pair
    finally:
        lt.run(pair.stop())
        lt.run(mesh.stop())
        lt.close()


_PROPERTY = {"examples": 0, "accepted": 0, "refused": 0}


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(plaintext=PLAINTEXTS)
def test_any_plaintext_then_the_next_honest_message_arrives(live: tuple[_LoopThread, Pair], plaintext: bytes) -> None:
    lt, pair = live
    try:
        expected: Any = loads_strict(plaintext, max_bytes=1 << 24)
        valid = True
    except MalformedJsonError:
        valid = False

    async def one() -> None:
        a, b = pair.a, pair.b
        b.drain()
        before = len(pair.errors)
        fid = await raw_send(a, b.did, plaintext)
        await pair.honest()
        got = [m for m in b.drain() if m.message_id == fid]
        if valid:
            assert [m.payload for m in got] == [expected]
        else:
            assert got == []
            assert any(kind == "decrypt" for kind, _, _ in pair.errors[before:])
        health = b.health
        assert health.ok and health.internal_errors == 0 and health.restarts == 0, health

    lt.run(one())
    _PROPERTY["examples"] += 1
    _PROPERTY["accepted" if valid else "refused"] += 1


def test_property_report() -> None:
    figure(
        f"property: {_PROPERTY['examples']} arbitrary plaintexts ({_PROPERTY['accepted']} valid JSON, "
        f"{_PROPERTY['refused']} refused) through a durable session; the next honest message arrived every time"
    )
    assert _PROPERTY["examples"] > 0


# ----------------------------------------------------------------------------------
# the pipeline survives failures of its own parts, and says so
# ----------------------------------------------------------------------------------


async def test_failing_store_stalls_then_resumes_without_loss_or_duplicates(pair: Pair) -> None:
    a, b = pair.a, pair.b
    assert b.store is not None
    real = b.store.commit
    failing = {"on": True, "calls": 0}

    def commit(**kw: Any) -> None:
        if failing["on"]:
            failing["calls"] += 1
            raise sqlite3.OperationalError("disk I/O error")
        real(**kw)

    b.store.commit = commit  # type: ignore[method-assign]
    mid = await a.send(b.did, {"during": "outage"})
    await _until(lambda: b.health.inbound == "stalled")
    health = b.health
    assert not health.ok and b.is_connected  # connected, yet nothing is being received
    assert health.detail is not None and "disk I/O error" in health.detail
    await asyncio.sleep(0.5)
    assert failing["calls"] >= 3  # retried
    assert [m for m in b.inbox.peek() if m.message_id == mid] == []  # not delivered before it is committed
    failing["on"] = False
    got = await b.wait_for(from_=a.did, timeout=10)
    assert got.message_id == mid
    await pair.honest()
    assert [m for m in b.drain() if m.message_id == mid] == []  # exactly once
    assert b.health.ok
    assert [kind for kind, _, _ in pair.errors].count("store") == 1


async def test_a_frame_that_breaks_processing_costs_only_that_frame(mesh: DevMesh, tmp_path: Path) -> None:
    """Later messages of the same sender wait for the lost one at most ``reorder_timeout``
    (its sequence gap), then arrive; other frames are not affected at all."""
    pair = await Pair(mesh, tmp_path / "bob", reorder_timeout=1.0).start()
    a, b = pair.a, pair.b
    real = b.protocol.receive

    def receive(obj: Any, now: float, random: Any) -> Any:
        if isinstance(obj, dict) and obj.get("id") == "boom-1":
            raise RuntimeError("a bug in frame processing")
        return real(obj, now, random)

    b.protocol.receive = receive  # type: ignore[method-assign]
    try:
        await a.send(b.did, "lost to a bug", message_id="boom-1")
        await pair.honest()
        await pair.honest()
        health = b.health
        assert health.internal_errors >= 1 and health.restarts == 0 and health.ok, health
        # each (re-sent) copy of that one frame failed on its own; nothing else did
        assert {(k, p) for k, p, d in pair.errors if "RuntimeError" in d} == {("internal", a.did)}
        assert [m for m in b.drain() if m.message_id == "boom-1"] == []
    finally:
        await pair.stop()


async def test_hooks_that_raise_do_not_stop_receiving(pair: Pair) -> None:
    b = pair.b

    def bad_hook(*_: Any) -> None:
        raise ValueError("application bug")

    b.on_message(bad_hook)
    b.on_error(bad_hook)
    for _ in range(3):
        await pair.honest()
    assert b.health.ok


async def test_a_crashed_processing_task_is_restarted_and_loses_nothing(pair: Pair) -> None:
    a, b = pair.a, pair.b
    real = b._decode
    crashes = {"left": 1}

    def decode(text: str) -> Any:
        if crashes["left"]:
            crashes["left"] -= 1
            raise RuntimeError("the processing loop itself fails")
        return real(text)

    b._decode = decode  # type: ignore[method-assign]
    mid = await a.send(b.did, "read just before the crash")
    got = await b.wait_for(from_=a.did, timeout=10)
    assert got.message_id == mid  # the frame that was read is processed after the restart
    await pair.honest()
    assert [m for m in b.drain() if m.message_id == mid] == []
    assert b.health.restarts == 1 and b.health.ok
    assert any(kind == "internal" and "restarted" in detail for kind, _, detail in pair.errors)


async def test_a_crash_inside_a_frame_skips_it_and_receipts_recover_it(
    pair: Pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The frame being processed when the task failed is skipped (it could fail again), never
    acknowledged nor receipted: the agt_mesh sender re-sends it and it arrives once."""
    a, b = pair.a, pair.b
    real = client_module._message_sender
    crashes = {"left": 1}

    def sender(obj: Any) -> str | None:
        if crashes["left"] and isinstance(obj, dict) and obj.get("id") == "crash-me":
            crashes["left"] -= 1
            raise RuntimeError("failure outside the per-frame guard")
        return real(obj)

    monkeypatch.setattr(client_module, "_message_sender", sender)
    mid = await a.send(b.did, "recovered by a re-send", message_id="crash-me")
    got = await b.wait_for(from_=a.did, timeout=15)
    assert got.message_id == mid
    await pair.honest()
    assert [m for m in b.drain() if m.message_id == mid] == []
    assert b.health.restarts == 1 and b.health.ok


async def test_a_crashed_timer_task_is_restarted(pair: Pair) -> None:
    a, b = pair.a, pair.b
    real = b.protocol.tick
    crashes = {"left": 1}

    def tick(now: float, random: Any) -> Any:
        if crashes["left"]:
            crashes["left"] -= 1
            raise RuntimeError("timer bug")
        return real(now, random)

    b.protocol.tick = tick  # type: ignore[method-assign]
    await _until(lambda: b.health.restarts == 1)
    await pair.honest()
    await _until(lambda: a.protocol.unconfirmed(b.did) == 0)  # bob's receipts still go out
    assert b.health.ok


# ----------------------------------------------------------------------------------
# bytes, not counts
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["agt-5.0.0", "agt-3.7.0", "dev"])
async def test_relay_connection_negotiates_no_compression(kind: str) -> None:
    """Both AGT server generations (uvicorn) and the dev relay compress when a client asks;
    ours does not ask, so a relay cannot make a small wire stream inflate into a large one
    in our memory."""
    got: list[str] = []

    async def on_frame(text: str) -> None:
        got.append(text)

    servers = ServerPair(kind).start()
    try:
        ident = Identity.generate(os.urandom)
        async with connect(servers.relay_url.replace("http", "ws") + "/ws") as ws:
            assert [e.name for e in ws.protocol.extensions] == ["permessage-deflate"]
        t = RelayTransport(servers.relay_url, ident, on_frame=on_frame, reconnect=False)
        await t.connect()
        try:
            ws2 = t._ws
            assert ws2 is not None and ws2.protocol.extensions == []
            await t.send(fr.plaintext_message_frame(ident.did, ident.did, "to-self", _ts(), {"x": 1}))
            await _until(lambda: any('"to-self"' in x for x in got))  # it still works
        finally:
            await t.close()
    finally:
        servers.stop()


class _CountingProxy:
    """A TCP proxy to the relay that counts the bytes the attacker actually sends."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.upstream_bytes = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"ws://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/ws"

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection("127.0.0.1", self.port)

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, count: bool) -> None:
            with contextlib.suppress(Exception):
                while data := await r.read(65536):
                    if count:
                        self.upstream_bytes += len(data)
                    w.write(data)
                    await w.drain()
            with contextlib.suppress(Exception):
                w.close()

        await asyncio.gather(pipe(cr, uw, True), pipe(ur, cw, False))

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


class _Victim:
    """``robustness_victim.py`` in its own process (its peak RSS is its own)."""

    def __init__(self, mesh: DevMesh, state: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "robustness_victim.py"), str(state), mesh.relay_url, mesh.registry_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.did = ""

    async def start(self) -> _Victim:
        # the relay runs on this event loop: never block it while the victim connects
        self.did = (await asyncio.to_thread(self._line))["did"]
        return self

    def _line(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"victim exited ({self.proc.wait()})")
        return dict(json.loads(line))

    async def ask(self, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return await asyncio.to_thread(self._line)

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.write('{"cmd": "quit"}\n')
            self.proc.stdin.flush()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


#: a flood of this many frames of this many (highly compressible) bytes
FLOOD_FRAMES = 64
FLOOD_FRAME_BYTES = 8 * MiB
#: the victim's peak RSS may grow at most this much (queue 32 MiB + websockets' 4 frames
#: + the frame being processed and its copies + the pre-KNOCK buffer's 16 MiB per peer)
FLOOD_RSS_BOUND = 160 * MiB


async def test_compressed_frame_flood_keeps_the_victim_within_its_byte_bounds(mesh: DevMesh, tmp_path: Path) -> None:
    victim = await _Victim(mesh, tmp_path / "victim").start()
    honest = _ephemeral(mesh, "honest")
    proxy = _CountingProxy(mesh.relay.port)
    try:
        await honest.connect()
        await honest.send(victim.did, {"t": "warm-up"})
        assert (await victim.ask(cmd="wait", token="warm-up", timeout=10))["ok"]
        base = await victim.ask(cmd="reset_peak")
        routed = mesh.relay.stats["messages_routed"]
        url = await proxy.start()
        attacker = Identity.generate(os.urandom)
        junk = "A" * FLOOD_FRAME_BYTES  # compresses ~1000:1
        sent = 0
        started = time.monotonic()
        async with connect(url, max_size=None, ping_interval=None) as ws:
            assert [e.name for e in ws.protocol.extensions] == ["permessage-deflate"]
            await ws.send(fr.encode_frame(fr.connect_frame(attacker.did, identity=attacker, timestamp=_ts())))
            for i in range(FLOOD_FRAMES):
                frame = {
                    "v": 1,
                    "type": "message",
                    "from": attacker.did,
                    "to": victim.did,
                    "id": f"flood-{i}",
                    "ts": _ts(),
                    "header": {"dh": base64.b64encode(os.urandom(32)).decode(), "pn": 0, "n": i},
                    "ciphertext": junk,
                }
                await ws.send(json.dumps(frame))
                sent += FLOOD_FRAME_BYTES
            # the relay has written the whole flood to the victim's socket
            await _until(lambda: mesh.relay.stats["messages_routed"] >= routed + FLOOD_FRAMES, 120)
            # the honest peer's message, behind the whole flood
            await honest.send(victim.did, {"t": "after-flood"})
            reply = await victim.ask(cmd="wait", token="after-flood", timeout=120)
            elapsed = time.monotonic() - started
        wire = proxy.upstream_bytes
        report = await victim.ask(cmd="report")
        growth = (report["hwm_kb"] - base["hwm_kb"]) * 1024
        figure(
            f"compressed flood: {FLOOD_FRAMES} x {FLOOD_FRAME_BYTES // MiB} MiB frames = {sent // MiB} MiB "
            f"decompressed from {wire // 1024} KiB on the attacker's wire (deflate, "
            f"{len(zlib.compress(junk.encode(), 9)) // 1024} KiB per frame); victim peak RSS "
            f"{base['hwm_kb'] // 1024} -> {report['hwm_kb'] // 1024} MiB (+{growth // MiB} MiB, bound "
            f"{FLOOD_RSS_BOUND // MiB} MiB); {report['errors']} flood frames refused; honest message after "
            f"the flood arrived in {elapsed:.1f} s"
        )
        assert reply["ok"], reply
        assert 0 < wire < sent // 100  # the attack really was compressed
        assert report["errors"] >= FLOOD_FRAMES - 3  # and really reached the victim (<= 2 still buffered)
        assert growth < FLOOD_RSS_BOUND, growth
        assert report["health"]["ok"], report["health"]
    finally:
        await proxy.stop()
        await honest.disconnect()
        victim.stop()


#: inbox flood: bob's inbox holds this many messages; alice sends several times as many
FLOOD_INBOX = 500
FLOOD_MESSAGES = 2_000
#: carol's message must reach bob's application within this many seconds meanwhile
HONEST_WITHIN = 5.0


async def test_inbox_flood_from_one_peer_does_not_delay_another(mesh: DevMesh, tmp_path: Path) -> None:
    pair = await Pair(mesh, tmp_path / "bob", inbox_size=FLOOD_INBOX).start()
    carol = _ephemeral(mesh, "carol")
    try:
        a, b = pair.a, pair.b
        await carol.connect()
        sent = [await a.send(b.did, {"i": i}) for i in range(FLOOD_MESSAGES)]
        await _until(lambda: b.health.parked_frames > 0, 30)
        assert len(b.inbox) <= FLOOD_INBOX + 1
        started = time.monotonic()
        await carol.send(b.did, {"t": "hello from carol"})
        got = await b.wait_for(from_=carol.did, timeout=HONEST_WITHIN)
        latency = time.monotonic() - started
        assert got.payload == {"t": "hello from carol"}
        health = b.health
        # the application reads: every flood message arrives, once, in alice's order
        received: list[int] = []
        deadline = time.monotonic() + 60
        while len(received) < FLOOD_MESSAGES and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                msg = await b.wait_for(from_=a.did, timeout=5)
                received.append(msg.payload["i"])
        figure(
            f"inbox flood: alice sent {FLOOD_MESSAGES} messages into a {FLOOD_INBOX}-message inbox nobody read; "
            f"{health.parked_frames} frames ({health.parked_bytes // 1024} KiB) set aside for alice; carol's message "
            f"reached the application in {latency * 1000:.0f} ms (bound {HONEST_WITHIN:g} s); then all "
            f"{len(received)} of alice's arrived once, in order"
        )
        assert received == list(range(FLOOD_MESSAGES))
        assert len(sent) == FLOOD_MESSAGES
    finally:
        await carol.disconnect()
        await pair.stop()


async def test_inbox_byte_share_and_parking_limit(mesh: DevMesh, tmp_path: Path) -> None:
    """Big messages: the inbox share is in bytes too, and a peer's set-aside frames are
    capped in bytes; what does not fit is dropped *unacknowledged* and re-sent by receipts."""
    pair = await Pair(mesh, tmp_path / "bob", inbox_bytes=4 * MiB).start()
    carol = _ephemeral(mesh, "carol")
    try:
        a, b = pair.a, pair.b
        await carol.connect()
        blob = "x" * (2 * MiB)
        count = 12  # 24 MiB from alice: 4 MiB inbox, 16 MiB parked at most
        for i in range(count):
            await a.send(b.did, {"i": i, "blob": blob})
        await _until(lambda: b.health.parked_dropped > 0, 30)
        health = b.health
        assert health.parked_bytes <= PARKED_PEER_BYTES
        assert b.inbox.bytes <= 4 * MiB + 2 * MiB + 4096  # one message may overshoot
        await carol.send(b.did, "small and on time")
        assert (await b.wait_for(from_=carol.did, timeout=HONEST_WITHIN)).payload == "small and on time"
        got = []
        deadline = time.monotonic() + 90
        while len(got) < count and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                got.append((await b.wait_for(from_=a.did, timeout=5)).payload["i"])
        figure(
            f"inbox bytes: 12 x 2 MiB into a 4 MiB inbox: {health.parked_bytes // MiB} MiB set aside "
            f"(limit {PARKED_PEER_BYTES // MiB} MiB), {health.parked_dropped} frame(s) dropped unacknowledged "
            f"and re-sent by receipts; all {len(got)} arrived once, in order"
        )
        assert got == list(range(count))
        assert any(kind == "limit" for kind, _, _ in pair.errors)
    finally:
        await carol.disconnect()
        await pair.stop()


async def test_pre_knock_buffer_is_bounded_in_bytes(mesh: DevMesh, tmp_path: Path) -> None:
    """Frames behind KNOCKs whose verdict is pending (a slow policy) from three attackers:
    16 MiB per peer and 32 MiB in total at most, whatever they send."""
    pair = await Pair(mesh, tmp_path / "bob").start()
    release = asyncio.Event()

    async def slow_policy(peer: str, intent: Any) -> bool:
        await release.wait()
        return False

    pair.b.on_knock(slow_policy)
    b = pair.b
    peak = {"total": 0, "peer": 0}
    attackers = [Identity.generate(os.urandom) for _ in range(3)]
    try:
        for attacker in attackers:
            async with connect(mesh.relay.ws_url, max_size=None, ping_interval=None) as ws:
                await ws.send(fr.encode_frame(fr.connect_frame(attacker.did, identity=attacker, timestamp=_ts())))
                knock = {
                    "v": 1,
                    "type": "knock",
                    "from": attacker.did,
                    "to": b.did,
                    "id": str(uuid.uuid4()),
                    "ts": _ts(),
                    "intent": {"action": "establish_session"},
                    "establishment": {
                        # its own identity key: a KNOCK whose key is not the sender's is
                        # refused before any verdict is pending (identity binding)
                        "ik": base64.b64encode(attacker.x25519_public).decode(),
                        "ek": base64.b64encode(os.urandom(32)).decode(),
                    },
                }
                await ws.send(json.dumps(knock))
                blob = base64.b64encode(os.urandom(MiB)).decode()
                for i in range(24):  # 24 MiB each
                    frame = {
                        "v": 1,
                        "type": "message",
                        "from": attacker.did,
                        "to": b.did,
                        "id": str(uuid.uuid4()),
                        "ts": _ts(),
                        "header": {"dh": base64.b64encode(os.urandom(32)).decode(), "pn": 0, "n": i},
                        "ciphertext": blob,
                    }
                    await ws.send(json.dumps(frame))
                await asyncio.sleep(0.3)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and b.health.queued_frames:
                    await asyncio.sleep(0.05)
                peak["total"] = max(peak["total"], b.protocol.buffered_bytes())
                peak["peer"] = max(peak["peer"], *(b.protocol.buffered_bytes(x.did) for x in attackers))
        assert peak["peer"] <= b.protocol.config.pre_knock_peer_bytes
        assert peak["total"] <= b.protocol.config.max_buffered_bytes
        assert peak["total"] > 16 * MiB  # more than one attacker was holding frames
        release.set()
        await pair.honest()
        figure(
            f"pre-KNOCK buffer: 3 attackers x 24 MiB behind pending KNOCKs; peak {peak['peer'] // MiB} MiB "
            f"for one peer (limit 16), {peak['total'] // MiB} MiB in total (limit 32)"
        )
    finally:
        release.set()
        await pair.stop()


# ----------------------------------------------------------------------------------
# safe local files
# ----------------------------------------------------------------------------------


def _plant(state: Path, victim: Path) -> dict[str, Path]:
    links = {}
    for name in (".mesh-prekeys.lock", "state.db", "state.db-wal", "state.db-shm", "state.db-journal"):
        target = victim.parent / f"{victim.name}-{name.strip('.')}"
        target.write_text(f"precious {name}\n")
        (state / name).symlink_to(target)
        links[name] = target
    return links


def _snapshot(paths: dict[str, Path]) -> dict[str, tuple[bytes, int, int]]:
    return {k: (p.read_bytes(), p.stat().st_mode, p.stat().st_mtime_ns) for k, p in paths.items()}


async def test_planted_symlinks_in_a_foreign_writable_state_dir(mesh: DevMesh, tmp_path: Path) -> None:
    ids = tmp_path / "ids"
    ids.mkdir(mode=0o700)
    save_identity(ids / "identity.json", Identity.generate(os.urandom))
    state = tmp_path / "shared"
    state.mkdir()
    state.chmod(0o777)  # another user could write here
    victims = _plant(state, tmp_path / "victim")
    before = _snapshot(victims)
    with pytest.raises(MeshStateError, match=r"writable by other users .*chmod 700"):
        MeshClient(ids / "identity.json", relay_url=mesh.relay_url, registry_url=mesh.registry_url, state_dir=state)
    ident = Identity.generate(os.urandom)
    client = MeshClient(ident, relay_url=mesh.relay_url, registry_url=mesh.registry_url, state_dir=state)
    with pytest.raises(MeshStateError, match=r"writable by other users .*chmod 700"):
        await client.connect()
    assert _snapshot(victims) == before  # not truncated, not written, not chmod-ed
    assert sorted(p.name for p in state.iterdir()) == sorted(victims)  # nothing created
    # the directory fixed but the links still there: each is refused, never followed
    state.chmod(0o700)
    with pytest.raises(MeshStateError, match="symbolic link"):
        await client.connect()
    (state / ".mesh-prekeys.lock").unlink()
    with pytest.raises(MeshStateError, match="symbolic link"):
        await client.connect()
    assert _snapshot(victims) == before
    # the same through the command line
    save_identity(state / "identity.json", ident)
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    res = subprocess.run(
        [sys.executable, "-m", "agt_mesh", "session", "list", "--state-dir", str(state)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert res.returncode == 1 and "symbolic link" in res.stderr, res
    assert _snapshot(victims) == before


async def test_state_dir_inside_a_directory_others_control(tmp_path: Path) -> None:
    open_parent = tmp_path / "open"
    open_parent.mkdir()
    open_parent.chmod(0o777)  # not sticky: anyone may rename the state directory away
    state = open_parent / "state"
    ident = Identity.generate(os.urandom)
    client = MeshClient(ident, relay_url="http://127.0.0.1:9", registry_url="http://127.0.0.1:9", state_dir=state)
    with pytest.raises(MeshStateError, match="other users can write"):
        await client.connect()
    assert not state.exists()  # refused before anything was created
    open_parent.chmod(0o1777)  # sticky, like /tmp: only the owner may rename its entries
    with contextlib.suppress(Exception):
        await client.connect()  # the relay is unreachable; the directory is accepted
    assert state.is_dir() and (state / ".mesh-prekeys.lock").exists()
    await client.disconnect()
    # a state directory that belongs to someone else
    if os.geteuid() == 0:
        foreign = tmp_path / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, 12345, 12345)
    else:
        foreign = Path("/usr/share")
    other = MeshClient(ident, relay_url="http://127.0.0.1:9", registry_url="http://127.0.0.1:9", state_dir=foreign)
    with pytest.raises(MeshStateError, match="belongs to another user"):
        await other.connect()
    assert not (foreign / ".mesh-prekeys.lock").exists()
