"""Cryptographic primitives used by the protocol, as plain functions on ``bytes``.

Each primitive uses whichever backend is fastest for it on CPython (measured in
``benchmarks/primitives.py``):

* X25519 and Ed25519 — libsodium through PyNaCl (key generation and verification are
  about 2x faster than OpenSSL's through ``cryptography``, mostly in object overhead).
* ChaCha20-Poly1305 (RFC 8439) — OpenSSL through ``cryptography`` (vectorised; 3x faster
  than libsodium's portable code at 64 KiB).
* HMAC-SHA256 and HKDF-SHA256 (RFC 2104 / RFC 5869) — written here over ``hashlib``
  with precomputed pads, which is several times cheaper than a generic HMAC object for
  the 32-byte keys the ratchet uses.

Nothing here draws randomness: callers pass the random bytes in.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from nacl import bindings as _sodium
from nacl.exceptions import BadSignatureError
from nacl.exceptions import RuntimeError as _SodiumRuntimeError

from agt_mesh.errors import MessageAuthError

__all__ = [
    "AEAD_NONCE_LEN",
    "AEAD_TAG_LEN",
    "KEY_LEN",
    "RandomSource",
    "aead_decrypt",
    "aead_encrypt",
    "ed25519_public_from_seed",
    "ed25519_public_to_x25519",
    "ed25519_sign",
    "ed25519_signing_key",
    "ed25519_verify",
    "hkdf_sha256",
    "hmac_sha256",
    "kdf_chain",
    "x25519",
    "x25519_public",
]

#: A source of randomness: called with ``n``, returns ``n`` random bytes.
RandomSource = Callable[[int], bytes]

KEY_LEN = 32
AEAD_NONCE_LEN = 12
AEAD_TAG_LEN = 16

_sha256 = hashlib.sha256
_IPAD = bytes(x ^ 0x36 for x in range(256))
_OPAD = bytes(x ^ 0x5C for x in range(256))
_BLOCK = 64


def hmac_sha256(key: bytes, msg: bytes) -> bytes:
    """HMAC-SHA256 (RFC 2104)."""
    if len(key) > _BLOCK:
        key = _sha256(key).digest()
    key = key.ljust(_BLOCK, b"\x00")
    inner = _sha256(key.translate(_IPAD) + msg).digest()
    return _sha256(key.translate(_OPAD) + inner).digest()


def kdf_chain(chain_key: bytes) -> tuple[bytes, bytes]:
    """KDF_CK: ``(message_key, next_chain_key)`` = HMAC(ck, 0x01), HMAC(ck, 0x02).

    Both HMACs share their key, so the padded key is prepared once.
    """
    key = chain_key.ljust(_BLOCK, b"\x00")
    ipad = key.translate(_IPAD)
    opad = key.translate(_OPAD)
    mk = _sha256(opad + _sha256(ipad + b"\x01").digest()).digest()
    ck = _sha256(opad + _sha256(ipad + b"\x02").digest()).digest()
    return mk, ck


def hkdf_sha256(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869) extract-then-expand."""
    if not 0 < length <= 255 * 32:
        raise ValueError("HKDF output length out of range")
    prk = hmac_sha256(salt, ikm)
    key = prk.ljust(_BLOCK, b"\x00")
    ipad = key.translate(_IPAD)
    opad = key.translate(_OPAD)
    out = b""
    block = b""
    counter = 1
    while len(out) < length:
        block = _sha256(opad + _sha256(ipad + block + info + bytes((counter,))).digest()).digest()
        out += block
        counter += 1
    return out[:length]


def x25519_public(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private scalar (clamped internally, RFC 7748)."""
    return _sodium.crypto_scalarmult_base(private)


def x25519(private: bytes, public: bytes) -> bytes:
    """X25519 Diffie-Hellman.

    Raises:
        ValueError: if either key is not 32 bytes or the shared secret is all zeros
            (a low-order public key), as the TypeScript SDK also refuses.
    """
    if len(private) != KEY_LEN or len(public) != KEY_LEN:
        raise ValueError("X25519 keys must be 32 bytes")
    try:
        return _sodium.crypto_scalarmult(private, public)
    except _SodiumRuntimeError:
        raise ValueError("X25519 produced an all-zero shared secret (low-order public key)") from None


def ed25519_signing_key(seed: bytes) -> tuple[bytes, bytes]:
    """``(public_key, expanded_secret)`` for a 32-byte Ed25519 seed (RFC 8032)."""
    if len(seed) != KEY_LEN:
        raise ValueError("an Ed25519 seed is 32 bytes")
    pk, sk = _sodium.crypto_sign_seed_keypair(seed)
    return pk, sk


def ed25519_public_from_seed(seed: bytes) -> bytes:
    """The Ed25519 public key of a 32-byte seed."""
    return ed25519_signing_key(seed)[0]


def ed25519_public_to_x25519(ed25519_public: bytes) -> bytes:
    """The X25519 form of an Ed25519 public key (the birational map, libsodium's
    ``crypto_sign_ed25519_pk_to_curve25519``).

    Raises:
        ValueError: if the key is not 32 bytes, not a canonical point on the curve, or of
            small order (libsodium refuses those).
    """
    if len(ed25519_public) != KEY_LEN:
        raise ValueError("an Ed25519 public key is 32 bytes")
    try:
        return _sodium.crypto_sign_ed25519_pk_to_curve25519(ed25519_public)
    except (_SodiumRuntimeError, ValueError, TypeError):
        raise ValueError("not a valid Ed25519 public key") from None


def ed25519_sign(expanded_secret: bytes, message: bytes) -> bytes:
    """A deterministic 64-byte Ed25519 signature.

    ``expanded_secret`` comes from :func:`ed25519_signing_key`.
    """
    return _sodium.crypto_sign(message, expanded_secret)[:64]


def ed25519_verify(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether ``signature`` is a valid Ed25519 signature of ``message`` by ``public_key``."""
    if len(public_key) != KEY_LEN or len(signature) != 64:
        return False
    try:
        _sodium.crypto_sign_open(signature + message, public_key)
    except (BadSignatureError, _SodiumRuntimeError, ValueError):
        return False
    return True


def aead_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """ChaCha20-Poly1305 encryption; returns ``ciphertext || tag``."""
    return ChaCha20Poly1305(key).encrypt(nonce, plaintext, aad)


def aead_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """ChaCha20-Poly1305 decryption of ``ciphertext || tag``.

    Raises:
        MessageAuthError: if the tag does not verify.
    """
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise MessageAuthError("message authentication failed (invalid tag)") from None
