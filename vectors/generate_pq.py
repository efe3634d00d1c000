#!/usr/bin/env python3
"""Known-answer vectors for the post-quantum hybrid session setup: writes ``vectors/pq-hybrid-v1.json``.

A second, independent computation: this script does not import ``agt_mesh``.  It builds every
value straight from the primitives and the formulas of ``docs/pq.md``:

* ML-KEM-768 from ``vectors/mlkem_ref.py`` (FIPS 203 in plain Python, which takes the
  encapsulation randomness ``m`` as an argument, so ciphertexts are reproducible), every
  operation cross-checked against OpenSSL's ML-KEM through ``cryptography``;
* X25519, Ed25519 and ChaCha20-Poly1305 from ``cryptography``; HKDF-SHA256 and HMAC written
  here over ``hmac``/``hashlib`` (RFC 5869);
* a small Double Ratchet written here (wire.md §3), for the conversations of the session cases.

All randomness comes from the DRBG ``SHA256(label || u32be(0)) || SHA256(label || u32be(1)) || ...``
(one label per case) and every drawn value is written into the case, so the file is byte-identical
from run to run.  Identity seeds are ``SHA-256("agentmesh-kat/<name>/ed25519-seed")``.

Usage::

    python vectors/generate_pq.py [--out PATH]      # write the file
    python vectors/generate_pq.py --check [FILE]    # recompute every case from its recorded inputs,
                                                    # key generation and decapsulation through OpenSSL

``--check`` prints one line per failing case and ``N passed, M failed``; it exits non-zero on any
failure.  The verifier of record is ``agt-mesh vectors verify`` (``agt_mesh/vectors.py``).
"""

from __future__ import annotations

import argparse
import base64
import copy
import hashlib
import hmac
import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mlkem_ref  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "pq-hybrid-v1.json"
H = bytes.fromhex
RAW = {"encoding": serialization.Encoding.Raw, "format": serialization.PublicFormat.Raw}

SUITE = "ML-KEM-768"
PQXDH_INFO = b"AgentMesh_PQXDH_v1_CURVE25519_SHA-256_ML-KEM-768"
X3DH_INFO = b"AgentMesh_X3DH_v1"
RATCHET_INFO = b"AgentMesh_Ratchet_v1"
LABEL = b"AgentMesh_PQPreKey_v1"
KIND_CODE = {"one_time": 1, "last_resort": 2}
T0 = 1_767_225_600  # 2026-01-01T00:00:00Z, the created_at of every pre-key here


# -- primitives ---------------------------------------------------------------------------
def hkdf(salt: bytes, ikm: bytes, info: bytes, n: int) -> bytes:
    prk = hmac.new(salt, ikm, "sha256").digest()
    out, block, i = b"", b"", 1
    while len(out) < n:
        block = hmac.new(prk, block + info + bytes([i]), "sha256").digest()
        out += block
        i += 1
    return out[:n]


