"""Per-sender order between agt_mesh peers: messages after a gap are held back until the
re-sent message fills it (``"sq"``, an extension other clients ignore)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers import Agent, Net, events_of, received
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agt_mesh.core import frames as fr
from agt_mesh.core.events import ErrorEvent
from agt_mesh.core.session import PeerSession
from agt_mesh.shell.store import StateStore


def _pair(net: Net, **b_config: Any) -> tuple[Agent, Agent]:
    a = net.agent("alice", receipts=True, receipt_timeout=5.0)
    b_config.setdefault("receipts", True)
    b = net.agent("bob", **b_config)
    net.connect(a, b)
    net.advance(0.5)
    _tick_and_route(net, a, b)  # both learn that the other sends receipts
    return a, b


def _tick_and_route(net: Net, *agents: Agent) -> dict[str, Any]:
    return net.route([f for agent in agents for f in agent.tick().frames])


def _resend(net: Net, a: Agent) -> list[dict[str, Any]]:
    """Let a's receipt timeout pass and return the frames it sends again."""
    net.advance(5.1)
    return [x for x in a.tick().frames if x.get("rr")]


def _gaps(step: Any) -> list[ErrorEvent]:
    return [e for e in events_of(step, ErrorEvent) if e.kind == "gap"]


def test_receipted_messages_carry_a_per_session_sequence() -> None:
    net = Net()
    a, b = _pair(net)
    first = a.session(b).send_seq
    frames = [a.send_frame(b, i) for i in range(3)]
    assert [f["sq"] for f in frames] == [first + 1, first + 2, first + 3]
    assert fr.parse_frame(frames[0]).seq == first + 1  # type: ignore[union-attr]
    plain = net.agent("carol")  # receipts off, like a TypeScript peer: no sequence either
    net.connect(plain, b)
    f = plain.send_frame(b, "x")
    assert "sq" not in f and "rr" not in f


def test_a_gap_holds_later_messages_back_until_the_resend_fills_it() -> None:
    net = Net()
    a, b = _pair(net)
    f = [a.send_frame(b, {"n": i}) for i in range(6)]
    step = net.route([f[0], f[2], f[4], f[5]])[b.did]  # f1 and f3 died in a dead socket
    assert received(step) == [{"n": 0}]
    # the held messages are committed, acknowledged and will be receipted like any other
    assert {f[2]["id"], f[4]["id"], f[5]["id"]} <= set(step.acks) and step.seen[-3:] == [
        f[2]["id"],
        f[4]["id"],
        f[5]["id"],
    ]
    assert b.proto.held_back(a.did) == 3 and b.proto.held_back() == 3
    assert b.proto.next_deadline() is not None
    net.advance(0.5)
    _tick_and_route(net, b)
    assert a.proto.unconfirmed(b.did) == 2  # only the lost ones
    resent = _resend(net, a)
    assert resent == [f[1], f[3]]
    assert received(net.route(resent[:1])[b.did]) == [{"n": 1}, {"n": 2}]
    assert received(net.route(resent[1:])[b.did]) == [{"n": 3}, {"n": 4}, {"n": 5}]
    assert b.proto.held_back() == 0
    assert received(net.route([a.send_frame(b, "next")])[b.did]) == ["next"]


def test_a_gap_that_never_fills_is_given_up_after_the_reorder_timeout() -> None:
    net = Net()
    a, b = _pair(net, reorder_timeout=20.0)
    f = [a.send_frame(b, {"n": i}) for i in range(4)]
    assert received(net.route([f[0], f[2], f[3]])[b.did]) == [{"n": 0}]
    net.advance(19.0)
    assert received(b.tick()) == []
    net.advance(1.5)
    step = b.tick()
    assert received(step) == [{"n": 2}, {"n": 3}]
    (gap,) = _gaps(step)
    assert gap.peer == a.did and f"message(s) {f[1]['sq']} of this session did not arrive" in gap.detail
    assert a.did in step.changed
    # should the lost message come after all, it is delivered, not dropped
    assert received(net.route([f[1]])[b.did]) == [{"n": 1}]
    assert received(net.route([a.send_frame(b, "after")])[b.did]) == ["after"]


def test_held_messages_survive_a_restart_of_the_receiver() -> None:
    net = Net()
    a, b = _pair(net)
    f = [a.send_frame(b, {"n": i}) for i in range(4)]
    assert received(net.route([f[0], f[2], f[3]])[b.did]) == [{"n": 0}]
    saved = b.session(a).to_bytes()
    assert b'{"n":2}' in saved  # held plaintext is part of the committed session state
    b2 = Agent(net, "bob", store=b.store, receipts=True)
    b2.proto.restore_session(PeerSession.from_bytes(saved))
    net.replace(b2)
    assert b2.proto.held_back(a.did) == 2
    assert received(net.route([f[1]])[b.did]) == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert b2.session(a).summary()["held_back"] == 0


