"""Hostile inbound frames against an established session (hypothesis).

Every example starts from a fresh, established Alice↔Bob session (plus an allow-listed
plaintext peer, Pat) and throws one to three hostile inputs at Bob: arbitrary JSON values,
frames of the right shape with wrong types, bad base64, missing or huge fields, headers
with out-of-range counters, forged ``plaintext`` flags, Alice's DID on random ciphertext,
replays of real frames, deeply nested and oversized text.  After each input the clock
moves 4 s (past the pre-KNOCK buffer TTL) and Bob ticks.  Properties:

* ``receive``/``receive_text``/``tick`` never raise;
* no hostile input is delivered as a message (except Pat's plaintext, which is
  unauthenticated by design) and none changes Bob's session with Alice — the whole
  serialized session, not only its ratchet: forgery never costs state, however many
  spoofed frames with Alice's DID arrive in a row;
* right after it, a fresh message from Alice decrypts at Bob and is delivered once.

The default budget keeps this file at a few seconds; ``AGT_FUZZ_EXAMPLES=N`` sets the
examples per test for a long run, which ends with a line such as
``protocol fuzz: 51234 hostile inputs in 20000 examples, 0 crashes``.
"""

from __future__ import annotations

import base64
import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from helpers import Agent, Drbg, Net, fake_did, identity, wire
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agt_mesh.core import frames as fr
from agt_mesh.core.encoding import compact_json
from agt_mesh.core.events import MessageReceived
from agt_mesh.core.protocol import Step

EXAMPLES = int(os.environ.get("AGT_FUZZ_EXAMPLES", "0")) or 150
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

STATS: Counter[str] = Counter()

A_DID = identity("alice").did
B_DID = identity("bob").did
C_DID = fake_did(0xC)  # a stranger
P_DID = fake_did(0x9A7)  # Pat, an allow-listed plaintext peer


@pytest.fixture(scope="module", autouse=True)
def _report(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    line = (
        f"protocol fuzz: {STATS['inputs']} hostile inputs in {STATS['examples']} examples, {STATS['crashes']} crashes"
    )
    capman = request.config.pluginmanager.getplugin("capturemanager")
    if capman is not None:
        with capman.global_and_fixture_disabled():
            print("\n" + line)
    else:  # pragma: no cover
        print(line)


# --------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # NaN and ±Infinity included: json.loads accepts them from the wire
    st.text(max_size=24),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=16,
)

_NUMBERS = [0, 1, 99, 100, 101, 2**32 - 1, 2**32, -1, 10**30, -(10**30), 2**63, 1.5, -0.0, float("nan"), float("inf")]
weird_numbers = st.sampled_from([*_NUMBERS, True, False, None, "1", "", [], {}])
counters = weird_numbers | st.integers(min_value=0, max_value=2**32 + 2)

b64_32 = st.binary(min_size=32, max_size=32).map(b64)
bad_b64 = st.sampled_from(["", "=", "A", "A===", "!!!!", "####====", "QUJD\x00", "\u00e9\u00e9\u00e9\u00e9", " " * 8])
b64_strings = st.one_of(
    b64_32,
    st.just(b64(bytes(32))),  # a low-order point
    st.binary(max_size=64).map(b64),  # wrong lengths
    st.binary(max_size=48).map(lambda d: b64(d).rstrip("=").replace("+", "-").replace("/", "_")),  # url form
    bad_b64,
    st.text(max_size=70),
)
dids = st.one_of(
    st.sampled_from([A_DID, B_DID, C_DID, P_DID, "", "did:mesh:", "x" * 513]),
    st.text(max_size=40),
    json_values,
)
ids = st.one_of(st.text(max_size=20).map(lambda s: "h-" + s), st.just("x" * 257), json_values)
ciphertexts = st.one_of(
    st.binary(max_size=120).map(b64),
    b64_strings,
    st.just("A" * 200_000),  # huge
    json_values,
)
headers = st.one_of(
    st.fixed_dictionaries(
        {"dh": b64_strings | json_values, "pn": counters, "n": counters},
        optional={"extra": json_values},
    ),
    st.fixed_dictionaries({}, optional={"dh": b64_32, "pn": counters, "n": counters}),
    json_values,
)
establishments = st.one_of(
    st.fixed_dictionaries(
        {"ik": b64_strings | json_values, "ek": b64_strings | json_values},
        optional={"otk": counters | st.integers(min_value=0, max_value=4)},
    ),
    json_values,
)


