"""Two MeshClients conversing through each of the four servers.

Servers (subprocesses on 127.0.0.1, see ``servers.py``): the real AGT core 5.0.0 relay +
registry (POP enforced), the real agentmesh-platform 3.7.0 (pre-POP), the dev relay, and
the cluster relay/registry (two replicas of each on a 3-node NATS JetStream cluster; each
new client gets the other replica than the previous one, so the two sides of every
conversation are on different replicas).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from servers import KINDS, ServerPair

from agt_mesh.core.identity import Identity
from agt_mesh.errors import MeshAuthError, MeshTransportError
from agt_mesh.shell.client import MeshClient
from agt_mesh.shell.identity_file import save_identity
from agt_mesh.shell.lock import LockHeldError


@pytest.fixture(scope="module", params=KINDS)
def servers(request: pytest.FixtureRequest) -> Iterator[ServerPair]:
    pair = ServerPair(request.param).start()
    yield pair
    pair.stop()


def _client(servers: ServerPair, name: str, **kw: Any) -> MeshClient:
    relay_url, registry_url = servers.urls()
    return MeshClient(
        Identity.generate(os.urandom),
        relay_url=relay_url,
        registry_url=registry_url,
        display_name=f"{name}-{os.urandom(4).hex()}",
        connect_timeout=5,
        **kw,
    )


class Errors:
    def __init__(self, *clients: MeshClient) -> None:
        self.items: list[tuple[str, str, str | None, str]] = []
        for c in clients:
            c.on_error(lambda kind, peer, detail, c=c: self.items.append((c.display_name or "", kind, peer, detail)))

    def serious(self) -> list[tuple[str, str, str | None, str]]:
        return [e for e in self.items if e[1] not in ("relay",)]


@pytest.fixture
async def pair(servers: ServerPair) -> AsyncIterator[tuple[MeshClient, MeshClient]]:
    a, b = _client(servers, "alice"), _client(servers, "bob")
    await a.connect()
    await b.connect()
    yield a, b
    await a.disconnect()
    await b.disconnect()


async def _collect(client: MeshClient, sender: str, n: int, timeout: float = 20) -> list[Any]:
    return [(await client.wait_for(from_=sender, timeout=timeout)).payload for _ in range(n)]


async def test_knock_and_100_messages_each_way(pair: tuple[MeshClient, MeshClient]) -> None:
    a, b = pair
    errors = Errors(a, b)
    assert b.display_name is not None
    await a.send(b.display_name, {"n": -1})  # by display name: KNOCK + first message
    assert (await b.wait_for(from_=a.did, timeout=10)).payload == {"n": -1}
    for i in range(100):
        await a.send(b.did, {"n": i})
        await b.send(a.did, {"m": i, "text": "réponse ✓"})
    assert await _collect(b, a.did, 100) == [{"n": i} for i in range(100)]
    assert await _collect(a, b.did, 100) == [{"m": i, "text": "réponse ✓"} for i in range(100)]
    assert errors.serious() == []
    (sa,) = a.sessions()
    (sb,) = b.sessions()
    assert sa["role"] == "initiator" and sb["role"] == "responder"
    assert sa["kdf_profile"] == sb["kdf_profile"] == "spec"


async def test_legacy_profile_initiator_is_detected_by_responder(servers: ServerPair) -> None:
    a = _client(servers, "legacy", profile="ts-sdk-4")  # profile must not change POP handling
    b = _client(servers, "auto")
    async with a, b:
        await a.send(b.did, "hello from a 4.0.0-style initiator")
        assert (await b.wait_for(from_=a.did, timeout=10)).payload == "hello from a 4.0.0-style initiator"
        assert b.sessions()[0]["kdf_profile"] == "legacy"
        await b.send(a.did, "ok")
        assert (await a.wait_for(timeout=10)).payload == "ok"
        # b remembers the peer's KDF when it initiates to it later
        assert b.protocol.profile_for(a.did).value == "legacy"


async def test_knock_overtaken_by_first_message(pair: tuple[MeshClient, MeshClient]) -> None:
    a, b = pair
    bundle = await a.registry.fetch_bundle(b.did)
    async with a._lock:
        knock_step = a.protocol.establish(b.did, bundle, time.time(), os.urandom)
        msg_step, _ = a.protocol.send(b.did, {"first": True}, time.time(), os.urandom)
    assert a.transport is not None
    for frame in msg_step.frames + knock_step.frames:  # the message overtakes its KNOCK
        await a.transport.send(frame)
    assert (await b.wait_for(from_=a.did, timeout=10)).payload == {"first": True}


async def test_offline_messages_are_replayed_once_and_acked(servers: ServerPair) -> None:
    a, b = _client(servers, "sender"), _client(servers, "offline")
    await b.connect()
    await b.disconnect()  # registered with pre-keys, now offline
    async with a:
        for i in range(20):
            await a.send(b.did, {"offline": i})
        await asyncio.sleep(0.3)
        await b.connect()
        try:
            assert await _collect(b, a.did, 20) == [{"offline": i} for i in range(20)]
            await asyncio.sleep(0.5)  # let the acks reach the relay
        finally:
            await b.disconnect()
        await b.connect()  # acked frames must not come back
        try:
            await asyncio.sleep(1.0)
            assert b.drain() == []
            await a.send(b.did, "live again")
            assert (await b.wait_for(from_=a.did, timeout=10)).payload == "live again"
        finally:
            await b.disconnect()


async def test_registry_without_one_time_prekeys_uses_3dh(servers: ServerPair) -> None:
    a = _client(servers, "a3dh")
    b = _client(servers, "b3dh", one_time_prekeys=0, replenish_below=0)
    async with a, b:
        bundle = await a.registry.fetch_bundle(b.did)
        assert bundle.one_time_pre_key is None
        await a.send(b.did, "three DH")
        assert (await b.wait_for(from_=a.did, timeout=10)).payload == "three DH"


async def test_reconnect_after_relay_drops_the_socket(pair: tuple[MeshClient, MeshClient]) -> None:
    a, b = pair
    await a.send(b.did, "before")
    assert (await b.wait_for(timeout=10)).payload == "before"
    assert b.transport is not None
    disconnects: list[tuple[str, int | None]] = []
    b.on_disconnect(lambda reason, code: disconnects.append((reason, code)))
    b.transport.backoff_base = 0.2
    await b.transport.drop_connection()
    for _ in range(100):
        await asyncio.sleep(0.05)
        if b.transport.connect_count >= 2 and b.is_connected:
            break
    assert b.is_connected and b.transport.connect_count == 2
    assert disconnects and disconnects[0][0] == "server"
    await a.send(b.did, "after")
    assert (await b.wait_for(timeout=10)).payload == "after"


async def test_unreachable_relay_fails_fast() -> None:
    from servers import free_port

    port = free_port()
    c = MeshClient(
        Identity.generate(os.urandom),
        relay_url=f"http://127.0.0.1:{port}",
        registry_url=f"http://127.0.0.1:{port}",
        connect_timeout=2,
        registry_timeout=0.5,
    )
    start = time.monotonic()
    with pytest.raises((MeshTransportError, Exception)) as info:
        await c.connect()
    assert time.monotonic() - start < 10
    assert "127.0.0.1" in str(info.value)
    assert not c.is_connected


async def test_relay_unreachable_but_registry_up_fails_within_timeout(servers: ServerPair) -> None:
    from servers import free_port

    c = MeshClient(
        Identity.generate(os.urandom),
        relay_url=f"http://127.0.0.1:{free_port()}",
        registry_url=servers.registry_url,
        connect_timeout=2,
    )
    start = time.monotonic()
    with pytest.raises(MeshTransportError, match="relay"):
        await c.connect()
    assert time.monotonic() - start < 5


def test_writer_lock_held_by_another_process(tmp_path: Path, servers: ServerPair) -> None:
    ident = Identity.generate(os.urandom)
    save_identity(tmp_path / "identity.json", ident)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import sys, time
            from agt_mesh.shell.lock import WriterLock
            lock = WriterLock({str(tmp_path)!r}); lock.acquire()
            print("locked", flush=True); sys.stdin.read()
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"

        async def attempt() -> None:
            c = MeshClient(tmp_path / "identity.json", relay_url=servers.relay_url, registry_url=servers.registry_url)
            try:
                await c.connect()
            finally:
                await c.disconnect()

        with pytest.raises(LockHeldError) as info:
            asyncio.run(attempt())
        assert info.value.pid == holder.pid
        assert str(holder.pid) in str(info.value)
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)

    async def after_release() -> None:
        c = MeshClient(tmp_path / "identity.json", relay_url=servers.relay_url, registry_url=servers.registry_url)
        await c.connect()
        try:
            # a second process for the same identity now fails while we hold it
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    textwrap.dedent(f"""
                    from agt_mesh.shell.lock import WriterLock, LockHeldError
                    try:
                        WriterLock({str(tmp_path)!r}).acquire()
                    except LockHeldError as exc:
                        print(exc.pid)
                """),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            assert proc.stdout.strip() == str(os.getpid())
        finally:
            await c.disconnect()

    asyncio.run(after_release())


async def test_failed_connect_releases_the_lock(tmp_path: Path) -> None:
    from servers import free_port

    save_identity(tmp_path / "identity.json", Identity.generate(os.urandom))
    dead = f"http://127.0.0.1:{free_port()}"
    c = MeshClient(tmp_path / "identity.json", relay_url=dead, registry_url=dead, registry_timeout=0.3)
    with pytest.raises(Exception):  # noqa: B017 - the registry is unreachable
        await c.connect()
    from agt_mesh.shell.lock import WriterLock

    with WriterLock(tmp_path):  # free again
        pass


async def test_heartbeats_keep_an_idle_connection_alive() -> None:
    """Dev relay with a 1 s idle timeout: heartbeats every 0.3 s keep the socket open."""
    dev = ServerPair("dev", extra_args=["--idle-timeout", "1"]).start()
    try:
        a = _client(dev, "hb-a", heartbeat_interval=0.3)
        b = _client(dev, "hb-b", heartbeat_interval=0.3)
        async with a, b:
            await asyncio.sleep(3.0)
            assert a.transport is not None and b.transport is not None
            assert a.transport.connect_count == 1 and b.transport.connect_count == 1
            await a.send(b.did, "still live")
            assert (await b.wait_for(timeout=5)).payload == "still live"
        c = _client(dev, "no-hb", heartbeat_interval=None, reconnect=False)
        async with c:
            await asyncio.sleep(2.0)
            assert not c.is_connected  # closed for idleness without heartbeats
    finally:
        dev.stop()


@pytest.mark.slow
async def test_heartbeats_keep_a_real_relay_connection_past_95_seconds() -> None:
    agt = ServerPair("agt-5.0.0").start()
    try:
        a, b = _client(agt, "long-a"), _client(agt, "long-b")
        async with a, b:
            await a.send(b.did, "t0")
            assert (await b.wait_for(timeout=10)).payload == "t0"
            await asyncio.sleep(95)
            assert a.transport is not None and b.transport is not None
            assert a.transport.connect_count == 1 and b.transport.connect_count == 1
            await a.send(b.did, "t95")  # delivered live: b is not stale
            assert (await b.wait_for(timeout=10)).payload == "t95"
            stored = agt.relay_health()["stats"]
            assert isinstance(stored, dict) and stored["messages_stored"] == 0
    finally:
        agt.stop()


@pytest.mark.parametrize("kind", ["dev", "agt-5.0.0"])
async def test_relay_shared_secret_token(kind: str) -> None:
    token = "s3cret-" + os.urandom(4).hex()
    pair = ServerPair(
        kind, env={"AGENTMESH_RELAY_TOKEN": token}, extra_args=["--token", token] if kind == "dev" else []
    )
    pair.start()
    try:
        good = _client(pair, "tok", relay_token=token)
        async with good:
            assert good.is_connected
        bad = _client(pair, "notok", reconnect=False)
        with pytest.raises(MeshAuthError, match="4003"):
            await bad.connect()
        assert not bad.is_connected
    finally:
        pair.stop()


async def test_entra_token_source_is_reread_on_every_connect(servers: ServerPair) -> None:
    calls: list[int] = []

    def source() -> str | None:
        calls.append(1)
        return None  # no token: the relays here do not enforce Entra

    c = _client(servers, "entra", entra_token=source)
    await c.connect()
    await c.disconnect()
    await c.connect()
    await c.disconnect()
    assert len(calls) == 2


async def test_one_time_prekeys_are_replenished_and_signed_prekey_rotates() -> None:
    dev = ServerPair("dev").start()
    now = [time.time()]
    try:
        b = _client(dev, "keys", one_time_prekeys=6, replenish_below=5, clock=lambda: now[0])
        b.prekey_check_interval = 0.2
        async with b:
            first_spk = b.prekeys.signed_pre_key
            assert first_spk is not None and b.uploaded_otks == 6
            for i in range(3):  # three initiators each consume one OTK (registry pops, KNOCK uses)
                a = _client(dev, f"init{i}")
                async with a:
                    await a.send(b.did, i)
                    assert (await b.wait_for(from_=a.did, timeout=10)).payload == i
            await asyncio.sleep(0.5)
            # after two KNOCKs 4 < 5 were left on the registry: a fresh batch (ids 6..11) was
            # published; older unused keys stay valid locally but are never published again
            assert b.uploaded_otks == 6 and b.prekeys.next_otk_id == 12
            ids = [o.key_id for o in b.prekeys.one_time_pre_keys]
            assert len(ids) == 9 and {7, 8, 9, 10, 11} <= set(ids)
            assert b.prekeys.signed_pre_key is first_spk  # not replaced by a top-up
            now[0] += b.signed_prekey_rotation + 1  # a week later
            for _ in range(50):
                await asyncio.sleep(0.1)
                if b.prekeys.signed_pre_key is not first_spk:
                    break
            assert b.prekeys.signed_pre_key is not first_spk
            assert first_spk in b.prekeys.retired_signed_pre_keys  # kept for in-flight KNOCKs
            late = _client(dev, "late")
            async with late:  # the registry serves the new bundle; the session works
                await late.send(b.did, "after rotation")
                assert (await b.wait_for(from_=late.did, timeout=10)).payload == "after rotation"
    finally:
        dev.stop()


async def test_replenishing_never_republishes_a_handed_out_one_time_prekey() -> None:
    """An initiator that fetched a bundle but KNOCKs late still gets its session."""
    dev = ServerPair("dev").start()
    try:
        b = _client(dev, "pool", one_time_prekeys=6, replenish_below=5)
        async with b:
            slow = _client(dev, "slow")
            async with slow:
                held = await slow.registry.fetch_bundle(b.did)  # takes OTK 0, KNOCKs later
                assert held.one_time_pre_key_id == 0
                for i in range(2):  # two quick initiators push b below the threshold
                    c = _client(dev, f"quick{i}")
                    async with c:
                        await c.send(b.did, i)
                        assert (await b.wait_for(from_=c.did, timeout=10)).payload == i
                await asyncio.sleep(0.5)
                late = _client(dev, "after")
                async with late:
                    fresh = await late.registry.fetch_bundle(b.did)
                    assert fresh.one_time_pre_key_id not in (0, 1, 2)  # never handed out twice
                async with slow._lock:
                    step = slow.protocol.establish(b.did, held, time.time(), os.urandom)
                await slow._apply(step)
                await slow.send(b.did, "late but fine")
                assert (await b.wait_for(from_=slow.did, timeout=10)).payload == "late but fine"
    finally:
        dev.stop()
