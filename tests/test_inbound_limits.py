"""Unit tests of the receive path's parts: strict JSON, the fair inbox, the byte-bounded
frame queue, parking, the protocol's byte limits, and the safe-file checks."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
from helpers import Net, wire

from agt_mesh.core import frames as fr
from agt_mesh.core.events import ErrorEvent, MessageReceived
from agt_mesh.core.protocol import MAX_INTENT_BYTES
from agt_mesh.core.strict_json import MAX_INT_DIGITS, MAX_JSON_DEPTH, loads_strict
from agt_mesh.errors import IdentityFileError, MalformedJsonError, MeshConfigError, MeshStateError
from agt_mesh.shell.inbound import FrameQueue, Parking, frame_size
from agt_mesh.shell.inbox import InboundMessage, Inbox
from agt_mesh.shell.lock import WriterLock
from agt_mesh.shell.safefs import check_sqlite_files, check_state_dir, open_private
from agt_mesh.shell.store import StateStore

MiB = 1024 * 1024

# ----------------------------------------------------------------------------------
# strict JSON
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("NaN", "non_finite"),
        ("[Infinity]", "non_finite"),
        ('{"a": -Infinity}', "non_finite"),
        ("1e400", "range"),
        ("[-1.5e309]", "range"),
        ("1" * (MAX_INT_DIGITS + 1), "range"),
        ("-" + "1" * (MAX_INT_DIGITS + 1), "range"),
        ("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1), "depth"),
        ('{"a":' * (MAX_JSON_DEPTH + 1) + "0" + "}" * (MAX_JSON_DEPTH + 1), "depth"),
        ("[" * 100_000, "depth"),
        (b"\xff", "utf8"),
        (b'"\xed\xa0\x80"', "utf8"),  # an encoded surrogate is not UTF-8
        ('{"x": 1}'.encode("utf-16"), "utf8"),
        ("\ufeff{}", "syntax"),
        ("", "syntax"),
        ("{'a': 1}", "syntax"),
        ("[1,]", "syntax"),
    ],
)
def test_loads_strict_refuses(text: str | bytes, reason: str) -> None:
    with pytest.raises(MalformedJsonError) as err:
        loads_strict(text, max_bytes=1 << 20, what="payload")
    assert err.value.reason == reason
    assert str(err.value).startswith("payload")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH, json.loads("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH)),
        ("1" * MAX_INT_DIGITS, int("1" * MAX_INT_DIGITS)),
        ("1e308", 1e308),
        ("1e-400", 0.0),
        ('"\\ud800"', "\ud800"),
        (b'{"caf\xc3\xa9": [true, null, -0, 2.5]}', {"caf\u00e9": [True, None, 0, 2.5]}),
    ],
)
def test_loads_strict_accepts(text: str | bytes, value: Any) -> None:
    assert loads_strict(text, max_bytes=1 << 20) == value


def test_loads_strict_size_and_interpreter_limit() -> None:
    with pytest.raises(MalformedJsonError) as err:
        loads_strict("[" + "0," * 600 + "0]", max_bytes=1000)
    assert err.value.reason == "size"
    old = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(0)  # an application lifted the interpreter's guard
    try:
        with pytest.raises(MalformedJsonError) as err:
            loads_strict("9" * 100_000, max_bytes=1 << 20)
        assert err.value.reason == "range"
    finally:
        sys.set_int_max_str_digits(old)


def test_decode_frame_is_strict() -> None:
    with pytest.raises(MalformedJsonError, match="NaN"):
        fr.decode_frame('{"type": "heartbeat", "x": NaN}')
    assert fr.decode_frame(b'{"type": "heartbeat"}') == {"type": "heartbeat"}


# ----------------------------------------------------------------------------------
# protocol limits (sans-I/O)
# ----------------------------------------------------------------------------------


def test_send_refuses_what_a_receiver_refuses() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    for bad in (float("nan"), [float("inf")], json.loads("[" * 200 + "]" * 200)):
        with pytest.raises(MeshConfigError):
            a.send(b, bad)
    deep: Any = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(MeshConfigError):  # deeper than the interpreter can serialise
        a.send(b, deep)


def test_decrypted_payload_keeps_its_text_and_refusals_cost_one_frame() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    primary = a.session(b).primary
    assert primary is not None
    header, blob = primary.encrypt(b"NaN", a.rng)
    step = b.receive(fr.message_frame(a.did, b.did, "nan", fr.iso_timestamp(net.now), header, blob))
    assert step.events == [
        ErrorEvent("decrypt", a.did, "decrypted payload refused: NaN is not a JSON number — dropped", "nan")
    ]
    assert step.acks == ["nan"]
    header, blob = primary.encrypt(b' {"a" : 1} ', a.rng)
    step = b.receive(fr.message_frame(a.did, b.did, "ok", fr.iso_timestamp(net.now), header, blob))
    (msg,) = [e for e in step.events if isinstance(e, MessageReceived)]
    assert msg.payload == {"a": 1} and msg.text == ' {"a" : 1} '


def test_pre_knock_buffer_is_bounded_in_bytes_per_peer_and_in_total() -> None:
    net = Net()
    b = net.agent("bob", pre_knock_peer_bytes=3 * MiB, max_buffered_bytes=5 * MiB, pre_knock_buffer_size=100)
    blob = os.urandom(MiB)
    senders = [f"did:mesh:{i:032x}" for i in range(3)]
    dropped: list[ErrorEvent] = []
    for n in range(6):
        for s in senders:
            frame = fr.message_frame(s, b.did, f"{s}-{n}", fr.iso_timestamp(net.now), bytes(32) + bytes(8), blob)
            step = b.receive(frame)
            dropped += [e for e in step.events if isinstance(e, ErrorEvent)]
            assert b.proto.buffered_bytes(s) <= 3 * MiB
            assert b.proto.buffered_bytes() <= 5 * MiB
    assert dropped and all("pre-knock buffer full" in e.detail for e in dropped)
    # every dropped frame is acknowledged (the relay stops redelivering it)
    assert len({e.frame_id for e in dropped}) == len(dropped)
    too_big = fr.message_frame(senders[0], b.did, "huge", fr.iso_timestamp(net.now), bytes(40), os.urandom(6 * MiB))
    step = b.receive(too_big)
    assert step.acks == ["huge"] and "does not fit" in step.events[0].detail  # type: ignore[union-attr]


def test_oversized_knock_intent_is_dropped() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    knock = wire(a.establish(b).frames[0])
    knock["intent"] = {"x": "y" * MAX_INTENT_BYTES}
    step = b.receive(knock)
    assert step.acks == [knock["id"]]
    assert [e.kind for e in step.events] == ["knock"]  # type: ignore[union-attr]
    assert not b.decisions


def test_held_back_messages_are_bounded_in_bytes() -> None:
    net = Net()
    a = net.agent("alice", receipts=True)
    b = net.agent("bob", receipts=True, max_held_bytes=3000)
    net.connect(a, b)
    frames = [a.send_frame(b, "x" * 1000) for _ in range(6)]
    steps = [b.receive(f) for f in frames[1:]]  # the first is lost: the rest wait for it
    events = [e for s in steps for e in s.events]
    assert any(isinstance(e, ErrorEvent) and e.kind == "gap" and "bytes held back" in e.detail for e in events)
    assert sum(len(h.payload or "") for h in b.session(a).held) <= 3000


# ----------------------------------------------------------------------------------
# the fair inbox
# ----------------------------------------------------------------------------------


def _msg(sender: str, i: int) -> InboundMessage:
    return InboundMessage(sender, {"i": i}, f"{sender}-{i}", float(i))


async def test_inbox_serves_senders_in_turn_each_in_order() -> None:
    box = Inbox(100)
    for i in range(5):
        box.add(_msg("flood", i), 10)
    box.add(_msg("carol", 0), 10)
    box.add(_msg("flood", 5), 10)
    got = [(m.sender, m.payload["i"]) for m in [await box.get() for _ in range(7)]]
    assert got == [("flood", 0), ("carol", 0), ("flood", 1), ("flood", 2), ("flood", 3), ("flood", 4), ("flood", 5)]
    for i in range(3):
        box.add(_msg("a", i), 1)
        box.add(_msg("b", i), 1)
    assert [m.message_id for m in box.peek()] == ["a-0", "b-0", "a-1", "b-1", "a-2", "b-2"]  # arrival order
    assert [m.message_id for m in box.drain(lambda m: m.sender == "b")] == ["b-0", "b-1", "b-2"]
    assert len(box) == 3 and box.bytes == 3 and box.usage("a") == (3, 3) and box.usage("b") == (0, 0)


def test_inbox_fair_share_admission() -> None:
    box = Inbox(10, 1000)
    assert box.admits("flood")
    for i in range(10):
        assert box.admits("flood")
        box.add(_msg("flood", i), 10)
    assert not box.admits("flood")  # full, and it holds everything
    assert box.admits("carol")  # a newcomer still gets in (a tenth over capacity at most)
    box.add(_msg("carol", 0), 10)
    assert not box.admits("carol")  # over capacity: only a sender with nothing waiting
    assert not box.admits("dave")  # ... and only up to a tenth over capacity (11 here)
    # bytes: one sender's share of 1000 bytes with two senders waiting is 500
    box2 = Inbox(100, 1000)
    box2.add(_msg("x", 0), 600)
    box2.add(_msg("y", 0), 10)
    assert not box2.admits("x") and box2.admits("y")
    # a sender may use the whole inbox while nobody else has anything waiting
    box3 = Inbox(4, 1 << 20)
    for i in range(4):
        assert box3.admits("solo")
        box3.add(_msg("solo", i), 1)
    assert not box3.admits("solo")


async def test_inbox_reports_space() -> None:
    box = Inbox(10)
    freed: list[int] = []
    box.on_removed = lambda: freed.append(len(box))
    box.add(_msg("a", 0))
    box.add(_msg("a", 1))
    await box.get()
    box.drain()
    assert freed == [1, 0]


# ----------------------------------------------------------------------------------
# frame queue and parking
# ----------------------------------------------------------------------------------


async def test_frame_queue_is_bounded_in_bytes_but_takes_one_big_frame() -> None:
    q = FrameQueue(max_bytes=1000, max_frames=100)
    big = "x" * 5000
    await q.put(big)  # an empty queue always takes one frame
    put = asyncio.ensure_future(q.put("y" * 10))
    await asyncio.sleep(0.05)
    assert not put.done() and q.bytes == frame_size(big)  # the reader waits
    assert await q.get(10) == [big]
    await asyncio.wait_for(put, 1)
    q.kick()
    assert await q.get(10) == ["y" * 10]  # frames first, the kick is consumed with them
    q.kick()
    assert await q.get(10) is None
    q.stop()
    with pytest.raises(EOFError):
        await q.get(10)


def test_parking_is_bounded_per_peer_and_in_total_and_keeps_one_copy() -> None:
    p = Parking(peer_bytes=100, total_bytes=150)
    f = [{"id": f"f{i}"} for i in range(10)]
    assert p.park("a", f[0], 60) == []
    assert p.park("a", f[0], 60) == []  # a re-send of the same frame
    assert len(p) == 1
    assert p.park("a", f[1], 60) == [("a", f[1])]  # over a's 100 bytes: the newcomer is dropped
    assert p.park("b", f[2], 40) == []
    assert p.park("c", f[3], 60) == [("a", f[0])]  # total full: the biggest (a) loses its newest
    assert p.bytes <= 150 and p.dropped == 2
    assert p.pop("b") is f[2]
    assert sorted(p.peers()) == ["c"]


# ----------------------------------------------------------------------------------
# safe files
# ----------------------------------------------------------------------------------


def test_state_dir_checks(tmp_path: Path) -> None:
    d = tmp_path / "state"
    assert check_state_dir(d) == d.resolve()
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    with pytest.raises(MeshStateError, match="does not exist"):
        check_state_dir(tmp_path / "missing", create=False)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(MeshStateError, match="not a directory"):
        check_state_dir(f)
    d.chmod(0o720)
    with pytest.raises(MeshStateError, match="chmod 700"):
        check_state_dir(d)
    d.chmod(0o750)  # readable by the group is fine: the files themselves are 0600
    check_state_dir(d)
    # a symbolic link to a safe directory is fine, in a safe place
    link = tmp_path / "link"
    link.symlink_to(d)
    assert check_state_dir(link) == d.resolve()


def test_private_files_are_never_followed_or_shared(tmp_path: Path) -> None:
    d = tmp_path / "state"
    check_state_dir(d)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (d / "link").symlink_to(victim)
    with pytest.raises(MeshStateError, match="symbolic link"):
        open_private(d / "link", os.O_RDWR, create=True)
    with pytest.raises(IdentityFileError, match="symbolic link"):
        open_private(d / "link", os.O_RDONLY, error=IdentityFileError)
    fd = open_private(d / "new", os.O_RDWR, create=True, exclusive=True)
    os.close(fd)
    assert stat.S_IMODE((d / "new").stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        open_private(d / "new", os.O_RDWR, create=True, exclusive=True)
    (d / "new").chmod(0o640)
    with pytest.raises(MeshStateError, match="chmod 600"):
        os.close(open_private(d / "new", os.O_RDONLY))
    assert victim.read_text() == "precious"


@pytest.mark.parametrize("name", ["state.db", "state.db-wal", "state.db-shm", "state.db-journal"])
def test_sqlite_files_are_checked_before_sqlite_opens_them(tmp_path: Path, name: str) -> None:
    d = tmp_path / "state"
    check_state_dir(d)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    victim.chmod(0o644)
    (d / name).symlink_to(victim)
    with pytest.raises(MeshStateError, match="symbolic link"):
        check_sqlite_files(d / "state.db")
    with pytest.raises(MeshStateError, match="symbolic link"):
        StateStore(d, did="did:mesh:" + "0" * 32).open()
    # neither written nor chmod-ed through the link (the store used to chmod side files)
    assert victim.read_text() == "precious" and stat.S_IMODE(victim.stat().st_mode) == 0o644


def test_lock_checks_the_directory_before_creating_anything(tmp_path: Path) -> None:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (d / ".mesh-prekeys.lock").symlink_to(victim)
    d.chmod(0o777)
    with pytest.raises(MeshStateError, match="writable by other users"):
        WriterLock(d).acquire()
    d.chmod(0o700)
    with pytest.raises(MeshStateError, match="symbolic link"):
        WriterLock(d).acquire()
    assert victim.read_text() == "precious"
    (d / ".mesh-prekeys.lock").unlink()
    with WriterLock(d) as lock:
        assert lock.holder_pid() == os.getpid()
        assert stat.S_IMODE(lock.path.stat().st_mode) == 0o600
