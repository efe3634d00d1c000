"""The sans-I/O protocol state machine (:class:`MeshProtocol`) driven through an in-memory mesh.

Every test uses :class:`helpers.Net`: agents with real pre-key stores, a fake clock that
only moves when told, deterministic randomness, and frames that make a JSON round trip
between agents (as through a relay).  Steps are checked exactly: frames, events, acks.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest
from helpers import (
    T0,
    Agent,
    Drbg,
    Net,
    events_of,
    fake_did,
    fake_key,
    received,
    wire,
)

from agt_mesh.core import frames as fr
from agt_mesh.core.events import (
    E2EVerified,
    ErrorEvent,
    KnockAccepted,
    KnockDecision,
    KnockRejected,
    MessageReceived,
    SessionEstablished,
    SessionRekeyed,
)
from agt_mesh.core.primitives import x25519_public
from agt_mesh.core.protocol import CONTROL_KEY, MeshProtocol, ProtocolConfig
from agt_mesh.core.session import MAX_CANDIDATES, PeerSession
from agt_mesh.core.x3dh import Establishment, KdfProfile
from agt_mesh.errors import MeshConfigError, MeshProtocolError

INTENT = {"action": "establish_session"}
TS0 = fr.iso_timestamp(T0)
BOTH = (KdfProfile.SPEC, KdfProfile.LEGACY)


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def assert_knock_reply(frame: dict[str, Any], kind: str, sender: Agent, to: Agent, knock_id: str, now: float) -> None:
    """``frame`` is exactly the ``knock_accept``/``knock_reject`` the TS client would send."""
    if kind == "knock_accept":
        expected = fr.knock_accept_frame(sender.did, to.did, frame["id"], knock_id, fr.iso_timestamp(now))
    else:
        expected = fr.knock_reject_frame(sender.did, to.did, frame["id"], knock_id, fr.iso_timestamp(now))
        assert expected["reason"] == "policy_denied"
    assert frame == expected
    assert list(frame) == list(expected)  # key order, too
    assert frame["id"].startswith(sender.label)


def empty(step: Any) -> bool:
    return not step.frames and not step.events and not step.acks


def b64_mutate(text: str, fn: Any) -> str:
    return base64.b64encode(fn(bytearray(base64.b64decode(text)))).decode()


def flip_at(index: int) -> Any:
    def fn(data: bytearray) -> bytes:
        data[index] ^= 0x01
        return bytes(data)

    return fn


def tampered(frame: dict[str, Any], how: str, rng: Drbg) -> dict[str, Any]:
    """A copy of a real message frame, corrupted in one way."""
    f = wire(frame)
    if how == "nonce":
        f["ciphertext"] = b64_mutate(f["ciphertext"], flip_at(0))
    elif how == "ciphertext":
        f["ciphertext"] = b64_mutate(f["ciphertext"], flip_at(13))
    elif how == "tag":
        f["ciphertext"] = b64_mutate(f["ciphertext"], flip_at(-1))
    elif how == "truncated":
        f["ciphertext"] = b64_mutate(f["ciphertext"], lambda d: bytes(d[:20]))
    elif how == "dh":
        f["header"]["dh"] = base64.b64encode(x25519_public(rng(32))).decode()
    elif how == "low_order_dh":
        f["header"]["dh"] = base64.b64encode(bytes(32)).decode()
    elif how == "counter":
        f["header"]["n"] += 1
    elif how == "pn":
        f["header"]["pn"] += 7
    else:  # pragma: no cover
        raise AssertionError(how)
    return f


#: ErrorEvent detail prefix (the DecryptError kind) each tampering produces
TAMPER_KIND = {
    "nonce": "auth",
    "ciphertext": "auth",
    "tag": "auth",
    "truncated": "malformed",
    "dh": "auth",
    "low_order_dh": "malformed",
    "counter": "auth",
    "pn": "auth",
}


def garbage_message(sender: str, to: str, frame_id: str, rng: Drbg, **extra: Any) -> dict[str, Any]:
    """A well-formed encrypted ``message`` frame that nobody can decrypt."""
    header = x25519_public(rng(32)) + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
    frame = fr.message_frame(sender, to, frame_id, TS0, header, rng(60))
    frame.update(extra)
    return frame


def forged_knock(sender: str, to: str, frame_id: str, rng: Drbg, *, ik: bytes | None = None) -> dict[str, Any]:
    """A KNOCK with a fresh, valid-looking establishment (no one-time pre-key); ``ik``
    defaults to the sender's key for a :func:`fake_did` sender, else a random key."""
    est = Establishment(ik or fake_key(sender) or x25519_public(rng(32)), x25519_public(rng(32)), None)
    return fr.knock_frame(sender, to, frame_id, TS0, est)


def converse(net: Net, x: Agent, y: Agent, rounds: int = 3) -> None:
    """Alternate messages; each must be delivered exactly once, in order."""
    for i in range(rounds):
        for s, r in ((x, y), (y, x)):
            payload = {"from": s.label, "i": i}
            step, mid = s.send(r, payload)
            out = net.route(step.frames)
            assert [(e.payload, e.message_id) for e in events_of(out[r.did], MessageReceived)] == [(payload, mid)]


def same_session(x: Agent, y: Agent) -> bool:
    """Whether the primaries of ``x`` and ``y`` are the two ends of one ratchet session
    (checked on copies: x encrypts a probe, y decrypts it)."""
    xp = x.session(y).primary
    yp = y.session(x).primary
    assert xp is not None and yp is not None
    xp, yp = xp.copy(), yp.copy()
    header, blob = xp.encrypt(b'"probe"', Drbg("probe"))
    try:
        yp.decrypt(header, blob, Drbg("probe-rx"))
    except Exception:
        return False
    return True


