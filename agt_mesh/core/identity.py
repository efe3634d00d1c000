"""Agent identity: an Ed25519 key pair, its X25519 conversion and its ``did:mesh:`` DID.

* The X25519 identity key (IK) used in X3DH is derived from the Ed25519 seed as
  libsodium's ``crypto_sign_ed25519_sk_to_curve25519`` does: SHA-512(seed)[0:32], clamped
  (RFC 7748); the public half is computed from that scalar.
* The DID is ``did:mesh:`` + the first 32 hex characters of SHA-256(Ed25519 public key),
  the form the relay and registry derive and enforce.

No object here prints its private bytes: ``repr``/``str`` show only the DID.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

from agt_mesh.core.encoding import b64url_decode, b64url_encode
from agt_mesh.core.primitives import (
    KEY_LEN,
    RandomSource,
    ed25519_sign,
    ed25519_signing_key,
    ed25519_verify,
    x25519_public,
)
from agt_mesh.errors import IdentityFileError, MeshConfigError

__all__ = [
    "IDENTITY_FILE_FORMAT",
    "IDENTITY_FILE_VERSION",
    "Identity",
    "did_from_ed25519",
    "ed25519_seed_to_x25519",
    "is_mesh_did",
]

IDENTITY_FILE_FORMAT = "agt-mesh-identity"
IDENTITY_FILE_VERSION = 1

_DID_RE = re.compile(r"^did:mesh:[0-9a-f]{32}$")


def did_from_ed25519(ed25519_public: bytes) -> str:
    """``did:mesh:`` + hex(SHA-256(raw Ed25519 public key))[0:32]."""
    if len(ed25519_public) != KEY_LEN:
        raise MeshConfigError("an Ed25519 public key is 32 bytes")
    return "did:mesh:" + hashlib.sha256(ed25519_public).hexdigest()[:32]


def is_mesh_did(value: str) -> bool:
    """Whether ``value`` is a key-derived ``did:mesh:<32 hex>`` DID."""
    return bool(_DID_RE.match(value))


def ed25519_seed_to_x25519(seed: bytes) -> tuple[bytes, bytes]:
    """``(x25519_private, x25519_public)`` derived from an Ed25519 seed (SHA-512 + clamp)."""
    if len(seed) != KEY_LEN:
        raise MeshConfigError("an Ed25519 seed is 32 bytes")
    h = bytearray(hashlib.sha512(seed).digest()[:32])
    h[0] &= 0xF8
    h[31] &= 0x7F
    h[31] |= 0x40
    priv = bytes(h)
    return priv, x25519_public(priv)


class Identity:
    """A long-term agent identity.

    Build one with :meth:`generate` or :meth:`from_seed`; persist it with
    :func:`agt_mesh.shell.identity_file.save_identity`.
    """

    __slots__ = ("_did", "_ed_public", "_ed_secret", "_seed", "_x_private", "_x_public")

    def __init__(self, seed: bytes, *, ed25519_public: bytes | None = None) -> None:
        """Create the identity for a 32-byte Ed25519 seed.

        A 64-byte libsodium-style ``seed || public`` secret is accepted too.

        Raises:
            MeshConfigError: if the seed has the wrong size, or ``ed25519_public`` (or the
                second half of a 64-byte secret) does not belong to the seed.
        """
        if not isinstance(seed, bytes | bytearray):
            raise MeshConfigError("the Ed25519 seed must be bytes")
        seed = bytes(seed)
        if len(seed) == 64:
            if ed25519_public is None:
                ed25519_public = seed[32:]
            seed = seed[:32]
        if len(seed) != KEY_LEN:
            raise MeshConfigError("an Ed25519 seed is 32 bytes (or 64 bytes seed||public)")
        pk, sk = ed25519_signing_key(seed)
        if ed25519_public is not None and not hmac.compare_digest(pk, bytes(ed25519_public)):
            raise MeshConfigError("the Ed25519 public key does not belong to this seed")
        self._seed = seed
        self._ed_secret = sk
        self._ed_public: bytes = pk
        self._x_private, self._x_public = ed25519_seed_to_x25519(seed)
        self._did = did_from_ed25519(pk)

    @classmethod
    def generate(cls, random: RandomSource) -> Identity:
        """A new identity from 32 bytes of ``random``."""
        return cls(random(KEY_LEN))

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """The identity of a 32-byte Ed25519 seed."""
        return cls(seed)

    # -- public parts ------------------------------------------------------------------

    @property
    def did(self) -> str:
        """The key-derived ``did:mesh:`` DID."""
        return self._did

    @property
    def ed25519_public(self) -> bytes:
        """The raw 32-byte Ed25519 public key (``identity_key_ed`` in the registry)."""
        return self._ed_public

    @property
    def x25519_public(self) -> bytes:
        """The raw 32-byte X25519 identity key (IK, ``identity_key`` in the registry)."""
        return self._x_public

    # -- private operations ------------------------------------------------------------

    def sign(self, message: bytes) -> bytes:
        """A deterministic 64-byte Ed25519 signature over ``message``."""
        return ed25519_sign(self._ed_secret, message)

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Whether ``signature`` is our signature over ``message``."""
        return ed25519_verify(self._ed_public, signature, message)

    @property
    def x25519_private(self) -> bytes:
        """The X25519 identity private key (for X3DH only; never log it)."""
        return self._x_private

    def export_seed(self) -> bytes:
        """The 32-byte Ed25519 seed.  Explicit export only: handle with care."""
        return self._seed

    # -- serialisation -----------------------------------------------------------------

    def to_file_dict(self, *, created_at: str | None = None) -> dict[str, Any]:
        """The identity-file JSON object (format ``agt-mesh-identity`` version 1).

        It holds the private seed: write it only to a 0600 file.
        """
        out: dict[str, Any] = {
            "format": IDENTITY_FILE_FORMAT,
            "version": IDENTITY_FILE_VERSION,
            "did": self._did,
            "ed25519_public": b64url_encode(self._ed_public),
            "x25519_public": b64url_encode(self._x_public),
            "ed25519_seed": b64url_encode(self._seed),
        }
        if created_at is not None:
            out["created_at"] = created_at
        return out

    def public_dict(self) -> dict[str, str]:
        """The public parts only: DID and both public keys (base64url)."""
        return {
            "did": self._did,
            "ed25519_public": b64url_encode(self._ed_public),
            "x25519_public": b64url_encode(self._x_public),
        }

    @classmethod
    def from_file_dict(cls, data: Any, *, source: str = "identity file") -> Identity:
        """Parse and check an identity-file object.

        Raises:
            IdentityFileError: on an unknown format or version, missing fields, or public
                keys or a DID that do not match the seed.
        """
        if not isinstance(data, dict) or data.get("format") != IDENTITY_FILE_FORMAT:
            raise IdentityFileError(f"{source}: not an {IDENTITY_FILE_FORMAT} file")
        version = data.get("version")
        if version != IDENTITY_FILE_VERSION:
            raise IdentityFileError(
                f"{source}: identity file version {version!r} is not supported "
                f"(this SDK reads version {IDENTITY_FILE_VERSION}); upgrade kars-agt-mesh"
            )
        try:
            seed = b64url_decode(data["ed25519_seed"])
            ed_pub = b64url_decode(data["ed25519_public"])
        except (KeyError, ValueError):
            raise IdentityFileError(f"{source}: missing or invalid key fields") from None
        try:
            ident = cls(seed)
        except MeshConfigError:
            raise IdentityFileError(f"{source}: the Ed25519 seed is invalid") from None
        if not hmac.compare_digest(ident.ed25519_public, ed_pub):
            raise IdentityFileError(
                f"{source}: the public key does not match the private seed; the file is "
                "corrupted or was edited by hand — restore it from a backup"
            )
        x_pub = data.get("x25519_public")
        if x_pub is not None:
            try:
                x_ok = hmac.compare_digest(ident.x25519_public, b64url_decode(x_pub))
            except ValueError:
                x_ok = False
            if not x_ok:
                raise IdentityFileError(f"{source}: the X25519 public key does not match the seed")
        did = data.get("did")
        if did is not None and did != ident.did:
            raise IdentityFileError(f"{source}: the DID {did!r} does not match the key")
        return ident

    def __repr__(self) -> str:
        return f"Identity(did={self._did!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Identity):
            return NotImplemented
        return hmac.compare_digest(self._ed_public, other._ed_public)

    def __hash__(self) -> int:
        return hash(self._ed_public)

    def __reduce__(self) -> Any:
        raise TypeError("Identity objects are not picklable (they hold private keys)")
