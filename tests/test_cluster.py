"""The cluster relay and registry (``agt_mesh.cluster``) on a 3-node NATS JetStream cluster:
the AGT wire contract across replicas (routing, replay, acks, 4006, the per-recipient cap)
and the registry's exactly-once one-time pre-keys under concurrent fetches on two replicas.

One cluster (3 NATS nodes + 2 relay + 2 registry replicas as subprocesses) serves the whole
module; every test uses fresh identities.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import identity
from servers import ServerPair, free_port, stop, wait_healthy
from test_dev_servers import (
    auth,
    bundle,
    closed_with,
    msg,
    now_ts,
    online,
    online_with_pushed,
    recv_json,
    register,
    silence,
)
from websockets.asyncio.client import ClientConnection

from agt_mesh.core.frames import ack_frame, encode_frame, heartbeat_frame
from agt_mesh.core.registry_codec import prekeys_path


@pytest.fixture(scope="module")
def cluster() -> Iterator[ServerPair]:
    pair = ServerPair("cluster").start()
    yield pair
    pair.stop()


def ws(url: str) -> str:
    return "ws" + url[len("http") :] + "/ws"


async def ack(conn: ClientConnection, frame_id: str) -> None:
    await conn.send(encode_frame(ack_frame(frame_id)))


async def test_live_routing_between_replicas_in_order(cluster: ServerPair) -> None:
    alice, bob = identity("cl-live-a"), identity("cl-live-b")
    a = await online(ws(cluster.relay_urls[0]), alice)
    b = await online(ws(cluster.relay_urls[1]), bob)
    for i in range(50):
        await a.send(msg(alice.did, bob.did, f"live-{i}"))
    got = [(await recv_json(b))["id"] for _ in range(50)]
    assert got == [f"live-{i}" for i in range(50)]
    await a.close()
    await b.close()


async def test_offline_frames_are_replayed_by_any_replica_until_acked(cluster: ServerPair) -> None:
    alice, bob = identity("cl-off-a"), identity("cl-off-b")
    a = await online(ws(cluster.relay_urls[0]), alice)
    for i in range(5):
        await a.send(msg(alice.did, bob.did, f"off-{i}"))
    await a.send(msg(alice.did, bob.did, "knock-0", "knock"))
    await asyncio.sleep(0.3)
    # replica 1 replays what replica 0 accepted; nothing acked yet
    b, pushed = await online_with_pushed(ws(cluster.relay_urls[1]), bob)
    assert [f["id"] for f in pushed] == [f"off-{i}" for i in range(5)] + ["knock-0"]
    for fid in ("off-0", "off-1", "off-2"):
        await ack(b, fid)
    await asyncio.sleep(0.3)
    await b.close()
    # replica 0 replays only the unacked ones (a stored KNOCK stays until acked, as on AGT)
    b, pushed = await online_with_pushed(ws(cluster.relay_urls[0]), bob)
    assert [f["id"] for f in pushed] == ["off-3", "off-4", "knock-0"]
    for fid in ("off-3", "off-4", "knock-0"):
        await ack(b, fid)
    await asyncio.sleep(0.3)
    await b.close()
    b = await online(ws(cluster.relay_urls[1]), bob)
    await silence(b)
    await b.close()
    await a.close()


async def test_an_ack_sent_to_another_replica_before_the_replay_is_honoured(cluster: ServerPair) -> None:
    """bob read off-0 on replica 0, which died before his ack; the ack reaches replica 1."""
    alice, bob = identity("cl-early-a"), identity("cl-early-b")
    a = await online(ws(cluster.relay_urls[0]), alice)
    b0 = await online(ws(cluster.relay_urls[0]), bob)
    await a.send(msg(alice.did, bob.did, "off-0"))
    assert (await recv_json(b0))["id"] == "off-0"
    b0.transport.abort()  # bob's ack never reached replica 0
    await asyncio.sleep(0.3)
    b1, pushed = await online_with_pushed(ws(cluster.relay_urls[1]), bob)
    assert [f["id"] for f in pushed] == ["off-0"]  # at-least-once: not acked, so again
    await ack(b1, "off-0")
    await asyncio.sleep(0.3)
    await b1.close()
    b1 = await online(ws(cluster.relay_urls[0]), bob)
    await silence(b1)
    await b1.close()
    await a.close()


async def test_a_live_knock_is_not_replayed(cluster: ServerPair) -> None:
    """TypeScript peers never ack KNOCKs: a KNOCK written live must not come back later."""
    alice, bob = identity("cl-knock-a"), identity("cl-knock-b")
    a = await online(ws(cluster.relay_urls[0]), alice)
    b = await online(ws(cluster.relay_urls[1]), bob)
    await a.send(msg(alice.did, bob.did, "k-live", "knock"))
    assert (await recv_json(b))["id"] == "k-live"
    await asyncio.sleep(0.3)
    await b.close()
    b = await online(ws(cluster.relay_urls[0]), bob)
    await silence(b)
    await b.close()
    await a.close()


async def test_newer_connection_on_another_replica_closes_the_older_with_4006(cluster: ServerPair) -> None:
    alice, bob = identity("cl-4006-a"), identity("cl-4006-b")
    old = await online(ws(cluster.relay_urls[0]), bob)
    new = await online(ws(cluster.relay_urls[1]), bob)
    _, code, reason = await closed_with(old, timeout=5)
    assert (code, reason) == (4006, "session_replaced")
    a = await online(ws(cluster.relay_urls[0]), alice)
    await a.send(msg(alice.did, bob.did, "to-the-new-one"))
    assert (await recv_json(new))["id"] == "to-the-new-one"
    await new.close()
    await a.close()


async def test_stale_recipient_gets_frames_on_reconnect_only(cluster: ServerPair) -> None:
    """AGT's staleness rule, across replicas: no heartbeat for stale_after → stored, not live."""
    port = free_port()
    extra = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agt_mesh",
            "relay",
            "--nats",
            ",".join(cluster.nats.urls if cluster.nats else []),
            "--serve",
            "relay",
            "--relay-port",
            str(port),
            "--stale-after",
            "1",
            "--log-level",
            "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, extra, Path("/dev/null"), timeout=60)
        alice, bob = identity("cl-stale-a"), identity("cl-stale-b")
        b = await online(ws(url), bob)
        a = await online(ws(cluster.relay_urls[0]), alice)
        await asyncio.sleep(1.5)  # bob sent no heartbeat: stale
        await a.send(msg(alice.did, bob.did, "while-stale"))
        await silence(b, 0.5)
        await b.send(encode_frame(heartbeat_frame(bob.did, now_ts())))
        await asyncio.sleep(0.1)
        await a.send(msg(alice.did, bob.did, "fresh-again"))
        assert (await recv_json(b))["id"] == "fresh-again"
        await ack(b, "fresh-again")
        await b.close()
        b, pushed = await online_with_pushed(ws(cluster.relay_urls[1]), bob)
        assert [f["id"] for f in pushed] == ["while-stale"]
        await b.close()
        await a.close()
    finally:
        stop(extra)