# --------------------------------------------------------------------------------------
# 1. happy path, both KDF profiles
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", BOTH, ids=lambda p: p.value)
def test_happy_path_both_profiles(profile: KdfProfile) -> None:
    net = Net()
    a = net.agent("alice", initiator_profile=profile)
    b = net.agent("bob")
    bundle = b.bundle()
    assert bundle.one_time_pre_key_id == 0

    est = a.establish(b, bundle)
    assert est.events == [SessionEstablished(b.did, "initiator", profile.value)]
    assert est.acks == [] and est.changed == {b.did}
    (knock,) = est.frames
    assert knock["type"] == "knock" and knock["from"] == a.did and knock["to"] == b.did
    assert knock["intent"] == INTENT and knock["establishment"]["otk"] == 0
    assert not a.proto.needs_session(b.did)

    sent, mid = a.send(b, {"hello": "bob"})
    (m1,) = sent.frames
    assert m1["header"]["n"] == 0 and m1["header"]["pn"] == 0

    # B: the KNOCK asks the policy, which accepts
    kstep = b.receive(knock)
    assert kstep.events == [KnockDecision(a.did, INTENT, knock["id"])]
    assert kstep.acks == [knock["id"]]
    (accept,) = kstep.frames
    assert_knock_reply(accept, "knock_accept", b, a, knock["id"], net.now)
    assert not b.store.has_one_time_pre_key(0)  # consumed
    assert len(b.session(a).candidates) == 2  # spec and legacy, decided by the first message

    mstep = b.receive(m1)
    assert mstep.events == [
        SessionEstablished(a.did, "responder", profile.value),
        E2EVerified(a.did, True),
        MessageReceived(a.did, {"hello": "bob"}, mid, plaintext=False, ts=TS0),
    ]
    assert mstep.acks == [mid] and mstep.frames == [] and mstep.changed == {a.did}
    assert b.proto.peer_profiles[a.did] == profile
    assert b.proto.profile_for(a.did) == profile  # used when B initiates to A later
    sb = b.session(a)
    assert sb.role == "responder" and sb.profile == profile and sb.verified and sb.candidates == []

    assert mstep.ack_frames() == [{"v": 1, "type": "ack", "id": mid}]

    astep = a.receive(accept)
    assert astep.events == [KnockAccepted(b.did)] and astep.acks == [accept["id"]] and astep.frames == []
    assert a.session(b).accepted

    reply, rid = b.send(a, ["hi", "alice"])
    rstep = a.receive(reply.frames[0])
    assert rstep.events == [
        E2EVerified(b.did, True),
        MessageReceived(b.did, ["hi", "alice"], rid, plaintext=False, ts=TS0),
    ]
    assert rstep.acks == [rid]

    for i in range(50):
        for s, r in ((a, b), (b, a)):
            step, mid = s.send(r, {"i": i, "from": s.label})
            got = r.receive(step.frames[0])
            assert got.events == [MessageReceived(s.did, {"i": i, "from": s.label}, mid, ts=TS0)]
            assert got.acks == [mid] and got.frames == []
    assert a.proto.undecryptable == b.proto.undecryptable == {}
    (summary,) = b.proto.session_summaries()
    assert summary["peer"] == a.did and summary["verified"] and summary["kdf_profile"] == profile.value
    assert summary["ratchet"]["can_send"] and summary["ratchet"]["skipped_keys"] == 0
    assert not any(isinstance(v, bytes) for v in summary.values())  # no key material


@pytest.mark.parametrize("profile", BOTH, ids=lambda p: p.value)
def test_responder_that_accepts_one_profile_only(profile: KdfProfile) -> None:
    """A responder restricted to one KDF gets exactly one candidate and decrypts with it."""
    net = Net()
    a = net.agent("alice", initiator_profile=profile)
    b = net.agent("bob", accept_profiles=(profile,))
    est = a.establish(b)
    b.receive(est.frames[0])
    assert [c.profile for c in b.session(a).candidates] == [profile]
    assert received(b.receive(a.send_frame(b, 1))) == [1]


def test_wrong_profile_is_never_delivered() -> None:
    """A LEGACY initiator towards a SPEC-only responder: the message cannot decrypt."""
    net = Net()
    a = net.agent("alice", initiator_profile=KdfProfile.LEGACY)
    b = net.agent("bob", accept_profiles=(KdfProfile.SPEC,))
    est = a.establish(b)
    b.receive(est.frames[0])
    frame = a.send_frame(b, "x")
    assert empty(b.receive(frame))  # waits in the buffer (a late KNOCK could still fix it)
    net.advance(3.0)
    step = b.tick()
    assert step.acks == [frame["id"]]
    (err,) = step.events
    assert err.kind == "decrypt" and err.peer == a.did and err.detail.startswith("auth:")


# --------------------------------------------------------------------------------------
# 2. the pre-KNOCK buffer
# --------------------------------------------------------------------------------------


def test_knock_overtaken_by_its_first_message() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    est = a.establish(b)
    m1, mid = a.send(b, "first")
    first = b.receive(m1.frames[0])
    assert empty(first)
    assert b.proto.next_deadline() == T0 + 3.0

    kstep = b.receive(est.frames[0])
    assert kstep.events == [
        KnockDecision(a.did, INTENT, est.frames[0]["id"]),
        SessionEstablished(a.did, "responder", "spec"),
        E2EVerified(a.did, True),
        MessageReceived(a.did, "first", mid, ts=TS0),
    ]
    assert kstep.acks == [est.frames[0]["id"], mid]
    (accept,) = kstep.frames
    assert_knock_reply(accept, "knock_accept", b, a, est.frames[0]["id"], net.now)
    assert b.proto.next_deadline() is None


def test_no_buffer_drops_frames_that_overtake_the_knock() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob", pre_knock_buffer_size=0)
    est = a.establish(b)
    m1, mid = a.send(b, "first")
    step = b.receive(m1.frames[0])
    assert step.events == [ErrorEvent("decrypt", a.did, "no session for encrypted message — dropping", mid)]
    assert step.acks == [mid] and step.frames == []

    kstep = b.receive(est.frames[0])
    assert received(kstep) == []
    # the session still works for what follows (the lost key is kept as skipped)
    assert received(b.receive(a.send_frame(b, "second"))) == ["second"]


def test_buffer_keeps_five_frames_per_peer() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    est = a.establish(b)
    frames = [a.send_frame(b, i) for i in range(6)]
    for f in frames[:5]:
        assert empty(b.receive(f))
    sixth = b.receive(frames[5])
    assert sixth.acks == [frames[0]["id"]]
    assert sixth.events == [
        ErrorEvent("decrypt", a.did, "pre-knock buffer full — oldest frame dropped", frames[0]["id"])
    ]
    kstep = b.receive(est.frames[0])
    assert received(kstep) == [1, 2, 3, 4, 5]
    assert kstep.acks == [est.frames[0]["id"]] + [f["id"] for f in frames[1:]]


def test_buffer_ignores_a_frame_it_already_holds() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    est = a.establish(b)
    frame = a.send_frame(b, "once")
    assert empty(b.receive(frame))
    assert empty(b.receive(frame))
    kstep = b.receive(est.frames[0])
    assert received(kstep) == ["once"]
    assert kstep.acks.count(frame["id"]) == 1


def test_buffer_ttl_expiry_acks_and_reports() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    est = a.establish(b)
    frame = a.send_frame(b, "late knock")
    assert empty(b.receive(frame))
    net.advance(2.9)
    assert empty(b.tick())
    net.advance(0.2)  # T0 + 3.1
    step = b.tick()
    assert step.acks == [frame["id"]]
    assert step.events == [
        ErrorEvent("decrypt", a.did, "no session for encrypted message (pre-knock buffer expired)", frame["id"])
    ]
    assert b.proto.next_deadline() is None
    # the KNOCK arrives after all: the session works from the next message on
    b.receive(est.frames[0])
    assert received(b.receive(a.send_frame(b, "next"))) == ["next"]


