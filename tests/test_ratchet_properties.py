"""Property tests of the Double Ratchet (hypothesis draws conversations and corruptions)."""

from __future__ import annotations

from dataclasses import dataclass, field

from helpers import Drbg, Pair, flip, make_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agt_mesh.core.ratchet import DoubleRatchet
from agt_mesh.errors import (
    DecryptError,
    DuplicateMessageError,
    MalformedMessageError,
    MessageAuthError,
    TooManySkippedError,
)

FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Msg = tuple[bytes, bytes]


# --------------------------------------------------------------------------------------
# conversation scripts
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    """One party sends ``len(order)`` messages; they are delivered in ``order``, except the
    ones marked ``held``, which are delivered after the last turn."""

    sender: str
    order: tuple[int, ...]
    held: tuple[bool, ...]


@dataclass(frozen=True)
class Script:
    turns: tuple[Turn, ...]
    final_order: tuple[int, ...]  # permutation of the held messages, delivered at the end


def _turn(max_count: int) -> st.SearchStrategy[Turn]:
    return st.integers(1, max_count).flatmap(
        lambda k: st.builds(
            Turn,
            st.sampled_from("ab"),
            st.permutations(range(k)).map(tuple),
            st.lists(st.booleans(), min_size=k, max_size=k).map(tuple),
        )
    )


@st.composite
def scripts(draw: st.DrawFn, max_turns: int = 6, max_count: int = 6) -> Script:
    turns = tuple(draw(st.lists(_turn(max_count), min_size=1, max_size=max_turns)))
    held = sum(sum(t.held) for t in turns)
    final = tuple(draw(st.permutations(range(held))))
    return Script(turns, final)


@dataclass
class Event:
    op: str  # "enc" or "dec"
    who: str  # "a" or "b": who encrypts / who decrypts
    msg: int  # message number in sending order


@dataclass
class Plan:
    events: list[Event] = field(default_factory=list)
    sender: dict[int, str] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return len(self.sender)


def compile_script(script: Script) -> Plan:
    """Turn a script into a list of encrypt/decrypt events.

    Bob cannot send before he has received something, so such a turn is given to Alice.
    """
    plan = Plan()
    bob_received = False
    held: list[int] = []
    for turn in script.turns:
        sender = turn.sender
        if sender == "b" and not bob_received:
            sender = "a"
        receiver = "b" if sender == "a" else "a"
        first = plan.count
        for i in range(len(turn.order)):
            plan.sender[first + i] = sender
            plan.events.append(Event("enc", sender, first + i))
        for i in turn.order:
            if turn.held[i]:
                held.append(first + i)
            else:
                plan.events.append(Event("dec", receiver, first + i))
                bob_received |= receiver == "b"
    for j in script.final_order:
        msg = held[j]
        plan.events.append(Event("dec", "b" if plan.sender[msg] == "a" else "a", msg))
    return plan


def plaintext(msg: int) -> bytes:
    return f"message {msg} ".encode() + bytes([msg % 256]) * (msg % 7)


@dataclass
class Run:
    pair: Pair
    rng: Drbg
    sent: dict[int, Msg] = field(default_factory=dict)
    trace: list[bytes] = field(default_factory=list)

    def party(self, who: str) -> DoubleRatchet:
        return self.pair.alice if who == "a" else self.pair.bob

    def restore_both(self) -> None:
        self.pair.alice = DoubleRatchet.from_bytes(self.pair.alice.to_bytes())
        self.pair.bob = DoubleRatchet.from_bytes(self.pair.bob.to_bytes())

    def step(self, ev: Event) -> None:
        r = self.party(ev.who)
        if ev.op == "enc":
            header, blob = r.encrypt(plaintext(ev.msg), self.rng)
            self.sent[ev.msg] = (header, blob)
            self.trace += [header, blob]
        else:
            got = r.decrypt(*self.sent[ev.msg], self.rng)
            assert got == plaintext(ev.msg)
            self.trace.append(got)


def run_plan(plan: Plan, label: str, restore_at: frozenset[int] = frozenset()) -> Run:
    rng = Drbg(label)
    run = Run(make_pair(rng), rng)
    for index, ev in enumerate(plan.events):
        if index in restore_at:
            run.restore_both()
        run.step(ev)
    run.trace += [run.pair.alice.to_bytes(), run.pair.bob.to_bytes()]
    return run


def _assert_rejected(r: DoubleRatchet, header: bytes, blob: bytes, rng: Drbg) -> DecryptError:
    before = r.to_bytes()
    try:
        r.decrypt(header, blob, rng)
    except DecryptError as exc:
        assert isinstance(
            exc,
            MessageAuthError | MalformedMessageError | DuplicateMessageError | TooManySkippedError,
        )
        assert r.to_bytes() == before
        return exc
    raise AssertionError("a corrupted or replayed message was accepted")


# --------------------------------------------------------------------------------------
# (a) any delivery order within the skip window decrypts every message exactly once
# --------------------------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(order=st.integers(1, 30).flatmap(lambda k: st.permutations(range(k))))
def test_any_permutation_of_one_batch(order: list[int]) -> None:
    rng = Drbg("perm-batch")
    p = make_pair(rng)
    msgs = [p.alice.encrypt(plaintext(i), rng) for i in range(len(order))]
    for i in order:
        assert p.bob.decrypt(*msgs[i], rng) == plaintext(i)
    assert p.bob.skipped_count == 0
    for i in order:  # exactly once
        _assert_rejected(p.bob, *msgs[i], rng)