async def test_health_and_spoofing(cluster: ServerPair) -> None:
    alice, bob, carol = identity("cl-h-a"), identity("cl-h-b"), identity("cl-h-c")
    a = await online(ws(cluster.relay_urls[0]), alice)
    b = await online(ws(cluster.relay_urls[1]), bob)
    await a.send(msg(carol.did, bob.did, "spoofed"))
    await silence(b)
    await a.send(msg(None, bob.did, "stamped"))
    got = await recv_json(b)
    assert (got["id"], got["from"]) == ("stamped", alice.did)
    async with httpx.AsyncClient() as http:
        h0 = (await http.get(cluster.relay_urls[0] + "/health")).json()
        h1 = (await http.get(cluster.relay_urls[1] + "/health")).json()
    assert h0["service"] == "agentmesh-relay" and h0["status"] == "healthy" and h0["store"] == "nats-jetstream"
    assert h0["connected_agents"] >= 1 and h1["connected_agents"] >= 1
    assert h0["replica"] != h1["replica"]
    await a.close()
    await b.close()


# --------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------


async def test_registry_replicas_share_records_and_hand_out_each_one_time_prekey_once(cluster: ServerPair) -> None:
    alice = identity("cl-reg-alice")
    r0, r1 = cluster.registry_urls
    async with httpx.AsyncClient(base_url=r0) as h0, httpx.AsyncClient(base_url=r1) as h1:
        assert (await register(h0, alice, ["cluster-chat"])).status_code == 201
        assert (await register(h1, alice)).status_code == 409  # the other replica knows it
        r = await h1.put(prekeys_path(alice.did), json=bundle(alice, list(range(40))), headers=auth(alice))
        assert (r.status_code, r.json()["otk_count"]) == (200, 40)

        async def fetch(h: httpx.AsyncClient) -> Any:
            r = await h.get(prekeys_path(alice.did))
            assert r.status_code == 200
            otk = r.json()["one_time_pre_key"]
            return otk and otk["key_id"]

        # 50 concurrent fetches split over both replicas: 40 distinct keys, then null
        got = await asyncio.gather(*(fetch(h0 if i % 2 else h1) for i in range(50)))
        keys = [k for k in got if k is not None]
        assert sorted(keys) == list(range(40)) and got.count(None) == 10
        r = await h0.get("/v1/discover", params={"capability": "cluster-chat"})
        assert [x["did"] for x in r.json()["results"]] == [alice.did]
        r = await h0.post(f"/v1/agents/{alice.did}/heartbeat", headers=auth(alice))
        assert r.status_code == 200
        r = await h1.post(f"/v1/agents/{alice.did}/heartbeat", headers=auth(alice))
        assert r.status_code == 429  # the throttle holds across replicas
        assert (await h1.get(f"/v1/agents/{alice.did}/presence")).json()["online"] is True
        assert (await h1.delete(f"/v1/agents/{alice.did}", headers=auth(alice))).status_code == 204
        assert (await h0.get(f"/v1/agents/{alice.did}")).status_code == 404
        r = await h0.get("/v1/discover", params={"capability": "cluster-chat"})
        assert r.json()["results"] == []


