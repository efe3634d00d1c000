"""Saved state (``agt_mesh.core.state_format``): named, versioned maps and their migrations.

The fixtures under ``tests/fixtures/state/`` are blobs written by earlier versions of this SDK
(``ratchet-v1``, ``session-v1``, ``session-v2``) and by the current one (``ratchet-v2``,
``session-v3``), each with a JSON file of what it must load as; ``generate_blobs.py`` there
records how they were made.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest
from helpers import Drbg

from agt_mesh.core import state_format as sf
from agt_mesh.core.ratchet import RATCHET_FORMAT, STATE_VERSION, DoubleRatchet
from agt_mesh.core.session import MAX_CANDIDATES, SESSION_FORMAT, SESSION_STATE_VERSION, PeerSession
from agt_mesh.errors import MeshStateError

FIXTURES = Path(__file__).parent / "fixtures" / "state"
RATCHETS = ["ratchet-v1", "ratchet-v2"]
SESSIONS = ["session-v1", "session-v2", "session-v3"]
#: the versions before these were positional arrays
FIRST_MAP_VERSION = {"ratchet": 2, "session": 3}


def _blob(name: str) -> bytes:
    return (FIXTURES / f"{name}.msgpack").read_bytes()


def _expected(name: str) -> dict[str, Any]:
    return dict(json.loads((FIXTURES / f"{name}.json").read_text()))


def _pack(value: object) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


def _load(name: str) -> DoubleRatchet | PeerSession:
    return DoubleRatchet.from_bytes(_blob(name)) if name.startswith("ratchet") else PeerSession.from_bytes(_blob(name))


def _hex(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def _check_ratchet(r: DoubleRatchet, exp: dict[str, Any]) -> None:
    """Every field of ``r`` against the fixture's record, then what it still does."""
    got = {
        "dhs_priv": r.dhs_priv.hex(),
        "dhs_pub": r.dhs_pub.hex(),
        "dhr": _hex(r.dhr),
        "rk": r.rk.hex(),
        "cks": _hex(r.cks),
        "ckr": _hex(r.ckr),
        "ns": r.ns,
        "nr": r.nr,
        "pn": r.pn,
        "max_skip": r.max_skip,
        "ad": r.ad.hex(),
        "skipped": [[dh.hex(), n, mk.hex()] for (dh, n), mk in (r.skipped or {}).items()],
        "old_dhrs": [o.hex() for o in r.old_dhrs],
    }
    assert got == {k: exp[k] for k in got}
    if "encrypts" in exp:  # the next message it sends is byte for byte the recorded one
        e = exp["encrypts"]
        header, blob = r.copy().encrypt(e["plaintext"].encode(), Drbg(e["random"]))
        assert (header.hex(), blob.hex()) == (e["header"], e["blob"])
    else:
        assert not r.can_send
    copy = r.copy()  # the messages it has not seen yet (skipped keys, current chain, new chain)
    for m in exp["decrypts"]:
        pt = copy.decrypt(bytes.fromhex(m["header"]), bytes.fromhex(m["blob"]), Drbg("decrypts"))
        assert pt == m["plaintext"].encode()
    assert exp["decrypts"]


def _check_session(s: PeerSession, exp: dict[str, Any]) -> None:
    got = {
        "peer": s.peer,
        "role": s.role,
        "profile": s.profile.value if s.profile else None,
        "verified": s.verified,
        "accepted": s.accepted,
        "failures": s.failures,
        "last_activity": s.last_activity,
        "establishment_ek": s.establishment_ek.hex(),
        "pending_knock": s.pending_knock,
        "knock_id": s.knock_id,
        "accept_ts": s.accept_ts,
        "send_seq": s.send_seq,
        "recv_seq": s.recv_seq,
        "held": [[h.seq, h.message_id, h.payload, h.ts, h.held_at] for h in s.held],
    }
    assert got == {k: exp[k] for k in got}
    assert s.primary is not None and s.previous is not None
    _check_ratchet(s.primary, exp["primary"])
    _check_ratchet(s.previous, exp["previous"])
    assert len(s.candidates) == len(exp["candidates"]) == 3
    for cand, ce in zip(s.candidates, exp["candidates"], strict=True):
        assert (cand.profile.value, cand.knock_ek.hex(), cand.glare) == (ce["profile"], ce["knock_ek"], ce["glare"])
        _check_ratchet(cand.ratchet, ce["ratchet"])


