"""Identity binding, key continuity and names are claims — below the network.

* binding math against the real TypeScript (npm 4.0.0) and AGT Python 5.0.0 keys of the
  committed vectors, and random identities;
* the sans-I/O protocol: KNOCKs and bundles whose keys are not the DID's are refused,
  keys are pinned (bundle, or first decrypted message), a pinned peer's new key is
  refused until trusted, session reset keeps the pin;
* the durable store: schema v3, the v2 fixture from the previous release migrates;
* ``MeshClient`` name resolution against a registry double (httpx ``MockTransport``).

The end-to-end attacks through real servers are in ``tests/test_attacks_identity.py``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import T0, Agent, Drbg, Net, fake_did, identity, received, wire

from agt_mesh.core import frames as fr
from agt_mesh.core.encoding import b64url_encode
from agt_mesh.core.events import ErrorEvent, KnockDecision, MessageReceived, SessionRekeyed
from agt_mesh.core.identity import Identity, did_from_ed25519
from agt_mesh.core.primitives import x25519_public
from agt_mesh.core.protocol import MeshProtocol, ProtocolConfig
from agt_mesh.core.trust import (
    FINGERPRINT_DIGITS,
    check_bundle_binding,
    check_key_binding,
    dids_of_x25519,
    ed25519_candidates,
    fingerprint,
    key_binds,
    normalize_fingerprint,
    safety_number,
)
from agt_mesh.core.x3dh import Establishment, PreKeyBundle
from agt_mesh.errors import (
    AmbiguousNameError,
    IdentityBindingError,
    IdentityChangedError,
    MeshConfigError,
    PeerNotFoundError,
)
from agt_mesh.shell.client import MeshClient
from agt_mesh.shell.registry import RegistryClient
from agt_mesh.shell.store import SCHEMA_VERSION, StateStore

ROOT = Path(__file__).resolve().parent.parent
VECTOR_FILES = [ROOT / "vectors" / "ts-npm-4.0.0.json", ROOT / "vectors" / "agt-python-5.0.0.json"]
P = 2**255 - 19


def _vector_cases(kind: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in VECTOR_FILES:
        for case in json.loads(path.read_text())["cases"]:
            if case["kind"] == kind:
                out.append((f"{path.stem}:{case['name']}", case))
    return out


# --------------------------------------------------------------------------------------
# binding math
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "case"), _vector_cases("identity"), ids=lambda v: v if isinstance(v, str) else "")
def test_real_keys_bind_to_their_dids(name: str, case: dict[str, Any]) -> None:
    """TS npm 4.0.0 and AGT Python 5.0.0 identities: the X25519 key alone leads to the DID."""
    expect = case["expect"]
    ed, x, did = bytes.fromhex(expect["ed25519_pub"]), bytes.fromhex(expect["x25519_pub"]), expect["did"]
    assert ed in ed25519_candidates(x)
    assert did in dids_of_x25519(x) and key_binds(did, x)
    check_key_binding(did, x)
    check_bundle_binding(did, x, ed)


def test_both_sign_bits_occur_in_the_real_vectors() -> None:
    """The recovered key needs the second candidate for some real keys (bob's here)."""
    positions = set()
    for _, case in _vector_cases("identity"):
        expect = case["expect"]
        positions.add(
            ed25519_candidates(bytes.fromhex(expect["x25519_pub"])).index(bytes.fromhex(expect["ed25519_pub"]))
        )
    assert positions == {0, 1}


def test_typescript_knock_frames_bind_to_their_sender() -> None:
    """Every KNOCK the npm 4.0.0 MeshClient emitted in the vectors passes the responder's check."""
    knocks = [c["frame"] for _, c in _vector_cases("frame") if c["frame"].get("type") == "knock"]
    assert knocks
    for frame in knocks:
        ik = base64.b64decode(frame["establishment"]["ik"])
        check_key_binding(frame["from"], ik)
        assert not key_binds(frame["to"], ik)


def test_random_identities_bind_and_others_do_not() -> None:
    rng = Drbg("binding-random")
    idents = [Identity(rng(32)) for _ in range(300)]
    for i, ident in enumerate(idents):
        assert key_binds(ident.did, ident.x25519_public)
        assert ident.ed25519_public in ed25519_candidates(ident.x25519_public)
        other = idents[i - 1]
        assert not key_binds(ident.did, other.x25519_public)
        with pytest.raises(IdentityBindingError) as err:
            check_key_binding(ident.did, other.x25519_public)
        assert err.value.did == ident.did and other.did in err.value.key_dids
        assert ident.did in str(err.value) and other.did in str(err.value)


@pytest.mark.parametrize(
    "key",
    [
        (P - 1).to_bytes(32, "little"),  # u = -1: no Edwards point
        P.to_bytes(32, "little"),  # not reduced
        (P + 5).to_bytes(32, "little"),
        bytes(31) + b"\x80",  # top bit set
        b"\x00" * 31,  # short
    ],
)
def test_non_canonical_x25519_keys_bind_to_no_canonical_did(key: bytes) -> None:
    assert ed25519_candidates(key) == ()
    did = identity("alice").did
    assert not key_binds(did, key)
    with pytest.raises(IdentityBindingError, match="not a valid X25519 public key"):
        check_key_binding(did, key)


def test_legacy_dids_are_not_checked() -> None:
    """``did:mesh:alice`` (npm 4.0.0 uses agentDid verbatim) says nothing about a key: TOFU."""
    assert key_binds("did:mesh:alice", os.urandom(32))
    check_key_binding("did:mesh:alice", os.urandom(32))
    a = identity("alice")
    check_bundle_binding("did:mesh:alice", a.x25519_public, a.ed25519_public)


def test_bundle_binding_refuses_swapped_and_mixed_keys() -> None:
    bob, mallory = identity("bob"), identity("mallory")
    with pytest.raises(IdentityBindingError) as swapped:
        check_bundle_binding(bob.did, mallory.x25519_public, mallory.ed25519_public)
    assert swapped.value.key_dids == (mallory.did,)
    assert bob.did in str(swapped.value) and mallory.did in str(swapped.value)
    # Bob's Ed25519 key (so the DID matches) with Mallory's X25519 key: forged too
    with pytest.raises(IdentityBindingError, match="not derived from"):
        check_bundle_binding(bob.did, mallory.x25519_public, bob.ed25519_public)
    # ... also for a legacy DID, where there is no hash to check
    with pytest.raises(IdentityBindingError, match="not derived from"):
        check_bundle_binding("did:mesh:bob", mallory.x25519_public, bob.ed25519_public)
    with pytest.raises(IdentityBindingError):
        check_bundle_binding(bob.did, bob.x25519_public, b"\x01" * 32)


def test_fingerprints_and_safety_numbers() -> None:
    a, b = identity("alice"), identity("bob")
    fa = fingerprint(a.did, a.x25519_public)
    assert fa == fingerprint(a.did, a.x25519_public)
    assert len(fa.replace(" ", "")) == FINGERPRINT_DIGITS and fa.replace(" ", "").isdigit()
    assert fa != fingerprint(b.did, a.x25519_public) != fingerprint(a.did, b.x25519_public)
    sn = safety_number(a.did, a.x25519_public, b.did, b.x25519_public)
    assert sn == safety_number(b.did, b.x25519_public, a.did, a.x25519_public)
    assert len(sn.replace(" ", "")) == 2 * FINGERPRINT_DIGITS and fa in sn
    assert normalize_fingerprint(fa.replace(" ", "")) == fa
    assert normalize_fingerprint(fa.replace(" ", ":")) == fa
    assert normalize_fingerprint(fa[:-1]) is None and normalize_fingerprint("x" * 30) is None


# --------------------------------------------------------------------------------------
# the protocol: KNOCKs and bundles
# --------------------------------------------------------------------------------------


def _mallory_as(net: Net, did: str, label: str = "mallory") -> Agent:
    """Mallory's own keys, ``did`` in ``from`` (anyone can write it on a relay that does
    not bind ``from``: agentmesh-platform 3.7.0, AGT core 5.0.0)."""
    m = Agent(net, label)
    m.proto = MeshProtocol(ProtocolConfig(did=did, receipts=False), m.store, new_id=m.new_id)
    return m


class Legacy(Agent):
    """An agent whose DID is not derived from its key (npm 4.0.0 ``agentDid`` verbatim)."""

    def __init__(self, net: Net, label: str, did: str, **kw: Any) -> None:
        super().__init__(net, label, **kw)
        self.proto = MeshProtocol(ProtocolConfig(did=did, receipts=False), self.store, new_id=self.new_id)
        net.agents[did] = self

    @property
    def did(self) -> str:
        return self.proto.config.did


def test_knock_with_another_identity_key_is_refused_before_the_policy() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    m = _mallory_as(net, a.did)
    otks = len(b.store.one_time_pre_keys)
    est = m.establish(b)
    step = b.receive(est.frames[0])
    (err,) = step.events
    assert err.kind == "identity_binding" and err.peer == a.did and err.frame_id == est.frames[0]["id"]
    assert a.did in err.detail and m.identity.did in err.detail  # both values are named
    assert step.frames == [] and step.acks == [est.frames[0]["id"]]  # no reply to the real alice
    assert b.decisions == [] and b.proto.sessions == {} and b.proto.pins == {}
    assert len(b.store.one_time_pre_keys) == otks  # no one-time pre-key spent
    # its messages cannot be read either: no session, given up after the buffer TTL
    b.receive(m.send_frame(b, "I am alice"))
    net.advance(3.1)
    assert received(b.tick()) == []
    # the real alice is not locked out
    net.connect(a, b)
    assert b.proto.pins[a.did].identity_key == a.identity.x25519_public


def test_rekey_knock_with_another_key_leaves_a_live_session_alone() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    before = b.session(a).to_bytes()
    m = _mallory_as(net, a.did)
    est = m.establish(b)
    frame = m.send_frame(b, "switch to me")
    events = b.receive(est.frames[0]).events + b.receive(frame).events
    net.advance(3.1)
    events += b.tick().events
    assert [e.kind for e in events if isinstance(e, ErrorEvent)] == ["identity_binding", "decrypt"]
    assert not any(isinstance(e, (KnockDecision, MessageReceived, SessionRekeyed)) for e in events)
    assert b.session(a).to_bytes() == before
    assert received(b.receive(a.send_frame(b, "still me"))) == ["still me"]


def test_bundle_swap_is_refused_and_nothing_is_sent() -> None:
    net = Net()
    a, b, m = net.agent("alice"), net.agent("bob"), net.agent("mallory")
    with pytest.raises(IdentityBindingError) as err:
        a.establish(b, bundle=m.bundle())  # the registry answered with Mallory's bundle
    assert err.value.did == b.did and err.value.key_dids == (m.did,)
    assert a.proto.sessions == {} and a.proto.pins == {} and a.log == []
    good = b.bundle()
    mixed = PreKeyBundle(
        m.identity.x25519_public,  # Mallory's X25519 key beside Bob's Ed25519 key and SPK
        good.identity_key_ed,
        good.signed_pre_key,
        good.signed_pre_key_signature,
        good.signed_pre_key_id,
    )
    with pytest.raises(IdentityBindingError, match="not derived from"):
        a.establish(b, bundle=mixed)
    assert a.proto.sessions == {}
    net.connect(a, b)


def test_keys_are_pinned_by_the_bundle_and_by_the_first_decrypted_message() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    est = a.establish(b)
    assert est.identities == {b.did}
    pin = a.proto.pins[b.did]
    assert (pin.identity_key, pin.source, pin.since) == (b.identity.x25519_public, "bundle", T0)
    kstep = b.receive(est.frames[0])
    assert b.proto.pins == {} and kstep.identities == set()  # a KNOCK alone proves nothing
    mstep = b.receive(a.send_frame(b, "hi"))
    assert mstep.identities == {a.did}
    assert b.proto.pins[a.did].identity_key == a.identity.x25519_public
    assert b.proto.pins[a.did].source == "knock"


def _legacy_pair(net: Net) -> tuple[Legacy, Agent]:
    a = Legacy(net, "alice-legacy", "did:mesh:alice")
    b = net.agent("bob")
    net.connect(a, b)
    return a, b


def test_legacy_did_is_trusted_on_first_use_and_a_new_key_is_refused() -> None:
    net = Net()
    a, b = _legacy_pair(net)
    assert b.proto.pins[a.did].identity_key == a.identity.x25519_public
    before = b.session(a).to_bytes()
    # someone else (or alice after losing her identity) KNOCKs as did:mesh:alice
    m = Legacy(net, "mallory", "did:mesh:alice")
    net.agents[a.did] = a  # frames to did:mesh:alice still reach the real one
    est = m.establish(b)
    step = b.receive(est.frames[0])
    (err,) = step.events
    assert err.kind == "identity_changed" and err.peer == a.did
    assert b64url_encode(m.identity.x25519_public) in err.detail and "peer trust" in err.detail
    assert b.decisions[-1].peer == a.did and len(b.decisions) == 1  # the policy was not asked again
    (reject,) = step.frames
    assert reject["type"] == "knock_reject" and reject["reason"] == "identity_changed"
    assert step.identities == {a.did} and b.proto.offered[a.did].identity_key == m.identity.x25519_public
    assert b.session(a).to_bytes() == before
    # the same refused key again: reported, not rewritten
    again = b.receive(dict(wire(m.establish(b).frames[0]), id="again"))
    assert [e.kind for e in again.events] == ["identity_changed"] and again.identities == set()
    # and as initiator: the registry now hands out the new key
    b.proto.reset_session(a.did)  # a reset keeps the pin
    with pytest.raises(IdentityChangedError) as changed:
        b.establish(a, bundle=m.bundle())
    assert changed.value.pinned == fingerprint(a.did, a.identity.x25519_public)
    assert changed.value.offered == fingerprint(a.did, m.identity.x25519_public)
    assert b.proto.sessions == {}


def test_trusting_the_new_key_replaces_the_pin_and_the_session() -> None:
    net = Net()
    a, b = _legacy_pair(net)
    a2 = Legacy(net, "alice-new-key", "did:mesh:alice")  # a new identity key, same DID
    b.receive(a2.establish(b).frames[0])
    assert b.proto.offered[a.did].identity_key == a2.identity.x25519_public
    step = b.proto.trust_identity(a.did, a2.identity.x25519_public, net.now)
    assert step.identities == {a.did} and a.did in step.changed
    assert b.proto.pins[a.did].source == "trusted" and a.did not in b.proto.offered
    assert a.did not in b.proto.sessions  # bound to the old key
    est = a2.establish(b)
    m = a2.send_frame(b, "new key, same me")
    assert received(net.route([*est.frames, m])[b.did]) == ["new key, same me"]
    # a canonical DID cannot be given a key that is not its own
    c = net.agent("carol")
    with pytest.raises(IdentityBindingError):
        b.proto.trust_identity(c.did, a2.identity.x25519_public, net.now)


def test_a_pin_survives_reset_and_restart() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    pin = b.proto.pins[a.did]
    b.proto.reset_session(a.did)
    assert b.proto.pins[a.did] == pin
    # a restarted protocol gets its pins back from the store (restore_pin)
    fresh = MeshProtocol(ProtocolConfig(did=b.did, receipts=False), b.store, new_id=b.new_id)
    fresh.restore_pin(pin)
    assert fresh.pins[a.did] == pin


def test_establish_keeps_the_pin_on_a_rekey_with_the_same_key() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    net.connect(a, b)
    pin = a.proto.pins[b.did]
    step = a.establish(b)
    assert step.identities == set() and a.proto.pins[b.did] == pin


def test_forged_knock_replies_change_nothing() -> None:
    """knock_accept/knock_reject are unauthenticated: only one naming our KNOCK's id counts."""
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    b.policy = lambda decision: None  # bob never answers
    est = a.establish(b)
    net.route(est.frames)
    before = a.session(b).to_bytes()
    for kid in ("not-our-knock", None):
        forged = fr.knock_accept_frame(b.did, a.did, f"fa-{kid}", kid or "", "2099-01-01T00:00:00.000Z")
        if kid is None:
            del forged["knock_id"]
        assert a.receive(forged).events == []
        rej = fr.knock_reject_frame(b.did, a.did, f"fr-{kid}", kid or "", "2099-01-01T00:00:00.000Z")
        assert a.receive(rej).events[0].ignored
    assert a.session(b).to_bytes() == before
    real = fr.knock_accept_frame(b.did, a.did, "ra", est.frames[0]["id"], "2099-01-01T00:00:00.000Z")
    assert a.receive(real).events and a.session(b).accepted


# --------------------------------------------------------------------------------------
# the store
# --------------------------------------------------------------------------------------


def _copy_fixture(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    src = ROOT / "tests" / "fixtures" / "store-v2"
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    shutil.copyfile(src / "state.db", state / "state.db")
    os.chmod(state / "state.db", stat.S_IRUSR | stat.S_IWUSR)
    return state, json.loads((src / "expect.json").read_text())


def test_a_v2_store_from_the_previous_release_migrates(tmp_path: Path) -> None:
    state, expect = _copy_fixture(tmp_path)
    bob = identity(expect["seed_label"])
    assert bob.did == expect["did"]
    store = StateStore(state, did=bob.did).open()
    try:
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
        pins = {p.did: (p, o) for p, o in store.load_pins()}
        assert set(pins) == {expect["alice"], expect["carol"]}
        for who in ("alice", "carol"):
            pin, offered = pins[expect[who]]
            assert pin.identity_key.hex() == expect[f"{who}_x25519"] and pin.source == "session" and offered is None
        names = {n.name: n.did for n in store.load_names()}
        assert names == {"alice": expect["alice"], "carol": expect["carol"]}  # "dup" has two DIDs
        assert {s.peer for s in store.load_sessions()} == {expect["alice"], expect["carol"]}
        assert [m.payload for m in store.load_inbox()] == [{"unread": 1}]
        assert store.stats()["pinned_keys"] == 2
    finally:
        store.close()
    # opening again is a no-op (the migration ran once)
    with StateStore(state, did=bob.did) as again:
        assert len(again.load_pins()) == 2


async def test_a_migrated_store_resumes_with_pins_and_names(tmp_path: Path) -> None:
    state, expect = _copy_fixture(tmp_path)
    mesh = MeshClient(identity(expect["seed_label"]), relay_url="http://127.0.0.1:9", registry_url="http://127.0.0.1:9")
    mesh.store = StateStore(state, did=mesh.did)
    mesh._load_state()
    try:
        assert set(mesh.protocol.pins) == {expect["alice"], expect["carol"]}
        assert await mesh.resolve("alice") == expect["alice"]  # bound: no registry needed
        assert mesh.display_name_of(expect["carol"]) == "carol"
        assert len(mesh.safety_number(expect["alice"]).split()) == 12
    finally:
        mesh.store.close()


def test_pins_and_names_round_trip(tmp_path: Path) -> None:
    from agt_mesh.core.trust import KeyPin, NameBinding

    state = tmp_path / "s"
    with StateStore(state, did="did:mesh:" + "0" * 32) as store:
        pin = KeyPin("did:mesh:alice", b"\x01" * 32, 5.0, "knock")
        offered = KeyPin("did:mesh:alice", b"\x02" * 32, 6.0, "bundle")
        store.commit(identities=[("did:mesh:alice", pin, offered)])
        assert store.load_pins() == [(pin, offered)]
        store.save_pins([("did:mesh:alice", pin, None)])
        assert store.load_pins() == [(pin, None)]
        store.bind_name(NameBinding("alice", "did:mesh:alice", 7.0, "user"))
        store.bind_name(NameBinding("alice", "did:mesh:alice2", 8.0, "user"))
        assert store.load_names() == [NameBinding("alice", "did:mesh:alice2", 8.0, "user")]
        assert store.unbind_name("alice") and not store.unbind_name("alice")
        store.save_pins([("did:mesh:alice", None, None)])
        assert store.load_pins() == []


# --------------------------------------------------------------------------------------
# names are claims (MeshClient.resolve against a registry double)
# --------------------------------------------------------------------------------------


class FakeRegistry:
    """``/v1/discover`` and ``/v1/agents/{did}`` answers from a dict of claims."""

    def __init__(self) -> None:
        self.agents: dict[str, dict[str, Any]] = {}
        self.requests: list[str] = []

    def claim(self, did: str, name: str, last_seen: str = "2026-01-01T00:00:00+00:00") -> None:
        self.agents[did] = {
            "did": did,
            "capabilities": [name],
            "metadata": {"display_name": name},
            "registered_at": last_seen,
            "last_seen": last_seen,
            "reputation_score": 0.5,
        }

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.url.path)
        if request.url.path == "/v1/discover":
            cap = request.url.params["capability"]
            hits = [
                {k: v for k, v in a.items() if k in ("did", "capabilities", "last_seen", "reputation_score")}
                for a in self.agents.values()
                if cap in a["capabilities"]
            ]
            return httpx.Response(200, json={"results": hits, "total": len(hits)})
        did = request.url.path.rsplit("/", 1)[-1]
        if did in self.agents:
            return httpx.Response(200, json=self.agents[did])
        return httpx.Response(404, json={"detail": "Agent not found"})


@pytest.fixture
def named(tmp_path: Path) -> tuple[MeshClient, FakeRegistry]:
    reg = FakeRegistry()
    me = identity("resolver")
    mesh = MeshClient(me, relay_url="http://127.0.0.1:9", registry_url="http://registry.test")
    mesh.store = StateStore(tmp_path / "state", did=me.did)
    mesh._load_state()
    mesh._registry = RegistryClient("http://registry.test", me, transport=httpx.MockTransport(reg.handler))
    return mesh, reg


async def test_a_name_binds_on_first_resolution_and_sticks(named: tuple[MeshClient, FakeRegistry]) -> None:
    mesh, reg = named
    bob, squatter = fake_did(1), fake_did(2)
    reg.claim(bob, "bob", "2026-01-01T00:00:00+00:00")
    assert await mesh.resolve("bob") == bob
    assert mesh.name_bindings()["bob"].source == "registry"
    assert [n.did for n in mesh.store.load_names()] == [bob]  # durable
    reg.claim(squatter, "bob", "2026-06-01T00:00:00+00:00")  # fresher: the old code picked it
    asked = len(reg.requests)
    assert await mesh.resolve("bob") == bob and len(reg.requests) == asked  # no registry call at all
    assert mesh.display_name_of(bob) == "bob" and mesh.display_name_of(squatter) is None


async def test_an_ambiguous_name_lists_its_claimants(named: tuple[MeshClient, FakeRegistry]) -> None:
    mesh, reg = named
    bob, squatter = fake_did(1), fake_did(2)
    reg.claim(bob, "bob", "2026-01-01T00:00:00+00:00")
    reg.claim(squatter, "bob", "2026-06-01T00:00:00+00:00")
    with pytest.raises(AmbiguousNameError) as err:
        await mesh.resolve("bob")
    assert err.value.name == "bob"
    assert [c.did for c in err.value.claims] == [squatter, bob]  # freshest first
    assert all(c.registered_at and c.last_seen for c in err.value.claims)
    assert bob in str(err.value) and squatter in str(err.value) and "peer bind" in str(err.value)
    assert mesh.name_bindings() == {}
    mesh.bind_name("bob", bob)
    assert await mesh.resolve("bob") == bob
    assert mesh.unbind_name("bob") and mesh.name_bindings() == {}
    with pytest.raises(AmbiguousNameError):
        await mesh.resolve("bob")
    with pytest.raises(PeerNotFoundError):
        await mesh.resolve("nobody")
    with pytest.raises(MeshConfigError):
        mesh.bind_name("did:mesh:x", bob)


async def test_a_claimant_we_have_a_key_for_shows_its_fingerprint(named: tuple[MeshClient, FakeRegistry]) -> None:
    mesh, reg = named
    bob, squatter = fake_did(1), fake_did(2)
    reg.claim(bob, "bob")
    reg.claim(squatter, "bob")
    from agt_mesh.core.trust import KeyPin

    key = x25519_public(Drbg("k")(32))
    mesh.protocol.restore_pin(KeyPin(bob, key, 1.0, "bundle"))
    claims = {c.did: c for c in await mesh.name_claims("bob")}
    assert claims[bob].fingerprint == fingerprint(bob, key) and claims[squatter].fingerprint is None


async def test_bindings_made_before_the_store_is_loaded_become_durable(tmp_path: Path) -> None:
    me = identity("early-binder")
    mesh = MeshClient(me, relay_url="http://127.0.0.1:9", registry_url="http://127.0.0.1:9")
    mesh.store = StateStore(tmp_path / "state", did=me.did)
    mesh.bind_name("bob", fake_did(1))
    with pytest.raises(Exception, match="connect"):
        await mesh.trust_identity(fake_did(1), b"\x01" * 32)
    mesh._load_state()
    assert [(n.name, n.did, n.source) for n in mesh.store.load_names()] == [("bob", fake_did(1), "user")]
    assert await mesh.resolve("bob") == fake_did(1)
    mesh.store.close()


async def test_trust_identity_by_fingerprint_or_key(named: tuple[MeshClient, FakeRegistry]) -> None:
    mesh, _reg = named
    from agt_mesh.core.trust import KeyPin

    did = "did:mesh:legacy-peer"
    old, new = x25519_public(b"\x01" * 32), x25519_public(b"\x02" * 32)
    mesh.protocol.restore_pin(KeyPin(did, old, 1.0, "knock"), KeyPin(did, new, 2.0, "knock"))
    with pytest.raises(MeshConfigError, match="not the fingerprint"):
        await mesh.trust_identity(did, "1" * 30)
    pin = await mesh.trust_identity(did, fingerprint(did, new).replace(" ", ""))
    assert pin.identity_key == new and pin.source == "trusted" and mesh.offered_identity(did) is None
    assert mesh.store is not None and mesh.store.load_pins()[0][0].identity_key == new
    # a key learned out of band, given in full
    other = x25519_public(b"\x03" * 32)
    assert (await mesh.trust_identity(did, b64url_encode(other))).identity_key == other
    assert (await mesh.trust_identity(did, other.hex())).identity_key == other
    canonical = fake_did(3)
    with pytest.raises(IdentityBindingError):
        await mesh.trust_identity(canonical, b64url_encode(other))


def test_establishment_of_an_unbound_x25519_key_is_never_pinned() -> None:
    net = Net()
    b = net.agent("bob")
    rng = Drbg("unbound")
    did = fake_did(5)
    frame = fr.knock_frame(
        did, b.did, "k1", fr.iso_timestamp(T0), Establishment(x25519_public(rng(32)), x25519_public(rng(32)))
    )
    step = b.receive(frame)
    assert [e.kind for e in step.events] == ["identity_binding"] and b.proto.pins == {}
    assert did_from_ed25519(identity("fake/5").ed25519_public) == did
