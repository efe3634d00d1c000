"""Registry request/response bodies: POP proofs, auth header, DID escaping, bundle parsing."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from helpers import Drbg, identity

from agt_mesh.core import registry_codec as rc
from agt_mesh.core.x3dh import PreKeyBundle, PreKeyStore, initiate
from agt_mesh.errors import BundleVerificationError, MeshRegistryError

TS = "2026-01-01T00:00:00.000Z"
B64URL_NOPAD = re.compile(r"^[A-Za-z0-9_-]*$")


def unb64url(text: str) -> bytes:
    assert B64URL_NOPAD.match(text), f"not unpadded base64url: {text!r}"
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify(public: bytes, signature: bytes, message: bytes) -> None:
    Ed25519PublicKey.from_public_bytes(public).verify(signature, message)


def _store() -> PreKeyStore:
    rng = Drbg("registry")
    store = PreKeyStore(identity("bob"))
    store.generate_signed_pre_key(rng)
    store.generate_one_time_pre_keys(3, rng)
    return store


# --------------------------------------------------------------------------------------
# request bodies
# --------------------------------------------------------------------------------------


def test_register_body_pop() -> None:
    ident = identity("alice")
    body = rc.register_body_pop(ident, TS, ("echo", "chat"), {"display_name": "Alice"})
    assert list(body) == ["public_key", "proof", "proof_timestamp", "capabilities", "metadata"]
    assert unb64url(body["public_key"]) == ident.ed25519_public
    assert body["proof_timestamp"] == TS
    assert body["capabilities"] == ["echo", "chat"]
    assert body["metadata"] == {"display_name": "Alice"}
    proof = unb64url(body["proof"])
    # the proof covers the transmitted *text* of the key followed by the timestamp
    verify(ident.ed25519_public, proof, (body["public_key"] + TS).encode("utf-8"))
    with pytest.raises(InvalidSignature):
        verify(ident.ed25519_public, proof, ident.ed25519_public + TS.encode())


def test_register_body_legacy() -> None:
    ident = identity("alice")
    body = rc.register_body_legacy(ident.did, ident, ["echo"], {})
    assert body == {
        "did": ident.did,
        "public_key": body["public_key"],
        "capabilities": ["echo"],
        "metadata": {},
    }
    assert list(body) == ["did", "public_key", "capabilities", "metadata"]
    assert unb64url(body["public_key"]) == ident.x25519_public


def test_bodies_copy_their_inputs() -> None:
    ident = identity("alice")
    caps, meta = ["a"], {"k": "v"}
    body = rc.register_body_pop(ident, TS, caps, meta)
    caps.append("b")
    meta["k"] = "changed"
    assert body["capabilities"] == ["a"] and body["metadata"] == {"k": "v"}


def test_prekey_upload_body() -> None:
    store = _store()
    ident = store.identity
    spk = store.signed_pre_key
    assert spk is not None
    body = rc.prekey_upload_body(ident, spk, store.one_time_pre_keys)
    assert list(body) == ["identity_key", "identity_key_ed", "signed_pre_key", "one_time_pre_keys"]
    assert unb64url(body["identity_key"]) == ident.x25519_public
    assert unb64url(body["identity_key_ed"]) == ident.ed25519_public
    assert list(body["signed_pre_key"]) == ["key_id", "public_key", "signature"]
    assert body["signed_pre_key"]["key_id"] == 0
    spk_pub = unb64url(body["signed_pre_key"]["public_key"])
    assert spk_pub == spk.public
    verify(ident.ed25519_public, unb64url(body["signed_pre_key"]["signature"]), spk_pub)
    assert [o["key_id"] for o in body["one_time_pre_keys"]] == [0, 1, 2]
    assert [unb64url(o["public_key"]) for o in body["one_time_pre_keys"]] == [o.public for o in store.one_time_pre_keys]
    assert all(list(o) == ["key_id", "public_key"] for o in body["one_time_pre_keys"])


def test_auth_header() -> None:
    ident = identity("alice")
    header = rc.auth_header(ident, ident.did, TS)
    parts = header.split(" ")
    assert len(parts) == 4
    scheme, did, ts, sig = parts
    assert (scheme, did, ts) == ("Ed25519-Timestamp", ident.did, TS)
    verify(ident.ed25519_public, unb64url(sig), TS.encode("utf-8"))


# --------------------------------------------------------------------------------------
# URL escaping (JavaScript encodeURIComponent known answers)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("did:mesh:x", "did%3Amesh%3Ax"),
        ("a b/c?d", "a%20b%2Fc%3Fd"),
        ("~!*()'", "~!*()'"),
        ("-_.", "-_."),
        ("a+b=c&d", "a%2Bb%3Dc%26d"),
        ("#[]@$,;", "%23%5B%5D%40%24%2C%3B"),
        ("é", "%C3%A9"),
        ("✓", "%E2%9C%93"),
        ("%", "%25"),
    ],
)
def test_encode_did_matches_encode_uri_component(text: str, expected: str) -> None:
    assert rc.encode_did(text) == expected


def test_paths() -> None:
    did = "did:mesh:498aaf869b0fb551d0b8077f1b07e32d"
    assert rc.agent_path(did) == "/v1/agents/did%3Amesh%3A498aaf869b0fb551d0b8077f1b07e32d"
    assert rc.prekeys_path(did) == ("/v1/agents/did%3Amesh%3A498aaf869b0fb551d0b8077f1b07e32d/prekeys")
    assert rc.discover_path("a b&c", 10) == "/v1/discover?capability=a%20b%26c&limit=10"


# --------------------------------------------------------------------------------------
# bundle parsing
# --------------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _body(otk: bool = True) -> dict[str, Any]:
    store = _store()
    spk = store.signed_pre_key
    assert spk is not None
    o = store.one_time_pre_keys[1]
    return {
        "identity_key": _b64url(store.identity.x25519_public),
        "identity_key_ed": _b64url(store.identity.ed25519_public),
        "signed_pre_key": {
            "key_id": spk.key_id,
            "public_key": _b64url(spk.public),
            "signature": _b64url(spk.signature),
        },
        "one_time_pre_key": {"key_id": o.key_id, "public_key": _b64url(o.public)} if otk else None,
    }


def test_parse_bundle_good() -> None:
    store = _store()
    bundle = rc.parse_bundle(_body())
    assert bundle == store.public_bundle(1)
    bundle.verify()
    init = initiate(identity("alice"), bundle, Drbg("parse"))
    assert init.establishment.one_time_pre_key_id == 1


def test_parse_bundle_without_one_time_pre_key() -> None:
    store = _store()
    body = _body(otk=False)
    assert body["one_time_pre_key"] is None
    assert rc.parse_bundle(body) == store.public_bundle()
    del body["one_time_pre_key"]
    bundle = rc.parse_bundle(body)
    assert bundle.one_time_pre_key is None and bundle.one_time_pre_key_id is None


def test_parse_bundle_accepts_standard_base64_with_padding() -> None:
    body = _body()
    body["identity_key"] = base64.b64encode(unb64url(body["identity_key"])).decode()
    body["signed_pre_key"]["signature"] = base64.b64encode(unb64url(body["signed_pre_key"]["signature"])).decode()
    assert rc.parse_bundle(body) == rc.parse_bundle(_body())


@pytest.mark.parametrize("value", [None, "absent"])
def test_parse_bundle_requires_identity_key_ed(value: str | None) -> None:
    body = _body()
    if value == "absent":
        del body["identity_key_ed"]
    else:
        body["identity_key_ed"] = None
    with pytest.raises(MeshRegistryError, match="identity_key_ed") as err:
        rc.parse_bundle(body, did="did:mesh:peer")
    assert "did:mesh:peer" in str(err.value)


def _set(body: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    target = body
    for key in keys[:-1]:
        target = target[key]
    if value is _DROP:
        del target[keys[-1]]
    else:
        target[keys[-1]] = value


_DROP = object()


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("identity_key", "!!not-base64!!", "identity_key"),
        ("identity_key", 12345, "identity_key"),
        ("identity_key", _DROP, "identity_key"),
        ("identity_key_ed", ["x"], "identity_key_ed"),
        ("identity_key_ed", "A", "identity_key_ed"),
        ("signed_pre_key", _DROP, "signed_pre_key"),
        ("signed_pre_key", "AAAA", "signed_pre_key"),
        ("signed_pre_key", [1, 2], "signed_pre_key"),
        ("signed_pre_key.public_key", "a$b", "public_key"),
        ("signed_pre_key.public_key", None, "public_key"),
        ("signed_pre_key.signature", 5, "signature"),
        ("signed_pre_key.key_id", -1, "key_id"),
        ("signed_pre_key.key_id", "0", "key_id"),
        ("signed_pre_key.key_id", True, "key_id"),
        ("signed_pre_key.key_id", 1.0, "key_id"),
        ("signed_pre_key.key_id", _DROP, "key_id"),
        ("one_time_pre_key", "AAAA", "one_time_pre_key"),
        ("one_time_pre_key", [], "one_time_pre_key"),
        ("one_time_pre_key.public_key", _DROP, "public_key"),
        ("one_time_pre_key.public_key", "***", "public_key"),
        ("one_time_pre_key.key_id", None, "key_id"),
        ("one_time_pre_key.key_id", -5, "key_id"),
    ],
)
def test_parse_bundle_rejects(path: str, value: Any, message: str) -> None:
    body = _body()
    _set(body, path, value)
    with pytest.raises(MeshRegistryError, match=message):
        rc.parse_bundle(body)


@pytest.mark.parametrize("body", [None, [], "x", 5])
def test_parse_bundle_rejects_non_objects(body: Any) -> None:
    with pytest.raises(MeshRegistryError):
        rc.parse_bundle(body)


def test_parse_bundle_leaves_size_checks_to_verify() -> None:
    body = _body()
    body["signed_pre_key"]["signature"] = _b64url(b"\x00" * 63)
    bundle = rc.parse_bundle(body)
    assert isinstance(bundle, PreKeyBundle)
    with pytest.raises(BundleVerificationError, match="signature length"):
        bundle.verify()