def _check(name: str, obj: DoubleRatchet | PeerSession) -> None:
    if isinstance(obj, DoubleRatchet):
        _check_ratchet(obj, _expected(name))
    else:
        _check_session(obj, _expected(name))


# --------------------------------------------------------------------------------------
# fixtures written by earlier versions (and by this one)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", RATCHETS + SESSIONS)
def test_fixture_is_the_version_it_is_named_after(name: str) -> None:
    state = msgpack.unpackb(_blob(name))
    kind, version = name.split("-v")
    if int(version) < FIRST_MAP_VERSION[kind]:
        assert isinstance(state, list) and state[0] == int(version)
    else:
        assert isinstance(state, dict) and state["v"] == int(version)
    assert _expected(name)["written_by"].startswith("agt_mesh ")


def test_the_fixtures_cover_the_interesting_parts() -> None:
    exp = _expected("session-v2")
    assert exp["held"] and any(h[2] is None for h in exp["held"]) and exp["send_seq"] and exp["recv_seq"]
    assert exp["pending_knock"] and exp["previous"] and exp["failures"]
    assert {c["glare"] for c in exp["candidates"]} == {True, False}
    assert {c["profile"] for c in exp["candidates"]} == {"spec", "legacy"}
    skipped = exp["primary"]["skipped"]
    assert len({dh for dh, _, _ in skipped}) == 2, "skipped keys of two remote chains"
    assert exp["primary"]["old_dhrs"] and exp["primary"]["max_skip"] != 100
    assert _expected("session-v1")["held"] == [] and _expected("session-v1")["send_seq"] == 0


@pytest.mark.parametrize("name", RATCHETS + SESSIONS)
def test_fixture_loads_with_every_field(name: str) -> None:
    _check(name, _load(name))


@pytest.mark.parametrize("name", RATCHETS + SESSIONS)
def test_fixture_round_trips_to_the_current_version(name: str) -> None:
    obj = _load(name)
    data = obj.to_bytes()
    state = msgpack.unpackb(data)
    current = STATE_VERSION if isinstance(obj, DoubleRatchet) else SESSION_STATE_VERSION
    assert isinstance(state, dict) and state["v"] == current
    again = type(obj).from_bytes(data)
    _check(name, again)
    assert again.to_bytes() == data, "re-encoding a loaded state gives identical bytes"


@pytest.mark.parametrize(("old", "current"), [("ratchet-v1", "ratchet-v2"), ("session-v2", "session-v3")])
def test_migrating_an_old_blob_writes_exactly_what_this_version_writes(old: str, current: str) -> None:
    """The old and current fixtures hold the same state (made from the same random stream)."""
    assert _load(old).to_bytes() == _blob(current)


def test_session_version_1_migrates_with_an_empty_sequence() -> None:
    v1 = msgpack.unpackb(_load("session-v1").to_bytes())
    v3 = msgpack.unpackb(_blob("session-v3"))
    assert {k: v for k, v in v3.items() if k not in ("ssq", "rsq", "held")} == v1


@pytest.mark.parametrize("name", ["ratchet-v2", "session-v3"])
def test_current_version_bytes_are_stable(name: str) -> None:
    """A state written by this version reads back and re-encodes to the same bytes: a change
    of the current format without a new version (and fixture) fails here."""
    assert _load(name).to_bytes() == _blob(name)


def test_current_session_keys_are_the_documented_ones() -> None:
    state = msgpack.unpackb(_blob("session-v3"))
    assert list(state) == [
        "v",
        "peer",
        "role",
        "kdf",
        "pri",
        "cand",
        "prev",
        "ver",
        "acc",
        "fail",
        "last",
        "ek",
        "knock",
        "kid",
        "ats",
        "ssq",
        "rsq",
        "held",
    ]
    assert list(state["cand"][0]) == ["kdf", "r", "ek", "gl"]
    assert list(state["held"][0]) == ["q", "id", "p", "ts", "at"] and list(state["held"][1]) == ["q", "id", "at"]
    assert list(state["pri"]) == ["v", "sk", "pk", "dhr", "rk", "cks", "ckr", "nr", "pn", "mx", "ad", "skip", "old"]
    assert state["pri"]["v"] == STATE_VERSION
    assert json.loads(state["knock"]) == _expected("session-v3")["pending_knock"]


