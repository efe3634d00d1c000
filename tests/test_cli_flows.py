"""``agt-mesh`` end to end: two terminals' worth of use against real servers.

Every command runs as a subprocess (``python -m agt_mesh``), in text and ``--json`` mode,
against the dev relay and the real AGT core 5.0.0 relay + registry (loopback).
"""

from __future__ import annotations

import json
import os
import pty
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import PY, ROOT, Listener, clean_env, cli, new_identity, ok
from servers import ServerPair

from agt_mesh.cli.errors import EXIT_IO, EXIT_USAGE


@pytest.fixture(scope="module", params=["dev", "agt-5.0.0"])
def servers(request: pytest.FixtureRequest) -> Iterator[ServerPair]:
    pair = ServerPair(request.param).start()
    yield pair
    pair.stop()


@pytest.fixture(scope="module")
def dev() -> Iterator[ServerPair]:
    pair = ServerPair("dev").start()
    yield pair
    pair.stop()


def urls(pair: ServerPair, state: Path) -> list[str]:
    return ["--relay", pair.relay_url, "--registry", pair.registry_url, "--state-dir", str(state)]


def unique(name: str) -> str:
    return f"{name}-{os.urandom(3).hex()}"


SESSION_KEYS = {
    "peer",
    "peer_name",
    "status",
    "status_text",
    "role",
    "kdf_profile",
    "e2e_verified",
    "verified",
    "accepted",
    "knock_pending",
    "knock_id",
    "candidates",
    "has_previous",
    "peer_fingerprint",
    "last_activity",
    "peer_identity_key",
    "ratchet",
    "inbox",
    "sequence",
}


def test_two_terminals(servers: ServerPair, tmp_path: Path) -> None:
    """identity new ×2; listen in one; send by display name in the other; session show on both."""
    a, b = tmp_path / "alice", tmp_path / "bob"
    did_a, did_b = new_identity(a), new_identity(b)
    alice, bob = unique("alice"), unique("bob")

    listener = Listener("--display-name", alice, "--count", "2", "--json", *urls(servers, a)).ready()
    # global flags after the subcommand, as scripts use them
    sent = ok(
        "send",
        "--relay",
        servers.relay_url,
        "--registry",
        servers.registry_url,
        "--state-dir",
        str(b),
        "--profile",
        "current",
        "--display-name",
        bob,
        "--to",
        alice,
        "hello alice",
    )
    assert sent.seconds < 30 and "KNOCK" in sent.out
    second = ok("send", "--to", alice, "--json-payload", '{"n": 2, "ok": true}', "--json", *urls(servers, b)).json()
    assert set(second) == {"id", "to", "to_input", "knock", "queued"}
    assert second["to"] == did_a and second["to_input"] == alice and second["knock"] is False

    res = listener.result()
    assert res.code == 0, str(res)
    got = res.json_lines()
    assert [m["payload"] for m in got] == ["hello alice", {"n": 2, "ok": True}]
    for m in got:
        assert m["from"] == did_b and m["from_name"] == bob
        assert {"from", "payload", "id", "received_at"} <= set(m)
        assert isinstance(m["received_at"], float)
    assert got[1]["id"] == second["id"]

    # the listener has exited: its session is in the state store
    seen_by_alice = ok("session", "show", bob, "--json", *urls(servers, a)).json()
    assert set(seen_by_alice) == SESSION_KEYS
    assert seen_by_alice["peer"] == did_b and seen_by_alice["status"] == "established"
    assert seen_by_alice["role"] == "responder" and seen_by_alice["e2e_verified"] is True
    # counters are per chain, and end-to-end receipts turn the ratchet at timing-dependent
    # moments, so only the shape is fixed: a receive chain exists and the text shows its count
    recv_n = seen_by_alice["ratchet"]["recv_n"]
    assert seen_by_alice["ratchet"]["has_receive_chain"] is True and 0 <= recv_n <= 2
    assert seen_by_alice["inbox"] == 0
    # both messages were numbered by bob's client and delivered in order, none held back
    assert seen_by_alice["sequence"] == {"sent": 0, "delivered_in_order": 2, "held_back": 0}
    text = ok("session", "show", did_b, *urls(servers, a)).out
    assert "established" in text and f"{recv_n} message(s)" in text
    assert "held back:        0 message(s)" in text

    seen_by_bob = ok("session", "show", alice, "--json", *urls(servers, b)).json()
    assert seen_by_bob["peer"] == did_a and seen_by_bob["role"] == "initiator"
    assert seen_by_bob["ratchet"]["can_send"] is True and seen_by_bob["kdf_profile"] == "spec"
    assert seen_by_bob["sequence"]["sent"] == 2
    # the peer identity key each side pinned is the other's public X25519 key
    pub_a = ok("identity", "show", "--json", "--state-dir", str(a)).json()
    assert seen_by_bob["peer_identity_key"] == pub_a["x25519_public"]
    assert pub_a["display_name"] == alice  # remembered from --display-name
    text = ok("session", "show", alice, *urls(servers, b)).out
    assert "initiator" in text

    # bob's display name was remembered: a send without --display-name keeps it registered
    ok("send", "--to", did_a, "third", *urls(servers, b))
    found = ok("discover", bob, "--json", *urls(servers, a)).json()["results"]
    assert [r["did"] for r in found] == [did_b]


