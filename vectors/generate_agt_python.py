#!/usr/bin/env python3
"""Known-answer vectors from the real AGT Python `agentmesh.encryption` (agent-governance-toolkit-core 5.0.0).

Writes ``vectors/agt-python-5.0.0.json`` in the ``agt-mesh-vectors/1`` format (see
``/work/shared/spec/vectors.md``) with ``"x3dh_kdf": "spec"``.

Method
------
The only entropy source on the X3DH / Double Ratchet path of ``agentmesh.encryption`` is
``secrets.token_bytes``:

* ``x3dh.X25519KeyPair.generate()``  -> ``secrets.token_bytes(32)`` (x3dh.py imports the ``secrets``
  module at top level), used for the signed pre-key, every one-time pre-key and the ephemeral key EK;
* ``ratchet._generate_dh_pair()``     -> ``secrets.token_bytes(32)`` (local ``import secrets``), used
  for the initiator's first ratchet key (``DoubleRatchet.init_sender``) and for the new ratchet key of
  every DH ratchet step (``_dh_ratchet_step``, called from ``decrypt``);
* ``ratchet._encrypt()``              -> ``secrets.token_bytes(12)`` (local ``import secrets``), the
  ChaCha20-Poly1305 nonce of every message.

Private keys are plain 32-byte strings (public = libsodium ``crypto_scalarmult_base``, which clamps), so
no un-seedable key object is involved. Ed25519 signing (PyNaCl) is deterministic.

Before driving the library, this script replaces the attribute ``secrets.token_bytes`` (the one
module object both x3dh.py and ratchet.py resolve at call time) with a deterministic DRBG:
stream = SHA256(label || u32be(0)) || SHA256(label || u32be(1)) || ...; every call takes the next
n bytes. Each draw is logged with the operation that made it, and each draw is checked against what
the library produced (EK public key, first ratchet public key, nonce prefix of each ciphertext, new
ratchet key in the state after a DH step), so the attribution is verified, not assumed.
``os.urandom``, ``secrets.randbits/choice`` and ``nacl.utils.random`` are trapped during the run:
any other entropy use aborts the generator. ``x3dh._kdf`` is wrapped (calls the original) to record
the X3DH DH concatenation and SK.

Ed25519 identities: seed = SHA-256("agentmesh-kat/<name>/ed25519-seed"); the 64-byte secret key
(seed || pub) from libsodium ``crypto_sign_seed_keypair`` goes into
``X3DHKeyManager.from_ed25519_keys(sk64, pk32)``. DID = "did:mesh:" + sha256(ed_pub).hex()[:32].
Channel AD: ``SecureChannel.create_sender/create_receiver(..., associated_data=utf8(didA|didB))``;
the channel prepends it to the X3DH AD (IK_A || IK_B), which gives exactly the vectors.md AD.

The DRBG draw order of agentmesh matches the format's assumptions: initiate draws EK, then
init_sender draws the first ratchet key; each encrypt draws one 12-byte nonce; each decrypt that makes
a DH step draws one 32-byte key (before the tag check); the responder draws nothing at set-up (its first
ratchet key is its SPK).

Run
---
    python -m venv ~/.cache/agt-mesh/venvs/core-5.0.0
    ~/.cache/agt-mesh/venvs/core-5.0.0/bin/pip install 'agent-governance-toolkit-core==5.0.0'
    ~/.cache/agt-mesh/venvs/core-5.0.0/bin/python vectors/generate_agt_python.py      # writes the JSON
    <any python with `cryptography`> vectors/generate_agt_python.py --self-check [FILE]

``--self-check`` does not import agentmesh: it recomputes identities, SKs, ADs, headers, ciphertexts and
error outcomes from the recorded inputs with plain ``cryptography`` primitives (wire.md §1-§3 formulas)
and prints one line per case and ``N passed, M failed``. Output of the generator is byte-identical
across runs (no clock, no other randomness).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "agt-python-5.0.0.json")
FORMAT = "agt-mesh-vectors/1"
SPEC_KAT_SK = "f8682588506e56d9b602f353a83910760692d4939a18b8043305b82f705a5bfa"


# =====================================================================================
# Generator (imports agentmesh lazily; run with the core-5.0.0 venv python)
# =====================================================================================

class DRBG:
    """SHA256(label || u32be(i)) stream; each draw takes the next n bytes and is logged."""

    def __init__(self, label: str) -> None:
        self.label = label.encode()
        self.buf = b""
        self.block = 0
        self.offset = 0
        self.ctx = "?"
        self.log: list[tuple[str, int, int, bytes]] = []

    def draw(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.buf += hashlib.sha256(self.label + struct.pack(">I", self.block)).digest()
            self.block += 1
        out, self.buf = self.buf[:n], self.buf[n:]
        self.log.append((self.ctx, self.offset, n, out))
        self.offset += n
        return out

    def mark(self, ctx: str) -> int:
        self.ctx = ctx
        return len(self.log)

    def since(self, m: int) -> list[bytes]:
        return [d[3] for d in self.log[m:]]


class Patches:
    """Installs the DRBG in place of secrets.token_bytes and traps any other entropy source."""

    def __init__(self) -> None:
        self.active: DRBG | None = None
        self.kdf_log: list[tuple[bytes, bytes]] = []

    def install(self) -> None:
        import secrets
        import nacl.utils
        import agentmesh.encryption.x3dh as x3dh
        import agentmesh.encryption.ratchet as ratchet  # noqa: F401  (imports `secrets` lazily)

        assert x3dh.secrets is secrets, "x3dh.py must use the global secrets module"

        def token_bytes(nbytes=None):
            if self.active is None:
                raise RuntimeError("entropy drawn outside a vector run")
            return self.active.draw(32 if nbytes is None else int(nbytes))

        def trap(name):
            def f(*a, **k):
                raise RuntimeError(f"unexpected entropy source used: {name}")
            return f

        secrets.token_bytes = token_bytes
        secrets.randbits = trap("secrets.randbits")
        secrets.choice = trap("secrets.choice")
        secrets.randbelow = trap("secrets.randbelow")
        nacl.utils.random = trap("nacl.utils.random")
        os.urandom = trap("os.urandom")

        orig_kdf = x3dh._kdf

        def recording_kdf(ikm: bytes) -> bytes:
            sk = orig_kdf(ikm)
            self.kdf_log.append((bytes(ikm), sk))
            return sk

        x3dh._kdf = recording_kdf
        self.orig_kdf = orig_kdf


def _did(ed_pub: bytes) -> str:
    return "did:mesh:" + hashlib.sha256(ed_pub).hexdigest()[:32]


def _seed(name: str) -> bytes:
    return hashlib.sha256(f"agentmesh-kat/{name}/ed25519-seed".encode()).digest()


def _keys(name: str):
    from nacl.bindings import crypto_sign_seed_keypair
    from agentmesh.encryption.x3dh import X3DHKeyManager

    seed = _seed(name)
    pk, sk = crypto_sign_seed_keypair(seed)
    assert sk == seed + pk
    km = X3DHKeyManager.from_ed25519_keys(sk, pk)
    return seed, pk, km


def _x25519(priv: bytes, pub: bytes) -> bytes:
    """Independent DH (cryptography/OpenSSL) to cross-check libsodium results in the generator."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

    return X25519PrivateKey.from_private_bytes(priv).exchange(X25519PublicKey.from_public_bytes(pub))