def test_an_application_retry_of_an_unconfirmed_message_is_the_identical_frame() -> None:
    net = Net()
    a, b = _pair(net)
    step, mid = a.send(b, "report")
    (frame,) = step.frames
    retry, mid2 = a.send(b, "report", message_id=mid)
    assert mid2 == mid and retry.frames == [frame] and not retry.changed
    assert a.proto.unconfirmed(b.did) == 1


def test_a_re_encrypted_duplicate_takes_its_slot_so_nothing_waits_for_it() -> None:
    """A sender that crashed after its message was confirmed may send the same id again
    (a new encryption with the next sequence number): the receiver drops it by id but
    counts its number as delivered."""
    net = Net()
    a, b = _pair(net)
    step, mid = a.send(b, "once")
    assert received(net.route(step.frames)[b.did]) == ["once"]
    net.advance(0.5)
    _tick_and_route(net, b)
    assert a.proto.unconfirmed(b.did) == 0
    again, _ = a.send(b, "once", message_id=mid)
    (dup,) = again.frames
    later = a.send_frame(b, "later")
    out = net.route([later, dup])[b.did]  # the duplicate even arrives after the next one
    assert received(out) == ["later"]
    assert b.proto.held_back() == 0 and b.session(a).recv_seq == later["sq"]


def test_a_duplicate_id_with_a_foreign_sequence_number_cannot_take_a_slot() -> None:
    net = Net()
    a, b = _pair(net)
    f = [a.send_frame(b, {"n": i}) for i in range(3)]
    assert received(net.route([f[0], f[2]])[b.did]) == [{"n": 0}]
    forged = dict(f[0], sq=f[1]["sq"])  # a replayed frame claiming the missing number
    assert received(net.route([forged])[b.did]) == []
    assert b.proto.held_back(a.did) == 1  # still waiting for the real one
    assert received(net.route([f[1]])[b.did]) == [{"n": 1}, {"n": 2}]


def test_rewritten_sequence_numbers_delay_or_reorder_but_never_lose() -> None:
    net = Net()
    a, b = _pair(net, reorder_timeout=10.0)
    f = [a.send_frame(b, {"n": i}) for i in range(3)]
    far = dict(f[0], sq=fr.MAX_SEQ)
    assert received(net.route([far])[b.did]) == []
    net.advance(5)
    assert received(net.route([f[1]])[b.did]) == []  # waits for its predecessor (sent as "far")
    net.advance(4.5)
    assert received(b.tick()) == []
    net.advance(1)  # "far" waited 10 s: it and everything before it go
    step = b.tick()
    assert received(step) == [{"n": 1}, {"n": 0}] and len(_gaps(step)) == 2
    assert b.proto.held_back() == 0
    assert received(net.route([f[2]])[b.did]) == [{"n": 2}]  # below the (rewritten) high mark: at once
    bad = [dict(a.send_frame(b, "x"), sq=v) for v in (0, -1, "3", True, 1.5, fr.MAX_SEQ + 1)]
    assert received(net.route(bad)[b.did]) == ["x"] * len(bad)  # unusable numbers: not ordered


def test_each_held_message_waits_at_most_the_reorder_timeout() -> None:
    net = Net()
    a, b = _pair(net, reorder_timeout=10.0)
    f = [a.send_frame(b, i) for i in range(5)]
    net.route([f[0], f[4]])  # 4 held at t=0 (waiting for 1..3)
    net.advance(6)
    net.route([f[2]])  # 2 held at t=6 (waiting for 1)
    net.advance(4.5)  # t=10.5: 4 is due, so 2 before it goes too
    step = b.tick()
    assert received(step) == [2, 4] and len(_gaps(step)) == 2
    assert received(net.route([f[1], f[3]])[b.did]) == [1, 3]


def test_too_many_held_messages_give_up_the_oldest_gap() -> None:
    net = Net()
    a, b = _pair(net, max_held=3)
    f = [a.send_frame(b, i) for i in range(7)]
    delivered: list[Any] = []
    for frame in [f[0], *f[2:]]:
        step = net.route([frame])[b.did]
        delivered += received(step)
        if _gaps(step):
            assert frame is f[5]
    assert delivered == [0, 2, 3, 4, 5, 6]
    assert received(net.route([f[1]])[b.did]) == [1]


def test_a_new_session_from_the_peer_releases_what_the_old_one_held() -> None:
    net = Net()
    a, b = _pair(net)
    f = [a.send_frame(b, {"n": i}) for i in range(3)]
    assert received(net.route([f[0], f[2]])[b.did]) == [{"n": 0}]
    est = a.establish(b, resync=True)  # a restarted without its state and re-KNOCKs
    assert a.session(b).send_seq == 0
    hello = a.send_frame(b, "new session")
    assert hello["sq"] == 1
    out = net.route([*est.frames, hello])[b.did]
    assert received(out) == [{"n": 2}, "new session"]
    assert len(_gaps(out)) == 1
    assert b.session(a).recv_seq == 1 and b.session(a).send_seq == 0
    assert received(net.route([a.send_frame(b, "two")])[b.did]) == ["two"]


