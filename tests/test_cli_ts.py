"""``agt-mesh`` against a TypeScript peer (npm ``@microsoft/agent-governance-sdk@4.0.0``).

The TS side is ``interop/ts_peer.js`` (JSON-line controlled); the CLI runs as
subprocesses.  Both directions, with each side opening the session, on the real AGT core
5.0.0 servers (TS with the POP shims) and on agentmesh-platform 3.7.0 (TS stock).
npm 4.0.0 uses the legacy X3DH KDF: we initiate with ``--profile ts-sdk-4``; as responder
the KDF is detected.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import Listener, TSPeer, new_identity, ok
from servers import ServerPair


@pytest.fixture(scope="module", params=["agt-5.0.0", "agt-3.7.0"])
def servers(request: pytest.FixtureRequest) -> Iterator[ServerPair]:
    pair = ServerPair(request.param).start()
    yield pair
    pair.stop()


@pytest.fixture
def ts(servers: ServerPair, node_modules: Path, tmp_path: Path) -> Iterator[TSPeer]:
    peer = TSPeer(tmp_path / "ts-peer.log")
    name = f"tsbob-{os.urandom(3).hex()}"
    mode = "stock" if servers.kind == "agt-3.7.0" else "pop"
    peer.did = peer.call("init", relay=servers.relay_url, registry=servers.registry_url, mode=mode, name=name)["did"]
    peer.name = name  # type: ignore[attr-defined]
    peer.call("connect")
    yield peer
    peer.close()


def urls(pair: ServerPair, state: Path) -> list[str]:
    return ["--relay", pair.relay_url, "--registry", pair.registry_url, "--state-dir", str(state)]


def test_cli_opens_the_session(servers: ServerPair, ts: TSPeer, tmp_path: Path) -> None:
    a = tmp_path / "alice"
    did_a = new_identity(a)
    ua = urls(servers, a)
    name = ts.name  # type: ignore[attr-defined]

    sent = ok("send", "--profile", "ts-sdk-4", "--display-name", "py-alice", "--to", name, "hello ts", "--json", *ua)
    assert sent.json()["knock"] is True and sent.json()["to"] == ts.did
    assert ts.call("expect", **{"from": did_a}, count=1, within=15)["payloads"] == ["hello ts"]

    listener = Listener("--count", "1", "--json", "--timeout", "30", *ua).ready()
    ts.call("send", to=did_a, payload={"reply": "hi python"})
    res = listener.result()
    assert res.code == 0, str(res)
    (msg,) = res.json_lines()
    assert msg["from"] == ts.did and msg["payload"] == {"reply": "hi python"} and msg["from_name"] == name

    info = ok("session", "show", name, "--json", *ua).json()
    assert info["status"] == "established" and info["role"] == "initiator"
    assert info["kdf_profile"] == "legacy" and info["e2e_verified"] is True
    assert info["ratchet"]["recv_n"] == 1


def test_ts_opens_the_session(servers: ServerPair, ts: TSPeer, tmp_path: Path) -> None:
    c = tmp_path / "carol"
    did_c = new_identity(c)
    uc = urls(servers, c)

    listener = Listener("--display-name", "py-carol", "--count", "1", "--timeout", "30", *uc).ready()
    ts.call("send", to=did_c, payload="hello python")
    res = listener.result()
    assert res.code == 0, str(res)
    assert res.out.rstrip().endswith(f'{ts.did}): "hello python"'), res.out

    # our answer uses the KDF learned from the TS peer's KNOCK (no --profile needed)
    answer = ok("send", "--to", ts.did, "--json-payload", '{"back": 1}', "--json", *uc).json()
    assert answer["knock"] is False
    assert ts.call("expect", **{"from": did_c}, count=1, within=15)["payloads"] == [{"back": 1}]

    info = ok("session", "show", ts.did, "--json", *uc).json()
    assert info["role"] == "responder" and info["kdf_profile"] == "legacy"
    assert info["ratchet"]["recv_n"] == 1 and info["ratchet"]["send_n"] == 1