def test_messaging_commands(dev: ServerPair, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    did_a, did_b = new_identity(a), new_identity(b)
    alice, bob = unique("alice"), unique("bob")
    ua, ub = urls(dev, a), urls(dev, b)

    # listen in text mode; a file and stdin as payloads
    listener = Listener("--display-name", alice, "--count", "2", *ua).ready()
    note = tmp_path / "note.txt"
    note.write_text("from a file\nline 2")
    ok("send", "--display-name", bob, "--to", alice, "--file", str(note), *ub)
    ok("send", "--to", did_a, "--file", "-", *ub, input="from stdin")
    res = listener.result()
    assert res.code == 0, str(res)
    lines = res.out.splitlines()
    assert len(lines) == 2
    assert f"{bob} ({did_b})" in lines[0] and '"from a file\\nline 2"' in lines[0]
    assert lines[1].endswith('"from stdin"')

    # alice is offline: messages wait at the relay; inbox fetches, prints and consumes them
    ok("send", "--to", alice, "one", *ub)
    ok("send", "--to", alice, "--json-payload", "[1, 2]", *ub)
    box = ok("inbox", "--json", *ua).json_lines()
    assert [m["payload"] for m in box] == ["one", [1, 2]]
    assert all(m["from"] == did_b and m["from_name"] == bob for m in box)
    empty = ok("inbox", *ua)
    assert empty.out == "" and "no messages" in empty.err
    assert ok("inbox", "--local", "--json", *ua).out == ""

    # alice answers as the responder (she has received, so she can send)
    ok("send", "--to", bob, "hi bob", *ua)
    res = ok("inbox", *ub)
    assert f'{alice} ({did_a}): "hi bob"' in res.out

    # listen --timeout: without --count it is a time limit (exit 0); with --count a failure
    assert ok("listen", "--timeout", "1", *ua).out == ""
    res = cli("listen", "--count", "1", "--timeout", "1", *ua)
    assert res.code == EXIT_IO and "0 of 1" in res.err

    # discover and peer
    found = ok("discover", alice, "--json", *ub).json()
    assert found["capability"] == alice and found["claimants"] == 1
    assert found["bound"] == did_a  # bob's `send --to alice` above bound the name
    (record,) = found["results"]
    assert set(record) == {
        "did",
        "display_name",
        "capabilities",
        "last_seen",
        "reputation_score",
        "metadata",
        "claims_name",
        "bound",
    }
    assert record["did"] == did_a and alice in record["capabilities"] and record["claims_name"] and record["bound"]
    assert did_a in ok("discover", alice, *ub).out
    nobody = ok("discover", unique("nobody"), *ub)
    assert nobody.out == "" and "no agent" in nobody.err

    peer = ok("peer", alice, "--json", *ub).json()
    assert set(peer) == {"did", "display_name", "registry", "local", "session", "fingerprint"}
    assert peer["did"] == did_a and peer["registry"]["did"] == did_a
    assert len(peer["fingerprint"].split()) == 6
    assert peer["session"]["status"] == "established" and peer["local"]["e2e_verified"] is True
    text = ok("peer", did_a, *ub).out
    assert "registered" in text and "established" in text
    res = cli("peer", unique("ghost"), *ub)
    assert res.code == EXIT_USAGE and "no agent named" in res.err
    unknown = ok("peer", "did:mesh:" + "0" * 32, "--json", *ub).json()
    assert unknown["registry"] is None and unknown["session"] is None
    res = cli("send", "--to", unique("ghost"), "hi", *ub)
    assert res.code == EXIT_USAGE and "no agent named" in res.err
    res = cli("send", "--to", "did:mesh:" + "0" * 32, "hi", *ub)
    assert res.code == EXIT_USAGE and "no pre-key bundle" in res.err

    # sessions
    listing = ok("session", "list", "--json", *ub).json()
    assert [s["peer"] for s in listing["sessions"]] == [did_a]
    assert did_a in ok("session", "list", *ub).out
    prefix = did_a[len("did:mesh:") : len("did:mesh:") + 6]
    assert ok("session", "show", prefix, "--json", *ub).json()["peer"] == did_a

    # bundle
    shown = ok("bundle", "show", "--json", *ua).json()
    assert set(shown) == {
        "did",
        "identity_key",
        "identity_key_ed",
        "signed_pre_key",
        "retired_signed_pre_keys",
        "one_time_pre_keys",
        "one_time_pre_key_ids",
    }
    assert shown["did"] == did_a and shown["signed_pre_key"]["key_id"] == 0
    assert shown["one_time_pre_keys"] == 19  # 20 uploaded, one used by bob's KNOCK
    assert "one-time pre-keys" in ok("bundle", "show", *ua).out
    up = ok("bundle", "upload", "--otks", "25", "--rotate", "--json", *ua).json()
    assert set(up) == {
        "did",
        "registry",
        "registered",
        "signed_pre_key_id",
        "one_time_pre_keys",
        "registry_otk_count",
        "display_name",
    }
    assert up["registered"] == "existing" and up["signed_pre_key_id"] == 1 and up["one_time_pre_keys"] == 25
    assert up["display_name"] == alice
    assert "uploaded signed pre-key #2" in ok("bundle", "upload", "--rotate", *ua).out
    # a KNOCK made from the new bundle still works: reset bob's session and send again
    assert ok("session", "reset", alice, "--json", *ub).json() == {"peer": did_a, "reset": True, "moved_to_inbox": 0}
    assert ok("session", "list", "--json", *ub).json() == {"sessions": []}
    again = ok("send", "--to", alice, "after reset", "--json", *ub).json()
    assert again["knock"] is True
    box = ok("inbox", "--json", *ua).json_lines()
    assert [m["payload"] for m in box] == ["after reset"]
    assert "reset" in ok("session", "reset", did_a, *ub).out

    # doctor, all green
    doc = ok("doctor", "--json", *ua).json()
    assert doc["ok"] is True and doc["did"] == did_a
    names = [c["name"] for c in doc["checks"]]
    assert names == [
        "identity",
        "state",
        "lock",
        "profile",
        "registry",
        "clock",
        "registration",
        "display_name",
        "prekeys",
        "relay",
    ]
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in doc["checks"])
    assert all(c["status"] == "ok" for c in doc["checks"]), doc
    text = ok("doctor", *ua).out
    assert "all checks passed" in text and "[ok  ] relay" in text
    assert "uploaded minus what KNOCKs consumed" in text


