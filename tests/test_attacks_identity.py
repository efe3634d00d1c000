"""Attacks on who a peer is, end to end through real servers (issue #12, part A).

Each attack runs through the embedded dev relay/registry and — for the binding and
spoofing cases — through the real ``agentmesh-platform[server]==3.7.0`` (no proof of
possession anywhere) and ``agent-governance-toolkit-core[server]==5.0.0`` (POP at connect
and registration), all as loopback subprocesses (``tests/servers.py``):

* **bundle swap by a lying registry** — a proxy in front of the real registry answers
  Bob's bundle fetch with Mallory's bundle (or Bob's with Mallory's X25519 key);
* **bundle overwrite through the registry API** — Mallory PUTs her bundle under Bob's DID;
* **KNOCK with a mismatched identity key** — Mallory KNOCKs as Alice with her own key;
* **forged frames on a live session** — messages "from" Alice that Mallory made up;
* **key change for a pinned peer** — a legacy-DID peer comes back with another key;
* **name squatting** — Mallory registers Bob's display name after Alice bound it.

Outcomes are asserted exactly: the typed error or ``on_error`` event naming both the DID
and the key's DID, no KNOCK or message leaving for the attacker, the victim's session
bytes unchanged, no re-KNOCK, and a valid message still arriving both ways afterwards.
The relay facts (which relays let ``from`` be spoofed) come out of the same runs.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import clean_env, cli, new_identity, ok
from lying_registry import LyingRegistry
from raw_peer import RawPeer
from servers import ServerPair

from agt_mesh.core import frames as fr
from agt_mesh.core.identity import Identity
from agt_mesh.core.trust import fingerprint
from agt_mesh.errors import AmbiguousNameError, IdentityBindingError, IdentityChangedError
from agt_mesh.shell.client import MeshClient
from agt_mesh.shell.identity_file import save_identity
from agt_mesh.shell.store import StateStore

SPOOFABLE = {"agt-3.7.0": True, "agt-5.0.0": True, "dev": False}
_PAIRS: dict[str, ServerPair] = {}


def _pair(kind: str) -> ServerPair:
    if kind not in _PAIRS:
        if kind == "dev-open":  # pre-5.0 behaviour: no POP, legacy registrations
            _PAIRS[kind] = ServerPair("dev", extra_args=["--no-pop", "--allow-legacy"]).start()
        else:
            _PAIRS[kind] = ServerPair(kind).start()
    return _PAIRS[kind]


@pytest.fixture(scope="module", autouse=True)
def _stop_servers() -> Iterator[None]:
    yield
    for pair in _PAIRS.values():
        pair.stop()
    _PAIRS.clear()


@pytest.fixture(params=["dev", "agt-3.7.0", "agt-5.0.0"])
def servers(request: pytest.FixtureRequest) -> ServerPair:
    return _pair(request.param)


class Agent:
    """A ``MeshClient`` with a durable state directory, its errors and sent frames."""

    def __init__(self, pair: ServerPair, home: Path, name: str, *, registry_url: str | None = None) -> None:
        self.home = home / name
        self.home.mkdir(mode=0o700, exist_ok=True)
        self.identity = Identity.generate(os.urandom)
        save_identity(self.home / "identity.json", self.identity)  # for the CLI commands
        self.name = f"{name}-{uuid.uuid4().hex[:6]}"
        self.pair = pair
        self.registry_url = registry_url
        self.errors: list[tuple[str, str | None, str]] = []
        self.sent: list[dict[str, Any]] = []
        self.mesh = self._client()

    def _client(self, display_name: str | None = None) -> MeshClient:
        mesh = MeshClient(
            self.identity,
            relay_url=self.pair.relay_url,
            registry_url=self.registry_url or self.pair.registry_url,
            state_dir=self.home,
            display_name=display_name or self.name,
            connect_timeout=10,
            receipt_timeout=3600,
        )
        mesh.on_error(lambda kind, peer, detail: self.errors.append((kind, peer, detail)))
        mesh.frame_tap = self.sent.append
        return mesh

    @property
    def did(self) -> str:
        return self.identity.did

    async def restart(self) -> None:
        await self.mesh.disconnect()
        self.mesh = self._client()
        await self.mesh.connect()

    def kinds(self) -> list[str]:
        return [k for k, _, _ in self.errors]


@pytest.fixture
async def home(tmp_path: Path) -> AsyncIterator[Path]:
    yield tmp_path


async def _agents(pair: ServerPair, home: Path, *names: str, **kw: Any) -> list[Agent]:
    out = [Agent(pair, home, n, **kw) for n in names]
    for a in out:
        await a.mesh.connect()
    return out


async def _close(*agents: Agent) -> None:
    for a in agents:
        await a.mesh.disconnect()


async def _exchange(a: Agent, b: Agent, tag: str) -> None:
    """A valid message arrives both ways."""
    await a.mesh.send(b.did, {"ok": tag})
    got = await b.mesh.wait_for(from_=a.did, timeout=15, predicate=lambda m: m.payload == {"ok": tag})
    assert got.payload == {"ok": tag}
    await b.mesh.send(a.did, {"back": tag})
    got = await a.mesh.wait_for(from_=b.did, timeout=15, predicate=lambda m: m.payload == {"back": tag})
    assert got.payload == {"back": tag}


async def _settle() -> None:
    """Let the end-to-end receipts of the last exchange go by (they change the sessions)."""
    await asyncio.sleep(1.5)


def _session_bytes(agent: Agent, peer: str) -> bytes:
    return agent.mesh.protocol.sessions[peer].to_bytes()


async def _until(cond: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.05)
    return bool(cond())


# --------------------------------------------------------------------------------------
# 1. bundle swap by a registry that lies
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["swap", "x25519"])
async def test_bundle_swap_by_a_lying_registry(servers: ServerPair, home: Path, mode: str) -> None:
    bob, mallory = await _agents(servers, home, "bob", "mallory")
    liar = LyingRegistry(servers.registry_url, bob.did, mallory.did, mode).start()
    (alice,) = await _agents(servers, home, "alice", registry_url=liar.url)
    try:
        with pytest.raises(IdentityBindingError) as err:
            await alice.mesh.send(bob.did, {"secret": "for bob only"})
        assert liar.rewritten == 1
        assert err.value.did == bob.did
        if mode == "swap":
            assert err.value.key_dids == (mallory.did,)  # the key's own DID is named
        assert bob.did in str(err.value) and (mode != "swap" or mallory.did in str(err.value))
        (event,) = [e for e in alice.errors if e[0] == "identity_binding"]
        assert event[1] == bob.did and event[2] == str(err.value)
        # nothing left for anyone: no KNOCK, no message, no session, no pin
        assert not [f for f in alice.sent if f.get("type") in ("knock", "message")]
        assert bob.did not in alice.mesh.protocol.sessions and alice.mesh.pinned_identity(bob.did) is None
        await asyncio.sleep(0.5)
        assert mallory.mesh.drain() == [] and bob.mesh.drain() == []
        # the registry stops lying: the same client talks to the real bob
        liar.mode = "honest"
        await _exchange(alice, bob, f"after-{mode}")
        assert alice.mesh.pinned_identity(bob.did).identity_key == bob.identity.x25519_public  # type: ignore[union-attr]
    finally:
        await _close(alice, bob, mallory)
        liar.stop()


async def test_bundle_overwrite_through_the_registry_api(servers: ServerPair, home: Path) -> None:
    """Mallory (registered, authenticated as herself) PUTs her bundle under Bob's DID.
    3.7.0 accepts it (no auth at all); the client refuses the bundle.  AGT 5.0.0 and the
    dev registry refuse the PUT (403 DID mismatch)."""
    bob, alice = await _agents(servers, home, "bob", "alice")
    mallory = RawPeer(servers.relay_url, servers.registry_url)
    try:
        # a registered Mallory, authenticated as herself
        if servers.kind == "agt-3.7.0":
            assert (await mallory.register_legacy("mallory")) == 201
        else:
            assert (await mallory.register_pop("mallory")) == 201
        put = await mallory.upload_prekeys(as_did=bob.did)
        if servers.kind == "agt-3.7.0":
            assert put.status_code == 200, put.text
            with pytest.raises(IdentityBindingError) as err:
                await alice.mesh.send(bob.did, "hi")
            assert err.value.key_dids == (mallory.did,)
            assert not [f for f in alice.sent if f.get("type") == "knock"]
        else:
            assert put.status_code == 403, put.text  # "DID mismatch": her auth is not Bob's
            await _exchange(alice, bob, "bundle-intact")
    finally:
        await mallory.close()
        await _close(alice, bob)


# --------------------------------------------------------------------------------------
# 2. a KNOCK whose identity key is not the sender's; forged frames on a live session
# --------------------------------------------------------------------------------------


async def _forged_knock(mallory: RawPeer, as_did: str, victim: Agent, text: str) -> list[dict[str, Any]]:
    """Mallory runs X3DH against the victim's real bundle with her own identity key and
    writes ``as_did`` into ``from``: a KNOCK and a message under that session."""
    forger = mallory.forger(as_did)
    bundle = await mallory.fetch_bundle(victim.did)
    step = forger.establish(victim.did, bundle, time.time(), os.urandom)
    msg, _ = forger.send(victim.did, {"forged": text}, time.time(), os.urandom)
    return [*step.frames, *msg.frames]


async def test_knock_with_a_mismatched_identity_key(servers: ServerPair, home: Path) -> None:
    alice, bob, carol = await _agents(servers, home, "alice", "bob", "carol")
    mallory = await RawPeer(servers.relay_url, servers.registry_url, pop=servers.kind != "agt-3.7.0").connect()
    try:
        await _exchange(alice, bob, "before")
        await _settle()
        before = _session_bytes(bob, alice.did)
        pin = bob.mesh.pinned_identity(alice.did)
        bob.sent.clear()
        frames = await _forged_knock(mallory, alice.did, bob, "I am alice") + await _forged_knock(
            mallory, alice.did, carol, "I am alice too"
        )
        for f in frames:
            await mallory.send_raw(f)
        arrived = await _until(lambda: "identity_binding" in bob.kinds() and "identity_binding" in carol.kinds(), 4)
        assert arrived == SPOOFABLE[servers.kind], (servers.kind, bob.errors, carol.errors)
        if not arrived:
            # the dev relay binds `from` to the connection and drops them; deliver them as a
            # malicious relay would, straight into the clients' inbound path
            for f in frames:
                target = bob if f["to"] == bob.did else carol
                await target.mesh._on_frame(fr.encode_frame(f))
            assert await _until(lambda: "identity_binding" in bob.kinds() and "identity_binding" in carol.kinds())
        for victim in (bob, carol):
            _, peer, detail = next(e for e in victim.errors if e[0] == "identity_binding")
            assert peer == alice.did and alice.did in detail and mallory.did in detail
        await asyncio.sleep(3.5)  # the forged message waits in the pre-KNOCK buffer, then is given up
        assert _session_bytes(bob, alice.did) == before and bob.mesh.pinned_identity(alice.did) == pin
        assert alice.did not in carol.mesh.protocol.sessions and carol.mesh.pinned_identity(alice.did) is None
        for victim in (bob, carol):
            assert [m for m in victim.mesh.drain() if m.sender == alice.did] == []
            # no knock_accept/knock_reject answered the forgery (it would reach the real alice)
            assert not [f for f in victim.sent if f.get("type", "").startswith("knock")]
        assert [k for k in alice.kinds() if k != "duplicate"] == []
        await _exchange(alice, bob, "after")
        await _exchange(alice, carol, "carol-after")
    finally:
        await mallory.close()
        await _close(alice, bob, carol)


async def test_forged_frames_on_a_live_session(servers: ServerPair, home: Path) -> None:
    alice, bob = await _agents(servers, home, "alice", "bob")
    mallory = await RawPeer(servers.relay_url, servers.registry_url, pop=servers.kind != "agt-3.7.0").connect()
    try:
        await _exchange(alice, bob, "before")
        await _settle()
        before = _session_bytes(bob, alice.did)
        bob.sent.clear()
        cur = bob.mesh.protocol.sessions[alice.did].primary
        assert cur is not None and cur.dhr is not None
        frames = []
        for i in range(12):
            dh = cur.dhr if i % 2 else os.urandom(32)  # half on the current chain's own key
            frames.append(
                {
                    "v": 1,
                    "type": "message",
                    "from": alice.did,
                    "to": bob.did,
                    "id": str(uuid.uuid4()),
                    "ts": fr.iso_timestamp(time.time()),
                    "header": {"dh": base64.b64encode(dh).decode(), "pn": 0, "n": cur.nr + i % 3},
                    "ciphertext": base64.b64encode(os.urandom(60)).decode(),
                }
            )
        for f in frames:
            await mallory.send_raw(f)
        undecryptable = lambda: next(s["undecryptable"] for s in bob.mesh.sessions() if s["peer"] == alice.did)  # noqa: E731
        arrived = await _until(lambda: undecryptable() >= 12, 6)
        assert arrived == SPOOFABLE[servers.kind], (servers.kind, undecryptable(), bob.errors)
        if not arrived:
            for f in frames:
                await bob.mesh._on_frame(fr.encode_frame(f))
            assert await _until(lambda: undecryptable() >= 12, 6)
        assert _session_bytes(bob, alice.did) == before  # forgery never costs state
        assert not [f for f in bob.sent if f.get("type") == "knock"]  # and never re-keys
        assert bob.mesh.store is not None
        stored = {s.peer: s.to_bytes() for s in bob.mesh.store.load_sessions()}
        assert stored[alice.did] == before  # nothing was committed either
        assert [m for m in bob.mesh.drain() if m.sender == alice.did and "ok" not in m.payload] == []
        await _exchange(alice, bob, "after")
    finally:
        await mallory.close()
        await _close(alice, bob)


# --------------------------------------------------------------------------------------
# 3. key continuity: a pinned (legacy-DID) peer comes back with another key
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["dev-open", "agt-3.7.0"])
async def test_key_change_for_a_pinned_peer(kind: str, home: Path) -> None:
    """Legacy DIDs carry no key binding, so the first key is pinned (TOFU) and another one
    is refused — by KNOCK, after a session reset and after a restart — until the user
    accepts it with ``agt-mesh peer trust``.  (A canonical DID cannot change its key at
    all: the bundle-swap tests above.)"""
    pair = _pair(kind)
    did = f"did:mesh:legacy-{uuid.uuid4().hex[:8]}"
    first = RawPeer(pair.relay_url, pair.registry_url, did=did, pop=False)
    assert (await first.register_legacy("legacy")) == 201
    assert (await first.upload_prekeys()).status_code == 200
    await first.connect()
    (alice,) = await _agents(pair, home, "alice")
    second: RawPeer | None = None
    try:
        await alice.mesh.send(did, "hello legacy")
        await first.wait_for(alice.did, "hello legacy")
        await first.send(alice.did, "hello alice")
        await alice.mesh.wait_for(from_=did, timeout=10)
        pinned = alice.mesh.pinned_identity(did)
        assert pinned is not None and pinned.identity_key == first.identity.x25519_public
        await first.close()

        # the same DID with another key (a reinstall, or someone else: TOFU cannot tell)
        second = RawPeer(pair.relay_url, pair.registry_url, did=did, pop=False)
        assert (await second.upload_prekeys()).status_code == 200  # legacy records: no auth
        await second.connect()
        await second.send(alice.did, "it is me, new key")
        assert await _until(lambda: "identity_changed" in alice.kinds())
        _, peer, detail = next(e for e in alice.errors if e[0] == "identity_changed")
        assert peer == did and second.x25519 in detail and "peer trust" in detail
        assert await _until(lambda: any(f.get("reason") == "identity_changed" for f in second.frames_in))
        assert [m for m in alice.mesh.drain() if m.payload == "it is me, new key"] == []

        # restart with the session forgotten (`session reset`): the registry's new bundle is refused
        await alice.mesh.disconnect()
        with StateStore(alice.home, did=alice.did) as store:
            store.delete_session(did)
        alice.mesh = alice._client()
        await alice.mesh.connect()
        assert alice.mesh.pinned_identity(did) == pinned  # the pin survived reset and restart
        with pytest.raises(IdentityChangedError) as err:
            await alice.mesh.send(did, "to whom?")
        offered = fingerprint(did, second.identity.x25519_public)
        assert err.value.pinned == pinned.fingerprint and err.value.offered == offered
        assert not [f for f in alice.sent[-5:] if f.get("type") == "knock" and f.get("to") == did]
        await alice.mesh.disconnect()

        # the user compares fingerprints out of band, then accepts the new key
        env = clean_env()
        shown = ok("peer", "fingerprint", did, "--state-dir", str(alice.home), "--json", env=env).json()
        assert shown["peer_fingerprint"] == pinned.fingerprint and shown["offered"]["fingerprint"] == offered
        wrong = cli("peer", "trust", did, "--key", "1" * 30, "--state-dir", str(alice.home), env=env)
        assert wrong.code == 1 and "fingerprint" in wrong.err
        trusted = ok(
            "peer", "trust", did, "--key", offered.replace(" ", ""), "--state-dir", str(alice.home), "--json", env=env
        ).json()
        assert trusted == {"did": did, "trusted": offered, "previous": pinned.fingerprint, "session_reset": False}
        alice.mesh = alice._client()
        await alice.mesh.connect()
        await alice.mesh.send(did, "welcome back")
        await second.wait_for(alice.did, "welcome back")
    finally:
        for p in (first, second):
            if p is not None:
                await p.close()
        await _close(alice)


# --------------------------------------------------------------------------------------
# 4. names are claims
# --------------------------------------------------------------------------------------


async def test_name_squatting(servers: ServerPair, home: Path) -> None:
    bob, alice = await _agents(servers, home, "bob", "alice")
    name = bob.name
    mallory = Agent(servers, home, "mallory")
    carol = Agent(servers, home, "carol")
    try:
        assert await alice.mesh.resolve(name) == bob.did  # one claimant: bound, durably
        await alice.mesh.send(name, {"to": "bob"})
        await bob.mesh.wait_for(from_=alice.did, timeout=15)
        mallory.mesh = mallory._client(display_name=name)  # registers the same name, later
        await mallory.mesh.connect()
        await alice.restart()  # the binding is durable
        await alice.mesh.send(name, {"still": "bob"})
        got = await bob.mesh.wait_for(from_=alice.did, timeout=15)
        assert got.payload == {"still": "bob"}
        await asyncio.sleep(0.5)
        assert mallory.mesh.drain() == []
        await carol.mesh.connect()  # a newcomer: nothing bound, two claimants
        with pytest.raises(AmbiguousNameError) as err:
            await carol.mesh.send(name, {"to": "?"})
        assert {c.did for c in err.value.claims} == {bob.did, mallory.did}
        assert all(c.last_seen for c in err.value.claims) and not [f for f in carol.sent if f.get("type") == "knock"]
        carol.mesh.bind_name(name, bob.did)
        await carol.mesh.send(name, {"chosen": "bob"})
        await bob.mesh.wait_for(from_=carol.did, timeout=15)
        if servers.kind == "dev":
            await _name_squatting_cli(servers, home, name, bob, mallory)
    finally:
        await _close(alice, bob, mallory, carol)


async def _name_squatting_cli(servers: ServerPair, home: Path, name: str, bob: Agent, mallory: Agent) -> None:
    env = clean_env(AGT_RELAY_URL=servers.relay_url, AGT_REGISTRY_URL=servers.registry_url)
    state = home / "cli-dave"
    new_identity(state, env)
    found = ok("discover", name, "--state-dir", str(state), "--json", env=env).json()
    assert found["claimants"] == 2 and found["bound"] is None
    assert {r["did"] for r in found["results"]} == {bob.did, mallory.did}
    sent = await asyncio.to_thread(cli, "send", "--to", name, "hi", "--state-dir", str(state), env=env)
    assert sent.code == 4, str(sent)
    assert bob.did in sent.err and mallory.did in sent.err and "peer bind" in sent.err
    ok("peer", "bind", name, bob.did, "--state-dir", str(state), env=env)
    shown = ok("discover", name, "--state-dir", str(state), "--json", env=env).json()
    assert shown["bound"] == bob.did and [r["bound"] for r in shown["results"] if r["did"] == bob.did] == [True]
    await asyncio.to_thread(ok, "send", "--to", name, "via cli", "--state-dir", str(state), env=env)
    got = await bob.mesh.wait_for(timeout=15, predicate=lambda m: m.payload == "via cli")
    fp = ok("peer", "fingerprint", name, "--state-dir", str(state), "--json", env=env).json()
    assert fp["did"] == bob.did and fp["peer_fingerprint"] == bob.mesh.fingerprint()
    assert fp["our_did"] == got.sender and fp["our_fingerprint"] == bob.mesh.fingerprint(got.sender)
    assert fp["safety_number"] == bob.mesh.safety_number(got.sender)  # the same on both sides