def test_buffer_global_peer_cap_evicts_oldest_peer() -> None:
    net = Net()
    b = net.agent("bob")
    rng = Drbg("global-cap")
    peers = [fake_did(i) for i in range(101)]
    for i, peer in enumerate(peers[:100]):
        assert empty(b.receive(garbage_message(peer, b.did, f"g-{i}", rng)))
    assert len(b.proto._buffer) == 100
    step = b.receive(garbage_message(peers[100], b.did, "g-100", rng))
    assert step.events == [
        ErrorEvent("frame", peers[0], "pre-knock buffer evicted: global peer cap (100) reached"),
        ErrorEvent("decrypt", peers[0], "pre-knock buffer evicted", "g-0"),
    ]
    assert step.acks == ["g-0"]
    assert len(b.proto._buffer) == 100
    assert peers[0] not in b.proto._buffer and peers[100] in b.proto._buffer


def test_frames_wait_for_a_pending_verdict_then_accept() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    b.policy = lambda decision: None  # the application takes its time
    est = a.establish(b)
    knock = est.frames[0]
    kstep = b.receive(knock)
    assert kstep.events == [KnockDecision(a.did, INTENT, knock["id"])]
    assert kstep.frames == [] and kstep.acks == []  # acked once the verdict is recorded
    assert empty(b.receive(knock))  # a redelivery while pending: nothing new
    m1, mid = a.send(b, "waiting")
    assert empty(b.receive(m1.frames[0]))

    net.advance(1.5)
    step = b.resolve(knock["id"], True)
    (accept,) = step.frames
    assert_knock_reply(accept, "knock_accept", b, a, knock["id"], net.now)
    assert step.events == [
        SessionEstablished(a.did, "responder", "spec"),
        E2EVerified(a.did, True),
        MessageReceived(a.did, "waiting", mid, ts=TS0),
    ]
    assert step.acks == [knock["id"], mid]
    assert empty(b.resolve(knock["id"], True))  # resolved once


def test_rejected_knock_acks_buffered_frames() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    b.policy = lambda decision: None
    est = a.establish(b)
    knock = est.frames[0]
    b.receive(knock)
    frames = [a.send_frame(b, i) for i in range(2)]
    for f in frames:
        assert empty(b.receive(f))
    step = b.resolve(knock["id"], False)
    (reject,) = step.frames
    assert_knock_reply(reject, "knock_reject", b, a, knock["id"], net.now)
    assert step.acks == [knock["id"]] + [f["id"] for f in frames]
    assert step.events == []
    assert a.did not in b.proto.sessions
    assert b.proto.next_deadline() is None


def test_frames_wait_for_a_slow_verdict_beyond_the_buffer_ttl() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    b.policy = lambda decision: None
    knock = a.establish(b).frames[0]
    b.receive(knock)
    m1, _ = a.send(b, "patience")
    assert empty(b.receive(m1.frames[0]))
    net.advance(3.1)
    assert empty(b.tick())  # the verdict is still pending: keep waiting
    net.advance(2.0)
    assert received(b.resolve(knock["id"], True)) == ["patience"]


def test_knock_without_establishment_is_accepted_but_makes_no_session() -> None:
    """A pre-"patch 4b" TS peer KNOCKs without the X3DH establishment."""
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    knock = wire(a.establish(b).frames[0])
    del knock["establishment"]
    frame = a.send_frame(b, "lost")
    assert empty(b.receive(frame))
    step = b.receive(knock)
    assert [f["type"] for f in step.frames] == ["knock_accept"]
    assert step.events == [
        KnockDecision(a.did, INTENT, knock["id"]),
        ErrorEvent("decrypt", a.did, "no session for encrypted message — dropping", frame["id"]),
    ]
    assert step.acks == [knock["id"], frame["id"]]
    assert a.did not in b.proto.sessions


# --------------------------------------------------------------------------------------
# 3. KNOCK verdict timeout
# --------------------------------------------------------------------------------------


def test_knock_verdict_timeout_rejects_and_late_verdict_is_ignored() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    b.policy = lambda decision: None
    est = a.establish(b)
    knock = est.frames[0]
    b.receive(knock)
    assert b.proto.next_deadline() == T0 + 10.0
    net.advance(9.99)
    assert empty(b.tick())
    net.advance(0.02)  # T0 + 10.01
    step = b.tick()
    (reject,) = step.frames
    assert_knock_reply(reject, "knock_reject", b, a, knock["id"], net.now)
    assert step.events == [] and step.acks == [knock["id"]]
    assert b.proto.next_deadline() is None

    late = b.resolve(knock["id"], True)
    assert empty(late) and late.changed == set()
    assert a.did not in b.proto.sessions
    assert b.store.has_one_time_pre_key(0)  # never used

    # the initiator, which has not decrypted anything, drops its session
    astep = a.receive(reject)
    assert astep.events == [KnockRejected(b.did, "policy_denied", ignored=False)]
    assert b.did not in a.proto.sessions


# --------------------------------------------------------------------------------------
# 4. duplicates
# --------------------------------------------------------------------------------------


def test_duplicate_message_id_is_acked_and_dropped() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    frame = a.send_frame(b, "once")
    assert received(b.receive(frame)) == ["once"]
    before = b.primary_bytes(a)
    again = b.receive(frame)
    assert again.events == [ErrorEvent("duplicate", a.did, "duplicate message id — dropped", frame["id"])]
    assert again.acks == [frame["id"]] and again.frames == [] and again.changed == set()
    assert b.primary_bytes(a) == before
    assert received(b.receive(a.send_frame(b, "next"))) == ["next"]


def test_replayed_ciphertext_with_new_id_is_a_duplicate_not_a_desync() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    frame = a.send_frame(b, "once")
    assert received(b.receive(frame)) == ["once"]
    before = b.primary_bytes(a)
    for i in range(5):  # duplicates never count as undecryptable
        replay = dict(wire(frame), id=f"replay-{i}")
        step = b.receive(replay)
        (err,) = step.events
        assert err.kind == "duplicate" and err.peer == a.did and err.frame_id == f"replay-{i}"
        assert err.detail.endswith("— dropped")
        assert step.acks == [f"replay-{i}"]
        assert b.primary_bytes(a) == before
        assert b.proto.undecryptable == {}
    net.advance(5)
    assert empty(b.tick())
    assert received(b.receive(a.send_frame(b, "still here"))) == ["still here"]


def test_replay_from_an_older_chain_is_a_duplicate() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    old = a.send_frame(b, "chain 1")
    assert received(b.receive(old)) == ["chain 1"]
    converse(net, a, b, rounds=2)  # both sides ratchet: `old` is now from an earlier chain
    events: list[Any] = []
    for i in range(3):
        step = b.receive(dict(wire(old), id=f"old-replay-{i}"))
        events += step.events
    net.advance(3.1)
    events += b.tick().events
    assert a.did in b.proto.sessions
    assert [e.kind for e in events if isinstance(e, ErrorEvent)] == ["duplicate"] * 3


