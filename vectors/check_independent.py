#!/usr/bin/env python3
"""Independent sanity check of vectors/generate_ts.js output (agt-mesh-vectors/1).

Recomputes every claim in the file from its inputs with `cryptography` only (no agt_mesh code):
identity conversions, the X3DH KDF, session SK/AD/headers/ciphertexts/decrypts/errors (with a
small Double Ratchet written here), that the recorded private keys and nonces are consecutive
chunks of the DRBG stream SHA256(label || u32be(i)) in the order the SDK draws them, frame JSON,
and registry bodies/paths/signatures.  Usage: check_independent.py [FILE...]
"""
import base64
import hashlib
import hmac
import json
import struct
import sys
import urllib.parse
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

RAW = dict(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)
H = bytes.fromhex


def x_pub(priv): return X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes(**RAW)
def dh(priv, pub): return X25519PrivateKey.from_private_bytes(priv).exchange(X25519PublicKey.from_public_bytes(pub))
def ed_pub(seed): return Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(**RAW)
def ed_sign(seed, msg): return Ed25519PrivateKey.from_private_bytes(seed).sign(msg)
def hkdf(ikm, salt, info, n): return HKDF(hashes.SHA256(), n, salt, info).derive(ikm)
def b64(b): return base64.b64encode(b).decode()
def b64url(b): return base64.urlsafe_b64encode(b).decode().rstrip("=")
def did_of(seed): return "did:mesh:" + hashlib.sha256(ed_pub(seed)).hexdigest()[:32]


def x_priv(seed):
    k = bytearray(hashlib.sha512(seed).digest()[:32])
    k[0] &= 248; k[31] &= 127; k[31] |= 64
    return bytes(k)


def legacy_sk(dh_concat): return hkdf(dh_concat, b"\xff" * 32, b"AgentMesh_X3DH_v1", 32)


def drbg(label, n):
    out, i = b"", 0
    while len(out) < n:
        out += hashlib.sha256(label.encode() + struct.pack(">I", i)).digest(); i += 1
    return out[:n]


class Err(Exception):
    pass


class Ratchet:
    """Double Ratchet as in wire.md §3 (state changes before the tag check, like the TS SDK)."""

    def __init__(self, rk, priv, remote=None, cks=None):
        self.rk, self.priv, self.remote, self.cks, self.ckr = rk, priv, remote, cks, None
        self.ns = self.nr = self.pn = 0
        self.skipped = {}

    @staticmethod
    def kdf_rk(rk, d):
        out = hkdf(d, rk, b"AgentMesh_Ratchet_v1", 64)
        return out[:32], out[32:]

    @staticmethod
    def kdf_ck(ck):
        return hmac.new(ck, b"\x01", "sha256").digest(), hmac.new(ck, b"\x02", "sha256").digest()

    @classmethod
    def sender(cls, sk, remote, priv):
        rk, cks = cls.kdf_rk(sk, dh(priv, remote))
        return cls(rk, priv, remote, cks)

    def encrypt(self, pt, ad, nonce):
        mk, self.cks = self.kdf_ck(self.cks)
        header = x_pub(self.priv) + struct.pack(">II", self.pn, self.ns)
        self.ns += 1
        return header, nonce + ChaCha20Poly1305(mk).encrypt(nonce, pt, ad + header)

    def _skip(self, until):
        if self.ckr is None:
            return
        if until - self.nr > 100:
            raise Err("too_many_skipped")
        while self.nr < until:
            self.skipped[(self.remote, self.nr)], self.ckr = self.kdf_ck(self.ckr)
            self.nr += 1

    def decrypt(self, header, blob, ad, new_priv):
        if len(header) != 40:
            raise Err("malformed")
        dhp, pn, n = header[:32], *struct.unpack(">II", header[32:])
        used_priv = False
        if (dhp, n) in self.skipped:
            mk = self.skipped.pop((dhp, n))
        else:
            if dhp != self.remote:
                self._skip(pn)
                if new_priv is None:
                    raise AssertionError("DH step needs a ratchet_priv but the event has none")
                self.pn, self.ns, self.nr, self.remote = self.ns, 0, 0, dhp
                self.rk, self.ckr = self.kdf_rk(self.rk, dh(self.priv, dhp))
                self.priv, used_priv = new_priv, True
                self.rk, self.cks = self.kdf_rk(self.rk, dh(self.priv, dhp))
            self._skip(n)
            mk, self.ckr = self.kdf_ck(self.ckr)
            self.nr += 1
        if new_priv is not None and not used_priv:
            raise AssertionError("event has a ratchet_priv but no DH step happens")
        if len(blob) < 28:
            raise Err("malformed")
        try:
            return ChaCha20Poly1305(mk).decrypt(blob[:12], blob[12:], ad + header)
        except InvalidTag:
            raise Err("auth") from None