def test_decode_with_identity_never_advances_state(dev: ServerPair, tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    did_a, did_b = new_identity(a), new_identity(b)
    alice = unique("alice")
    ua, ub = urls(dev, a), urls(dev, b)
    ok("bundle", "upload", "--display-name", alice, *ua)  # registered, offline
    frames = tmp_path / "frames.jsonl"

    # 1. KNOCK + first message while alice is offline: no session on her side yet
    ok("send", "--to", alice, "first", "--save-frames", str(frames), *ub)
    knock, first = (json.loads(line) for line in frames.read_text().splitlines())
    assert knock["type"] == "knock" and first["type"] == "message"
    decoded = ok("decode", "-", "--identity", "--json", *ua, input=frames.read_text()).json_lines()
    assert decoded[0]["establishment"]["otk"] == 0
    assert any("still hold one-time pre-key #0" in n for n in decoded[0]["notes"])
    assert any("belongs to the sender" in n for n in decoded[0]["notes"])
    # the same KNOCK with someone else's identity key in it: a forged `from`
    forged = dict(knock, establishment={**knock["establishment"], "ik": first["header"]["dh"]})
    notes = ok("decode", json.dumps(forged), "--json").json()["notes"]
    assert any("NOT the sender's" in n for n in notes), notes
    assert decoded[1]["decrypted"]["ok"] is False and "no session" in decoded[1]["decrypted"]["error"]

    # alice fetches them
    assert [m["payload"] for m in ok("inbox", "--json", *ua).json_lines()] == ["first"]
    notes = ok("decode", json.dumps(knock), "--identity", "--json", *ua).json()["notes"]
    assert any("made our current session" in n for n in notes)

    # 2. a second message while alice is offline: decode decrypts it on a copy
    frames.unlink()
    ok("send", "--to", alice, "second", "--save-frames", str(frames), *ub)
    sent = [json.loads(line) for line in frames.read_text().splitlines()]
    # (also saved: acks, and our KNOCK re-sent on connect while its answer was on its way)
    (second,) = (f for f in sent if f["type"] == "message")
    before = ok("session", "show", did_b, "--json", *ua).json()["ratchet"]
    out: dict[str, Any] = ok("decode", json.dumps(second), "--identity", "--json", *ua).json()
    assert out["decrypted"] == {"ok": True, "ratchet": "primary", "payload": "second", "error": None}
    text = ok("decode", json.dumps(second), "--identity", *ua).out
    assert "stored state unchanged" in text
    assert ok("session", "show", did_b, "--json", *ua).json()["ratchet"] == before
    # the real receive still works, and afterwards decode recognises a duplicate
    assert [m["payload"] for m in ok("inbox", "--json", *ua).json_lines()] == ["second"]
    out = ok("decode", json.dumps(second), "--identity", "--json", *ua).json()
    assert out["decrypted"]["ok"] is False and "already received" in out["decrypted"]["error"]

    # our own frames cannot be decrypted afterwards, and say so
    out = ok("decode", json.dumps(second), "--identity", "--json", *ub).json()
    assert "decrypted" not in out and any("sent by us" in n for n in out["notes"])
    assert did_a in out["to"]


def test_sigterm_stops_listen_cleanly_and_progress_is_tty_only(dev: ServerPair, tmp_path: Path) -> None:
    a = tmp_path / "a"
    new_identity(a)
    listener = Listener("--display-name", unique("alice"), *urls(dev, a)).ready()
    listener.proc.send_signal(signal.SIGTERM)
    res = listener.result(timeout=15)
    assert res.code == 143 and "stopped (SIGTERM)" in res.err, str(res)
    assert "\x1b[" not in res.err  # no progress line without a terminal
    # the lock was released and the state is intact
    assert ok("listen", "--timeout", "0.5", *urls(dev, a)).code == 0

    # with a terminal on stderr, a progress line is drawn (and erased)
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [PY, "-m", "agt_mesh", "listen", "--timeout", "1.5", *urls(dev, a)],
        stdout=subprocess.PIPE,
        stderr=slave,
        env=clean_env(TERM="xterm"),
        cwd=ROOT,
    )
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=20) == 0
    assert b"\r\x1b[K" in seen and b"waiting for messages" in seen