# --------------------------------------------------------------------------------------
# 5. forged and tampered frames; desync and resync
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", sorted(TAMPER_KIND))
def test_tampered_frame_never_changes_the_session(how: str) -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    converse(net, a, b, rounds=1)
    before = b.session(a).to_bytes()
    bad = tampered(a.send_frame(b, "tampered"), how, Drbg(f"tamper/{how}"))
    assert empty(b.receive(bad))  # waits: a late re-key KNOCK could still explain it
    assert b.session(a).to_bytes() == before
    net.advance(3.1)
    step = b.tick()
    assert step.acks == [bad["id"]] and step.changed == set() and step.frames == []
    (err,) = step.events
    assert err.kind == "decrypt" and err.peer == a.did and err.frame_id == bad["id"]
    assert err.detail.startswith(TAMPER_KIND[how] + ":")
    assert b.session(a).to_bytes() == before  # the whole session, not only the ratchet
    assert b.proto.undecryptable == {a.did: 1}  # diagnostics, outside the session state
    assert received(b.receive(a.send_frame(b, "valid"))) == ["valid"]
    assert b.proto.undecryptable == {}


def test_spoofed_third_party_garbage_is_dropped_after_ttl() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    before = b.primary_bytes(a)
    carol = fake_did(7)
    frame = garbage_message(carol, b.did, "spoof-1", Drbg("spoof"))
    assert empty(b.receive(frame))
    net.advance(3.1)
    step = b.tick()
    assert step.acks == ["spoof-1"]
    assert step.events == [
        ErrorEvent("decrypt", carol, "no session for encrypted message (pre-knock buffer expired)", "spoof-1")
    ]
    assert b.primary_bytes(a) == before and b.proto.undecryptable == {}
    assert carol not in b.proto.sessions
    assert received(b.receive(a.send_frame(b, "valid"))) == ["valid"]


def test_undecryptable_frames_never_tear_down_or_rekey() -> None:
    """Forgery never costs state: 40 undecryptable frames "from" Alice change nothing
    (5 at a time: the pre-KNOCK buffer holds 5 per peer, the rest are given up at once)."""
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    rng = Drbg("never-tear-down")
    for round_ in range(8):
        before = b.session(a).to_bytes()
        forged = [garbage_message(a.did, b.did, f"bad-{round_}-{i}", rng) for i in range(2)]
        forged += [tampered(a.send_frame(b, i), "ciphertext", rng) for i in range(3)]
        for f in forged:
            assert empty(b.receive(f))
        net.advance(3.1)
        step = b.tick()
        assert step.frames == [] and step.changed == set() and step.identities == set()
        assert sorted(step.acks) == sorted(f["id"] for f in forged)
        assert [e.kind for e in step.events] == ["decrypt"] * 5
        assert "the session is unchanged" in step.events[-1].detail
        assert b.session(a).to_bytes() == before and not b.proto.needs_session(a.did)
        assert b.proto.undecryptable[a.did] == 5
        assert received(b.receive(a.send_frame(b, round_))) == [round_]
        assert a.did not in b.proto.undecryptable
    converse(net, a, b, rounds=2)


def test_a_peer_that_lost_its_session_recovers_by_rekeying() -> None:
    """A real desync (Alice lost her state while Bob keeps his session): Alice's frames on
    a session Bob never saw fail; they change nothing; her next send KNOCKs with her bound
    key, Bob takes it as a candidate and switches when her message decrypts under it."""
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    converse(net, a, b, rounds=1)
    a2 = _restarted(net, a)
    stray = garbage_message(a.did, b.did, "from-a-lost-session", Drbg("lost"))
    before = b.session(a).to_bytes()
    b.receive(stray)
    net.advance(3.1)
    assert [e.kind for e in b.tick().events] == ["decrypt"]
    assert b.session(a).to_bytes() == before
    est = a2.establish(b)
    m = a2.send_frame(b, "back again")
    out = net.route([*est.frames, m])
    assert [e for e in out[b.did].events if not isinstance(e, KnockDecision)] == [
        SessionRekeyed(a.did, "spec"),
        MessageReceived(a.did, "back again", m["id"], ts=fr.iso_timestamp(net.now)),
    ]
    converse(net, a2, b, rounds=2)
    assert same_session(a2, b)


def test_resync_knock_switches_the_peer_with_a_control_message() -> None:
    """After ``session reset`` B re-establishes with ``resync``: A switches on the
    control message alone, without any application message."""
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    b.proto.reset_session(a.did)
    assert b.proto.needs_session(a.did)
    rs = b.establish(a, resync=True)
    assert [f["type"] for f in rs.frames] == ["knock", "message"]
    assert rs.events == [SessionEstablished(a.did, "initiator", "spec")]
    kstep = a.receive(rs.frames[0])
    assert kstep.events == [KnockDecision(b.did, INTENT, rs.frames[0]["id"])]
    cstep = a.receive(rs.frames[1])
    assert cstep.events == [SessionRekeyed(b.did, "spec")]
    assert cstep.acks == [rs.frames[1]["id"]]
    assert received(cstep) == []
    assert a.session(b).role == "responder"
    converse(net, a, b, rounds=3)
    assert same_session(a, b) and same_session(b, a)


def test_control_payload_is_never_delivered() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    step = b.receive(a.send_frame(b, {CONTROL_KEY: "resync"}))
    assert received(step) == [] and step.events == [] and len(step.acks) == 1
    # other payloads that merely mention the key are application data
    assert received(b.receive(a.send_frame(b, {CONTROL_KEY: "x", "y": 1}))) == [{CONTROL_KEY: "x", "y": 1}]


# --------------------------------------------------------------------------------------
# 6. knock_reject
# --------------------------------------------------------------------------------------


def test_knock_reject_removes_an_unproven_session() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    b.policy = lambda decision: False
    est = a.establish(b)
    a.send_frame(b, "never read")
    out = net.route(est.frames)
    (reject,) = b.log[-1].frames
    assert_knock_reply(reject, "knock_reject", b, a, est.frames[0]["id"], net.now)
    assert out[a.did].events == [KnockRejected(b.did, "policy_denied", ignored=False)]
    assert out[a.did].acks == [reject["id"]] and out[a.did].changed == {b.did}
    assert b.did not in a.proto.sessions
    with pytest.raises(MeshProtocolError, match="Call establish"):
        a.send(b, "x")
    assert b.store.has_one_time_pre_key(0)  # rejected before the X3DH ran


def test_knock_reject_after_a_decrypted_reply_is_ignored() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    forged = fr.knock_reject_frame(b.did, a.did, "forged-1", "whatever", TS0)
    step = a.receive(forged)
    assert step.events == [KnockRejected(b.did, "policy_denied", ignored=True)]
    assert step.acks == ["forged-1"]
    assert a.session(b).verified
    converse(net, a, b, rounds=1)