def check_identity(c):
    seed, e = H(c["ed25519_seed"]), c["expect"]
    xp = x_priv(seed)
    assert e["ed25519_pub"] == ed_pub(seed).hex(), "ed25519_pub"
    assert e["x25519_priv"] == xp.hex() and e["x25519_pub"] == x_pub(xp).hex(), "x25519"
    assert e["did"] == did_of(seed), "did"


def check_kdf(c):
    assert len(H(c["dh_concat"])) in (96, 128), "dh_concat length"
    assert legacy_sk(H(c["dh_concat"])).hex() == c["expect"]["sk"], "sk"


def check_session(c):
    e = c["expect"]
    a_seed, b_seed = H(c["alice"]["ed25519_seed"]), H(c["bob"]["ed25519_seed"])
    assert c["alice"]["did"] == did_of(a_seed) and c["bob"]["did"] == did_of(b_seed), "dids"
    ika, ikb = x_priv(a_seed), x_priv(b_seed)
    spk, ek, r0 = H(c["bob_spk"]["priv"]), H(c["alice_ek_priv"]), H(c["alice_ratchet_priv"])
    otks = {o["id"]: H(o["priv"]) for o in c["bob_otks"]}
    assert e["bob_spk_pub"] == x_pub(spk).hex(), "bob_spk_pub"
    assert e["bob_spk_sig"] == ed_sign(b_seed, x_pub(spk)).hex(), "bob_spk_sig"
    assert e["bob_otk_pubs"] == [x_pub(otks[o["id"]]).hex() for o in c["bob_otks"]], "bob_otk_pubs"
    assert e["alice_ek_pub"] == x_pub(ek).hex(), "alice_ek_pub"
    # X3DH from both sides (wire.md §2.3 order).
    ini = [dh(ika, x_pub(spk)), dh(ek, x_pub(ikb)), dh(ek, x_pub(spk))]
    res = [dh(spk, x_pub(ika)), dh(ikb, x_pub(ek)), dh(spk, x_pub(ek))]
    if c["use_otk"] is not None:
        ini.append(dh(ek, x_pub(otks[c["use_otk"]])))
        res.append(dh(otks[c["use_otk"]], x_pub(ek)))
    assert ini == res and e["sk"] == legacy_sk(b"".join(ini)).hex(), "sk"
    sk = legacy_sk(b"".join(ini))
    ad = (c["alice"]["did"] + "|" + c["bob"]["did"]).encode() + x_pub(ika) + x_pub(ikb)
    assert e["ad"] == ad.hex(), "ad"
    # The recorded keys/nonces must be the DRBG stream in SDK draw order.
    draws = [spk] + [otks[o["id"]] for o in c["bob_otks"]] + [ek, r0]
    for ev in c["events"]:
        draws.append(H(ev["nonce"]) if ev["op"] == "encrypt" else H(ev["ratchet_priv"] or ""))
    stream = b"".join(draws)
    assert stream == drbg(c["drbg_label"], len(stream)), "draws != DRBG stream"
    party = {"alice": Ratchet.sender(sk, x_pub(spk), r0), "bob": Ratchet(sk, spk)}
    for i, ev in enumerate(c["events"]):
        r, where = party[ev["by"]], f"event {i}"
        if ev["op"] == "encrypt":
            assert len(H(ev["nonce"])) == 12, where
            header, blob = r.encrypt(H(ev["plaintext"]), ad, H(ev["nonce"]))
            assert ev["expect"] == {"header": header.hex(), "ciphertext": blob.hex()}, where + " encrypt"
            continue
        if ev["op"] == "decrypt":
            src = c["events"][ev["message"]]
            assert src["op"] == "encrypt" and src["by"] != ev["by"] and ev["message"] < i, where
            header, blob = H(src["expect"]["header"]), H(src["expect"]["ciphertext"])
        else:
            header, blob = H(ev["header"]), H(ev["ciphertext"])
        priv = H(ev["ratchet_priv"]) if ev["ratchet_priv"] else None
        try:
            got = {"plaintext": r.decrypt(header, blob, ad, priv).hex()}
        except Err as x:
            got = {"error": str(x)}
        assert got == ev["expect"], f"{where} {ev['op']}: got {got}"
        if "error" in got:
            assert i == len(c["events"]) - 1, "error event is not last"
        elif ev["op"] == "decrypt":
            assert got["plaintext"] == src["plaintext"], where + " round trip"