async def test_relay_per_recipient_cap(cluster: ServerPair) -> None:
    """The per-recipient cap is a stream limit: new frames are refused, old ones kept."""
    port = free_port()
    assert cluster.nats is not None
    # a separate mesh (own stream) with a cap of 3
    extra = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import asyncio, sys\n"
            "from agt_mesh.cluster.relay import ClusterRelay\n"
            "async def main():\n"
            f"    r = ClusterRelay({cluster.nats.urls!r}, port={port}, max_queue_per_recipient=3,\n"
            "                     stream='CAPTEST', subject_prefix='captest', sessions_bucket='captest_sessions')\n"
            "    await r.start(); print('up', flush=True); await asyncio.Event().wait()\n"
            "asyncio.run(main())\n",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert extra.stdout is not None
        line = await asyncio.to_thread(extra.stdout.readline)
        assert line.strip() == b"up", line
        url = ws(f"http://127.0.0.1:{port}")
        alice, bob = identity("cl-cap-a"), identity("cl-cap-b")
        a = await online(url, alice)
        for i in range(5):
            await a.send(msg(alice.did, bob.did, f"cap-{i}"))
        await asyncio.sleep(0.3)
        b, pushed = await online_with_pushed(url, bob)
        assert [f["id"] for f in pushed] == ["cap-0", "cap-1", "cap-2"]
        await b.close()
        await a.close()
    finally:
        stop(extra)


def test_cli_refuses_fault_knobs_and_serve_without_nats(capsys: pytest.CaptureFixture[str]) -> None:
    from agt_mesh.dev.server import main

    assert main(["--serve", "relay"]) == 2
    assert "--serve needs --nats" in capsys.readouterr().err
    assert main(["--nats", "nats://127.0.0.1:1", "--knock-delay", "1"]) == 2
    assert "fault knobs" in capsys.readouterr().err


def test_cluster_bench_smoke(tmp_path: Path) -> None:
    """benchmarks/cluster_bench.py runs end to end (1 and 2 replicas) and loses nothing."""
    out = tmp_path / "cluster.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve().parent.parent / "benchmarks" / "cluster_bench.py"),
            "--agents",
            "6",
            "--seconds",
            "2",
            "--rate",
            "2",
            "--no-agt",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    runs = json.loads(out.read_text())["runs"]
    assert [r["relay_replicas"] for r in runs] == [1, 2]
    for r in runs:
        assert r["sent"] > 0 and r["lost"] == 0 and r["duplicated"] == 0
        assert r["nats_cpu_us_per_message"] > 0