def _x25519_pub(priv: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives import serialization as ser

    return X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes(
        ser.Encoding.Raw, ser.PublicFormat.Raw)


def _classify(exc: BaseException) -> str:
    from cryptography.exceptions import InvalidTag

    if isinstance(exc, InvalidTag):
        return "auth"
    if isinstance(exc, RuntimeError) and str(exc).startswith("Too many skipped messages"):
        return "too_many_skipped"
    if isinstance(exc, ValueError) and (str(exc).startswith("Invalid header length")
                                        or str(exc) == "Ciphertext too short"):
        return "malformed"
    raise exc


LONG_TEXT = ("The quick brown fox jumps over the lazy dog. " * 112)[:5000].encode()
UNICODE_TEXT = "Grüße, 世界! Ωμέγα — naïve café ☕ 🤖🔐".encode("utf-8")
BINARY = bytes(range(256))


def run_session(P: Patches, name: str, ini: str, res: str, n_otks: int, use_otk, script):
    """Drive SecureChannel for one conversation and return the vector case."""
    from agentmesh.encryption.channel import ChannelEstablishment, SecureChannel
    from agentmesh.encryption.ratchet import EncryptedMessage, MessageHeader
    from agentmesh.encryption.x3dh import PreKeyBundle

    label = f"AGT-PY-KAT/{name}"
    rng = DRBG(label)
    P.active = rng
    P.kdf_log.clear()

    a_seed, a_pk, a_km = _keys(ini)
    b_seed, b_pk, b_km = _keys(res)
    a_did, b_did = _did(a_pk), _did(b_pk)
    assert rng.log == []

    # Responder pre-keys.
    m = rng.mark("bob.generate_signed_pre_key")
    spk = b_km.generate_signed_pre_key()
    d = rng.since(m)
    assert d == [spk.key_pair.private_key] and len(d[0]) == 32
    otk_privs = []
    for i in range(n_otks):
        m = rng.mark(f"bob.generate_one_time_pre_keys#{i}")
        (otk,) = b_km.generate_one_time_pre_keys(1)
        assert otk.key_id == i and rng.since(m) == [otk.key_pair.private_key]
        otk_privs.append(otk.key_pair.private_key)
    pub_bundle = b_km.get_public_bundle(otk_id=use_otk)
    assert (pub_bundle.one_time_pre_key_id == use_otk)
    # Hand the bundle over as plain bytes (what a registry would carry).
    bundle = PreKeyBundle(
        identity_key=bytes(pub_bundle.identity_key), identity_key_ed=bytes(pub_bundle.identity_key_ed),
        signed_pre_key=bytes(pub_bundle.signed_pre_key),
        signed_pre_key_signature=bytes(pub_bundle.signed_pre_key_signature),
        signed_pre_key_id=pub_bundle.signed_pre_key_id,
        one_time_pre_key=None if pub_bundle.one_time_pre_key is None else bytes(pub_bundle.one_time_pre_key),
        one_time_pre_key_id=pub_bundle.one_time_pre_key_id)

    extra_ad = f"{a_did}|{b_did}".encode()

    # Initiator: X3DH initiate + DoubleRatchet.init_sender.
    m = rng.mark("alice.create_sender")
    a_ch, est = SecureChannel.create_sender(a_km, bundle, associated_data=extra_ad)
    d = rng.since(m)
    assert len(d) == 2 and all(len(x) == 32 for x in d), "create_sender must draw EK then ratchet key"
    ek_priv, a_ratchet_priv = d
    for j, what in ((m, "EK (initiate)"), (m + 1, "first ratchet key (init_sender)")):
        c0, o0, n0, b0 = rng.log[j]
        rng.log[j] = (f"{c0}: {what}", o0, n0, b0)
    assert _x25519_pub(ek_priv) == est.ephemeral_public_key
    assert a_ch._ratchet.state.dh_self_private == a_ratchet_priv
    assert a_ch._ratchet.state.dh_self_public == _x25519_pub(a_ratchet_priv)
    assert len(P.kdf_log) == 1
    dh_concat, sk = P.kdf_log[0]

    # Recompute the DHs independently (OpenSSL) and check the KDF input.
    a_ik_priv = a_km.identity_key.private_key
    dhs = [_x25519(a_ik_priv, bundle.signed_pre_key), _x25519(ek_priv, bundle.identity_key),
           _x25519(ek_priv, bundle.signed_pre_key)]
    if use_otk is not None:
        dhs.append(_x25519(ek_priv, bundle.one_time_pre_key))
    assert b"".join(dhs) == dh_concat

    # Responder: establishment goes over the wire as (ik, ek, otk id).
    m = rng.mark("bob.create_receiver")
    est_wire = ChannelEstablishment(
        initiator_identity_key=bytes(est.initiator_identity_key),
        ephemeral_public_key=bytes(est.ephemeral_public_key),
        used_one_time_key_id=est.used_one_time_key_id)
    b_ch = SecureChannel.create_receiver(b_km, est_wire, associated_data=f"{a_did}|{b_did}".encode())
    assert rng.since(m) == [], "responder set-up must not draw"
    assert len(P.kdf_log) == 2 and P.kdf_log[1] == (dh_concat, sk)

    ad = extra_ad + a_km.identity_key.public_key + b_km.identity_key.public_key
    assert a_ch._associated_data == ad and b_ch._associated_data == ad

    chans = {"alice": a_ch, "bob": b_ch}
    events = []
    msgs = {}  # tag -> (event index, header bytes, ciphertext bytes)
    final_exc = None
    for si, step in enumerate(script):
        op = step[0]
        last = si == len(script) - 1
        if op == "enc":
            _, who, pt, tag = step
            m = rng.mark(f"{who}.send[{tag}]")
            em = chans[who].send(pt)
            d = rng.since(m)
            assert len(d) == 1 and len(d[0]) == 12, f"encrypt must draw one nonce: {step}"
            hdr = em.header.serialize()
            ct = em.ciphertext
            assert len(hdr) == 40 and ct[:12] == d[0] and len(ct) == len(pt) + 28
            assert hdr[:32] == chans[who]._ratchet.state.dh_self_public
            msgs[tag] = (len(events), hdr, ct)
            events.append({"op": "encrypt", "by": who, "plaintext": pt.hex(), "nonce": d[0].hex(),
                           "expect": {"header": hdr.hex(), "ciphertext": ct.hex()}})
            continue
        if op == "dec":
            _, who, tag = step
            idx, hdr, ct = msgs[tag]
            ev = {"op": "decrypt", "by": who, "message": idx}
            expect_pt = bytes.fromhex(events[idx]["plaintext"])
        elif op == "raw":  # forged / tampered
            _, who, tag, hdr, ct = step
            ev = {"op": "decrypt_raw", "by": who, "header": hdr.hex(), "ciphertext": ct.hex()}
            expect_pt = None
        else:
            raise ValueError(op)
        m = rng.mark(f"{who}.receive[{tag}{'' if op == 'dec' else '/forged'}]")
        try:
            header = MessageHeader.deserialize(hdr)
            got = chans[who].receive(EncryptedMessage(header=header, ciphertext=ct))
            outcome = {"plaintext": got.hex()}
        except Exception as exc:  # classified below; unknown exceptions propagate
            outcome = {"error": _classify(exc)}
            final_exc = exc
        d = rng.since(m)
        assert len(d) <= 1 and all(len(x) == 32 for x in d), f"decrypt draws at most one key: {step}"
        rp = d[0] if d else None
        if rp is not None and "plaintext" in outcome:
            st = chans[who]._ratchet.state
            assert st.dh_self_private == rp and st.dh_self_public == _x25519_pub(rp)
        if "error" in outcome:
            assert last, f"an error event must be last in its case: {name} step {si}"
        else:
            assert expect_pt is not None and outcome["plaintext"] == expect_pt.hex(), step
        ev["ratchet_priv"] = None if rp is None else rp.hex()
        ev["expect"] = outcome
        events.append(ev)
    if "error" not in events[-1].get("expect", {}):
        raise AssertionError(f"{name}: script must end with an error event")

    P.active = None
    case = {
        "name": name, "kind": "session",
        "alice": {"ed25519_seed": a_seed.hex(), "did": a_did},
        "bob": {"ed25519_seed": b_seed.hex(), "did": b_did},
        "bob_spk": {"id": spk.key_id, "priv": spk.key_pair.private_key.hex()},
        "bob_otks": [{"id": i, "priv": p.hex()} for i, p in enumerate(otk_privs)],
        "use_otk": use_otk,
        "alice_ek_priv": ek_priv.hex(),
        "alice_ratchet_priv": a_ratchet_priv.hex(),
        "expect": {
            "bob_spk_pub": spk.key_pair.public_key.hex(),
            "bob_spk_sig": spk.signature.hex(),
            "bob_otk_pubs": [_x25519_pub(p).hex() for p in otk_privs],
            "alice_ek_pub": est.ephemeral_public_key.hex(),
            "sk": sk.hex(),
            "ad": ad.hex(),
        },
        "events": events,
        # Informational (ignored by verifiers): roles, DRBG label and draw log, final exception.
        "roles": {"alice": ini, "bob": res},
        "drbg": {"label": label, "draws": [f"{c} @{o} +{n}" for (c, o, n, _) in rng.log]},
        "agt_final_exception": f"{type(final_exc).__module__}.{type(final_exc).__name__}: {final_exc}",
    }
    return case, dh_concat, sk


def _tamper_last(ct: bytes) -> bytes:
    return ct[:-1] + bytes([ct[-1] ^ 0x01])


def scripts():
    """The conversations. Names below are message tags; 'alice' = initiator, 'bob' = responder."""
    s = []
    # 1. OTK, out-of-order within a chain, turn changes, late message from an older chain,
    #    empty / 5000-byte / non-ASCII / binary plaintexts, final tampered tag -> auth.
    s.append(("session-otk-reorder-late-auth", "alice", "bob", 2, 0, lambda M: [
        ("enc", "alice", b"alice->bob #0", "a0"),
        ("enc", "alice", b"", "a1"),
        ("enc", "alice", b"alice->bob #2", "a2"),
        ("enc", "alice", LONG_TEXT, "a3"),
        ("dec", "bob", "a0"),
        ("dec", "bob", "a1"),
        ("dec", "bob", "a3"),            # skips a2 (cached)
        ("enc", "bob", UNICODE_TEXT, "b0"),
        ("enc", "bob", b"bob->alice #1", "b1"),
        ("dec", "alice", "b1"),          # DH step, skips b0
        ("dec", "alice", "b0"),          # from the skipped-key cache
        ("enc", "alice", b"alice->bob #4 (new chain)", "a4"),
        ("dec", "bob", "a4"),            # DH step (pn = 4)
        ("dec", "bob", "a2"),            # late message from the previous chain
        ("enc", "bob", BINARY, "b2"),
        ("dec", "alice", "b2"),
        ("enc", "alice", b"alice->bob #5 (to be tampered)", "a5"),
        ("dec", "bob", "a5"),
        ("enc", "alice", b"alice->bob #6 (tampered tag)", "a6"),
        ("raw", "bob", "a6", M["a6"][1], _tamper_last(M["a6"][2])),
    ]))
    # 2. 3-DH (OTKs exist but none in the bundle), ping-pong, out-of-order (2,0,1), a gap of exactly
    #    100 (allowed), then a gap of 101 in the current chain -> too_many_skipped (no DH step).
    def s2(M):
        ev = [("enc", "alice", b"ping 0", "c0"), ("dec", "bob", "c0"),
              ("enc", "bob", b"pong 0", "d0"), ("dec", "alice", "d0"),
              ("enc", "alice", b"ping 1", "c1"), ("dec", "bob", "c1"),
              ("enc", "bob", "pong 1 \u00e9\u00e8".encode(), "d1"),
              ("enc", "bob", b"pong 2", "d2"),
              ("enc", "bob", b"pong 3", "d3"),
              ("dec", "alice", "d3"), ("dec", "alice", "d1"), ("dec", "alice", "d2"),
              ("enc", "alice", b"ping 2", "c2"), ("dec", "bob", "c2")]
        ev += [("enc", "alice", b"x%d" % i, f"x{i}") for i in range(101)]
        ev += [("dec", "bob", "x100"), ("dec", "bob", "x0"), ("dec", "bob", "x57")]
        ev += [("enc", "alice", b"y%d" % i, f"y{i}") for i in range(102)]
        ev += [("dec", "bob", "y101")]
        return ev
    s.append(("session-3dh-pingpong-gap101", "carol", "dave", 2, None, s2))
    # 3. OTK id 2, several DH steps, a gap of 101 through pn (previous chain) -> too_many_skipped.
    def s3(M):
        ev = [("enc", "alice", UNICODE_TEXT, "a0"), ("dec", "bob", "a0"),
              ("enc", "bob", b"", "b0"), ("dec", "alice", "b0"),
              ("enc", "alice", b"a1", "a1"), ("dec", "bob", "a1")]
        ev += [("enc", "alice", b"p%d" % i, f"p{i}") for i in range(1, 102)]
        ev += [("enc", "bob", b"b1", "b1"), ("dec", "alice", "b1"),
               ("enc", "alice", b"a-new-chain pn=102", "an"), ("dec", "bob", "an")]
        return ev
    s.append(("session-otk2-pn-gap101", "bob", "alice", 3, 2, s3))
    # 4. Tampered first message of a new chain: the DH step draws a ratchet key, then auth fails.
    s.append(("session-otk-newchain-tamper-auth", "dave", "carol", 1, 0, lambda M: [
        ("enc", "alice", b"hello", "a0"), ("dec", "bob", "a0"),
        ("enc", "bob", b"hi", "b0"), ("dec", "alice", "b0"),
        ("enc", "alice", LONG_TEXT, "a1"), ("dec", "bob", "a1"),
        ("enc", "bob", b"reply on new chain", "b1"),
        ("raw", "alice", "b1", M["b1"][1],
         M["b1"][2][:12] + bytes([M["b1"][2][12] ^ 0x80]) + M["b1"][2][13:]),
    ]))
    # 5. Header is authenticated: pn changed in a current-chain header (pn unused there) -> auth.
    def s5(M):
        h = bytearray(M["a2"][1]); h[35] ^= 0x07
        return [("enc", "alice", b"m0", "a0"), ("dec", "bob", "a0"),
                ("enc", "alice", b"m1", "a1"), ("dec", "bob", "a1"),
                ("enc", "alice", b"m2 header tampered", "a2"),
                ("raw", "bob", "a2", bytes(h), M["a2"][2])]
    s.append(("session-3dh-header-tamper-auth", "alice", "carol", 0, None, s5))
    # 6. Duplicate delivery of an already-decrypted message (key not cached) -> auth.
    s.append(("session-otk-duplicate-auth", "carol", "bob", 1, 0, lambda M: [
        ("enc", "alice", b"once", "a0"), ("dec", "bob", "a0"),
        ("enc", "bob", b"ack", "b0"), ("dec", "alice", "b0"),
        ("enc", "alice", b"twice?", "a1"), ("dec", "bob", "a1"),
        ("dec", "bob", "a1"),
    ]))
    # 7. Malformed header (39 bytes) -> malformed (agentmesh: MessageHeader.deserialize ValueError).
    s.append(("session-3dh-malformed-header", "dave", "alice", 1, None, lambda M: [
        ("enc", "alice", b"m0", "a0"), ("dec", "bob", "a0"),
        ("enc", "bob", b"r0", "b0"), ("dec", "alice", "b0"),
        ("enc", "bob", b"r1", "b1"),
        ("raw", "alice", "b1", M["b1"][1][:39], M["b1"][2]),
    ]))
    # 8. Ciphertext shorter than the 12-byte nonce -> malformed ("Ciphertext too short").
    s.append(("session-otk-short-ciphertext", "bob", "dave", 2, 1, lambda M: [
        ("enc", "alice", b"m0", "a0"), ("dec", "bob", "a0"),
        ("enc", "alice", b"m1", "a1"),
        ("raw", "bob", "a1", M["a1"][1], M["a1"][2][:11]),
    ]))
    return s


def run_script(P, name, ini, res, n_otks, use_otk, build):
    """Forged events need the bytes of an earlier message: a first pass replays the script prefix
    (same DRBG label, so the same bytes) to learn them, then the real pass records the case."""
    class Placeholder(dict):
        def __missing__(self, k):
            return (0, b"\x00" * 40, b"\x00" * 40)

    draft = build(Placeholder())
    learned = Placeholder()
    if draft[-1][0] == "raw":
        learned.update(_learn(P, name, ini, res, n_otks, use_otk, draft[:-1]))
    return run_session(P, name, ini, res, n_otks, use_otk, build(learned))


def _learn(P, name, ini, res, n_otks, use_otk, prefix):
    """Run the prefix (no error event) and return tag -> (index, header, ciphertext)."""
    out = {}
    from agentmesh.encryption.channel import ChannelEstablishment, SecureChannel
    from agentmesh.encryption.ratchet import EncryptedMessage, MessageHeader

    rng = DRBG(f"AGT-PY-KAT/{name}")
    P.active = rng
    P.kdf_log.clear()
    _, a_pk, a_km = _keys(ini)
    _, b_pk, b_km = _keys(res)
    b_km.generate_signed_pre_key()
    for _ in range(n_otks):
        b_km.generate_one_time_pre_keys(1)
    bundle = b_km.get_public_bundle(otk_id=use_otk)
    ad = f"{_did(a_pk)}|{_did(b_pk)}".encode()
    a_ch, est = SecureChannel.create_sender(a_km, bundle, associated_data=ad)
    b_ch = SecureChannel.create_receiver(b_km, ChannelEstablishment(
        est.initiator_identity_key, est.ephemeral_public_key, est.used_one_time_key_id), associated_data=ad)
    chans = {"alice": a_ch, "bob": b_ch}
    for i, st in enumerate(prefix):
        if st[0] == "enc":
            em = chans[st[1]].send(st[2])
            out[st[3]] = (i, em.header.serialize(), em.ciphertext)
        elif st[0] == "dec":
            _, h, c = out[st[2]]
            chans[st[1]].receive(EncryptedMessage(MessageHeader.deserialize(h), c))
    P.active = None
    return out


def generate(out_path: str) -> None:
    import warnings
    from importlib.metadata import version

    warnings.simplefilter("ignore", DeprecationWarning)  # agentmesh/__init__ deprecation notice
    import agentmesh.encryption.x3dh as x3dh

    core_ver = version("agent-governance-toolkit-core")
    assert core_ver == "5.0.0", core_ver
    P = Patches()
    P.install()

    cases = []
    # --- identity
    idents = {}
    for name in ["alice", "bob", "carol", "dave"]:
        seed, pk, km = _keys(name)
        idents[name] = (seed, pk, km)
        cases.append({"name": f"identity-{name}", "kind": "identity", "ed25519_seed": seed.hex(),
                      "expect": {"ed25519_pub": pk.hex(),
                                 "x25519_priv": km.identity_key.private_key.hex(),
                                 "x25519_pub": km.identity_key.public_key.hex(),
                                 "did": _did(pk)}})
    # Cross-check against the TypeScript KAT in wire.md §1.2/§1.3/§10.
    a = cases[0]["expect"]
    assert a["ed25519_pub"].startswith("bce71265") and a["ed25519_pub"].endswith("f93f")
    assert a["x25519_priv"].startswith("103c3789") and a["x25519_priv"].endswith("9642")
    assert a["x25519_pub"].startswith("d53d0f36") and a["x25519_pub"].endswith("c252")
    assert a["did"] == "did:mesh:498aaf869b0fb551d0b8077f1b07e32d"
    for name, (seed, pk, km) in idents.items():  # private -> public consistency (libsodium vs OpenSSL)
        assert _x25519_pub(km.identity_key.private_key) == km.identity_key.public_key

    # --- sessions (run first: their X3DH inputs feed the x3dh_kdf cases)
    sessions = []
    concat_by_len = {}
    for (name, ini, res, n_otks, use_otk, build) in scripts():
        case, dh_concat, sk = run_script(P, name, ini, res, n_otks, use_otk, build)
        sessions.append(case)
        concat_by_len.setdefault(len(dh_concat), []).append((name, dh_concat, sk))

    # --- x3dh_kdf
    kat_in = bytes(range(0x60))
    kat_sk = P.orig_kdf(kat_in)
    assert kat_sk.hex() == SPEC_KAT_SK, kat_sk.hex()
    cases.append({"name": "x3dh-kdf-spec-kat-00-5f", "kind": "x3dh_kdf", "dh_concat": kat_in.hex(),
                  "expect": {"sk": kat_sk.hex()}})
    for ln in (96, 128):
        assert ln in concat_by_len, f"no {ln}-byte dh_concat captured"
        for (name, dh_concat, sk) in concat_by_len[ln]:
            assert P.orig_kdf(dh_concat) == sk
            cases.append({"name": f"x3dh-kdf-{ln}-from-{name}", "kind": "x3dh_kdf",
                          "dh_concat": dh_concat.hex(), "expect": {"sk": sk.hex()}})
    cases.extend(sessions)
    assert x3dh._kdf is not P.orig_kdf  # still the recorder

    doc = {
        "format": FORMAT,
        "generator": (f"agent-governance-toolkit-core {core_ver} agentmesh.encryption on CPython "
                      f"{platform.python_version()}"),
        "x3dh_kdf": "spec",
        "label": "AGT-PY-KAT (DRBG label per session case: AGT-PY-KAT/<case name>)",
        "generator_deps": {"pynacl": version("pynacl"), "cryptography": version("cryptography")},
        "cases": cases,
    }
    text = json.dumps(doc, indent=1, ensure_ascii=True) + "\n"
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="ascii") as f:
        f.write(text)
    os.replace(tmp, out_path)
    n_ev = sum(len(c["events"]) for c in sessions)
    print(f"wrote {out_path}: {len(cases)} cases ({len(sessions)} sessions, {n_ev} events), "
          f"sha256={hashlib.sha256(text.encode()).hexdigest()}")


