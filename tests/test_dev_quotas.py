"""Per-DID quotas of the development relay and registry (dev-only protection: one client
must not be able to exhaust the store or bloat the records everybody reads)."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from helpers import identity
from test_dev_servers import auth, bundle, msg, now_ts, online, online_with_pushed, register, silence

from agt_mesh.core.registry_codec import prekeys_path, register_body_pop
from agt_mesh.dev import DevRegistry, DevRelay, RelayState
from agt_mesh.dev.registry import (
    MAX_CAPABILITIES,
    MAX_CAPABILITY_CHARS,
    MAX_METADATA_ENTRIES,
    MAX_ONE_TIME_PRE_KEYS,
    MAX_PRE_KEY_BYTES,
    MAX_PROFILE_BYTES,
)
from agt_mesh.dev.relay import StoreResult

# --------------------------------------------------------------------------------------
# relay store
# --------------------------------------------------------------------------------------


def test_sender_quota_counts_frames_and_bytes_and_is_freed_by_acks_and_expiry() -> None:
    clock = [0.0]
    state: RelayState[object] = RelayState(
        max_frames_per_sender=3, max_bytes_per_sender=100, ttl=10.0, clock=lambda: clock[0]
    )
    for i in range(3):
        assert state.store(f"rcpt-{i}", f"m{i}", "x" * 10, "mallory") is StoreResult.STORED
    # the 4th frame from mallory is refused, whoever it is for; others are unaffected
    assert state.store("rcpt-9", "m3", "x" * 10, "mallory") is StoreResult.SENDER_FULL
    assert state.store("rcpt-9", "h0", "x" * 10, "honest") is StoreResult.STORED
    assert state.sender_usage("mallory") == (3, 30)
    # an ack by the recipient frees one slot of the sender's quota
    assert state.ack("rcpt-0", "m0")
    assert state.sender_usage("mallory") == (2, 20)
    assert state.store("rcpt-9", "m3", "x" * 10, "mallory") is StoreResult.STORED
    # bytes: 70 more bytes would take mallory to 100 + 10 > 100
    assert state.ack("rcpt-1", "m1")
    assert state.store("rcpt-8", "big", "x" * 81, "mallory") is StoreResult.SENDER_FULL
    # expiry frees the quota too
    clock[0] += 11
    assert state.pending("rcpt-2") == [] and state.pending("rcpt-9") == []
    assert state.sender_usage("mallory") == (0, 0)
    assert state.stored_bytes == 0
    assert state.stats["dropped_full"] == 2


def test_recipient_byte_quota() -> None:
    state: RelayState[object] = RelayState(max_bytes_per_recipient=50)
    assert state.store("bob", "a", "x" * 30, "s1") is StoreResult.STORED
    assert state.store("bob", "b", "x" * 30, "s2") is StoreResult.QUEUE_FULL
    assert state.store("carol", "b", "x" * 30, "s2") is StoreResult.STORED
    assert state.ack("bob", "a")
    assert state.store("bob", "b", "x" * 30, "s2") is StoreResult.STORED


async def test_a_flooding_sender_hits_its_quota_and_an_honest_sender_still_gets_through() -> None:
    mallory, honest, bob, carol = (identity(n) for n in ("q-mallory", "q-honest", "q-bob", "q-carol"))
    async with DevRelay(max_frames_per_sender=20) as relay:
        m = await online(relay.ws_url, mallory)
        for i in range(15):  # two offline victims
            await m.send(msg(mallory.did, bob.did, f"flood-b{i}"))
            await m.send(msg(mallory.did, carol.did, f"flood-c{i}"))
        h = await online(relay.ws_url, honest)
        await h.send(msg(honest.did, bob.did, "honest"))
        await asyncio.sleep(0.3)
        assert relay.state.sender_usage(mallory.did) == (20, relay.state.sender_usage(mallory.did)[1])
        assert relay.stats["dropped_full"] == 10
        b, pushed = await online_with_pushed(relay.ws_url, bob)
        ids = [f["id"] for f in pushed]
        assert ids == [f"flood-b{i}" for i in range(10)] + ["honest"]  # 10 of 20 flood frames were for bob
        await b.close()
        await m.close()
        await h.close()


async def test_frames_for_a_live_recipient_are_not_limited_by_the_store_quota() -> None:
    """Quotas bound what the relay *stores*; a live conversation is not throttled by them."""
    alice, bob = identity("q-live-a"), identity("q-live-b")
    async with DevRelay(max_frames_per_sender=2, hold_until_ack=False) as relay:
        a = await online(relay.ws_url, alice)
        b = await online(relay.ws_url, bob)
        for i in range(10):
            await a.send(msg(alice.did, bob.did, f"live-{i}"))
        got: list[Any] = []
        for _ in range(10):
            got.append(json_id(await b.recv()))
        assert got == [f"live-{i}" for i in range(10)]
        await silence(b)
        await a.close()
        await b.close()


def json_id(raw: str | bytes) -> str:
    import json

    return str(json.loads(raw)["id"])


# --------------------------------------------------------------------------------------
# registry records
# --------------------------------------------------------------------------------------


async def test_registry_record_quotas() -> None:
    alice = identity("q-reg-alice")
    async with DevRegistry() as registry, httpx.AsyncClient(base_url=registry.url) as http:

        async def post(caps: list[str], meta: dict[str, str]) -> httpx.Response:
            return await http.post("/v1/agents", json=register_body_pop(alice, now_ts(), caps, meta))

        too_many = [f"cap{i}" for i in range(MAX_CAPABILITIES + 1)]
        r = await post(too_many, {})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "capabilities"]
        r = await post(["x" * (MAX_CAPABILITY_CHARS + 1)], {})
        assert r.status_code == 422
        r = await post([], {f"k{i}": "v" for i in range(MAX_METADATA_ENTRIES + 1)})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "metadata"]
        r = await post([], {"blob": "x" * MAX_PROFILE_BYTES})
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body"]
        assert registry.state.dids == []
        # within the quotas: accepted
        r = await post([f"cap{i}" for i in range(MAX_CAPABILITIES)], {"display_name": "alice"})
        assert r.status_code == 201

        path = prekeys_path(alice.did)
        r = await http.put(path, json=bundle(alice, list(range(MAX_ONE_TIME_PRE_KEYS + 1))), headers=auth(alice))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "one_time_pre_keys"]
        fat = bundle(alice, [1])
        fat["one_time_pre_keys"][0]["padding"] = "x" * MAX_PRE_KEY_BYTES
        r = await http.put(path, json=fat, headers=auth(alice))
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "one_time_pre_keys", 0]
        assert registry.otk_count(alice.did) == 0
        r = await http.put(path, json=bundle(alice, list(range(MAX_ONE_TIME_PRE_KEYS))), headers=auth(alice))
        assert (r.status_code, r.json()["otk_count"]) == (200, MAX_ONE_TIME_PRE_KEYS)


async def test_a_rejected_heartbeat_does_not_change_the_record() -> None:
    """The store's update is atomic: a change that fails (429) leaves the record as it was."""
    alice = identity("q-hb")
    async with DevRegistry(heartbeat_interval=60) as registry, httpx.AsyncClient(base_url=registry.url) as http:
        assert (await register(http, alice)).status_code == 201
        r = await http.post(f"/v1/agents/{alice.did}/heartbeat", headers=auth(alice))
        assert r.status_code == 200
        record = registry.state.agent(alice.did)
        assert record is not None
        seen = record.last_seen
        r = await http.post(f"/v1/agents/{alice.did}/heartbeat", headers=auth(alice))
        assert r.status_code == 429
        after = registry.state.agent(alice.did)
        assert after is not None and after.last_seen == seen
