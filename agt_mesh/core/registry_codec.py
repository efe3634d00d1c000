"""Registry request and response bodies (pure; the HTTP client lives in ``agt_mesh.shell``).

All binary values are base64url without padding.  Two registration shapes exist:

* ``pop`` (AGT 5.x registries): ``{public_key: Ed25519, proof, proof_timestamp, capabilities,
  metadata}`` with ``proof = Ed25519(utf8(public_key_b64url_text + proof_timestamp))``; the
  registry derives the DID from the key.
* ``legacy`` (pre-POP registries such as agentmesh-platform 3.7, and npm 4.0.0 clients):
  ``{did, public_key: X25519 identity key, capabilities, metadata}``.

Authenticated calls carry ``Authorization: Ed25519-Timestamp <did> <timestamp>
<b64url(Ed25519(utf8(timestamp)))>``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import quote

from agt_mesh.core.encoding import b64url_decode, b64url_encode
from agt_mesh.core.identity import Identity
from agt_mesh.core.x3dh import OneTimePreKey, PreKeyBundle, SignedPreKey
from agt_mesh.errors import MeshRegistryError

__all__ = [
    "agent_path",
    "auth_header",
    "discover_path",
    "encode_did",
    "parse_bundle",
    "prekey_upload_body",
    "prekeys_path",
    "register_body_legacy",
    "register_body_pop",
]

_URI_SAFE = "-_.!~*'()"


def encode_did(did: str) -> str:
    """Percent-encode a DID for a URL path, as JavaScript ``encodeURIComponent`` does."""
    return quote(did, safe=_URI_SAFE)


def agent_path(did: str) -> str:
    return f"/v1/agents/{encode_did(did)}"


def prekeys_path(did: str) -> str:
    return f"/v1/agents/{encode_did(did)}/prekeys"


def discover_path(capability: str, limit: int) -> str:
    return f"/v1/discover?capability={encode_did(capability)}&limit={int(limit)}"


def register_body_pop(
    identity: Identity, timestamp: str, capabilities: Sequence[str], metadata: Mapping[str, Any]
) -> dict[str, Any]:
    """Proof-of-possession registration body (AGT 5.x)."""
    public_key = b64url_encode(identity.ed25519_public)
    proof = identity.sign((public_key + timestamp).encode())
    return {
        "public_key": public_key,
        "proof": b64url_encode(proof),
        "proof_timestamp": timestamp,
        "capabilities": list(capabilities),
        "metadata": dict(metadata),
    }


def register_body_legacy(
    did: str, identity: Identity, capabilities: Sequence[str], metadata: Mapping[str, Any]
) -> dict[str, Any]:
    """Pre-POP registration body (the X25519 identity key as ``public_key``)."""
    return {
        "did": did,
        "public_key": b64url_encode(identity.x25519_public),
        "capabilities": list(capabilities),
        "metadata": dict(metadata),
    }


def prekey_upload_body(identity: Identity, spk: SignedPreKey, otks: Iterable[OneTimePreKey]) -> dict[str, Any]:
    """``PUT /v1/agents/{did}/prekeys`` body; it replaces the whole stored bundle."""
    return {
        "identity_key": b64url_encode(identity.x25519_public),
        "identity_key_ed": b64url_encode(identity.ed25519_public),
        "signed_pre_key": {
            "key_id": spk.key_id,
            "public_key": b64url_encode(spk.public),
            "signature": b64url_encode(spk.signature),
        },
        "one_time_pre_keys": [{"key_id": o.key_id, "public_key": b64url_encode(o.public)} for o in otks],
    }


def auth_header(identity: Identity, did: str, timestamp: str) -> str:
    """The ``Ed25519-Timestamp`` authorization header value."""
    sig = b64url_encode(identity.sign(timestamp.encode()))
    return f"Ed25519-Timestamp {did} {timestamp} {sig}"


def _key(obj: Mapping[str, Any], name: str, *, required: bool = True) -> bytes | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise MeshRegistryError(f"pre-key bundle field {name!r} is missing")
        return None
    if not isinstance(value, str):
        raise MeshRegistryError(f"pre-key bundle field {name!r} must be a base64url string")
    try:
        return b64url_decode(value)
    except ValueError:
        raise MeshRegistryError(f"pre-key bundle field {name!r} is not valid base64url") from None


def _key_id(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MeshRegistryError(f"pre-key bundle field {name!r} must be a non-negative integer")
    return value


def parse_bundle(body: Any, *, did: str = "peer") -> PreKeyBundle:
    """Parse a ``GET /v1/agents/{did}/prekeys`` response.

    ``one_time_pre_key`` may be ``null`` (the registry ran out) — the initiator then uses
    3-DH.  Signatures are *not* checked here: :meth:`PreKeyBundle.verify` does that.

    Raises:
        MeshRegistryError: for a malformed body or a bundle without ``identity_key_ed``.
    """
    if not isinstance(body, Mapping):
        raise MeshRegistryError("pre-key bundle is not a JSON object")
    if body.get("identity_key_ed") is None:
        raise MeshRegistryError(
            f"{did} has not published identity_key_ed; its bundle cannot be verified, so no "
            "session is started (the peer must upload pre-keys with its Ed25519 key)"
        )
    spk = body.get("signed_pre_key")
    if not isinstance(spk, Mapping):
        raise MeshRegistryError("pre-key bundle has no signed_pre_key object")
    otk = body.get("one_time_pre_key")
    otk_pub: bytes | None = None
    otk_id: int | None = None
    if otk is not None:
        if not isinstance(otk, Mapping):
            raise MeshRegistryError("pre-key bundle one_time_pre_key must be an object or null")
        otk_pub = _key(otk, "public_key")
        otk_id = _key_id(otk.get("key_id"), "one_time_pre_key.key_id")
    ik = _key(body, "identity_key")
    ik_ed = _key(body, "identity_key_ed")
    spk_pub = _key(spk, "public_key")
    spk_sig = _key(spk, "signature")
    assert ik is not None and ik_ed is not None and spk_pub is not None and spk_sig is not None
    return PreKeyBundle(
        identity_key=ik,
        identity_key_ed=ik_ed,
        signed_pre_key=spk_pub,
        signed_pre_key_signature=spk_sig,
        signed_pre_key_id=_key_id(spk.get("key_id"), "signed_pre_key.key_id"),
        one_time_pre_key=otk_pub,
        one_time_pre_key_id=otk_id,
    )