def _frame(kind: str, required: dict[str, Any], optional: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({"type": st.just(kind), **required}, optional=optional)


common_optional = {"v": st.just(1) | json_values, "to": dids, "ts": st.just("2023-11-14T22:13:20.000Z") | json_values}
message_frames = _frame(
    "message",
    {"from": dids, "id": ids, "ciphertext": ciphertexts},
    {**common_optional, "header": headers, "plaintext": st.just(True) | json_values},
)
knock_frames = _frame(
    "knock",
    {"from": dids, "id": ids},
    {**common_optional, "intent": json_values, "establishment": establishments},
)
reply_frames = st.sampled_from(["knock_accept", "knock_reject"]).flatmap(
    lambda kind: _frame(kind, {"from": dids}, {**common_optional, "id": ids, "knock_id": ids, "reason": json_values})
)
error_frames = _frame("error", {}, {"detail": json_values})
other_frames = st.fixed_dictionaries(
    {"type": st.sampled_from(["ack", "heartbeat", "connect", "disconnect", "fetch_pending"]) | st.text(max_size=12)},
    optional={"from": dids, "id": ids, "public_key": b64_strings, "signature": b64_strings, "token": json_values},
)
single_frames = st.one_of(message_frames, knock_frames, reply_frames, error_frames, other_frames)
shaped_frames = st.one_of(
    single_frames,
    # a batch carries at most two entries (each may spoof Alice: see the module docstring)
    _frame("pending_messages", {}, {"messages": st.lists(single_frames | json_values, max_size=2) | json_values}),
)

#: spoof / replay actions, interpreted against the example's real frames
spoof_actions = st.tuples(
    st.just("spoof"),
    st.integers(min_value=0, max_value=50),  # which real A->B message lends its header
    st.integers(min_value=-2, max_value=200),  # change of n
    st.binary(max_size=100),  # ciphertext
)
replay_actions = st.tuples(
    st.just("replay"),
    st.integers(min_value=0, max_value=50),  # which real frame (any direction)
    st.sampled_from(["same", "new_id", "plaintext_flag", "no_header", "from_c", "from_p", "batch", "new_id_batch2"]),
)
frame_actions = st.tuples(st.just("frame"), shaped_frames)
value_actions = st.tuples(st.just("value"), json_values)


def _nested(kind: str, depth: int) -> str:
    if kind == "array":
        return "[" * depth + "]" * depth
    if kind == "object":
        return '{"a":' * depth + "1" + "}" * depth
    if kind == "error_detail":
        return '{"type":"error","detail":' + "[" * depth + "]" * depth + "}"
    if kind == "intent":
        return '{"type":"knock","from":"' + A_DID + '","id":"deep","intent":' + "[" * depth + "]" * depth + "}"
    if kind == "batch":
        return '{"type":"pending_messages","messages":[' * depth + "]}" * depth
    return (
        '{"type":"message","from":"' + A_DID + '","id":"d","ciphertext":"","header":' + "[" * depth + "]" * depth + "}"
    )


text_actions = st.one_of(
    st.tuples(
        st.just("deep"),
        st.sampled_from(["array", "object", "error_detail", "intent", "batch", "header"]),
        st.integers(min_value=1, max_value=3000),
    ),
    st.tuples(
        st.just("text"), st.text(max_size=200) | st.binary(max_size=200), st.integers(min_value=1, max_value=400)
    ),
    st.tuples(st.just("frame_text"), shaped_frames, st.integers(min_value=1, max_value=2000)),
)
plaintext_actions = st.tuples(
    st.just("plaintext"),
    st.sampled_from([P_DID, A_DID, C_DID]),
    st.one_of(
        json_values.map(lambda v: compact_json(v).encode("utf-8") if _finite(v) else b"null"),
        st.binary(max_size=60),
        st.integers(min_value=1, max_value=5000).map(lambda d: b"[" * d + b"]" * d),
    ),
    st.booleans(),  # plaintext flag
)


def _finite(value: Any) -> bool:
    try:
        compact_json(value)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------
# the property
# --------------------------------------------------------------------------------------


class World:
    """Alice and Bob, established and having talked a little; Pat is allow-listed at Bob."""

    def __init__(self) -> None:
        self.net = net = Net()
        self.a = a = net.agent("alice", otks=2)
        self.b = b = net.agent("bob", otks=4)
        b.proto.plaintext_peers.add(P_DID)
        net.connect(a, b)
        for i in range(2):
            net.route([a.send_frame(b, {"warm-up": i}), b.send_frame(a, {"warm-up": i})])
        self.real = [f for s in a.log + b.log for f in s.frames]
        self.a_messages = [f for s in a.log for f in s.frames if f["type"] == "message"]
        self.valid = 0

    # -- calls that must never raise -----------------------------------------------------

    def guarded(self, call: Callable[[], Step]) -> Step:
        try:
            return call()
        except Exception:
            STATS["crashes"] += 1
            raise

    def apply(self, action: tuple[Any, ...]) -> list[Step]:
        b = self.b
        kind = action[0]
        if kind == "value":
            return [self.guarded(lambda: b.receive(action[1], raw=True))]
        if kind == "frame":
            return [self.guarded(lambda: b.receive(action[1], raw=True))]
        if kind == "spoof":
            _, index, dn, blob = action
            src = wire(self.a_messages[index % len(self.a_messages)])
            src["header"]["n"] = max(0, src["header"]["n"] + dn)
            src["ciphertext"] = b64(blob)
            src["id"] = f"spoof-{STATS['inputs']}"
            return [self.guarded(lambda: b.receive(src))]
        if kind == "replay":
            frames = self._replay(action[1], action[2])
            return [self.guarded(lambda f=f: b.receive(f, raw=True)) for f in frames]
        if kind == "deep":
            text = _nested(action[1], action[2])
            return [self.guarded(lambda: b.receive_text(text))]
        if kind == "text":
            return [self.guarded(lambda: b.receive_text(action[1], max_bytes=action[2]))]
        if kind == "frame_text":
            text = compact_json(action[1]) if _finite(action[1]) else '{"type":"error","detail":NaN}'
            return [self.guarded(lambda: b.receive_text(text, max_bytes=action[2]))]
        if kind == "plaintext":
            _, sender, payload, flag = action
            frame = fr.plaintext_message_frame(sender, b.did, f"pt-{STATS['inputs']}", "t", None)
            frame["ciphertext"] = b64(payload)
            if not flag:
                del frame["plaintext"]
            return [self.guarded(lambda: b.receive(frame))]
        raise AssertionError(kind)  # pragma: no cover

    def _replay(self, index: int, how: str) -> list[Any]:
        frame = wire(self.real[index % len(self.real)])
        new_id = f"replay-{STATS['inputs']}"
        if how == "same":
            return [frame]
        if how == "new_id":
            return [dict(frame, id=new_id)]
        if how == "plaintext_flag":
            return [dict(frame, plaintext=True)]
        if how == "no_header":
            frame.pop("header", None)
            return [dict(frame, id=new_id)]
        if how == "from_c":
            return [dict(frame, id=new_id, **{"from": C_DID})]
        if how == "from_p":
            return [dict(frame, id=new_id, **{"from": P_DID})]
        if how == "batch":
            return [{"type": "pending_messages", "messages": [frame, frame]}]
        return [{"type": "pending_messages", "messages": [dict(frame, id=new_id), dict(frame, id=new_id + "b")]}]

    # -- the checks ----------------------------------------------------------------------

    def hostile(self, action: tuple[Any, ...], *, then_valid: bool = True) -> bool:
        """Apply one hostile input and check the properties (and, with ``then_valid``,
        that a valid message from Alice still arrives)."""
        a, b, net = self.a, self.b, self.net
        STATS["inputs"] += 1
        before = b.session(a).to_bytes()
        steps = self.apply(action)
        # Bob's replies (knock_accept/knock_reject for hostile KNOCKs) reach Alice
        for step in steps:
            self.guarded(lambda step=step: _merge(net.route(step.frames)))
        net.advance(4.0)
        steps.append(self.guarded(b.tick))
        events = [e for s in steps for e in s.events]
        for e in events:
            if isinstance(e, MessageReceived):
                assert e.peer == P_DID and e.plaintext, f"hostile input delivered: {e!r}"
        assert b.session(a).to_bytes() == before, "a hostile input changed the session"
        assert not any(f["type"] == "knock" for s in steps for f in s.frames), "a hostile input caused a re-KNOCK"
        assert b.proto._buffer == {} and b.proto.next_deadline() is None
        if then_valid:
            self.check_valid()
        return True

    def check_valid(self) -> None:
        a, b = self.a, self.b
        self.valid += 1
        mid = f"valid-{self.valid}"
        payload = {"valid": self.valid}
        step, _ = a.send(b, payload, message_id=mid)
        got = self.guarded(lambda: b.receive(step.frames[0]))
        delivered = [(e.message_id, e.payload) for e in got.events if isinstance(e, MessageReceived)]
        assert delivered == [(mid, payload)], got.events
        assert got.acks == [mid]
        # and it is delivered once only
        again = self.guarded(lambda: b.receive(step.frames[0]))
        assert [e for e in again.events if isinstance(e, MessageReceived)] == []


def _merge(steps: dict[str, Step]) -> Step:
    out = Step()
    for s in steps.values():
        out.extend(s)
    return out


def garbage(sender: str, frame_id: str, rng: Drbg) -> dict[str, Any]:
    """A well-formed message frame with a random ratchet key and ciphertext."""
    header = {"dh": b64(rng(32)), "pn": 0, "n": 0}
    return {
        "type": "message",
        "from": sender,
        "to": B_DID,
        "id": frame_id,
        "header": header,
        "ciphertext": b64(rng(60)),
    }


def run(actions: list[tuple[Any, ...]]) -> None:
    STATS["examples"] += 1
    world = World()
    for i, action in enumerate(actions):
        # a valid message after every second input: spoofs also arrive back to back
        world.hostile(action, then_valid=i % 2 == 1)
    world.check_valid()


def _actions(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    return st.lists(strategy, min_size=1, max_size=3)


# --------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------


@FUZZ
@given(_actions(value_actions))
def test_arbitrary_json_values(actions: list[tuple[Any, ...]]) -> None:
    run(actions)


@FUZZ
@given(_actions(frame_actions))
def test_frames_with_hostile_fields(actions: list[tuple[Any, ...]]) -> None:
    run(actions)


@FUZZ
@given(_actions(st.one_of(spoof_actions, replay_actions)))
def test_spoofed_and_replayed_frames(actions: list[tuple[Any, ...]]) -> None:
    run(actions)


@FUZZ
@given(_actions(text_actions))
def test_hostile_text(actions: list[tuple[Any, ...]]) -> None:
    run(actions)


@FUZZ
@given(_actions(plaintext_actions))
def test_plaintext_frames(actions: list[tuple[Any, ...]]) -> None:
    run(actions)


@FUZZ
@given(
    _actions(st.one_of(value_actions, frame_actions, spoof_actions, replay_actions, text_actions, plaintext_actions))
)
def test_everything_mixed(actions: list[tuple[Any, ...]]) -> None:
    run(actions)


def test_world_is_sane() -> None:
    """The fixture itself: a valid message is delivered, garbage from Alice is not."""
    world = World()
    world.check_valid()
    assert world.hostile(("spoof", 0, 1, b"\x00" * 40))
    assert world.hostile(("replay", 1, "same"))
    rng = Drbg("sanity")
    assert world.hostile(("frame", {"type": "message", "from": A_DID, "id": "x", "ciphertext": b64(rng(50))}))
    # twenty spoofs in a row, no valid message between: nothing changes, no re-KNOCK
    agent: Agent = world.b
    for i in range(20):
        assert world.hostile(("frame", garbage(A_DID, f"s-{i}", rng)), then_valid=False)
    assert agent.proto.undecryptable[A_DID] == 20
    world.check_valid()
    assert A_DID not in agent.proto.undecryptable