def test_defaults_are_left_out_and_load_back() -> None:
    s = PeerSession("did:mesh:" + "0" * 32, "responder", None, None)
    state = msgpack.unpackb(s.to_bytes())
    assert state == {"v": SESSION_STATE_VERSION, "peer": s.peer, "role": "responder"}
    assert PeerSession.from_bytes(s.to_bytes()) == s
    s.failures, s.last_activity, s.verified = 1, 5.5, True
    assert msgpack.unpackb(s.to_bytes()) == {**state, "ver": True, "fail": 1, "last": 5.5}
    assert PeerSession.from_bytes(s.to_bytes()) == s


def test_a_new_field_is_one_line_and_one_migration_step() -> None:
    """What adding a field to the session state takes (post-quantum state, say): one
    ``Field`` line and one migration; every stored version then loads with it."""
    fields = [*SESSION_FORMAT.fields, sf.Field("pq", "pq_state", sf.optional(sf.binary()), default=None)]
    v4 = sf.StateFormat(
        "session state",
        SESSION_STATE_VERSION + 1,
        fields,
        {**SESSION_FORMAT.migrations, SESSION_STATE_VERSION: lambda s: {**s, "v": SESSION_STATE_VERSION + 1}},
    )
    for name in SESSIONS:
        loaded = v4.unpack_and_load(_blob(name))
        assert loaded["pq_state"] is None
        _check_session(PeerSession(**{k: v for k, v in loaded.items() if k != "pq_state"}), _expected(name))
    newer = SimpleNamespace(**v4.load(msgpack.unpackb(_blob("session-v3"))))
    newer.pq_state = b"\x01" * 40
    data = _pack(v4.dump(newer))
    assert v4.unpack_and_load(data)["pq_state"] == b"\x01" * 40
    with pytest.raises(MeshStateError, match=r"version 4 is newer than this SDK reads.*upgrade"):
        PeerSession.from_bytes(data)


# --------------------------------------------------------------------------------------
# the framework
# --------------------------------------------------------------------------------------


class _Obj(SimpleNamespace):
    pass


def _toy(calls: list[int]) -> sf.StateFormat:
    """Version 1: [1, a]; version 2: {"v": 2, "a": a}; version 3 adds "b" (default 0)."""

    def one(state: Any) -> Any:
        calls.append(1)
        if type(state) is not list or len(state) != 2:
            raise ValueError("layout")
        return {"v": 2, "a": state[1]}

    def two(state: Any) -> Any:
        calls.append(2)
        return {**state, "v": 3, "b": 7}

    return sf.StateFormat(
        "toy state",
        3,
        [sf.Field("a", "a", sf.text), sf.Field("b", "b", sf.count(10), default=0)],
        {1: one, 2: two},
    )


def test_migrations_run_once_each_in_order_from_the_stored_version() -> None:
    calls: list[int] = []
    toy = _toy(calls)
    assert toy.unpack_and_load(_pack([1, "x"])) == {"a": "x", "b": 7} and calls == [1, 2]
    calls.clear()
    assert toy.unpack_and_load(_pack({"v": 2, "a": "y"})) == {"a": "y", "b": 7} and calls == [2]
    calls.clear()
    assert toy.unpack_and_load(_pack({"v": 3, "a": "z"})) == {"a": "z", "b": 0} and calls == []
    assert toy.pack(_Obj(a="z", b=0)) == _pack({"v": 3, "a": "z"})
    assert toy.pack(_Obj(a="z", b=5)) == _pack({"v": 3, "a": "z", "b": 5})