# --------------------------------------------------------------------------------------
# 7. re-key after a peer restart
# --------------------------------------------------------------------------------------


def _restarted(net: Net, old: Agent) -> Agent:
    """The same identity with a brand-new pre-key store and no sessions (a TS-like peer
    that lost its state); it now receives the frames for its DID."""
    fresh = Agent(net, old.label, store_label=f"{old.label}-restarted")
    assert fresh.did == old.did and fresh.store.signed_pre_key != old.store.signed_pre_key
    net.replace(fresh)
    return fresh


def test_rekey_after_peer_restart() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    converse(net, a, b, rounds=2)
    old_knock = a.log[0].frames[0]
    old_primary = b.primary_bytes(a)

    a2 = _restarted(net, a)
    est = a2.establish(b)
    (knock,) = est.frames
    m1, mid = a2.send(b, "I am back")

    kstep = b.receive(knock)
    assert kstep.events == [KnockDecision(a.did, INTENT, knock["id"])]
    (accept,) = kstep.frames
    assert_knock_reply(accept, "knock_accept", b, a2, knock["id"], net.now)
    sb = b.session(a)
    assert len(sb.candidates) == 2 and b.primary_bytes(a) == old_primary  # not switched yet

    mstep = b.receive(m1.frames[0])
    assert mstep.events == [
        SessionRekeyed(a.did, "spec"),
        MessageReceived(a.did, "I am back", mid, ts=TS0),
    ]
    assert mstep.acks == [mid]
    sb = b.session(a)
    assert sb.candidates == [] and sb.previous is not None and sb.role == "responder"
    assert sb.previous.to_bytes() == old_primary

    reply, rid = b.send(a, "welcome back")
    rstep = a2.receive(reply.frames[0])
    assert rstep.events == [E2EVerified(b.did, True), MessageReceived(b.did, "welcome back", rid, ts=TS0)]
    assert a2.receive(accept).events == [KnockAccepted(b.did)]
    converse(net, a2, b, rounds=3)

    # replays of the KNOCK that made the session: ignored, no policy call, no reply frame
    decisions = len(b.decisions)
    for replay in (knock, dict(wire(knock), id="knock-replay-new-id"), old_knock):
        step = b.receive(replay)
        assert step.events == [] and step.frames == [] and step.acks == [replay["id"]]
        assert b.session(a).candidates == []
    assert len(b.decisions) == decisions
    converse(net, a2, b, rounds=1)


def test_replayed_pre_restart_knock_does_not_kill_the_new_session() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    old_knock = a.log[0].frames[0]
    a2 = _restarted(net, a)
    est = a2.establish(b)
    m1 = a2.send_frame(b, "I am back")
    assert received(net.route([*est.frames, m1])[b.did]) == ["I am back"]
    net.route([dict(wire(old_knock), id="old-knock-replayed")])  # before B has replied
    assert b.did in a2.proto.sessions
    converse(net, b, a2, rounds=2)


def test_forged_rekey_knock_cannot_hijack_a_verified_session() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    before = b.primary_bytes(a)
    mallory = Agent(net, "mallory")
    # Mallory's own keys, Alice's DID in `from` (unauthenticated on pre-5.0 relays)
    mallory.proto = MeshProtocol(ProtocolConfig(did=a.did, receipts=False), mallory.store, new_id=mallory.new_id)
    est = mallory.establish(b)
    frame = mallory.send_frame(b, "I am alice, send me the secrets")
    events = b.receive(est.frames[0]).events + b.receive(frame).events
    net.advance(3.1)
    events += b.tick().events
    assert "I am alice, send me the secrets" not in [e.payload for e in events if isinstance(e, MessageReceived)]
    assert b.primary_bytes(a) == before
    converse(net, a, b, rounds=1)


def test_initiator_reestablishing_keeps_the_old_session_for_frames_in_flight() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    in_flight = b.send_frame(a, "sent on the old session")
    old_primary = a.primary_bytes(b)
    est = a.establish(b)  # e.g. the application called establish() again
    assert a.session(b).previous is not None and a.session(b).previous.to_bytes() == old_primary
    step = a.receive(in_flight)
    assert received(step) == ["sent on the old session"]
    m = a.send_frame(b, "on the new session")
    out = net.route([*est.frames, m])
    assert [e for e in out[b.did].events if not isinstance(e, KnockDecision)] == [
        SessionRekeyed(a.did, "spec"),
        MessageReceived(a.did, "on the new session", m["id"], ts=TS0),
    ]
    converse(net, a, b, rounds=2)
    assert same_session(a, b)


# --------------------------------------------------------------------------------------
# 8. glare: both sides KNOCK at once
# --------------------------------------------------------------------------------------


def _glare(order: str) -> tuple[Net, Agent, Agent, list[tuple[str, Any]]]:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    sent: list[tuple[str, Any]] = []
    ka = a.establish(b)
    sa, ida = a.send(b, "a1")
    kb = b.establish(a)
    sb, idb = b.send(a, "b1")
    sent += [(ida, "a1"), (idb, "b1")]
    to_b = [*ka.frames, *sa.frames]
    to_a = [*kb.frames, *sb.frames]
    if order == "a_first":
        net.route(to_b + to_a)
    elif order == "b_first":
        net.route(to_a + to_b)
    else:  # interleaved: both KNOCKs first, then both messages
        net.route([to_b[0], to_a[0], to_b[1], to_a[1]])
    return net, a, b, sent


def _all_received(agent: Agent) -> list[tuple[str, Any]]:
    return [(e.message_id, e.payload) for s in agent.log for e in s.events if isinstance(e, MessageReceived)]


@pytest.mark.parametrize("order", ["a_first", "b_first", "interleaved"])
def test_glare_converges_without_losing_messages(order: str) -> None:
    net, a, b, sent = _glare(order)
    for round_ in range(3):
        for s, r in ((a, b), (b, a)):
            for k in range(2):
                step, mid = s.send(r, f"{s.label}-{round_}-{k}")
                sent.append((mid, f"{s.label}-{round_}-{k}"))
                net.route(step.frames)
    got = _all_received(a) + _all_received(b)
    assert sorted(got) == sorted(sent)  # every message exactly once
    winner = a if a.did < b.did else b
    loser = b if winner is a else a
    # the lower DID keeps the session it initiated; the other side switched to it
    assert winner.session(loser).role == "initiator"
    assert loser.session(winner).role == "responder"
    assert same_session(a, b) and same_session(b, a)
    errors = [e for ag in (a, b) for s in ag.log for e in s.events if isinstance(e, ErrorEvent)]
    assert errors == []