# =====================================================================================
# Independent self-check (plain `cryptography`; never imports agentmesh)
# =====================================================================================

def self_check(paths: list[str]) -> int:
    import hmac as _hmac
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    RAW = serialization.Encoding.Raw

    def xpub(priv):
        return X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes(
            RAW, serialization.PublicFormat.Raw)

    def dh(priv, pub):
        return X25519PrivateKey.from_private_bytes(priv).exchange(X25519PublicKey.from_public_bytes(pub))

    def ident(seed):
        sk = Ed25519PrivateKey.from_private_bytes(seed)
        edpub = sk.public_key().public_bytes(RAW, serialization.PublicFormat.Raw)
        x = bytearray(hashlib.sha512(seed).digest()[:32])
        x[0] &= 0xF8; x[31] &= 0x7F; x[31] |= 0x40
        x = bytes(x)
        return sk, edpub, x, xpub(x), "did:mesh:" + hashlib.sha256(edpub).hexdigest()[:32]

    def hkdf(salt, ikm, info, n):
        return HKDF(algorithm=hashes.SHA256(), length=n, salt=salt, info=info).derive(ikm)

    def x3dh_sk(concat, mode):
        if mode == "spec":
            return hkdf(b"\x00" * 32, b"\xff" * 32 + concat, b"AgentMesh_X3DH_v1", 32)
        if mode == "legacy":
            return hkdf(b"\xff" * 32, concat, b"AgentMesh_X3DH_v1", 32)
        raise ValueError(f"unknown x3dh_kdf {mode!r}")

    def kdf_rk(rk, out):
        o = hkdf(rk, out, b"AgentMesh_Ratchet_v1", 64)
        return o[:32], o[32:]

    def kdf_ck(ck):
        return (_hmac.new(ck, b"\x01", hashlib.sha256).digest(),
                _hmac.new(ck, b"\x02", hashlib.sha256).digest())

    class Fail(Exception):
        pass

    def eq(what, got, want):
        if got != want:
            g = got.hex() if isinstance(got, (bytes, bytearray)) else got
            raise Fail(f"{what}: got {str(g)[:80]} expected {str(want)[:80]}")

    class Party:
        def __init__(self, priv, remote, rk, cks):
            self.priv, self.pub = priv, xpub(priv)
            self.remote, self.rk, self.cks, self.ckr = remote, rk, cks, None
            self.ns = self.nr = self.pn = 0
            self.skipped = {}

    class Err(Exception):
        def __init__(self, cls):
            super().__init__(cls)
            self.cls = cls

    def skip(p, until):
        if p.ckr is None:
            return
        if until - p.nr > 100:
            raise Err("too_many_skipped")
        while p.nr < until:
            mk, p.ckr = kdf_ck(p.ckr)
            p.skipped[(p.remote, p.nr)] = mk
            p.nr += 1
            while len(p.skipped) > 2000:
                del p.skipped[next(iter(p.skipped))]

    def recv(p, ad, header, ct, ratchet_priv):
        """Returns (plaintext, used_ratchet_step)."""
        if len(header) != 40 or len(ct) < 28:
            raise Err("malformed")
        dhp, pn, n = header[:32], *struct.unpack(">II", header[32:])
        aead = lambda mk: ChaCha20Poly1305(mk).decrypt(ct[:12], ct[12:], ad + header)
        mk = p.skipped.pop((dhp, n), None)
        stepped = False
        if mk is None:
            if p.remote != dhp:
                skip(p, pn)
                if ratchet_priv is None:
                    raise Fail("a DH ratchet step is needed but ratchet_priv is null")
                p.pn, p.ns, p.nr, p.remote = p.ns, 0, 0, dhp
                p.rk, p.ckr = kdf_rk(p.rk, dh(p.priv, p.remote))
                p.priv, p.pub = ratchet_priv, xpub(ratchet_priv)
                p.rk, p.cks = kdf_rk(p.rk, dh(p.priv, p.remote))
                stepped = True
            skip(p, n)
            mk, p.ckr = kdf_ck(p.ckr)
            p.nr += 1
        try:
            return aead(mk), stepped
        except InvalidTag:
            raise Err("auth")

    def check_case(c, mode):
        k = c.get("kind")
        e = c.get("expect", {})
        if k == "identity":
            _, edpub, x, xp, did = ident(bytes.fromhex(c["ed25519_seed"]))
            eq("ed25519_pub", edpub.hex(), e["ed25519_pub"]); eq("x25519_priv", x.hex(), e["x25519_priv"])
            eq("x25519_pub", xp.hex(), e["x25519_pub"]); eq("did", did, e["did"])
            return
        if k == "x3dh_kdf":
            dc = bytes.fromhex(c["dh_concat"])
            if len(dc) not in (96, 128):
                raise Fail(f"dh_concat length {len(dc)}")
            eq("sk", x3dh_sk(dc, mode).hex(), e["sk"])
            return
        if k != "session":
            raise Fail(f"unknown case kind {k!r}")
        _, a_ed, a_x, a_xp, a_did = ident(bytes.fromhex(c["alice"]["ed25519_seed"]))
        b_sk, b_ed, b_x, b_xp, b_did = ident(bytes.fromhex(c["bob"]["ed25519_seed"]))
        eq("alice.did", a_did, c["alice"]["did"]); eq("bob.did", b_did, c["bob"]["did"])
        spk_priv = bytes.fromhex(c["bob_spk"]["priv"]); spk_pub = xpub(spk_priv)
        eq("bob_spk_pub", spk_pub.hex(), e["bob_spk_pub"])
        eq("bob_spk_sig", b_sk.sign(spk_pub).hex(), e["bob_spk_sig"])
        otks = {o["id"]: bytes.fromhex(o["priv"]) for o in c["bob_otks"]}
        eq("bob_otk_pubs", [xpub(bytes.fromhex(o["priv"])).hex() for o in c["bob_otks"]], e["bob_otk_pubs"])
        ek = bytes.fromhex(c["alice_ek_priv"]); eq("alice_ek_pub", xpub(ek).hex(), e["alice_ek_pub"])
        concat = dh(a_x, spk_pub) + dh(ek, b_xp) + dh(ek, spk_pub)
        bconcat = dh(spk_priv, a_xp) + dh(b_x, xpub(ek)) + dh(spk_priv, xpub(ek))
        if c["use_otk"] is not None:
            otk = otks[c["use_otk"]]
            concat += dh(ek, xpub(otk)); bconcat += dh(otk, xpub(ek))
        eq("responder dh_concat", bconcat, concat)
        sk = x3dh_sk(concat, mode); eq("sk", sk.hex(), e["sk"])
        ad = f"{a_did}|{b_did}".encode() + a_xp + b_xp; eq("ad", ad.hex(), e["ad"])
        arp = bytes.fromhex(c["alice_ratchet_priv"])
        rk, cks = kdf_rk(sk, dh(arp, spk_pub))
        P = {"alice": Party(arp, spk_pub, rk, cks), "bob": Party(spk_priv, None, sk, None)}
        evs = c["events"]
        for i, ev in enumerate(evs):
            p = P[ev["by"]]
            ex = ev["expect"]
            if ev["op"] == "encrypt":
                if p.cks is None:
                    raise Fail(f"event {i}: send chain not initialised")
                mk, p.cks = kdf_ck(p.cks)
                hdr = p.pub + struct.pack(">II", p.pn, p.ns)
                p.ns += 1
                nonce = bytes.fromhex(ev["nonce"])
                ct = nonce + ChaCha20Poly1305(mk).encrypt(nonce, bytes.fromhex(ev["plaintext"]), ad + hdr)
                eq(f"event {i} header", hdr.hex(), ex["header"]); eq(f"event {i} ciphertext", ct.hex(), ex["ciphertext"])
                continue
            if ev["op"] == "decrypt":
                src = evs[ev["message"]]
                if ev["message"] >= i or src["op"] != "encrypt":
                    raise Fail(f"event {i}: bad message reference")
                hdr, ct = bytes.fromhex(src["expect"]["header"]), bytes.fromhex(src["expect"]["ciphertext"])
            elif ev["op"] == "decrypt_raw":
                hdr, ct = bytes.fromhex(ev["header"]), bytes.fromhex(ev["ciphertext"])
            else:
                raise Fail(f"event {i}: unknown op {ev['op']!r}")
            rp = None if ev.get("ratchet_priv") is None else bytes.fromhex(ev["ratchet_priv"])
            try:
                pt, stepped = recv(p, ad, hdr, ct, rp)
                if "error" in ex:
                    raise Fail(f"event {i}: decrypted, expected error {ex['error']}")
                eq(f"event {i} plaintext", pt.hex(), ex["plaintext"])
                if rp is not None and not stepped:
                    raise Fail(f"event {i}: ratchet_priv given but no DH step happened")
            except Err as err:
                if "error" not in ex:
                    raise Fail(f"event {i}: error {err.cls}, expected plaintext")
                eq(f"event {i} error", err.cls, ex["error"])
                if i != len(evs) - 1:
                    raise Fail(f"event {i}: error event is not last")
                return

    passed = failed = 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        if doc.get("format") != FORMAT:
            print(f"FAIL {path}: format {doc.get('format')!r}")
            failed += 1
            continue
        mode = doc.get("x3dh_kdf")
        for c in doc.get("cases", []):
            try:
                check_case(c, mode)
                print(f"ok {c.get('name')}")
                passed += 1
            except Fail as exc:
                print(f"FAIL {c.get('name')}: {exc}")
                failed += 1
            except Exception as exc:  # malformed vector
                print(f"FAIL {c.get('name')}: {type(exc).__name__}: {exc}")
                failed += 1
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 and passed > 0 else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--self-check", nargs="*", metavar="FILE",
                    help="independently verify vector file(s) (default: the generated file)")
    ap.add_argument("--out", default=DEFAULT_OUT)
    a = ap.parse_args()
    if a.self_check is not None:
        return self_check(a.self_check or [a.out])
    generate(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