@FAST
@given(script=scripts())
def test_multi_turn_conversations_shuffled_within_turns(script: Script) -> None:
    plan = compile_script(script)
    run = run_plan(plan, "multi-turn")
    delivered = [e.msg for e in plan.events if e.op == "dec"]
    assert sorted(delivered) == list(range(plan.count))
    assert run.pair.alice.skipped_count == 0
    assert run.pair.bob.skipped_count == 0
    for msg, (header, blob) in run.sent.items():  # nothing decrypts twice
        receiver = run.party("b" if plan.sender[msg] == "a" else "a")
        _assert_rejected(receiver, header, blob, run.rng)


# --------------------------------------------------------------------------------------
# (b) any single-byte corruption fails, changes nothing, and the original still decrypts
# --------------------------------------------------------------------------------------

SCENARIOS = ("first", "current", "skipped", "new-chain", "previous-chain-cached")


def _scenario(name: str, p: Pair, rng: Drbg) -> tuple[DoubleRatchet, Msg, bytes]:
    """Put the session in a state where ``target`` reaches a given decrypt path."""
    a1 = [p.alice.encrypt(plaintext(i), rng) for i in range(4)]
    if name == "first":
        return p.bob, a1[0], plaintext(0)
    p.bob.decrypt(*a1[0], rng)
    if name == "current":
        return p.bob, a1[1], plaintext(1)
    p.bob.decrypt(*a1[3], rng)
    if name == "skipped":
        return p.bob, a1[2], plaintext(2)
    reply = p.bob.encrypt(plaintext(100), rng)
    p.alice.decrypt(*reply, rng)
    a2 = p.alice.encrypt(plaintext(200), rng)
    if name == "new-chain":
        return p.bob, a2, plaintext(200)
    p.bob.decrypt(*a2, rng)
    return p.bob, a1[1], plaintext(1)  # cached key of the previous chain


@settings(max_examples=800, deadline=None)
@given(
    scenario=st.sampled_from(SCENARIOS),
    part=st.sampled_from(("header", "blob", "ad")),
    data=st.data(),
)
def test_single_byte_corruption(scenario: str, part: str, data: st.DataObject) -> None:
    rng = Drbg(f"corrupt/{scenario}")
    p = make_pair(rng)
    receiver, (header, blob), expected = _scenario(scenario, p, rng)
    mask = data.draw(st.integers(1, 255), label="xor")
    if part == "ad":
        pos = data.draw(st.integers(0, len(p.ad) - 1), label="pos")
        wrong = receiver.copy()
        wrong.ad = flip(p.ad, pos, mask)
        before = wrong.to_bytes()
        exc = _assert_rejected(wrong, header, blob, rng)
        assert isinstance(exc, MessageAuthError)
        assert wrong.to_bytes() == before
    elif part == "header":
        pos = data.draw(st.integers(0, len(header) - 1), label="pos")
        _assert_rejected(receiver, flip(header, pos, mask), blob, rng)
    else:
        pos = data.draw(st.integers(0, len(blob) - 1), label="pos")
        exc = _assert_rejected(receiver, header, flip(blob, pos, mask), rng)
        assert isinstance(exc, MessageAuthError)
    assert receiver.decrypt(header, blob, rng) == expected


# --------------------------------------------------------------------------------------
# (c) a duplicate is rejected without changing state
# --------------------------------------------------------------------------------------


@FAST
@given(script=scripts(max_turns=5, max_count=5), data=st.data())
def test_duplicate_rejected_without_state_change(script: Script, data: st.DataObject) -> None:
    plan = compile_script(script)
    # Replay a message at a random point after its first delivery.
    dec_points = [i for i, e in enumerate(plan.events) if e.op == "dec"]
    first_delivery = data.draw(st.sampled_from(dec_points), label="first delivery")
    replay_at = data.draw(st.integers(first_delivery + 1, len(plan.events)), label="replay at")
    ev = plan.events[first_delivery]
    rng = Drbg("dup-prop")
    run = Run(make_pair(rng), rng)
    for index, e in enumerate(plan.events):
        if index == replay_at:
            other = run.party("b" if ev.who == "a" else "a")
            other_before = other.to_bytes()
            _assert_rejected(run.party(ev.who), *run.sent[ev.msg], rng)
            assert other.to_bytes() == other_before
        run.step(e)
    if replay_at == len(plan.events):
        _assert_rejected(run.party(ev.who), *run.sent[ev.msg], rng)
    # the session still works both ways
    if run.pair.bob.can_send:
        msg = run.pair.bob.encrypt(b"after", rng)
        assert run.pair.alice.decrypt(*msg, rng) == b"after"
    msg = run.pair.alice.encrypt(b"again", rng)
    assert run.pair.bob.decrypt(*msg, rng) == b"again"


# --------------------------------------------------------------------------------------
# (d) serialise -> load at any points continues the conversation identically
# --------------------------------------------------------------------------------------


@FAST
@given(script=scripts(), data=st.data())
def test_restore_at_any_point_continues_identically(script: Script, data: st.DataObject) -> None:
    plan = compile_script(script)
    restore_at = data.draw(
        st.frozensets(st.integers(0, len(plan.events) - 1), min_size=1, max_size=4),
        label="restore at",
    )
    reference = run_plan(plan, "restore-prop")
    restored = run_plan(plan, "restore-prop", restore_at)
    assert restored.trace == reference.trace
    assert restored.rng.position == reference.rng.position