def test_glare_with_a_slow_policy_at_the_winner_still_converges() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    winner, loser = (a, b) if a.did < b.did else (b, a)
    winner.policy = lambda decision: None
    kw = winner.establish(loser)
    mw = winner.send_frame(loser, "w1")
    kl = loser.establish(winner)
    ml = loser.send_frame(winner, "l1")
    net.route([*kw.frames, mw])  # the loser accepts and switches to the winner's session
    net.route([*kl.frames, ml])  # the winner's verdict is pending: l1 waits
    net.route([loser.send_frame(winner, "l2")])  # the loser replies on the winner's session
    (decision,) = winner.decisions
    net.route(winner.resolve(decision.knock_id, True).frames)
    assert sorted(p for _, p in _all_received(winner)) == ["l1", "l2"]
    assert same_session(winner, loser) and same_session(loser, winner)


# --------------------------------------------------------------------------------------
# 9. plaintext peers (the 5.0.0 downgrade latch)
# --------------------------------------------------------------------------------------


def _plaintext_pair(net: Net) -> tuple[Agent, Agent]:
    b, carol = net.agent("bob"), net.agent("carol")
    b.proto.plaintext_peers.add(carol.did)
    carol.proto.plaintext_peers.add(b.did)
    return b, carol


def test_plaintext_frame_from_a_stranger_is_refused() -> None:
    net = Net()
    b = net.agent("bob")
    dave = fake_did(4)
    frame = fr.plaintext_message_frame(dave, b.did, "pt-1", TS0, {"evil": True})
    step = b.receive(frame)
    (err,) = step.events
    assert err.kind == "decrypt" and err.peer == dave and err.frame_id == "pt-1"
    assert err.detail.startswith("plaintext frame refused")
    assert step.acks == ["pt-1"] and received(step) == []


def test_plaintext_peer_round_trip() -> None:
    net = Net()
    b, carol = _plaintext_pair(net)
    assert not carol.proto.needs_session(b.did)
    step, mid = carol.send(b, {"caf\u00e9": "cr\u00e8me"})
    (frame,) = step.frames
    expected = fr.plaintext_message_frame(carol.did, b.did, mid, TS0, {"caf\u00e9": "cr\u00e8me"})
    assert frame == expected and list(frame) == list(expected) and frame["plaintext"] is True
    got = b.receive(frame)
    assert got.events == [MessageReceived(carol.did, {"caf\u00e9": "cr\u00e8me"}, mid, plaintext=True, ts=TS0)]
    assert got.acks == [mid]
    # the flag is not what selects plaintext: an allow-listed peer's headerless frame is
    # plaintext with or without it
    no_flag = {k: v for k, v in wire(frame).items() if k != "plaintext"}
    no_flag["id"] = "pt-no-flag"
    assert b.receive(no_flag).events[0] == MessageReceived(
        carol.did, {"caf\u00e9": "cr\u00e8me"}, "pt-no-flag", plaintext=True, ts=TS0
    )


def test_plaintext_send_refuses_non_latin1() -> None:
    net = Net()
    b, carol = _plaintext_pair(net)
    with pytest.raises(MeshProtocolError, match="Latin-1"):
        carol.send(b, "snowman \u2603")
    with pytest.raises(MeshConfigError):
        carol.send(b, {1, 2})  # not JSON at all


def test_plaintext_payload_that_is_not_json() -> None:
    net = Net()
    b, carol = _plaintext_pair(net)
    frame = fr.plaintext_message_frame(carol.did, b.did, "pt-2", TS0, "x")
    frame["ciphertext"] = base64.b64encode(b"{not json").decode()
    step = b.receive(frame)
    assert step.events == [ErrorEvent("decrypt", carol.did, "plaintext payload is not JSON", "pt-2")]
    assert step.acks == ["pt-2"]


def test_plaintext_latch_after_verification_survives_reset() -> None:
    net = Net()
    b, carol = _plaintext_pair(net)
    # Carol upgrades to an encrypted session (an explicit establish)
    est = carol.establish(b)
    frame = carol.send_frame(b, "encrypted now")
    assert received(net.route([*est.frames, frame])[b.did]) == ["encrypted now"]
    assert carol.did in b.proto.e2e_verified

    def refused(step: Any, fid: str) -> None:
        (err,) = step.events
        assert err.kind == "decrypt" and err.frame_id == fid
        assert err.detail.startswith("plaintext frame refused")
        assert step.acks == [fid]

    pt = fr.plaintext_message_frame(carol.did, b.did, "pt-live", TS0, "downgrade?")
    refused(b.receive(pt), "pt-live")
    assert carol.did in b.proto.sessions
    assert b.proto.reset_session(carol.did).changed == {carol.did}
    assert carol.did not in b.proto.sessions
    refused(b.receive(dict(pt, id="pt-after-reset")), "pt-after-reset")
    assert b.proto.needs_session(carol.did)
    with pytest.raises(MeshProtocolError, match="Call establish"):
        b.send(carol, "x")


def test_headerless_frame_on_a_live_session_is_dropped() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    b.proto.plaintext_peers.add(a.did)  # even an allow-listed peer, once verified
    before = b.primary_bytes(a)
    real = wire(a.send_frame(b, "x"))
    del real["header"]
    step = b.receive(real)
    assert step.events == [
        ErrorEvent("decrypt", a.did, "encrypted message missing ratchet header — dropping", real["id"])
    ]
    assert step.acks == [real["id"]]
    assert b.primary_bytes(a) == before
    assert b.proto.undecryptable == {}


def test_plaintext_flag_on_an_encrypted_frame_is_ignored() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    b.proto.plaintext_peers.add(a.did)
    frame = dict(wire(a.send_frame(b, "still encrypted")), plaintext=True)
    step = b.receive(frame)
    assert step.events == [MessageReceived(a.did, "still encrypted", frame["id"], plaintext=False, ts=TS0)]


def test_deeply_nested_plaintext_payload_does_not_crash() -> None:
    net = Net()
    b, carol = _plaintext_pair(net)
    frame = fr.plaintext_message_frame(carol.did, b.did, "deep-pt", TS0, "x")
    frame["ciphertext"] = base64.b64encode(b"[" * 100_000 + b"]" * 100_000).decode()
    step = b.receive(frame)
    assert step.acks == ["deep-pt"]
    assert [e.kind for e in step.events] == ["decrypt"]


def test_deeply_nested_encrypted_payload_does_not_crash() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    primary = a.session(b).primary
    assert primary is not None
    header, blob = primary.encrypt(b"[" * 100_000 + b"]" * 100_000, a.rng)
    frame = fr.message_frame(a.did, b.did, "deep", TS0, header, blob)
    step = b.receive(frame)
    assert step.acks == ["deep"]
    assert [(e.kind, e.frame_id) for e in events_of(step, ErrorEvent)] == [("decrypt", "deep")]
    assert received(b.receive(a.send_frame(b, "after"))) == ["after"]


