"""``StateStore`` (``agt_mesh/shell/store.py``): the SQLite state of one identity.

Opening (creation, permissions, newer schemas, damaged and foreign files, another identity's
store), every commit/load round trip, and a store written by an earlier version: the
``tests/fixtures/state/store-v2`` directories (SQLite schema 2, session state version 2),
opened, migrated and resumed by real clients through a dev relay.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
from helpers import Net, identity
from servers import ServerPair

from agt_mesh.core.identity import Identity
from agt_mesh.core.session import SESSION_STATE_VERSION, PeerSession
from agt_mesh.core.x3dh import KdfProfile, PreKeyStore
from agt_mesh.errors import MeshStateError
from agt_mesh.shell.client import MeshClient
from agt_mesh.shell.inbox import InboundMessage
from agt_mesh.shell.store import SCHEMA_VERSION, SEEN_WINDOW, STORE_NAME, PeerMeta, StateStore, check_state_dir

FIXTURES = Path(__file__).parent / "fixtures" / "state"
DID = "did:mesh:" + "a" * 32
PEER = "did:mesh:" + "b" * 32


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(tmp_path / "state", did=DID) as s:
        yield s


def _user_version(path: Path) -> int:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return int(con.execute("PRAGMA user_version").fetchone()[0])
    finally:
        con.close()


def _session() -> PeerSession:
    """An established session (both sides verified), as bob holds it."""
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    return b.session(a)


def _msg(i: int, **kw: Any) -> InboundMessage:
    return InboundMessage(PEER, {"i": i, "t": "✓"}, f"m-{i}", 1_700_000_000.0 + i, **kw)


# --------------------------------------------------------------------------------------
# opening
# --------------------------------------------------------------------------------------


def test_open_creates_a_private_store(tmp_path: Path) -> None:
    d = tmp_path / "new" / "state"
    s = StateStore(d, did=DID)
    assert not s.db_open
    with pytest.raises(MeshStateError, match="not open"):
        _ = s.db
    assert s.open() is s and s.open() is s  # a second open is a no-op
    assert d.stat().st_mode & 0o777 == 0o700
    assert (d / STORE_NAME).stat().st_mode & 0o777 == 0o600
    for side in ("-wal", "-shm"):
        if Path(f"{d / STORE_NAME}{side}").exists():
            assert Path(f"{d / STORE_NAME}{side}").stat().st_mode & 0o777 == 0o600
    assert s.get_meta("did") == DID
    assert s.stats() | {"bytes": 0} == {
        "path": str(d / STORE_NAME),
        "schema_version": SCHEMA_VERSION,
        "sessions": 0,
        "peers": 0,
        "inbox": 0,
        "pinned_keys": 0,
        "names": 0,
        "one_time_prekeys": 0,
        "seen_ids": 0,
        "bytes": 0,
    }
    s.close()
    s.close()  # idempotent
    assert not s.db_open
    assert _user_version(d / STORE_NAME) == SCHEMA_VERSION
    with StateStore(d, did=DID) as again:  # reopening an existing store
        assert again.get_meta("did") == DID and again.db_open
    assert not again.db_open


def test_open_refuses_unsafe_permissions(tmp_path: Path) -> None:
    d = tmp_path / "p"
    with StateStore(d, did=DID):
        pass
    for mode in (0o777, 0o720, 0o702):
        os.chmod(d, mode)
        with pytest.raises(MeshStateError, match=f"writable by other users .*chmod 700 {d}"):
            StateStore(d, did=DID).open()
    os.chmod(d, 0o700)
    for mode in (0o644, 0o640, 0o604, 0o660):
        os.chmod(d / STORE_NAME, mode)
        with pytest.raises(MeshStateError, match=f"accessible by other users .*chmod 600 {d / STORE_NAME}"):
            StateStore(d, did=DID).open()
    os.chmod(d / STORE_NAME, 0o600)
    StateStore(d, did=DID).open().close()


def test_open_refuses_what_is_not_a_directory_or_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(MeshStateError, match="is not a directory"):
        StateStore(tmp_path / "file", did=DID).open()
    with pytest.raises(MeshStateError, match="does not exist"):
        check_state_dir(tmp_path / "missing", create=False)
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    target = tmp_path / "elsewhere.db"
    target.write_bytes(b"")
    os.chmod(target, 0o600)
    (d / STORE_NAME).symlink_to(target)
    with pytest.raises(MeshStateError, match=r"not a regular file|symbolic link"):
        StateStore(d, did=DID).open()
    (d / STORE_NAME).unlink()
    (d / STORE_NAME).mkdir()
    with pytest.raises(MeshStateError, match="not a regular file"):
        StateStore(d, did=DID).open()


def test_open_refuses_a_newer_schema_and_leaves_it_untouched(tmp_path: Path) -> None:
    d = tmp_path / "n"
    with StateStore(d, did=DID) as s:
        s.set_meta("probe", "1")
    con = sqlite3.connect(d / STORE_NAME)
    con.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    con.commit()
    con.close()
    before = (d / STORE_NAME).read_bytes()
    with pytest.raises(MeshStateError, match=f"schema version {SCHEMA_VERSION + 1}, newer than this SDK"):
        StateStore(d, did=DID).open()
    assert (d / STORE_NAME).read_bytes() == before
    assert _user_version(d / STORE_NAME) == SCHEMA_VERSION + 1


def test_open_refuses_a_corrupted_or_truncated_file(tmp_path: Path) -> None:
    d = tmp_path / "c"
    with StateStore(d, did=DID) as s:
        s.commit(sessions={PEER: _session()}, inbox=[_msg(1)])
        s.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    good = (d / STORE_NAME).read_bytes()
    assert len(good) > 4096
    for data in (good[:100], good[: 4096 + 100], b"not a database at all" * 100, b"\x00" * 8192):
        (d / STORE_NAME).write_bytes(data)
        for side in ("-wal", "-shm"):
            Path(f"{d / STORE_NAME}{side}").unlink(missing_ok=True)
        with pytest.raises(MeshStateError) as err:
            StateStore(d, did=DID).open()
        assert "corrupted or truncated" in str(err.value) or "not an agt-mesh state store" in str(err.value)
        assert err.value.__cause__ is None
        assert (d / STORE_NAME).read_bytes() == data, "a damaged store is never replaced"


def test_an_empty_file_becomes_a_new_store(tmp_path: Path) -> None:
    d = tmp_path / "e"
    d.mkdir(mode=0o700)
    fd = os.open(d / STORE_NAME, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    with StateStore(d, did=DID) as s:
        assert s.get_meta("did") == DID


def test_open_refuses_a_foreign_sqlite_file(tmp_path: Path) -> None:
    d = tmp_path / "f"
    d.mkdir(mode=0o700)
    fd = os.open(d / STORE_NAME, os.O_CREAT | os.O_WRONLY, 0o600)
    os.close(fd)
    con = sqlite3.connect(d / STORE_NAME)
    con.execute("CREATE TABLE something_else (x)")
    con.commit()
    con.close()
    with pytest.raises(MeshStateError, match="not an agt-mesh state store"):
        StateStore(d, did=DID).open()


def test_open_refuses_another_identitys_store(tmp_path: Path) -> None:
    d = tmp_path / "o"
    with StateStore(d, did=DID):
        pass
    other = StateStore(d, did=PEER)
    with pytest.raises(MeshStateError, match=f"belongs to {DID}, not to {PEER}"):
        other.open()
    assert not other.db_open
    with StateStore(d, did=DID) as s:
        assert s.get_meta("did") == DID


def test_synchronous_mode_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="synchronous"):
        StateStore(tmp_path, did=DID, synchronous="OFF")
    with StateStore(tmp_path / "full", did=DID, synchronous="FULL") as s:
        assert s.db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


# --------------------------------------------------------------------------------------
# commit / load round trips
# --------------------------------------------------------------------------------------


def test_sessions_round_trip_and_delete(store: StateStore) -> None:
    live = _session()
    fixture = PeerSession.from_bytes((FIXTURES / "session-v3.msgpack").read_bytes())
    store.commit(sessions={live.peer: live, fixture.peer: fixture})
    loaded = {s.peer: s for s in store.load_sessions()}
    assert set(loaded) == {live.peer, fixture.peer}
    assert loaded[live.peer].to_bytes() == live.to_bytes()
    assert loaded[fixture.peer].to_bytes() == (FIXTURES / "session-v3.msgpack").read_bytes()
    # stored as the current session state version
    for (state,) in store.db.execute("SELECT state FROM sessions"):
        assert msgpack.unpackb(state)["v"] == SESSION_STATE_VERSION
    live.failures = 3
    store.commit(sessions={live.peer: live})  # replaced in place
    assert {s.peer: s.failures for s in store.load_sessions()}[live.peer] == 3
    store.commit(sessions={live.peer: None})
    assert [s.peer for s in store.load_sessions()] == [fixture.peer]


def test_sessions_of_earlier_versions_load(store: StateStore) -> None:
    for i, name in enumerate(("session-v1", "session-v2")):
        blob = (FIXTURES / f"{name}.msgpack").read_bytes()
        with store.transaction() as db:
            db.execute("INSERT INTO sessions(peer, state, updated_at) VALUES (?, ?, 0)", (f"p{i}", blob))
    loaded = store.load_sessions()
    assert [len(s.held) for s in loaded] == [0, 2]
    assert loaded[0].primary is not None and loaded[0].primary.to_bytes() == loaded[1].primary.to_bytes()  # type: ignore[union-attr]


@pytest.mark.parametrize("blob", [b"", b"\xc1", b"\x81\xa1v\x63", msgpack.packb({"v": 3, "peer": "x"})])
def test_a_corrupted_session_is_refused_with_its_peer(store: StateStore, blob: bytes) -> None:
    with store.transaction() as db:
        db.execute("INSERT INTO sessions(peer, state, updated_at) VALUES (?, ?, 0)", (PEER, blob))
    with pytest.raises(MeshStateError, match=f"session with {PEER} is corrupted") as err:
        store.load_sessions()
    # the only context is the session's own MeshStateError, which keeps none (no msgpack error)
    inner = err.value.__context__
    assert isinstance(inner, MeshStateError) and str(inner) in str(err.value)
    assert inner.__context__ is None and inner.__cause__ is None


def test_peers_merge(store: StateStore) -> None:
    store.commit(peers=[PeerMeta(PEER, KdfProfile.LEGACY, "bob", True, True)])
    store.commit(peers=[PeerMeta(PEER)])  # nothing known: keeps what was stored
    store.commit(peers=[PeerMeta(DID, None, None, False, False)])
    assert sorted(store.load_peers(), key=lambda m: m.did) == sorted(
        [PeerMeta(PEER, KdfProfile.LEGACY, "bob", True, True), PeerMeta(DID)], key=lambda m: m.did
    )
    # profile and name are replaced by newer values; the verified and receipts latches never drop
    store.commit(peers=[PeerMeta(PEER, KdfProfile.SPEC, "robert", False, False)])
    assert [m for m in store.load_peers() if m.did == PEER] == [PeerMeta(PEER, KdfProfile.SPEC, "robert", True, True)]


def test_seen_ids_keep_order_and_a_bounded_window(store: StateStore) -> None:
    store.commit(seen=["a", "b"])
    store.commit(seen=["b", "c"])  # already seen ids are not added again
    assert store.load_seen_ids() == ["a", "b", "c"]
    batch = 500
    for start in range(0, SEEN_WINDOW + 3 * batch, batch):
        store.commit(seen=[f"id-{i}" for i in range(start, start + batch)])
    ids = store.load_seen_ids()
    assert len(ids) <= SEEN_WINDOW + 1000, "trimmed now and then"
    assert len(ids) >= SEEN_WINDOW
    assert ids[-1] == f"id-{SEEN_WINDOW + 3 * batch - 1}" and "a" not in ids
    assert ids == sorted(ids, key=lambda i: int(i[3:])), "oldest first"


def test_inbox_round_trip_and_consume(store: StateStore) -> None:
    msgs = [_msg(1), _msg(2, plaintext=True), _msg(3, sender_name="bob")]
    store.commit(inbox=msgs)
    store.commit(inbox=[_msg(1)])  # the same id again: stored once
    assert store.load_inbox() == msgs
    assert store.consume(["m-2", "m-unknown"]) == 1
    assert store.consume([]) == 0
    assert store.consume(["m-2"]) == 0
    assert [m.message_id for m in store.load_inbox()] == ["m-1", "m-3"]
    assert store.stats()["inbox"] == 2


def test_unconfirmed_frames_round_trip(store: StateStore) -> None:
    frames = [{"type": "message", "id": f"u-{i}", "n": i, "text": "ü"} for i in range(3)]
    store.commit(sent=[(PEER, f["id"], f) for f in frames])
    got = store.load_unconfirmed()
    assert [(p, i, f) for p, i, f, _ in got] == [(PEER, f["id"], f) for f in frames]
    assert all(isinstance(t, float) and t > 1e9 for *_, t in got)
    store.commit(confirmed=["u-1", "u-unknown"])
    assert [i for _, i, _, _ in store.load_unconfirmed()] == ["u-0", "u-2"]


def test_prekeys_round_trip(store: StateStore) -> None:
    keys = PreKeyStore(identity("store-owner"))
    keys.generate_signed_pre_key(os.urandom, created_at=1.0)
    keys.generate_signed_pre_key(os.urandom, created_at=2.0)  # the first is retired
    keys.generate_one_time_pre_keys(5, os.urandom)
    keys.take_one_time_pre_key(2)
    store.commit(prekeys=keys)
    fresh = PreKeyStore(keys.identity)
    assert store.load_prekeys(fresh) is True
    assert fresh.signed_pre_key == keys.signed_pre_key
    assert fresh.retired_signed_pre_keys == keys.retired_signed_pre_keys
    assert fresh.one_time_pre_keys == keys.one_time_pre_keys
    assert (fresh.next_spk_id, fresh.next_otk_id) == (2, 5)
    assert store.load_prekeys(PreKeyStore(keys.identity)) is True
    with StateStore(store.dir.parent / "empty", did=DID) as empty:
        assert empty.load_prekeys(PreKeyStore(keys.identity)) is False


def test_a_commit_is_all_or_nothing(store: StateStore) -> None:
    session = _session()
    with pytest.raises(ValueError):
        store.commit(
            sessions={session.peer: session},
            seen=["s-1"],
            inbox=[InboundMessage(PEER, float("nan"), "bad", 0.0)],  # not JSON: fails mid-commit
        )
    assert store.load_sessions() == [] and store.load_seen_ids() == [] and store.load_inbox() == []
    assert not store.db.in_transaction
    store.commit(sessions={session.peer: session}, seen=["s-1"])
    assert len(store.load_sessions()) == 1


def test_transactions_nest_and_roll_back(store: StateStore) -> None:
    with pytest.raises(RuntimeError), store.transaction():
        store.set_meta("a", "1")  # nested: committed by the outer transaction only
        raise RuntimeError
    assert store.get_meta("a") is None
    with store.transaction():
        store.set_meta("a", "2")
    assert store.get_meta("a") == "2"


def test_delete_session_moves_held_messages_to_the_inbox(store: StateStore) -> None:
    session = PeerSession.from_bytes((FIXTURES / "session-v3.msgpack").read_bytes())
    held = [h for h in session.held if h.payload is not None]
    assert held and len(held) < len(session.held)  # one slot was taken by a duplicate
    store.commit(sessions={session.peer: session}, peers=[PeerMeta(session.peer, display_name="bob")])
    assert store.delete_session(session.peer) == len(held)
    assert store.load_sessions() == []
    inbox = store.load_inbox()
    assert [(m.sender, m.message_id, m.payload, m.sender_name) for m in inbox] == [
        (session.peer, h.message_id, json.loads(h.payload), "bob") for h in held if h.payload
    ]
    assert store.delete_session(session.peer) == 0  # nothing left
    with store.transaction() as db:  # an unreadable session is deleted too, nothing to move
        db.execute("INSERT INTO sessions(peer, state, updated_at) VALUES (?, ?, 0)", (PEER, b"\xc1"))
    assert store.delete_session(PEER) == 0 and store.load_sessions() == []


# --------------------------------------------------------------------------------------
# a store written by an earlier version
# --------------------------------------------------------------------------------------


def _copy_fixture_store(tmp_path: Path) -> tuple[dict[str, Path], dict[str, Any]]:
    facts = json.loads((FIXTURES / "store-v2.json").read_text())
    dirs = {}
    for name in ("alice", "bob"):
        d = dirs[name] = tmp_path / name
        shutil.copytree(FIXTURES / "store-v2" / name, d)
        os.chmod(d, 0o700)
        for f in d.iterdir():
            os.chmod(f, 0o600)
    return dirs, facts


def test_the_fixture_store_is_what_an_earlier_version_wrote() -> None:
    facts = json.loads((FIXTURES / "store-v2.json").read_text())
    assert facts["schema_version"] == 2
    for name in ("alice", "bob"):
        db = FIXTURES / "store-v2" / name / STORE_NAME
        assert _user_version(db) == 2
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        states = [bytes(s) for (s,) in con.execute("SELECT state FROM sessions")]
        con.close()
        assert [msgpack.unpackb(s)[0] for s in states] == [2] == facts[f"{name}_session_versions"]


def test_a_store_from_an_earlier_version_opens_migrated(tmp_path: Path) -> None:
    dirs, facts = _copy_fixture_store(tmp_path)
    sessions = {}
    for name, peer in (("alice", "bob"), ("bob", "alice")):
        with StateStore(dirs[name], did=facts["dids"][name]) as s:
            assert _user_version(s.path) == SCHEMA_VERSION
            (session,) = s.load_sessions()
            assert session.peer == facts["dids"][peer]
            assert session.establishment_ek.hex() == facts["establishment_ek"][name]
            assert session.verified and session.accepted
            sessions[name] = session
            if name == "bob":
                assert [m.message_id for m in s.load_inbox()] == facts["bob_inbox"]
                assert [m.payload for m in s.load_inbox()] == ["read, not consumed"]
            else:
                assert [i for _, i, _, _ in s.load_unconfirmed()] == facts["alice_unconfirmed"]
            assert s.load_seen_ids() and s.load_prekeys(PreKeyStore(Identity.generate(os.urandom)))
    # the sessions still fit together: bob decrypts what alice's restored session sends
    out = sessions["bob"].decrypt(*sessions["alice"].primary.encrypt(b"next", os.urandom), os.urandom, keep_own=False)  # type: ignore[union-attr]
    assert (out.plaintext, out.source) == (b"next", "primary")


@pytest.fixture(scope="module")
def dev() -> Iterator[ServerPair]:
    pair = ServerPair("dev").start()
    yield pair
    pair.stop()


async def test_a_store_from_an_earlier_version_resumes_its_session(tmp_path: Path, dev: ServerPair) -> None:
    """Real clients on the fixture directories: bob still gets the message he had read but
    not consumed, alice re-sends the one that was never confirmed, and the session carries
    on both ways without a new KNOCK."""
    dirs, facts = _copy_fixture_store(tmp_path)
    alice_did, bob_did = facts["dids"]["alice"], facts["dids"]["bob"]

    def client(name: str) -> MeshClient:
        return MeshClient(
            dirs[name] / "identity.json",
            relay_url=dev.relay_url,
            registry_url=dev.registry_url,
            receipt_timeout=0.5,
        )

    a, b = client("alice"), client("bob")
    async with a, b:
        unread = await b.wait_for(timeout=10)
        assert (unread.message_id, unread.payload) == (facts["bob_inbox"][0], "read, not consumed")
        away = await b.wait_for(timeout=15)
        assert (away.message_id, away.payload) == (facts["alice_unconfirmed"][0], "while you were away")
        await a.send(bob_did, "after the upgrade")
        assert (await b.wait_for(timeout=10)).payload == "after the upgrade"
        await b.send(alice_did, "welcome back")
        assert (await a.wait_for(timeout=10)).payload == "welcome back"
        assert a.protocol.sessions[bob_did].establishment_ek.hex() == facts["establishment_ek"]["alice"]
        assert b.protocol.sessions[alice_did].establishment_ek.hex() == facts["establishment_ek"]["bob"]
        assert a.protocol.unanswered_knocks() == []
    for name in ("alice", "bob"):  # written back in the current format
        con = sqlite3.connect(f"file:{dirs[name] / STORE_NAME}?mode=ro", uri=True)
        (state,) = [bytes(s) for (s,) in con.execute("SELECT state FROM sessions")]
        con.close()
        assert msgpack.unpackb(state)["v"] == SESSION_STATE_VERSION
