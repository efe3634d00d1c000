"""Shared test helpers: a deterministic random source, ready-made sessions and an
in-memory mesh (:class:`Net` of :class:`Agent` s) for the sans-I/O protocol.

Nothing here touches global random state: every random byte a test uses comes from a
:class:`Drbg` seeded by a label, so failures reproduce exactly.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import struct
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from agt_mesh.core.events import KnockDecision, MessageReceived
from agt_mesh.core.identity import Identity
from agt_mesh.core.protocol import MeshProtocol, ProtocolConfig, Step
from agt_mesh.core.ratchet import DoubleRatchet
from agt_mesh.core.session import PeerSession
from agt_mesh.core.x3dh import (
    KdfProfile,
    PreKeyBundle,
    PreKeyStore,
    channel_ad,
    initiate,
    respond,
)

#: The low-order points of Curve25519 (Montgomery u-coordinates, little endian).  X25519
#: with any of them gives an all-zero shared secret.
LOW_ORDER_POINTS: tuple[bytes, ...] = (
    bytes(32),
    b"\x01" + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    b"\xec" + b"\xff" * 30 + b"\x7f",
    b"\xed" + b"\xff" * 30 + b"\x7f",
    b"\xee" + b"\xff" * 30 + b"\x7f",
)


class Drbg:
    """A deterministic byte stream: SHA256(label || u32be(0)) || SHA256(label || u32be(1)) || ...

    Calling it with ``n`` returns the next ``n`` bytes (the ``RandomSource`` signature).
    ``draws`` counts the calls, ``position`` the bytes handed out so far.
    """

    def __init__(self, label: str | bytes) -> None:
        self._label = label.encode() if isinstance(label, str) else label
        self._counter = 0
        self._buffer = b""
        self.draws = 0
        self.position = 0

    def __call__(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._buffer += hashlib.sha256(self._label + struct.pack(">I", self._counter)).digest()
            self._counter += 1
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        self.draws += 1
        self.position += n
        return out


def identity(label: str) -> Identity:
    """A fixed identity derived from ``label``."""
    return Identity.from_seed(hashlib.sha256(f"agt-mesh-tests/{label}".encode()).digest())


@dataclass
class Pair:
    """A connected session: Alice initiated, Bob responded."""

    alice: DoubleRatchet
    bob: DoubleRatchet
    alice_id: Identity
    bob_id: Identity
    shared_secret: bytes
    ad: bytes
    bob_spk_private: bytes
    bob_spk_public: bytes


def make_pair(
    rng: Drbg,
    *,
    use_otk: bool = True,
    profile: KdfProfile = KdfProfile.SPEC,
    alice_label: str = "alice",
    bob_label: str = "bob",
) -> Pair:
    """Run X3DH between two fixed identities and build both ratchets."""
    alice_id, bob_id = identity(alice_label), identity(bob_label)
    store = PreKeyStore(bob_id)
    store.generate_signed_pre_key(rng)
    otks = store.generate_one_time_pre_keys(2, rng)
    bundle = store.public_bundle(otks[0].key_id if use_otk else None)
    init = initiate(alice_id, bundle, rng, profile=profile)
    ad = channel_ad(alice_id.did, bob_id.did, alice_id.x25519_public, bob_id.x25519_public)
    (cand,) = respond(store, init.establishment, profiles=(profile,))
    assert cand.shared_secret == init.shared_secret
    alice = DoubleRatchet.init_sender(init.shared_secret, bundle.signed_pre_key, ad, rng)
    bob = DoubleRatchet.init_receiver(cand.shared_secret, cand.signed_pre_key.private, cand.signed_pre_key.public, ad)
    return Pair(
        alice,
        bob,
        alice_id,
        bob_id,
        init.shared_secret,
        ad,
        cand.signed_pre_key.private,
        cand.signed_pre_key.public,
    )


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    """``data`` with byte ``index`` XOR-ed with ``mask`` (non-zero)."""
    assert mask & 0xFF
    out = bytearray(data)
    out[index] ^= mask
    return bytes(out)


# --------------------------------------------------------------------------------------
# an in-memory mesh for MeshProtocol tests (no relay, no sockets, no clock)
# --------------------------------------------------------------------------------------

#: A fixed start time (2023-11-14T22:13:20Z) for the fake clock.
T0 = 1_700_000_000.0


def wire(frame: Any) -> Any:
    """``frame`` as the peer sees it after a trip through JSON text (the relay)."""
    return json.loads(json.dumps(frame))


#: identities behind :func:`fake_did` DIDs, by DID
_FAKE_IDENTITIES: dict[str, Identity] = {}


def fake_did(i: int) -> str:
    """The canonical DID of stranger number ``i`` (an identity no test agent runs).

    Its key is real (:func:`fake_key`), so a KNOCK made with it passes the identity
    binding, as an attacker's own fresh identities would.
    """
    ident = identity(f"fake/{i}")
    _FAKE_IDENTITIES[ident.did] = ident
    return ident.did


def fake_key(did: str) -> bytes | None:
    """The X25519 identity key of a :func:`fake_did` DID (None for other DIDs)."""
    ident = _FAKE_IDENTITIES.get(did)
    return ident.x25519_public if ident is not None else None


class Agent:
    """One :class:`~agt_mesh.core.protocol.MeshProtocol` with its pre-keys, ids and policy.

    ``policy`` decides ``KnockDecision`` events as they appear: ``True``/``False`` resolve
    the KNOCK at once (in the same :class:`Step`), ``None`` leaves it pending.
    ``log`` keeps every step this agent produced, in order.
    """

    def __init__(
        self,
        net: Net,
        label: str,
        *,
        otks: int = 20,
        store_label: str | None = None,
        store: PreKeyStore | None = None,
        **config: Any,
    ) -> None:
        self.net = net
        self.label = label
        self.identity = identity(label)
        # a restarted agent must not replay the random stream of its previous incarnation
        incarnation = net.incarnations[label] = net.incarnations.get(label, 0) + 1
        suffix = "" if incarnation == 1 else f"#{incarnation}"
        self.rng = Drbg(f"agent/{store_label or label}{suffix}")
        if store is None:
            store = PreKeyStore(self.identity)
            store.generate_signed_pre_key(self.rng)
            store.generate_one_time_pre_keys(otks, self.rng)
        self.store = store
        self._handed_out: set[int] = set()
        self._ids = itertools.count()
        # message ids are unique across restarts (they are UUIDs in real life)
        self._id_prefix = label + suffix
        self.policy: Callable[[KnockDecision], bool | None] = lambda decision: True
        self.decisions: list[KnockDecision] = []
        self.log: list[Step] = []
        # The exact-frame tests pin the TypeScript-compatible behaviour; end-to-end receipts
        # (an agt_mesh extension) are exercised by the tests that turn them on.
        config.setdefault("receipts", False)
        self.proto = MeshProtocol(ProtocolConfig(did=self.identity.did, **config), self.store, new_id=self.new_id)

    def new_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"

    @property
    def did(self) -> str:
        return self.identity.did

    def session(self, peer: Agent | str) -> PeerSession:
        return self.proto.sessions[_did(peer)]

    def primary_bytes(self, peer: Agent | str) -> bytes:
        primary = self.session(peer).primary
        assert primary is not None
        return primary.to_bytes()

    def bundle(self, *, otk: bool = True) -> PreKeyBundle:
        """Our bundle as the registry would hand it out (each one-time pre-key once)."""
        otk_id = None
        if otk:
            free = [k.key_id for k in self.store.one_time_pre_keys if k.key_id not in self._handed_out]
            otk_id = free[0]
            self._handed_out.add(otk_id)
        return self.store.public_bundle(otk_id)

    def _record(self, step: Step) -> Step:
        self.log.append(step)
        return step

    def establish(self, peer: Agent, bundle: PreKeyBundle | None = None, **kwargs: Any) -> Step:
        bundle = bundle if bundle is not None else peer.bundle()
        return self._record(self.proto.establish(peer.did, bundle, self.net.now, self.rng, **kwargs))

    def send(self, peer: Agent | str, payload: Any, **kwargs: Any) -> tuple[Step, str]:
        step, mid = self.proto.send(_did(peer), payload, self.net.now, self.rng, **kwargs)
        return self._record(step), mid

    def send_frame(self, peer: Agent | str, payload: Any) -> dict[str, Any]:
        """Encrypt one message that can be sent right away and return its frame."""
        step, _ = self.send(peer, payload)
        (frame,) = step.frames
        return frame

    def _decide(self, step: Step) -> Step:
        for event in list(step.events):
            if isinstance(event, KnockDecision):
                self.decisions.append(event)
                verdict = self.policy(event)
                if verdict is not None:
                    step.extend(self.proto.resolve_knock(event.knock_id, verdict, self.net.now, self.rng))
        return step

    def receive(self, frame: Any, *, raw: bool = False) -> Step:
        """One inbound frame, as decoded JSON after the trip through the relay
        (``raw``: exactly ``frame``, for values JSON text cannot carry)."""
        obj = frame if raw else wire(frame)
        return self._record(self._decide(self.proto.receive(obj, self.net.now, self.rng)))

    def receive_text(self, text: str | bytes, *, max_bytes: int = 1 << 20) -> Step:
        return self._record(self._decide(self.proto.receive_text(text, self.net.now, self.rng, max_bytes=max_bytes)))

    def resolve(self, knock_id: str, accept: bool) -> Step:
        return self._record(self.proto.resolve_knock(knock_id, accept, self.net.now, self.rng))

    def tick(self) -> Step:
        return self._record(self._decide(self.proto.tick(self.net.now, self.rng)))


def _did(peer: Agent | str) -> str:
    return peer if isinstance(peer, str) else peer.did


class Net:
    """The fake clock and the agents; :meth:`route` plays the relay (in order, no loss)."""

    def __init__(self, now: float = T0) -> None:
        self.now = now
        self.agents: dict[str, Agent] = {}
        self.incarnations: dict[str, int] = {}
        #: frames addressed to nobody we know (dropped by the relay)
        self.undeliverable: list[dict[str, Any]] = []

    def agent(self, label: str, **kwargs: Any) -> Agent:
        agent = Agent(self, label, **kwargs)
        self.agents[agent.did] = agent
        return agent

    def replace(self, agent: Agent) -> None:
        """Make ``agent`` the one that receives frames for its DID (after a restart)."""
        self.agents[agent.did] = agent

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now

    def route(self, frames: Iterable[dict[str, Any]]) -> dict[str, Step]:
        """Deliver frames (and every frame they cause) FIFO; returns one merged step per DID."""
        queue = deque(frames)
        out: dict[str, Step] = {}
        while queue:
            frame = queue.popleft()
            target = self.agents.get(frame.get("to", ""))
            if target is None:
                self.undeliverable.append(frame)
                continue
            step = target.receive(frame)
            out.setdefault(target.did, Step()).extend(step)
            queue.extend(step.frames)
        return out

    def connect(self, a: Agent, b: Agent, *, profile: KdfProfile | None = None) -> None:
        """``a`` establishes to ``b`` and both exchange one message (both sides verified)."""
        first = a.establish(b, profile=profile)
        frame = a.send_frame(b, "hello")
        delivered = self.route([*first.frames, frame])
        assert received(delivered[b.did]) == ["hello"]
        reply = b.send_frame(a, "hello back")
        assert received(self.route([reply])[a.did]) == ["hello back"]


def received(step: Step) -> list[Any]:
    """Payloads of the ``MessageReceived`` events of a step."""
    return [e.payload for e in step.events if isinstance(e, MessageReceived)]


def events_of(step: Step, kind: type) -> list[Any]:
    return [e for e in step.events if isinstance(e, kind)]