def test_decrypted_payload_that_is_not_json() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    primary = a.session(b).primary
    assert primary is not None
    header, blob = primary.encrypt(b"\xff\xfe not json", a.rng)
    step = b.receive(fr.message_frame(a.did, b.did, "nj", TS0, header, blob))
    assert step.events == [ErrorEvent("decrypt", a.did, "decrypted payload is not JSON — dropped", "nj")]
    assert step.acks == ["nj"]
    assert received(b.receive(a.send_frame(b, "after"))) == ["after"]


# --------------------------------------------------------------------------------------
# 10. the responder's outbox
# --------------------------------------------------------------------------------------


def test_responder_queues_until_the_first_message() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    est = a.establish(b)
    b.receive(est.frames[0])
    early, early_id = b.send(a, "early bird")
    assert early.frames == [] and b.proto.queued(a.did) == 1
    m1, mid = a.send(b, "first")
    step = b.receive(m1.frames[0])
    assert step.events == [
        SessionEstablished(a.did, "responder", "spec"),
        E2EVerified(a.did, True),
        MessageReceived(a.did, "first", mid, ts=TS0),
    ]
    (queued,) = step.frames
    assert queued["type"] == "message" and queued["id"] == early_id and queued["to"] == a.did
    assert b.proto.queued(a.did) == 0
    assert a.receive(queued).events == [
        E2EVerified(b.did, True),
        MessageReceived(b.did, "early bird", early_id, ts=TS0),
    ]


def test_responder_outbox_is_bounded() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    b.receive(a.establish(b).frames[0])
    for i in range(1000):
        b.send(a, i)
    with pytest.raises(MeshProtocolError, match="too many messages queued"):
        b.send(a, "one too many")
    assert b.proto.queued(a.did) == 1000


def test_responder_outbox_flushes_on_a_control_message() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    rs = b.establish(a, resync=True)  # B re-establishes; A holds no session with B
    a.receive(rs.frames[0])
    _, qid = a.send(b, "queued while waiting")
    assert a.proto.queued(b.did) == 1
    step = a.receive(rs.frames[1])
    assert [f["id"] for f in step.frames] == [qid]


# --------------------------------------------------------------------------------------
# 11. pending_messages batches
# --------------------------------------------------------------------------------------


def test_pending_messages_batch_processes_entries_one_by_one() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    est = a.establish(b)
    (knock,) = est.frames
    m1, id1 = a.send(b, "one")
    m2, id2 = a.send(b, "two")
    batch = {
        "type": "pending_messages",
        "messages": [
            knock,
            m1.frames[0],
            42,
            {"type": "message", "from": a.did, "id": "bad-1"},
            m2.frames[0],
        ],
    }
    step = b.receive(batch)
    assert step.events == [
        KnockDecision(a.did, INTENT, knock["id"]),
        ErrorEvent("frame", None, "pending message dropped: frame is not a JSON object"),
        ErrorEvent("frame", a.did, "pending message dropped: message ciphertext must be a base64 string", "bad-1"),
        SessionEstablished(a.did, "responder", "spec"),
        E2EVerified(a.did, True),
        MessageReceived(a.did, "one", id1, ts=TS0),
        MessageReceived(a.did, "two", id2, ts=TS0),
    ]
    assert step.acks == ["bad-1", knock["id"], id1, id2]
    (accept,) = step.frames
    assert_knock_reply(accept, "knock_accept", b, a, knock["id"], net.now)


def test_pending_messages_edge_cases() -> None:
    net = Net()
    b = net.agent("bob")
    assert empty(b.receive({"type": "pending_messages"}))
    assert empty(b.receive({"type": "pending_messages", "messages": []}))
    step = b.receive({"type": "pending_messages", "messages": {"not": "a list"}})
    assert step.events == [ErrorEvent("frame", None, "frame dropped: pending_messages.messages must be a list")]
    step = b.receive({"type": "pending_messages", "messages": [None, "x", [], {"type": 5}]})
    assert [e.kind for e in step.events] == ["frame"] * 4 and step.acks == []


# --------------------------------------------------------------------------------------
# 12. relay frames, unknown types, malformed text
# --------------------------------------------------------------------------------------


def test_relay_error_frame() -> None:
    net = Net()
    b = net.agent("bob")
    step = b.receive({"type": "error", "detail": "Unknown frame type: fetch_pending"})
    assert step.events == [ErrorEvent("relay", None, "Unknown frame type: fetch_pending")]
    assert step.acks == [] and step.frames == []
    step = b.receive({"type": "error", "detail": {"code": 4}})
    assert step.events == [ErrorEvent("relay", None, '{"code":4}')]


@pytest.mark.parametrize(
    "frame",
    [
        {"type": "presence", "from": "x"},
        {"type": "ack", "id": "m-1"},
        {"v": 1, "type": "heartbeat", "from": "did:mesh:x", "ts": TS0},
        {"v": 1, "type": "connect", "from": "did:mesh:x"},
        {"v": 1, "type": "fetch_pending", "from": "did:mesh:x"},
        {"v": 1, "type": "disconnect", "from": "did:mesh:x"},
        {"type": "x" * 10_000},
    ],
    ids=lambda f: str(f["type"])[:16],
)
def test_unknown_and_outbound_only_types_are_ignored(frame: dict[str, Any]) -> None:
    net = Net()
    b = net.agent("bob")
    step = b.receive(frame)
    assert empty(step) and step.changed == set()


@pytest.mark.parametrize(
    ("text", "detail"),
    [
        ("not json", "dropping malformed frame: frame is not valid JSON: JSONDecodeError"),
        (b"\xff\xfe\xfa", "dropping malformed frame: frame is not valid JSON: UnicodeDecodeError"),
        ("[1, 2]", "dropping malformed frame: frame is not a JSON object"),
        ('{"a": ' * 50_000, "dropping malformed frame: frame JSON is nested too deeply"),
        ("x" * 2000, "dropping malformed frame: frame of 2000 bytes exceeds the 1000-byte limit"),
    ],
    ids=["garbage", "bad-utf8", "array", "deep", "oversized"],
)
def test_malformed_text_becomes_an_error_event(text: str | bytes, detail: str) -> None:
    net = Net()
    b = net.agent("bob")
    step = b.receive_text(text, max_bytes=1000 if detail.endswith("limit") else 1 << 20)
    assert step.events == [ErrorEvent("frame", None, detail)]
    assert step.acks == [] and step.frames == []


def test_unparseable_message_and_knock_are_acked() -> None:
    net = Net()
    b = net.agent("bob")
    step = b.receive({"type": "message", "from": "did:mesh:x", "id": "m-1", "ciphertext": "%%%"})
    assert step.events == [
        ErrorEvent("frame", "did:mesh:x", "frame dropped: frame field 'ciphertext' is not valid base64", "m-1")
    ]
    assert step.acks == ["m-1"]
    step = b.receive({"type": "knock", "id": "k-1", "from": 5})
    assert step.events == [ErrorEvent("frame", None, "frame dropped: frame field 'from' must be a string", "k-1")]
    assert step.acks == ["k-1"]


