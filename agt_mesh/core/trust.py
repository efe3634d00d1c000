"""Who a key belongs to: identity binding, fingerprints and pinned keys (pure functions).

**Binding.**  A canonical DID (``did:mesh:`` + 32 hex) is the first 16 bytes of
SHA-256 over the agent's Ed25519 public key, so a key can be checked against the DID that
presents it without asking anyone — never trust a server's word for it:

* a pre-key bundle: ``identity_key_ed`` must hash to the DID we asked for, and the X25519
  ``identity_key`` must be that Ed25519 key's X25519 form (the TypeScript SDK checks
  neither, ``wire.md`` §2.2);
* a KNOCK carries only the initiator's X25519 identity key.  The Ed25519 key is recovered
  from the Montgomery u-coordinate up to the sign of x (``y = (u − 1) / (u + 1) mod p``,
  RFC 7748 §4.1), so the two candidate encodings are hashed and one must give the DID.

A DID of another form (``did:mesh:alice``, which npm 4.0.0 clients may use verbatim) says
nothing about its key: such peers fall back to trust on first use (the first key seen is
pinned, see :class:`KeyPin`).

**Fingerprints** follow Signal's safety numbers: each identity gets 30 digits from an
iterated hash of its key and DID, and a conversation's safety number is both halves in
sorted order, so the two sides print the same 60 digits and can compare them out of band.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from agt_mesh.core.encoding import b64url_decode, b64url_encode
from agt_mesh.core.identity import did_from_ed25519, is_mesh_did
from agt_mesh.core.primitives import KEY_LEN, ed25519_public_to_x25519
from agt_mesh.errors import IdentityBindingError

__all__ = [
    "FINGERPRINT_DIGITS",
    "KeyPin",
    "NameBinding",
    "check_bundle_binding",
    "check_key_binding",
    "dids_of_x25519",
    "ed25519_candidates",
    "fingerprint",
    "key_binds",
    "normalize_fingerprint",
    "parse_identity_key",
    "safety_number",
]

#: 2**255 - 19, the field of Curve25519 / edwards25519
_P = 2**255 - 19
#: Hash iterations per fingerprint, as Signal's safety numbers use: they make a search for
#: a second key with the same (truncated) fingerprint ~5,000 times dearer.  One
#: fingerprint costs ~3 ms here.
FINGERPRINT_ITERATIONS = 5200
#: digits per identity (6 groups of 5, as Signal); a safety number has twice as many
FINGERPRINT_DIGITS = 30
_FP_VERSION = b"agt-mesh fingerprint v1\x00"
_DIGITS_RE = re.compile(r"[\s:-]+")


def ed25519_candidates(x25519_public: bytes) -> tuple[bytes, ...]:
    """The Ed25519 public keys whose X25519 form is ``x25519_public``.

    Returns the two encodings (sign bit of x clear, set) of ``y = (u − 1) / (u + 1)``, or
    nothing for a key that is not a canonical u-coordinate (top bit set, ``u ≥ p``) or is
    ``u = −1`` (no Edwards point).  Whether a candidate is a point on the curve is not
    checked: it only has to hash to a DID.
    """
    if len(x25519_public) != KEY_LEN:
        return ()
    u = int.from_bytes(x25519_public, "little")
    if u >= _P or u == _P - 1:
        return ()
    y = (u - 1) * pow(u + 1, _P - 2, _P) % _P
    low = y.to_bytes(KEY_LEN, "little")
    high = (y | (1 << 255)).to_bytes(KEY_LEN, "little")
    return (low, high)


def dids_of_x25519(x25519_public: bytes) -> tuple[str, ...]:
    """The canonical DIDs an X25519 identity key can belong to (two, or none)."""
    return tuple(did_from_ed25519(e) for e in ed25519_candidates(x25519_public))


def key_binds(did: str, x25519_public: bytes) -> bool:
    """Whether ``x25519_public`` may belong to ``did``.

    True for a canonical DID only when one Ed25519 candidate hashes to it; always True for
    a DID of another form (nothing to check: trust on first use applies).
    """
    if not is_mesh_did(did):
        return True
    return any(hmac.compare_digest(d, did) for d in dids_of_x25519(x25519_public))


def check_key_binding(did: str, x25519_public: bytes, *, what: str = "identity key") -> None:
    """Refuse an X25519 identity key (e.g. a KNOCK's ``establishment.ik``) not bound to ``did``.

    Raises:
        IdentityBindingError: naming the claimed DID and the DIDs the key belongs to.
    """
    if key_binds(did, x25519_public):
        return
    owners = dids_of_x25519(x25519_public)
    belongs = f"it belongs to {' or '.join(owners)}" if owners else "it is not a valid X25519 public key"
    raise IdentityBindingError(
        f"{what} {b64url_encode(x25519_public)} is not a key of {did}: {belongs}; refused (a canonical "
        "DID is the hash of its key)",
        did=did,
        key_dids=owners,
    )


def check_bundle_binding(did: str, identity_key: bytes, identity_key_ed: bytes) -> None:
    """Refuse a pre-key bundle whose identity keys do not belong to ``did``.

    Always: the X25519 ``identity_key`` must be the X25519 form of ``identity_key_ed`` (a
    bundle mixing two identities is forged).  For a canonical DID also: the Ed25519 key
    must hash to it.

    Raises:
        IdentityBindingError: naming the DID asked for and the DID the bundle's key has.
    """
    key_did = did_from_ed25519(identity_key_ed) if len(identity_key_ed) == KEY_LEN else "an invalid key"
    if is_mesh_did(did) and not hmac.compare_digest(key_did, did):
        raise IdentityBindingError(
            f"the pre-key bundle for {did} carries the Ed25519 key of {key_did} "
            f"({b64url_encode(identity_key_ed)}): the registry (or the path to it) returned another "
            "agent's keys; refused",
            did=did,
            key_dids=(key_did,),
        )
    try:
        converted = ed25519_public_to_x25519(identity_key_ed)
    except ValueError:
        converted = b""
    if not hmac.compare_digest(converted, identity_key):
        raise IdentityBindingError(
            f"the pre-key bundle for {did} pairs the X25519 identity key {b64url_encode(identity_key)} with "
            f"an Ed25519 key it is not derived from ({b64url_encode(identity_key_ed)}, {key_did}): the "
            "bundle is forged or corrupted; refused",
            did=did,
            key_dids=dids_of_x25519(identity_key),
        )


# -- fingerprints -----------------------------------------------------------------------


def fingerprint(did: str, x25519_public: bytes) -> str:
    """30 digits in groups of five identifying ``did`` with this X25519 identity key."""
    digest = hashlib.sha512(_FP_VERSION + x25519_public + did.encode()).digest()
    for _ in range(FINGERPRINT_ITERATIONS):
        digest = hashlib.sha512(digest + x25519_public).digest()
    groups = (int.from_bytes(digest[i : i + 5], "big") % 100_000 for i in range(0, 30, 5))
    return " ".join(f"{g:05d}" for g in groups)


def safety_number(did_a: str, key_a: bytes, did_b: str, key_b: bytes) -> str:
    """Both identities' fingerprints in sorted order: the same 60 digits on either side."""
    return " ".join(sorted((fingerprint(did_a, key_a), fingerprint(did_b, key_b))))


def normalize_fingerprint(text: str) -> str | None:
    """``text`` as a canonical fingerprint (spaces, colons and dashes ignored), or None."""
    digits = _DIGITS_RE.sub("", text)
    if len(digits) != FINGERPRINT_DIGITS or not digits.isdigit():
        return None
    return " ".join(digits[i : i + 5] for i in range(0, FINGERPRINT_DIGITS, 5))


def parse_identity_key(text: str | bytes) -> bytes | None:
    """A 32-byte key from bytes, base64url/base64 text or hex; None if it is none of them."""
    if isinstance(text, bytes | bytearray):
        return bytes(text) if len(text) == KEY_LEN else None
    value = text.strip()
    if len(value) == 2 * KEY_LEN:
        try:
            return bytes.fromhex(value)
        except ValueError:
            pass
    if len(value) in (43, 44):
        try:
            raw = b64url_decode(value.replace("+", "-").replace("/", "_").rstrip("="))
        except ValueError:
            return None
        return raw if len(raw) == KEY_LEN else None
    return None


# -- pins -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyPin:
    """An identity key recorded for a DID: the pinned one, or one offered and refused.

    ``source`` says where it came from: ``bundle`` (we initiated), ``knock`` (the peer's
    KNOCK, pinned once a message decrypted under it), ``trusted`` (accepted explicitly),
    ``session`` (an older store's session).
    """

    did: str
    identity_key: bytes
    since: float
    source: str

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.did, self.identity_key)

    def same_key(self, key: bytes) -> bool:
        return hmac.compare_digest(self.identity_key, key)


@dataclass(frozen=True, slots=True)
class NameBinding:
    """A display name bound to one DID by a local decision (it never follows the registry).

    ``source``: ``registry`` (the only agent claiming the name when it was first resolved),
    ``user`` (bound explicitly), ``migrated`` (the name an older store used for the DID).
    """

    name: str
    did: str
    since: float
    source: str