def test_re_establishing_ourselves_and_resetting_release_held_messages() -> None:
    net = Net()
    a, b = _pair(net)
    f = [a.send_frame(b, i) for i in range(3)]
    net.route([f[0], f[2]])
    step = b.establish(a)
    assert received(step) == [2] and b.proto.held_back() == 0
    net2 = Net()
    a2, b2 = _pair(net2)
    g = [a2.send_frame(b2, i) for i in range(3)]
    net2.route([g[0], g[2]])
    reset = b2.proto.reset_session(a2.did)
    assert received(reset) == [2] and reset.changed == {a2.did}


def test_undecryptable_frames_leave_held_messages_and_the_session_alone() -> None:
    """Forged frames cost no state: what the session holds back stays held, in order."""
    net = Net()
    a, b = _pair(net)
    f = [a.send_frame(b, i) for i in range(3)]
    net.route([f[0], f[2]])
    net.advance(1)
    net.route(b.tick().frames)  # the receipts for f[0] and f[2] (they advance b's sending chain)
    before = b.session(a).to_bytes()
    out: list[Any] = []
    for k in range(5):
        junk = dict(a.send_frame(b, "junk"), id=f"junk-{k}", ciphertext="AAAA" * 20)
        step = b.receive(junk)
        out += received(step)
        net.advance(4)
        out += received(b.tick())
    assert out == [] and b.session(a).to_bytes() == before and b.proto.held_back() == 1
    assert received(net.route([f[1]])[b.did]) == [1, 2]


def test_no_ordering_without_receipts_or_with_timeout_zero() -> None:
    for config in ({"receipts": False}, {"reorder_timeout": 0.0}):
        net = Net()
        a, b = _pair(net, **config)
        f = [a.send_frame(b, i) for i in range(3)]
        assert received(net.route([f[0], f[2]])[b.did]) == [0, 2], config
        assert b.proto.held_back() == 0


def test_store_reset_moves_held_messages_to_the_inbox(tmp_path: Path) -> None:
    net = Net()
    a, b = _pair(net)
    f = [a.send_frame(b, {"n": i}) for i in range(3)]
    net.route([f[0], f[2]])
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    store = StateStore(state, did=b.did).open()
    try:
        store.commit(sessions={a.did: b.session(a)})
        assert store.delete_session(a.did) == 1
        (msg,) = store.load_inbox()
        assert (msg.sender, msg.payload, msg.message_id) == (a.did, {"n": 2}, f[2]["id"])
        assert store.load_sessions() == [] and store.delete_session(a.did) == 0
    finally:
        store.close()


def test_messages_are_delivered_in_sequence_order_under_any_arrival_order() -> None:
    """Any permutation with losses that are re-sent yields the sender's order."""
    import random

    rng = random.Random(7)
    for _ in range(20):
        net = Net()
        a, b = _pair(net)
        frames = [a.send_frame(b, i) for i in range(12)]
        lost = set(rng.sample(range(12), 4))
        arrive = [fr_ for i, fr_ in enumerate(frames) if i not in lost]
        rng.shuffle(arrive)
        got: list[Any] = []
        for frame in arrive:
            got += received(net.route([frame])[b.did])
        net.advance(0.5)
        _tick_and_route(net, b)
        resent = _resend(net, a)
        rng.shuffle(resent)
        for frame in resent:
            got += received(net.route([frame])[b.did])
        assert got == list(range(12))
        assert not [e for s in b.log for e in _gaps(s)]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(1, 10),
    data=st.data(),
)
def test_property_any_arrival_order_losses_and_duplicates_deliver_in_order_once(n: int, data: st.DataObject) -> None:
    """Frames arrive in any order, some twice, some not at all; receipts and re-sends
    (themselves in any order) fill the gaps: the application sees 0..n-1, once each."""
    net = Net()
    a, b = _pair(net)
    frames = [a.send_frame(b, i) for i in range(n)]
    arrivals = data.draw(st.lists(st.integers(0, n - 1), max_size=2 * n), label="arrivals")
    got: list[Any] = []
    for i in arrivals:
        got += received(net.route([frames[i]])[b.did])
    net.advance(0.5)
    _tick_and_route(net, b)
    resent = _resend(net, a)
    assert sorted(f["sq"] for f in resent) == sorted(frames[i]["sq"] for i in set(range(n)) - set(arrivals))
    order = data.draw(st.permutations(resent), label="re-sent order")
    for frame in order:
        got += received(net.route([frame, frame])[b.did])  # each re-send duplicated as well
    assert got == list(range(n))
    assert b.proto.held_back() == 0 and not [e for s in b.log for e in _gaps(s)]