def x_pub(priv: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes(**RAW)


def dh(priv: bytes, pub: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(priv).exchange(X25519PublicKey.from_public_bytes(pub))


def ed_pub(seed: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(**RAW)


def ed_sign(seed: bytes, msg: bytes) -> bytes:
    return Ed25519PrivateKey.from_private_bytes(seed).sign(msg)


def ik_priv(seed: bytes) -> bytes:
    k = bytearray(hashlib.sha512(seed).digest()[:32])
    k[0] &= 248
    k[31] &= 127
    k[31] |= 64
    return bytes(k)


def did_of(seed: bytes) -> str:
    return "did:mesh:" + hashlib.sha256(ed_pub(seed)).hexdigest()[:32]


def b64(b: bytes) -> str:
    return base64.b64encode(b).decode()


def b64url(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).decode().rstrip("=")


def compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def drbg(label: str, n: int) -> bytes:
    out, i = b"", 0
    while len(out) < n:
        out += hashlib.sha256(label.encode() + struct.pack(">I", i)).digest()
        i += 1
    return out[:n]


def seed_of(name: str) -> bytes:
    return hashlib.sha256(f"agentmesh-kat/{name}/ed25519-seed".encode()).digest()


def pq_sk(dh_concat: bytes, ss: bytes) -> bytes:
    return hkdf(b"\x00" * 32, b"\xff" * 32 + dh_concat + ss, PQXDH_INFO, 32)


def spec_sk(dh_concat: bytes) -> bytes:
    return hkdf(b"\x00" * 32, b"\xff" * 32 + dh_concat, X3DH_INFO, 32)


def signed_message(kind: str, key_id: int, created_at: int, public: bytes, spk_pub: bytes | None) -> bytes:
    binding = spk_pub if kind == "one_time" else b"\x00" * 32
    assert binding is not None and len(binding) == 32 and len(public) == 1184
    return LABEL + b"\x00" + bytes([0x01, KIND_CODE[kind]]) + struct.pack(">IQ", key_id, created_at) + binding + public


# -- ML-KEM back ends -----------------------------------------------------------------------
class RefKem:
    """The plain-Python FIPS 203 implementation, checked against OpenSSL on every call."""

    def public(self, seed: bytes) -> bytes:
        ek, _ = mlkem_ref.keygen(seed)
        assert ek == OpenSslKem().public(seed), "ML-KEM key generation differs from OpenSSL"
        return ek

    def encaps(self, public: bytes, m: bytes) -> tuple[bytes, bytes]:
        return mlkem_ref.encaps(public, m)

    def decaps(self, seed: bytes, ct: bytes) -> bytes:
        ss = mlkem_ref.decaps(mlkem_ref.keygen(seed)[1], ct)
        assert ss == OpenSslKem().decaps(seed, ct), "ML-KEM decapsulation differs from OpenSSL"
        return ss


class OpenSslKem:
    """OpenSSL through ``cryptography`` (no deterministic encapsulation there: the plain-Python
    one makes the ciphertext, and OpenSSL must decapsulate it to the same secret)."""

    def public(self, seed: bytes) -> bytes:
        return MLKEM768PrivateKey.from_seed_bytes(seed).public_key().public_bytes_raw()

    def encaps(self, public: bytes, m: bytes) -> tuple[bytes, bytes]:
        return mlkem_ref.encaps(public, m)

    def decaps(self, seed: bytes, ct: bytes) -> bytes:
        return MLKEM768PrivateKey.from_seed_bytes(seed).decapsulate(ct)


Kem = RefKem | OpenSslKem


# -- a small Double Ratchet (wire.md §3) ----------------------------------------------------
class Ratchet:
    def __init__(self, rk: bytes, priv: bytes, remote: bytes | None = None, cks: bytes | None = None) -> None:
        self.rk, self.priv, self.remote, self.cks, self.ckr = rk, priv, remote, cks, None
        self.ns = self.nr = self.pn = 0
        self.skipped: dict[tuple[bytes, int], bytes] = {}

    @staticmethod
    def kdf_rk(rk: bytes, d: bytes) -> tuple[bytes, bytes]:
        out = hkdf(rk, d, RATCHET_INFO, 64)
        return out[:32], out[32:]

    @staticmethod
    def kdf_ck(ck: bytes) -> tuple[bytes, bytes]:
        return hmac.new(ck, b"\x01", "sha256").digest(), hmac.new(ck, b"\x02", "sha256").digest()

    @classmethod
    def sender(cls, sk: bytes, remote: bytes, priv: bytes) -> Ratchet:
        rk, cks = cls.kdf_rk(sk, dh(priv, remote))
        return cls(rk, priv, remote, cks)

    def encrypt(self, pt: bytes, ad: bytes, nonce: bytes) -> tuple[bytes, bytes]:
        assert self.cks is not None
        mk, self.cks = self.kdf_ck(self.cks)
        header = x_pub(self.priv) + struct.pack(">II", self.pn, self.ns)
        self.ns += 1
        return header, nonce + ChaCha20Poly1305(mk).encrypt(nonce, pt, ad + header)

    def _skip(self, until: int) -> None:
        if self.ckr is None:
            return
        assert until - self.nr <= 100
        while self.nr < until:
            assert self.remote is not None
            self.skipped[(self.remote, self.nr)], self.ckr = self.kdf_ck(self.ckr)
            self.nr += 1

    def needs_step(self, header: bytes) -> bool:
        dhp, n = header[:32], struct.unpack(">I", header[36:])[0]
        return (dhp, n) not in self.skipped and dhp != self.remote

    def decrypt(self, header: bytes, blob: bytes, ad: bytes, new_priv: bytes | None) -> bytes:
        dhp, pn, n = header[:32], *struct.unpack(">II", header[32:])
        if (dhp, n) in self.skipped:
            mk = self.skipped.pop((dhp, n))
        else:
            if dhp != self.remote:
                assert new_priv is not None
                self._skip(pn)
                self.pn, self.ns, self.nr, self.remote = self.ns, 0, 0, dhp
                self.rk, self.ckr = self.kdf_rk(self.rk, dh(self.priv, dhp))
                self.priv = new_priv
                self.rk, self.cks = self.kdf_rk(self.rk, dh(self.priv, dhp))
            self._skip(n)
            assert self.ckr is not None
            mk, self.ckr = self.kdf_ck(self.ckr)
            self.nr += 1
        return ChaCha20Poly1305(mk).decrypt(blob[:12], blob[12:], ad + header)


# -- case builders (pure functions of their inputs) ------------------------------------------
def case_keygen(name: str, seed: bytes, kem: Kem) -> dict[str, Any]:
    return {"name": name, "kind": "mlkem768_keygen", "seed": seed.hex(), "expect": {"public_key": kem.public(seed).hex()}}


def case_decaps(name: str, seed: bytes, ct: bytes, m: bytes | None, note: str, kem: Kem) -> dict[str, Any]:
    ss = kem.decaps(seed, ct)
    if m is not None:  # a well-formed ciphertext: decapsulation gives the encapsulated secret
        want_ss, want_ct = kem.encaps(kem.public(seed), m)
        assert (want_ss, want_ct) == (ss, ct), f"{name}: encapsulation and decapsulation disagree"
    return {
        "name": name,
        "kind": "mlkem768_decaps",
        "note": note,
        "seed": seed.hex(),
        "ciphertext": ct.hex(),
        "encaps_m": m.hex() if m is not None else None,
        "expect": {"shared_secret": ss.hex()},
    }


def case_pq_kdf(name: str, dh_concat: bytes, ss: bytes) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "pq_kdf",
        "dh_concat": dh_concat.hex(),
        "kem_ss": ss.hex(),
        "expect": {"sk": pq_sk(dh_concat, ss).hex()},
    }


def case_x3dh_kdf(name: str, dh_concat: bytes) -> dict[str, Any]:
    return {"name": name, "kind": "x3dh_kdf", "dh_concat": dh_concat.hex(), "expect": {"sk": spec_sk(dh_concat).hex()}}


def kem_record(seed: bytes, kind: str, key_id: int, created_at: int, kem_seed: bytes, spk_pub: bytes | None, kem: Kem):
    public = kem.public(kem_seed)
    msg = signed_message(kind, key_id, created_at, public, spk_pub)
    sig = ed_sign(seed, msg)
    record = {"suite": SUITE, "key_id": key_id, "public_key": b64url(public), "signature": b64url(sig), "created_at": created_at}
    return public, msg, sig, record


def case_prekey(
    name: str, seed: bytes, kind: str, key_id: int, kem_seed: bytes, spk_pub: bytes | None, kem: Kem
) -> dict[str, Any]:
    public, msg, sig, record = kem_record(seed, kind, key_id, T0, kem_seed, spk_pub, kem)
    expect: dict[str, Any] = {"public_key": public.hex(), "signed_message": msg.hex(), "signature": sig.hex(), "record": record}
    if kind == "last_resort":
        expect["metadata"] = {"agt_mesh_pq": compact(record)}
    return {
        "name": name,
        "kind": "pq_prekey",
        "ed25519_seed": seed.hex(),
        "kem_kind": kind,
        "key_id": key_id,
        "created_at": T0,
        "kem_seed": kem_seed.hex(),
        "spk_pub": spk_pub.hex() if spk_pub is not None else None,
        "expect": expect,
    }


def case_upload(
    name: str,
    seed: bytes,
    spk: tuple[int, bytes],
    otks: list[tuple[int, bytes]],
    kem_otks: list[tuple[int, bytes]],
    kem: Kem,
) -> dict[str, Any]:
    spk_pub = x_pub(spk[1])
    entries: list[dict[str, Any]] = [{"key_id": i, "public_key": b64url(x_pub(p))} for i, p in otks]
    for entry, (kid, kseed) in zip(entries, kem_otks, strict=False):
        entry["pq"] = kem_record(seed, "one_time", kid, T0, kseed, spk_pub, kem)[3]
    body = {
        "identity_key": b64url(x_pub(ik_priv(seed))),
        "identity_key_ed": b64url(ed_pub(seed)),
        "signed_pre_key": {"key_id": spk[0], "public_key": b64url(spk_pub), "signature": b64url(ed_sign(seed, spk_pub))},
        "one_time_pre_keys": entries,
    }
    return {
        "name": name,
        "kind": "pq_upload",
        "ed25519_seed": seed.hex(),
        "spk": {"id": spk[0], "priv": spk[1].hex()},
        "otks": [{"id": i, "priv": p.hex()} for i, p in otks],
        "kem_otks": [{"id": i, "seed": s.hex(), "created_at": T0} for i, s in kem_otks],
        "expect": {"body": body},
    }


Draw = Callable[[str, int], bytes]


def case_session(
    name: str,
    label: str,
    use_otk: int | None,
    use_kem: int,
    script: list[tuple[Any, ...]],
    draw: Draw,
    kem: Kem,
) -> dict[str, Any]:
    """One hybrid X3DH and a conversation.  ``draw(field, n)`` supplies every random value."""
    a_seed, b_seed = seed_of("alice"), seed_of("bob")
    a_did, b_did = did_of(a_seed), did_of(b_seed)
    spk = draw("bob_spk.priv", 32)
    otks = [(i, draw(f"bob_otks[{i}].priv", 32)) for i in range(3)]
    kem_keys = [(10 + i, "one_time", draw(f"bob_kem_keys[{i}].seed", 64)) for i in range(2)]
    kem_keys.append((12, "last_resort", draw("bob_kem_keys[2].seed", 64)))
    ek = draw("alice_ek_priv", 32)
    m = draw("encaps_m", 32)
    r0 = draw("alice_ratchet_priv", 32)

    spk_pub = x_pub(spk)
    kid, kkind, kseed = next(k for k in kem_keys if k[0] == use_kem)
    public, _, kem_sig, _ = kem_record(b_seed, kkind, kid, T0, kseed, spk_pub, kem)
    ss, ct = kem.encaps(public, m)
    ika, ikb = ik_priv(a_seed), ik_priv(b_seed)
    otk = dict(otks).get(use_otk) if use_otk is not None else None
    ini = dh(ika, spk_pub) + dh(ek, x_pub(ikb)) + dh(ek, spk_pub) + (dh(ek, x_pub(otk)) if otk else b"")
    res = dh(spk, x_pub(ika)) + dh(ikb, x_pub(ek)) + dh(spk, x_pub(ek)) + (dh(otk, x_pub(ek)) if otk else b"")
    assert ini == res
    assert kem.decaps(kseed, ct) == ss
    sk = pq_sk(ini, ss)
    ad = f"{a_did}|{b_did}".encode() + x_pub(ika) + x_pub(ikb)
    est: dict[str, Any] = {"ik": b64(x_pub(ika)), "ek": b64(x_pub(ek))}
    if use_otk is not None:
        est["otk"] = use_otk
    est["pq"] = {"suite": SUITE, "kem": use_kem, "spk": 0, "ct": b64(ct)}

    sides = {"alice": Ratchet.sender(sk, spk_pub, r0), "bob": Ratchet(sk, spk)}
    events: list[dict[str, Any]] = []
    for idx, step in enumerate(script):
        op, by = step[0], step[1]
        r = sides[by]
        if op == "encrypt":
            pt = step[2].encode()
            nonce = draw(f"events[{idx}].nonce", 12)
            header, blob = r.encrypt(pt, ad, nonce)
            events.append(
                {"op": "encrypt", "by": by, "plaintext": pt.hex(), "nonce": nonce.hex(),
                 "expect": {"header": header.hex(), "ciphertext": blob.hex()}}
            )  # fmt: skip
            continue
        src = events[step[2]]
        header, blob = H(src["expect"]["header"]), H(src["expect"]["ciphertext"])
        priv = draw(f"events[{idx}].ratchet_priv", 32) if r.needs_step(header) else None
        if op == "decrypt":
            pt = r.decrypt(header, blob, ad, priv)
            assert pt.hex() == src["plaintext"]
            events.append(
                {"op": "decrypt", "by": by, "message": step[2], "ratchet_priv": priv.hex() if priv else None,
                 "expect": {"plaintext": pt.hex()}}
            )  # fmt: skip
        else:  # a tampered copy of an earlier message: the last event of the case
            bad = bytearray(blob)
            bad[len(bad) // 2] ^= 0x01
            try:
                r.decrypt(header, bytes(bad), ad, priv)
            except InvalidTag:
                pass
            else:
                raise AssertionError("tampered message decrypted")
            assert idx == len(script) - 1
            events.append(
                {"op": "decrypt_raw", "by": by, "header": header.hex(), "ciphertext": bytes(bad).hex(),
                 "ratchet_priv": priv.hex() if priv else None, "expect": {"error": "auth"}}
            )  # fmt: skip
    return {
        "name": name,
        "kind": "pq_session",
        "drbg_label": label,
        "alice": {"ed25519_seed": a_seed.hex(), "did": a_did},
        "bob": {"ed25519_seed": b_seed.hex(), "did": b_did},
        "bob_spk": {"id": 0, "priv": spk.hex()},
        "bob_otks": [{"id": i, "priv": p.hex()} for i, p in otks],
        "bob_kem_keys": [{"id": i, "kind": k, "seed": s.hex(), "created_at": T0} for i, k, s in kem_keys],
        "use_otk": use_otk,
        "use_kem": use_kem,
        "alice_ek_priv": ek.hex(),
        "encaps_m": m.hex(),
        "kem_ciphertext": ct.hex(),
        "alice_ratchet_priv": r0.hex(),
        "expect": {
            "bob_spk_pub": spk_pub.hex(),
            "bob_spk_sig": ed_sign(b_seed, spk_pub).hex(),
            "bob_kem_pub": public.hex(),
            "bob_kem_sig": kem_sig.hex(),
            "alice_ek_pub": x_pub(ek).hex(),
            "kem_ss": ss.hex(),
            "sk": sk.hex(),
            "ad": ad.hex(),
            "knock_establishment": est,
        },
        "events": events,
        "_dh_concat": ini.hex(),  # removed before writing; feeds the pq_kdf cases
    }


# -- the document -----------------------------------------------------------------------------
SESSIONS = [
    # name, use_otk, use_kem, conversation
    (
        "pq_session/otk1-kem-one-time-ooo-dh-steps-tampered-auth",
        1,
        11,
        [
            ("encrypt", "alice", "hybrid a0"),
            ("encrypt", "alice", "hybrid a1"),
            ("decrypt", "bob", 1),
            ("decrypt", "bob", 0),
            ("encrypt", "bob", "hybrid b0 \u00e9\u00e8"),
            ("decrypt", "alice", 4),
            ("encrypt", "alice", ""),
            ("decrypt", "bob", 6),
            ("encrypt", "bob", "x" * 300),
            ("decrypt", "alice", 8),
            ("tamper", "bob", 6),
        ],
    ),
    (
        "pq_session/no-otk-last-resort-3dh",
        None,
        12,
        [
            ("encrypt", "alice", "exhausted registry: last-resort KEM key"),
            ("decrypt", "bob", 0),
            ("encrypt", "bob", "reply"),
            ("encrypt", "bob", "reply 2"),
            ("decrypt", "alice", 3),
            ("decrypt", "alice", 2),
        ],
    ),
    (
        "pq_session/otk0-last-resort-kem-4dh",
        0,
        12,
        [
            ("encrypt", "alice", "one-time X25519 key, last-resort KEM key"),
            ("decrypt", "bob", 0),
            ("encrypt", "bob", "ok"),
            ("decrypt", "alice", 2),
        ],
    ),
    (
        "pq_session/otk2-kem-one-time-first-message-only",
        2,
        10,
        [("encrypt", "alice", "{\"hello\":\"post-quantum\"}"), ("decrypt", "bob", 0)],
    ),
]


class Recorder:
    """The generation-time draw source: consecutive chunks of one case's DRBG stream."""

    def __init__(self, label: str) -> None:
        self.label, self.pos = label, 0

    def __call__(self, field: str, n: int) -> bytes:
        out = drbg(self.label, self.pos + n)[self.pos :]
        self.pos += n
        return out


def build(kem: Kem) -> dict[str, Any]:
    cases: list[dict[str, Any]] = []
    keygen_seeds = [drbg(f"pq-kat/keygen/{i}", 64) for i in range(3)]
    for i, seed in enumerate(keygen_seeds):
        cases.append(case_keygen(f"mlkem768_keygen/{i}", seed, kem))
    for i, seed in enumerate(keygen_seeds):
        m = drbg(f"pq-kat/encaps-m/{i}", 32)
        _, ct = kem.encaps(kem.public(seed), m)
        cases.append(case_decaps(f"mlkem768_decaps/valid-{i}", seed, ct, m, "well-formed ciphertext", kem))
        if i < 2:
            bad = bytearray(ct)
            bad[(i * 517) % len(bad)] ^= 0x80
            cases.append(
                case_decaps(f"mlkem768_decaps/implicit-rejection-{i}", seed, bytes(bad), None,
                            "one bit flipped: FIPS 203 implicit rejection, J(z || c)", kem)
            )  # fmt: skip
        else:
            other = keygen_seeds[0]
            cases.append(
                case_decaps("mlkem768_decaps/ciphertext-for-another-key", other, ct, None,
                            "made for keygen seed 2, decapsulated with keygen seed 0", kem)
            )  # fmt: skip

    fixed = [(bytes(range(96)), bytes(range(96, 128))), (bytes(range(128)), bytes(range(128, 160)))]
    for dh_concat, ss in fixed:
        n = len(dh_concat)
        cases.append(case_pq_kdf(f"pq_kdf/bytes-00-{n - 1:02x}-ss-{n:02x}-{n + 31:02x}", dh_concat, ss))
        cases.append(case_x3dh_kdf(f"x3dh_kdf/classic-spec-same-dh-00-{n - 1:02x}", dh_concat))
    # a 3-DH hybrid IKM is as long as a 4-DH classic one: only the info string tells them apart
    dh3, ss = fixed[0]
    cases.append(case_x3dh_kdf("x3dh_kdf/classic-spec-of-dh3-plus-ss-same-ikm-length", dh3 + ss))

    bob_seed = seed_of("bob")
    spk_pub = x_pub(drbg("pq-kat/prekeys/spk", 32))
    for i, kind in enumerate(["one_time", "one_time", "last_resort", "last_resort"]):
        kseed = drbg(f"pq-kat/prekeys/kem/{i}", 64)
        key_id = [0, 4_294_967_295, 7, 1][i]
        cases.append(
            case_prekey(f"pq_prekey/{kind}-{key_id}", bob_seed if i != 3 else seed_of("carol"), kind, key_id,
                        kseed, spk_pub if kind == "one_time" else None, kem)
        )  # fmt: skip

    for name, n_otk, n_kem in (("pq_upload/bob-3-otks-3-kem", 3, 3), ("pq_upload/dave-2-otks-1-kem", 2, 1)):
        who = name.split("/")[1].split("-")[0]
        label = f"pq-kat/upload/{who}"
        draws = drbg(label, 32 + 32 * n_otk + 64 * n_kem)
        spk = (3, draws[:32])
        otks = [(5 + i, draws[32 + 32 * i : 64 + 32 * i]) for i in range(n_otk)]
        base = 32 + 32 * n_otk
        kem_otks = [(20 + i, draws[base + 64 * i : base + 64 * (i + 1)]) for i in range(n_kem)]
        cases.append(case_upload(name, seed_of(who), spk, otks, kem_otks, kem))

    for name, use_otk, use_kem, script in SESSIONS:
        label = "pq-kat/" + name
        case = case_session(name, label, use_otk, use_kem, script, Recorder(label), kem)
        dh_concat = H(case.pop("_dh_concat"))
        cases.append(case)
        short = name.split("/")[1]
        cases.append(case_pq_kdf(f"pq_kdf/{short}", dh_concat, H(case["expect"]["kem_ss"])))
        cases.append(case_x3dh_kdf(f"x3dh_kdf/classic-spec-same-dh/{short}", dh_concat))
    return {
        "format": "agt-mesh-vectors/1",
        "generator": "vectors/generate_pq.py: ML-KEM-768 from vectors/mlkem_ref.py (FIPS 203, plain Python) "
        "checked against OpenSSL via cryptography; X25519/Ed25519/ChaCha20-Poly1305 from cryptography; "
        "HKDF/HMAC over hashlib",
        "x3dh_kdf": "spec",
        "label": "agt-mesh post-quantum hybrid session setup, version 1",
        "pq": {
            "suite": SUITE,
            "kdf": "HKDF-SHA256(salt = 00*32, IKM = FF*32 || DH1 || DH2 || DH3 [|| DH4] || SS, info, 32)",
            "info": PQXDH_INFO.decode(),
            "prekey_signature": "Ed25519(identity, utf8('AgentMesh_PQPreKey_v1') || 00 || 01 || kind "
            "(01 one-time, 02 last-resort) || u32be(key_id) || u64be(created_at) || SPK or 00*32 || public key)",
        },
        "cases": cases,
    }


# -- --check -----------------------------------------------------------------------------------
class Replay:
    """Draws replayed from a case's recorded fields."""

    def __init__(self, case: dict[str, Any]) -> None:
        self.case = case

    def __call__(self, field: str, n: int) -> bytes:
        obj: Any = self.case
        for part in field.replace("]", "").replace("[", ".").split("."):
            obj = obj[int(part)] if part.isdigit() else obj[part]
        value = H(obj)
        assert len(value) == n, f"{field}: {len(value)} bytes recorded, {n} drawn"
        return value


SCRIPTS = {name: (use_otk, use_kem, script) for name, use_otk, use_kem, script in SESSIONS}


def rebuild(case: dict[str, Any], kem: Kem) -> dict[str, Any]:
    """Recompute a case from its inputs alone."""
    kind = case["kind"]
    if kind == "mlkem768_keygen":
        return case_keygen(case["name"], H(case["seed"]), kem)
    if kind == "mlkem768_decaps":
        m = H(case["encaps_m"]) if case["encaps_m"] is not None else None
        return case_decaps(case["name"], H(case["seed"]), H(case["ciphertext"]), m, case["note"], kem)
    if kind == "pq_kdf":
        return case_pq_kdf(case["name"], H(case["dh_concat"]), H(case["kem_ss"]))
    if kind == "x3dh_kdf":
        return case_x3dh_kdf(case["name"], H(case["dh_concat"]))
    if kind == "pq_prekey":
        spk = H(case["spk_pub"]) if case["spk_pub"] is not None else None
        assert case["created_at"] == T0
        return case_prekey(case["name"], H(case["ed25519_seed"]), case["kem_kind"], case["key_id"], H(case["kem_seed"]), spk, kem)
    if kind == "pq_upload":
        otks = [(o["id"], H(o["priv"])) for o in case["otks"]]
        kem_otks = [(o["id"], H(o["seed"])) for o in case["kem_otks"]]
        return case_upload(case["name"], H(case["ed25519_seed"]), (case["spk"]["id"], H(case["spk"]["priv"])), otks, kem_otks, kem)
    if kind == "pq_session":
        use_otk, use_kem, script = SCRIPTS[case["name"]]
        assert (case["use_otk"], case["use_kem"]) == (use_otk, use_kem)
        out = case_session(case["name"], case["drbg_label"], use_otk, use_kem, script, Replay(case), kem)
        # and the recorded draws must be the case's DRBG stream, in draw order
        fresh = case_session(case["name"], case["drbg_label"], use_otk, use_kem, script, Recorder(case["drbg_label"]), kem)
        assert fresh == out, "the recorded random values are not the DRBG stream"
        out.pop("_dh_concat")
        return out
    raise AssertionError(f"unknown case kind {kind!r}")


def check(paths: list[str]) -> int:
    passed = failed = 0
    kem = OpenSslKem()
    for path in paths:
        doc = json.loads(Path(path).read_text())
        for case in doc["cases"]:
            try:
                ok = rebuild(copy.deepcopy(case), kem) == case
                detail = "recomputed case differs"
            except (AssertionError, KeyError, ValueError) as exc:
                ok, detail = False, f"{type(exc).__name__}: {exc}"
            if ok:
                passed += 1
            else:
                failed += 1
                print(f"FAIL {path}: {case.get('name')}: {detail}")
        if doc != build(kem):
            failed += 1
            print(f"FAIL {path}: the file is not what this generator writes")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--check", nargs="*", metavar="FILE", help="recompute every case of FILE (default: the committed file)")
    args = ap.parse_args(argv)
    if args.check is not None:
        return check(args.check or [str(DEFAULT_OUT)])
    doc = build(RefKem())
    Path(args.out).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {len(doc['cases'])} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
