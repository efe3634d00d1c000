"""End-to-end receipts between agt_mesh peers (an extension other clients ignore)."""

from __future__ import annotations

from typing import Any

from helpers import Agent, Net, received

from agt_mesh.core.protocol import CONTROL_KEY


def _pair(net: Net, *, b_receipts: bool = True) -> tuple[Agent, Agent]:
    a = net.agent("alice", receipts=True, receipt_timeout=5.0)
    b = net.agent("bob", receipts=b_receipts)
    net.connect(a, b)
    return a, b


def _tick_and_route(net: Net, *agents: Agent) -> dict[str, Any]:
    frames = [f for agent in agents for f in agent.tick().frames]
    return net.route(frames)


def test_receipts_confirm_messages_and_are_not_delivered_to_the_app() -> None:
    net = Net()
    a, b = _pair(net)
    frames = [a.send_frame(b, {"n": i}) for i in range(3)]
    assert all(f["rr"] == 1 for f in frames)
    assert received(net.route(frames)[b.did]) == [{"n": 0}, {"n": 1}, {"n": 2}]
    assert a.proto.unconfirmed(b.did) >= 3
    net.advance(0.5)
    out = _tick_and_route(net, b)  # b sends one control message with the receipts
    assert received(out[a.did]) == []  # not for the application
    assert a.proto.unconfirmed(b.did) == 0
    assert b.did in a.proto.receipt_peers


def test_a_frame_lost_by_the_relay_is_sent_again_and_delivered_once() -> None:
    net = Net()
    a, b = _pair(net)
    net.advance(0.5)
    _tick_and_route(net, b)  # a learns that b sends receipts
    f0, f1, f2 = (a.send_frame(b, {"n": i}) for i in range(3))
    # f1 lost in a dead socket: f2 is committed and receipted but held back for it
    assert received(net.route([f0, f2])[b.did]) == [{"n": 0}]
    net.advance(0.5)
    _tick_and_route(net, b)
    assert a.proto.unconfirmed(b.did) == 1
    net.advance(5.1)
    resent = [x for x in a.tick().frames if x.get("rr")]  # (a's own receipts to b do not ask for one)
    assert resent == [f1]  # the identical frame: same id, same ciphertext
    # its key was cached as skipped; f2 follows it
    assert received(net.route(resent)[b.did]) == [{"n": 1}, {"n": 2}]
    net.advance(0.5)
    _tick_and_route(net, b)
    assert a.proto.unconfirmed(b.did) == 0


def test_a_resent_frame_already_processed_is_deduplicated_and_confirmed_again() -> None:
    net = Net()
    a, b = _pair(net)
    net.advance(0.5)
    _tick_and_route(net, b)
    f = a.send_frame(b, "once")
    assert received(net.route([f])[b.did]) == ["once"]
    b.tick()  # b's receipt is "lost": its frames are never routed
    net.advance(5.1)
    resent = [x for x in a.tick().frames if x.get("rr")]
    assert resent == [f]
    step = net.route(resent)[b.did]
    assert received(step) == [] and f["id"] in step.acks
    net.advance(0.5)
    out = _tick_and_route(net, b)
    assert received(out[a.did]) == []
    assert a.proto.unconfirmed(b.did) == 0


def test_nothing_is_resent_to_a_peer_that_never_sends_receipts() -> None:
    net = Net()
    a, b = _pair(net, b_receipts=False)  # like a TypeScript peer
    for i in range(300):
        net.route([a.send_frame(b, i)])
    net.advance(60)
    out = _tick_and_route(net, a, b)
    assert out == {} or all(not s.frames for s in out.values())
    assert a.proto.unconfirmed(b.did) == 200  # a small window, in case it turns out to receipt
    assert b.did not in a.proto.receipt_peers


def test_control_payload_shape() -> None:
    net = Net()
    a, b = _pair(net)
    a.send_frame(b, "x")
    net.route([f for f in a.log[-1].frames])
    net.advance(0.5)
    frames = b.tick().frames
    assert len(frames) == 1 and frames[0]["type"] == "message" and "rr" not in frames[0]
    assert CONTROL_KEY == "agt_mesh_control"