@pytest.mark.parametrize("text", ['{"type":"error","detail":NaN}', '{"type":"error","detail":[-Infinity]}'])
def test_relay_error_with_non_finite_detail_does_not_crash(text: str) -> None:
    net = Net()
    b = net.agent("bob")
    step = b.receive_text(text)
    # NaN/Infinity are not JSON: the frame is refused when decoded (strict JSON)
    assert [e.kind for e in step.events] == ["frame"]
    assert "is not a JSON number" in step.events[0].detail  # type: ignore[union-attr]


def test_relay_error_with_deeply_nested_detail_does_not_crash() -> None:
    net = Net()
    b = net.agent("bob")
    for depth in range(1, 1500):  # the failing window depends on the stack depth
        text = '{"type":"error","detail":' + "[" * depth + "]" * depth + "}"
        step = b.receive_text(text)
        assert [e.kind for e in step.events] in (["relay"], ["frame"])


def test_knock_with_a_malformed_establishment_is_rejected() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    knock = wire(a.establish(b).frames[0])
    knock["establishment"]["ek"] = base64.b64encode(b"short").decode()
    step = b.receive(knock)
    assert step.events == [
        KnockDecision(a.did, INTENT, knock["id"]),
        ErrorEvent(
            "knock", a.did, "failed to bootstrap responder from KNOCK: establishment keys must be 32 bytes", knock["id"]
        ),
    ]
    (reject,) = step.frames
    assert_knock_reply(reject, "knock_reject", b, a, knock["id"], net.now)


def test_knock_naming_an_unknown_one_time_key_is_rejected() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    knock = wire(a.establish(b).frames[0])
    knock["establishment"]["otk"] = 999
    step = b.receive(knock)
    assert [type(e) for e in step.events] == [KnockDecision, ErrorEvent]
    assert step.events[1].kind == "knock" and "999" in step.events[1].detail
    assert [f["type"] for f in step.frames] == ["knock_reject"]
    assert a.did not in b.proto.sessions


# --------------------------------------------------------------------------------------
# 13. state restore
# --------------------------------------------------------------------------------------


def test_restored_session_continues_without_knock() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    converse(net, a, b, rounds=2)
    old = a.send_frame(b, "chain before")
    assert received(b.receive(old)) == ["chain before"]
    converse(net, a, b, rounds=1)  # `old` is now from an earlier receiving chain

    state = b.session(a).to_bytes()
    restored = PeerSession.from_bytes(state)
    assert restored.to_bytes() == state
    seen = list(b.proto.seen_ids())

    b2 = Agent(net, "bob", store=b.store)
    b2.proto.restore_session(restored)
    b2.proto.mark_seen(seen)
    net.replace(b2)
    assert not b2.proto.needs_session(a.did)
    assert a.did in b2.proto.e2e_verified and b2.proto.peer_profiles[a.did] == KdfProfile.SPEC

    # the dedupe window came back too: a redelivered old frame is a duplicate by id
    dup = b2.receive(old)
    assert dup.events == [ErrorEvent("duplicate", a.did, "duplicate message id — dropped", old["id"])]
    step, mid = a.send(b2, "after restore")
    got = b2.receive(step.frames[0])
    assert got.events == [MessageReceived(a.did, "after restore", mid, ts=TS0)]  # no E2EVerified again
    assert [f for f in got.frames if f["type"] == "knock"] == []
    converse(net, a, b2, rounds=3)


def test_restored_plaintext_latch_comes_from_the_session() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    b2 = Agent(net, "bob", store=b.store)
    b2.proto.plaintext_peers.add(a.did)
    b2.proto.restore_session(PeerSession.from_bytes(b.session(a).to_bytes()))
    b2.proto.reset_session(a.did)
    step = b2.receive(fr.plaintext_message_frame(a.did, b.did, "pt", TS0, "downgrade"))
    assert received(step) == [] and step.events[0].detail.startswith("plaintext frame refused")


# --------------------------------------------------------------------------------------
# 14. flood bounds
# --------------------------------------------------------------------------------------


def test_knock_flood_is_capped() -> None:
    net = Net()
    b = net.agent("bob")
    b.policy = lambda decision: None
    rng = Drbg("knock-flood")
    for i in range(1000):
        step = b.receive(forged_knock(fake_did(i), b.did, f"k-{i}", rng))
        assert [type(e) for e in step.events] == [KnockDecision] and step.acks == []
    assert len(b.proto._pending_knocks) == 1000
    step = b.receive(forged_knock(fake_did(1000), b.did, "k-1000", rng))
    assert step.events == [
        ErrorEvent("knock", fake_did(1000), "too many KNOCKs awaiting a verdict — dropped", "k-1000")
    ]
    assert step.acks == ["k-1000"] and step.frames == []
    assert len(b.proto._pending_knocks) == 1000
    net.advance(10)
    step = b.tick()
    assert len(step.frames) == 1000 and {f["type"] for f in step.frames} == {"knock_reject"}
    assert step.acks == [f"k-{i}" for i in range(1000)]
    assert b.proto._pending_knocks == {} and b.proto.sessions == {}


def test_rekey_flood_keeps_candidates_bounded() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    before = b.primary_bytes(a)
    rng = Drbg("rekey-flood")
    for i in range(25):  # Alice's real identity key, new ephemeral keys: each one a candidate
        step = b.receive(forged_knock(a.did, b.did, f"fk-{i}", rng, ik=a.identity.x25519_public))
        assert [f["type"] for f in step.frames] == ["knock_accept"]
        assert len(b.session(a).candidates) <= MAX_CANDIDATES
    assert len(b.session(a).candidates) == MAX_CANDIDATES
    assert b.primary_bytes(a) == before
    converse(net, a, b, rounds=2)


def test_dedupe_memory_is_bounded() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob", dedupe_window=64)
    net.connect(a, b)
    ids = [b.receive(a.send_frame(b, i)).acks[0] for i in range(200)]
    seen = list(b.proto.seen_ids())
    assert len(seen) == 64 and seen == ids[-64:]
    rng = Drbg("knock-window")
    for i in range(200):
        b.receive(forged_knock(fake_did(i), b.did, f"kw-{i}", rng))
    assert len(b.proto._seen_knocks) == 64


def test_next_deadline_tracks_buffer_and_knocks() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    assert b.proto.next_deadline() is None
    b.policy = lambda decision: None
    est = a.establish(b)
    b.receive(est.frames[0])
    assert b.proto.next_deadline() == T0 + 10.0
    net.advance(1)
    b.receive(garbage_message(fake_did(1), b.did, "g", Drbg("nd")))
    assert b.proto.next_deadline() == T0 + 4.0