def test_a_format_needs_one_migration_per_version_step() -> None:
    field = [sf.Field("a", "a", sf.text)]
    for migrations in ({}, {1: list}, {1: list, 2: list, 3: list}, {2: list, 3: list}):
        with pytest.raises(ValueError, match="one migration per version step"):
            sf.StateFormat("toy", 3, field, migrations)
    assert sf.StateFormat("toy", 1, field, {}).version == 1
    with pytest.raises(ValueError, match="unique"):
        sf.Record("toy", [*field, *field])
    with pytest.raises(ValueError, match="unique"):
        sf.Record("toy", [sf.Field("v", "v", sf.text)])


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"v": 4, "a": "x"}, "version 4 is newer than this SDK reads \\(up to version 3\\); upgrade"),
        ({"v": 0, "a": "x"}, "version 0 is not a known version"),
        ([-3, "x"], "version -3 is not a known version"),
        ({"a": "x"}, "unknown layout"),
        ({"v": "3", "a": "x"}, "unknown layout"),
        ({"v": 3.0, "a": "x"}, "unknown layout"),
        ([], "unknown layout"),
        ("x", "unknown layout"),
        (None, "unknown layout"),
        ([1, "x", "y"], "version 1 is corrupted"),
        ({"v": 1, "a": "x"}, "version 1 is corrupted"),
        ([3, "x"], "version 3 is not a map"),
        ({"v": 3}, "wrong fields \\(missing a\\)"),
        ({"v": 3, "a": "x", "c": 1}, "wrong fields \\(unexpected c\\)"),
        ({"v": 3, "a": 5}, "field 'a' \\(a\\) is invalid"),
        ({"v": 3, "a": "x", "b": 11}, "field 'b' \\(b\\) is invalid"),
        ({"v": 3, "a": "x", "b": None}, "field 'b' \\(b\\) is invalid"),
    ],
)
def test_refusals(value: object, message: str) -> None:
    with pytest.raises(MeshStateError, match=message) as err:
        _toy([]).unpack_and_load(_pack(value))
    assert err.value.__context__ is None and err.value.__cause__ is None


def test_unexpected_keys_are_not_echoed_unless_short_text() -> None:
    secret = bytes(range(32))
    state = {"v": 3, "a": "x", secret: 1, "k" * 40: 2}
    with pytest.raises(MeshStateError) as err:
        _toy([]).unpack_and_load(_pack(state))
    text = str(err.value)
    assert "unexpected key, unexpected key" in text and "kkk" not in text and secret.hex()[:8] not in text


@pytest.mark.parametrize("name", ["session-v1", "session-v2", "session-v3", "ratchet-v1", "ratchet-v2"])
def test_no_error_keeps_the_secret_state_as_context(name: str) -> None:
    """Every refusal of a damaged blob is a MeshStateError without ``__context__``: msgpack's
    errors (ExtraData holds the whole unpacked state) must not ride along."""
    good = _blob(name)
    loader = DoubleRatchet.from_bytes if name.startswith("ratchet") else PeerSession.from_bytes
    damaged = [good[:cut] for cut in range(0, len(good), 7)] + [good + b"\x00", good + good]
    damaged += [good[:i] + bytes([good[i] ^ 0xFF]) + good[i + 1 :] for i in range(0, len(good), 11)]
    refused = 0
    for data in damaged:
        try:
            loader(data)
        except MeshStateError as exc:
            refused += 1
            assert exc.__context__ is None and exc.__cause__ is None
            assert good[-32:].hex() not in str(exc)
    assert refused > len(good) // 7  # every cut and the extensions at least


def test_checks() -> None:
    key = sf.binary(32)
    assert key(b"k" * 32) == b"k" * 32
    for bad in (b"k" * 31, bytearray(32), "k" * 32, None):
        with pytest.raises(ValueError):
            key(bad)
    assert sf.binary(0, 32)(b"") == b"" and sf.binary()(b"any") == b"any"
    assert sf.optional(key)(None) is None
    assert sf.count(5)(5) == 5
    for bad_count in (6, -1, True, 1.0, "1"):
        with pytest.raises(ValueError):
            sf.count(5)(bad_count)
    assert sf.number(3) == 3.0 and isinstance(sf.number(3), float)
    for bad_number in (float("nan"), float("inf"), True, "1", None):
        with pytest.raises(ValueError):
            sf.number(bad_number)
    for bad_flag in (0, 1, None, "true"):
        with pytest.raises(TypeError):
            sf.flag(bad_flag)
    with pytest.raises(TypeError):
        sf.text(b"x")
    assert sf.one_of(("a", "b"))("a") == "a"
    with pytest.raises(ValueError):
        sf.one_of(("a", "b"))("c")


# --------------------------------------------------------------------------------------
# the session state's own checks
# --------------------------------------------------------------------------------------


def _session_state() -> dict[str, Any]:
    state = msgpack.unpackb(_blob("session-v3"))
    assert isinstance(state, dict)
    return state


def _cand(**changes: object) -> dict[str, object]:
    return {**_session_state()["cand"][0], **changes}