def build_frame(t, x):
    if t in ("connect", "fetch_pending", "disconnect"):
        return {"v": 1, "type": t, "from": x["from"]}
    if t == "heartbeat":
        return {"v": 1, "type": t, "from": x["from"], "ts": x["ts"]}
    if t == "ack":
        return {"v": 1, "type": t, "id": x["id"]}
    if t == "knock_accept":
        return {"v": 1, "type": t, "from": x["from"], "to": x["to"], "id": x["id"], "knock_id": x["knock_id"], "ts": x["ts"]}
    if t == "knock_reject":
        return {"v": 1, "type": t, "from": x["from"], "to": x["to"], "id": x["id"], "knock_id": x["knock_id"],
                "reason": x["reason"], "ts": x["ts"]}
    if t == "knock":
        est = {"ik": b64(H(x["ik"])), "ek": b64(H(x["ek"]))}
        if x["otk"] is not None:
            est["otk"] = x["otk"]
        return {"v": 1, "type": t, "from": x["from"], "to": x["to"], "id": x["id"], "ts": x["ts"],
                "intent": {"action": "establish_session"}, "establishment": est}
    if t == "message":
        h = H(x["header"])
        pn, n = struct.unpack(">II", h[32:])
        return {"v": 1, "type": t, "from": x["from"], "to": x["to"], "id": x["id"], "ts": x["ts"],
                "header": {"dh": b64(h[:32]), "pn": pn, "n": n}, "ciphertext": b64(H(x["ciphertext"]))}
    raise AssertionError(f"unknown frame type {t}")


def check_frame(c):
    built = build_frame(c["frame"]["type"], c["context"])
    assert built == c["frame"], f"frame differs: {built}"
    # Key order as the TS client emitted it (JSON.stringify, compact).
    compact = lambda o: json.dumps(o, separators=(",", ":"), ensure_ascii=False)
    assert compact(built) == compact(c["frame"]), "key order"


def check_registry(c):
    x = c["context"]
    seed = H(x["ed25519_seed"])
    assert x["shape"] == "legacy" and x["did"] == did_of(seed), "context"
    if c["method"] == "POST":
        assert c["path"] == "/v1/agents", "path"
        body = {"did": x["did"], "public_key": b64url(x_pub(x_priv(seed))),
                "capabilities": x["capabilities"], "metadata": x["metadata"]}
    else:
        assert c["method"] == "PUT", "method"
        assert c["path"] == "/v1/agents/" + urllib.parse.quote(x["did"], safe="") + "/prekeys", "path"
        spk_pub = x_pub(H(x["spk"]["priv"]))
        body = {"identity_key": b64url(x_pub(x_priv(seed))), "identity_key_ed": b64url(ed_pub(seed)),
                "signed_pre_key": {"key_id": x["spk"]["id"], "public_key": b64url(spk_pub),
                                   "signature": b64url(ed_sign(seed, spk_pub))},
                "one_time_pre_keys": [{"key_id": o["id"], "public_key": b64url(x_pub(H(o["priv"])))} for o in x["otks"]]}
    assert body == c["body"], f"body differs: {body}"
    if c["headers"]:
        ts = x["timestamp"]
        want = f"Ed25519-Timestamp {x['did']} {ts} {b64url(ed_sign(seed, ts.encode()))}"
        assert c["headers"] == {"authorization": want}, "authorization"


CHECKS = {"identity": check_identity, "x3dh_kdf": check_kdf, "session": check_session,
          "frame": check_frame, "registry": check_registry}


def main(paths):
    passed = failed = 0
    for p in paths:
        doc = json.loads(Path(p).read_text())
        if doc.get("format") != "agt-mesh-vectors/1" or doc.get("x3dh_kdf") != "legacy":
            print(f"FAIL {p}: not an agt-mesh-vectors/1 legacy-KDF file"); failed += 1
            continue
        names = [c["name"] for c in doc["cases"]]
        if len(names) != len(set(names)):
            print(f"FAIL {p}: duplicate case names"); failed += 1
        for c in doc["cases"]:
            try:
                CHECKS[c["kind"]](c)
                passed += 1
            except Exception as ex:  # noqa: BLE001 - report every failure and continue
                failed += 1
                print(f"FAIL {c['name']}: {type(ex).__name__}: {str(ex)[:300]}")
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or [str(Path(__file__).with_name("ts-npm-4.0.0.json"))]))