def _held(**changes: object) -> dict[str, object]:
    return {**_session_state()["held"][0], **changes}


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("peer", None),
        ("peer", b"did:mesh:x"),
        ("role", "observer"),
        ("role", None),
        ("kdf", "SPEC"),
        ("kdf", 1),
        ("pri", b"a ratchet blob"),
        ("pri", {"v": 2}),
        ("pri", {"v": 3}),
        ("pri", [1]),
        ("cand", {}),
        ("cand", None),
        ("cand", [_cand()] * (MAX_CANDIDATES + 1)),
        ("cand", [_cand(kdf="other")]),
        ("cand", [_cand(gl=1)]),
        ("cand", [_cand(ek=b"\x00" * 31)]),
        ("cand", [_cand(r=None)]),
        ("cand", [_cand(x=1)]),
        ("cand", [[1, 2, 3, 4]]),
        ("prev", 5),
        ("ver", 1),
        ("acc", None),
        ("fail", -1),
        ("fail", 1.0),
        ("last", "now"),
        ("last", float("nan")),
        ("last", True),
        ("ek", b"\x00" * 31),
        ("ek", None),
        ("knock", "{not json"),
        ("knock", "[1]"),
        ("knock", "[" * 100_000),
        ("knock", {"type": "knock"}),
        ("kid", 5),
        ("ats", b"ts"),
        ("ssq", -1),
        ("rsq", True),
        ("held", {}),
        ("held", [{"q": 1, "at": 1.0}]),
        ("held", [_held(q=-1)]),
        ("held", [_held(at="x")]),
        ("held", [_held(p=b"{}")]),
        ("held", [_held(id=None)]),
        ("held", [[7, "m-7", None, None, 1.0]]),
    ],
)
def test_session_invalid_fields(key: str, value: object) -> None:
    state = _session_state()
    state[key] = value
    with pytest.raises(MeshStateError) as err:
        PeerSession.from_bytes(_pack(state))
    assert err.value.__context__ is None


@pytest.mark.parametrize("key", ["peer", "role"])
def test_session_missing_required_field(key: str) -> None:
    state = _session_state()
    del state[key]
    with pytest.raises(MeshStateError, match=f"missing {key}"):
        PeerSession.from_bytes(_pack(state))


def test_session_accepts_the_limits() -> None:
    state = _session_state()
    state.update(cand=[_cand()] * MAX_CANDIDATES, fail=(1 << 64) - 1, ssq=(1 << 64) - 1, knock=None)
    s = PeerSession.from_bytes(_pack(state))
    assert len(s.candidates) == MAX_CANDIDATES and s.failures == s.send_seq == (1 << 64) - 1
    assert s.pending_knock is None


def _v2() -> list[Any]:
    state = msgpack.unpackb(_blob("session-v2"))
    assert isinstance(state, list) and len(state) == 18
    return state


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (1, 5),  # peer
        (2, "observer"),  # role
        (4, b"not msgpack \xc1"),  # primary: a nested ratchet blob
        (4, _pack([2, 1, 2])),
        (4, {"v": 2}),
        (5, {}),  # candidates
        (5, [[1, 2, 3]]),
        (5, [["spec", b"\xc1", b"", False]]),
        (6, 5),  # previous
        (12, "{"),  # pending knock
        (15, -1),  # send_seq
        (17, {}),  # held
        (17, [[1, 2]]),
        (17, [[1, "m", None, None, "x"]]),
    ],
)
def test_session_version_2_invalid_fields(index: int, value: object) -> None:
    state = _v2()
    state[index] = value
    with pytest.raises(MeshStateError) as err:
        PeerSession.from_bytes(_pack(state))
    assert err.value.__context__ is None


@pytest.mark.parametrize(("version", "count"), [(1, 14), (1, 16), (1, 18), (2, 15), (2, 17), (2, 19)])
def test_session_positional_versions_with_the_wrong_layout(version: int, count: int) -> None:
    state = ([version, *_v2()[1:]] + [None] * count)[:count]
    with pytest.raises(MeshStateError, match=f"version {version} has the wrong layout"):
        PeerSession.from_bytes(_pack(state))


def test_ratchet_format_is_the_one_the_session_nests() -> None:
    state = _session_state()
    assert RATCHET_FORMAT.load(state["pri"])["rk"] == bytes.fromhex(_expected("session-v3")["primary"]["rk"])
