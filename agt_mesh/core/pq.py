"""Post-quantum hybrid session setup: X3DH over X25519 plus ML-KEM-768, as Signal's PQXDH.

Between two ``agt_mesh`` peers that both publish ML-KEM-768 pre-keys, the initiator
encapsulates to the responder's signed KEM pre-key and mixes the KEM shared secret ``SS``
into the root key after the X3DH Diffie-Hellman outputs::

    SK = HKDF-SHA256(salt = 0x00*32,
                     IKM  = 0xFF*32 || DH1 || DH2 || DH3 [|| DH4] || SS,
                     info = "AgentMesh_PQXDH_v1_CURVE25519_SHA-256_ML-KEM-768",  L = 32)

``DH1..DH4`` are exactly those of :mod:`agt_mesh.core.x3dh` (same keys, same order).  The
key is as strong as the stronger of X25519 and ML-KEM-768: an attacker who records traffic
now and breaks X25519 later still lacks ``SS``.  The info string differs from
``AgentMesh_X3DH_v1`` (both classic KDFs) and ``AgentMesh_Ratchet_v1``, so no classic
derivation can ever produce a hybrid key, even where the input lengths coincide (a hybrid
IKM without DH4 is as long as a classic IKM with it).  ``docs/pq.md`` justifies each byte.

**Pre-keys.**  An ML-KEM pre-key is a 64-byte seed ``d || z`` (FIPS 203 key generation),
drawn from the injected :data:`RandomSource`; its public key is 1,184 bytes.  It is signed
by the Ed25519 identity key over a domain-separated message (:func:`prekey_signed_message`)
naming its kind (one-time or last-resort), id, creation time and, for one-time keys, the
X25519 signed pre-key published with it — so a hybrid initiator checks one signature that
covers both the signed pre-key and the KEM pre-key.

**Randomness.**  Everything is drawn from the injected source except the 32 bytes of
ML-KEM *encapsulation* randomness: ``cryptography`` exposes no way to pass them in, so
:func:`kem_encapsulate` uses OpenSSL's generator.  :func:`initiate_hybrid` therefore takes
the encapsulation as an argument (``encapsulate=``), which is how known-answer vectors
replay a recorded ciphertext.

**Wire.**  The KEM pre-keys travel through the registry (see :func:`prekey_upload_body`
and :func:`advert_metadata`) and the ciphertext in the KNOCK ``establishment`` object as
``"pq": {"suite", "kem", "spk", "ct"}`` (:func:`encode_pq_establishment`), which relays
forward and the TypeScript SDK ignores.

Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from agt_mesh.core import registry_codec
from agt_mesh.core.encoding import b64_decode, b64_encode, b64url_decode, b64url_encode, compact_json
from agt_mesh.core.identity import Identity
from agt_mesh.core.primitives import KEY_LEN, RandomSource, ed25519_verify, hkdf_sha256, x25519, x25519_public
from agt_mesh.core.strict_json import loads_strict
from agt_mesh.core.x3dh import Establishment, OneTimePreKey, PreKeyBundle, PreKeyStore, SignedPreKey
from agt_mesh.errors import (
    BundleVerificationError,
    DowngradeError,
    MalformedJsonError,
    MeshConfigError,
    MeshProtocolError,
    MeshRegistryError,
    PreKeyNotFoundError,
)

try:  # ML-KEM arrived in cryptography 47 and needs an OpenSSL (or AWS-LC) that has it
    from cryptography.hazmat.primitives.asymmetric.mlkem import MLKEM768PrivateKey, MLKEM768PublicKey
except ImportError:  # pragma: no cover - exercised only with an old cryptography
    MLKEM768PrivateKey = None  # type: ignore[assignment,misc]
    MLKEM768PublicKey = None  # type: ignore[assignment,misc]

__all__ = [
    "KEM_CIPHERTEXT_LEN",
    "KEM_PUBLIC_KEY_LEN",
    "KEM_SEED_LEN",
    "KEM_SHARED_SECRET_LEN",
    "KEM_SUITE",
    "LAST_RESORT_REPLAY_LIMIT",
    "PQXDH_INFO",
    "PQ_ESTABLISHMENT_FIELD",
    "PQ_METADATA_KEY",
    "PQ_OTK_FIELD",
    "PREKEY_SIGNATURE_LABEL",
    "HybridInitiation",
    "HybridResponse",
    "KemEncapsulator",
    "KemKeyKind",
    "KemPreKey",
    "KemPreKeyStore",
    "PQEstablishment",
    "SignedKemPreKey",
    "advert_metadata",
    "choose_kem_prekey",
    "encode_pq_establishment",
    "hybrid_kdf",
    "initiate_hybrid",
    "kem_encapsulate",
    "knock_with_pq",
    "parse_advert",
    "parse_bundle_kem_prekey",
    "parse_pq_establishment",
    "pq_supported",
    "prekey_signed_message",
    "prekey_upload_body",
    "require_hybrid",
    "respond_hybrid",
]

#: The one KEM suite: the name on the wire and in the registry.
KEM_SUITE: Final = "ML-KEM-768"
KEM_PUBLIC_KEY_LEN: Final = 1184
KEM_CIPHERTEXT_LEN: Final = 1088
KEM_SHARED_SECRET_LEN: Final = 32
#: FIPS 203 seed form of a decapsulation key: ``d || z``.
KEM_SEED_LEN: Final = 64

#: HKDF info of the hybrid root key.  PQXDH asks for an application name plus the curve,
#: hash and KEM; it must differ from every other info string this key material meets.
PQXDH_INFO: Final = b"AgentMesh_PQXDH_v1_CURVE25519_SHA-256_ML-KEM-768"
#: First bytes of every KEM pre-key signature message (followed by a 0x00 byte).
PREKEY_SIGNATURE_LABEL: Final = b"AgentMesh_PQPreKey_v1"

#: Key of the signed last-resort KEM pre-key in the registration ``metadata`` (a string).
PQ_METADATA_KEY: Final = "agt_mesh_pq"
#: Key of the signed one-time KEM pre-key inside a ``one_time_pre_keys`` entry.
PQ_OTK_FIELD: Final = "pq"
#: Key of the hybrid extension inside a KNOCK ``establishment`` object.
PQ_ESTABLISHMENT_FIELD: Final = "pq"

#: Ciphertext digests remembered per last-resort key to refuse replayed establishments.
#: Every hybrid session anyone sets up through the last-resort key adds one entry, so the
#: set must be bounded: 4,096 SHA-256 digests are about 0.5 MB with the index, per key.
#: The oldest are forgotten first; a replay older than that is no worse than a replayed
#: classic KNOCK without a one-time pre-key (X3DH itself has no replay protection there).
LAST_RESORT_REPLAY_LIMIT: Final = 4096

# Longest base64 text accepted for a field before decoding it (exact lengths plus slack for
# padding), so a hostile registry or KNOCK cannot make us decode megabytes.
_PUB_TEXT_MAX: Final = 1600  # 1,184 bytes are 1,579 base64url characters
_CT_TEXT_MAX: Final = 1460  # 1,088 bytes are 1,452 base64 characters with padding
_SIG_TEXT_MAX: Final = 90  # 64 bytes are 86 base64url characters
#: Longest metadata value accepted as a last-resort record (one is about 1,750 characters).
PQ_RECORD_TEXT_MAX: Final = 4096

_U32_MAX: Final = 0xFFFFFFFF
_U64_MAX: Final = 0xFFFFFFFFFFFFFFFF
_SUITE_BYTE: Final = 0x01  # ML-KEM-768 in the signed message
_ZERO32 = b"\x00" * 32
_FF32 = b"\xff" * 32

#: Encapsulation: public key -> ``(shared_secret, ciphertext)``.
KemEncapsulator = Callable[[bytes], tuple[bytes, bytes]]


@functools.cache
def pq_supported() -> bool:
    """Whether this ``cryptography`` and its OpenSSL provide ML-KEM-768 (checked once)."""
    if MLKEM768PrivateKey is None:
        return False
    from cryptography.hazmat.backends.openssl.backend import backend

    return bool(backend.mlkem_supported())


def _require_mlkem() -> None:
    if not pq_supported():
        raise MeshConfigError(
            "ML-KEM-768 is not available: post-quantum sessions need cryptography >= 47 built "
            "with an OpenSSL that provides ML-KEM (e.g. the cryptography wheels from PyPI)"
        )


class KemKeyKind(enum.Enum):
    """Whether a KEM pre-key is used once or stays until rotated (Signal's last-resort key)."""

    ONE_TIME = "one_time"
    LAST_RESORT = "last_resort"

    @property
    def code(self) -> int:
        """The byte naming the kind in the signed message."""
        return 1 if self is KemKeyKind.ONE_TIME else 2


def _check_id(value: int, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U32_MAX:
        raise MeshConfigError(f"{name} must be an integer in 0..2^32-1")
    return value


def prekey_signed_message(
    kind: KemKeyKind, key_id: int, created_at: int, public: bytes, signed_pre_key: bytes | None
) -> bytes:
    """The exact bytes the identity key signs for a KEM pre-key::

        "AgentMesh_PQPreKey_v1" || 0x00 || 0x01 (ML-KEM-768) || kind (0x01 one-time, 0x02 last-resort)
          || u32be(key_id) || u64be(created_at) || SPK (32) || public key (1,184)

    ``SPK`` is the X25519 signed pre-key published with a one-time key, and 32 zero bytes
    for a last-resort key (which outlives signed pre-key rotations).  Every other message
    the identity key signs is either exactly 32 bytes (an X25519 signed pre-key) or ASCII
    text (timestamps, registration proofs); these are 1,252 bytes with a 0x00 at offset 21,
    so no signature can be replayed from one context into another.
    """
    if kind is KemKeyKind.ONE_TIME:
        if signed_pre_key is None or len(signed_pre_key) != KEY_LEN:
            raise MeshConfigError("a one-time KEM pre-key is signed together with a 32-byte signed pre-key")
        binding = signed_pre_key
    else:
        binding = _ZERO32
    if len(public) != KEM_PUBLIC_KEY_LEN:
        raise MeshConfigError(f"an {KEM_SUITE} public key is {KEM_PUBLIC_KEY_LEN} bytes")
    if not isinstance(created_at, int) or isinstance(created_at, bool) or not 0 <= created_at <= _U64_MAX:
        raise MeshConfigError("created_at must be an integer number of seconds in 0..2^64-1")
    return b"".join(
        (
            PREKEY_SIGNATURE_LABEL,
            b"\x00",
            bytes((_SUITE_BYTE, kind.code)),
            struct.pack(">IQ", _check_id(key_id, "key_id"), created_at),
            binding,
            public,
        )
    )


# -- ML-KEM --------------------------------------------------------------------------


def _private_from_seed(seed: bytes) -> Any:
    _require_mlkem()
    if len(seed) != KEM_SEED_LEN:
        raise MeshConfigError(f"an {KEM_SUITE} seed is {KEM_SEED_LEN} bytes")
    return MLKEM768PrivateKey.from_seed_bytes(seed)


def kem_encapsulate(public: bytes) -> tuple[bytes, bytes]:
    """``(shared_secret, ciphertext)`` for a peer's ML-KEM-768 public key.

    Draws its 32 random bytes from OpenSSL (the one draw not taken from an injected source).

    Raises:
        BundleVerificationError: if the key is not a valid encapsulation key (FIPS 203 checks
            its length and that every coefficient is reduced).
    """
    _require_mlkem()
    try:
        key = MLKEM768PublicKey.from_public_bytes(public)
    except ValueError:
        raise BundleVerificationError(f"invalid {KEM_SUITE} public key in the pre-key bundle") from None
    shared, ciphertext = key.encapsulate()
    return shared, ciphertext


@dataclass(frozen=True, slots=True)
class KemPreKey:
    """One of our ML-KEM-768 pre-keys: its seed (the private key) and public key."""

    key_id: int
    kind: KemKeyKind
    seed: bytes = field(repr=False)
    public: bytes = field(repr=False)
    created_at: int
    _private: Any = field(repr=False, compare=False)

    @classmethod
    def from_seed(cls, key_id: int, kind: KemKeyKind, seed: bytes, *, created_at: int) -> KemPreKey:
        """Build the key for a 64-byte seed (``d || z``); deterministic."""
        private = _private_from_seed(seed)
        return cls(
            _check_id(key_id, "key_id"), kind, bytes(seed), private.public_key().public_bytes_raw(), created_at, private
        )

    def decapsulate(self, ciphertext: bytes) -> bytes:
        """The shared secret for ``ciphertext``.

        A ciphertext that was not made for this key still yields 32 bytes (FIPS 203 implicit
        rejection), just not the initiator's: the first message then fails its AEAD check.

        Raises:
            MeshProtocolError: if the ciphertext is not 1,088 bytes.
        """
        if len(ciphertext) != KEM_CIPHERTEXT_LEN:
            raise MeshProtocolError(f"an {KEM_SUITE} ciphertext is {KEM_CIPHERTEXT_LEN} bytes")
        return bytes(self._private.decapsulate(ciphertext))

    def signed(self, identity: Identity, signed_pre_key: bytes | None = None) -> SignedKemPreKey:
        """The public, signed form to publish (``signed_pre_key``: the X25519 SPK published
        with a one-time key; ignored for a last-resort key)."""
        message = prekey_signed_message(self.kind, self.key_id, self.created_at, self.public, signed_pre_key)
        return SignedKemPreKey(self.kind, self.key_id, self.public, identity.sign(message), self.created_at)


@dataclass(frozen=True, slots=True)
class SignedKemPreKey:
    """A peer's published ML-KEM-768 pre-key, as read from the registry."""

    kind: KemKeyKind
    key_id: int
    public: bytes = field(repr=False)
    signature: bytes = field(repr=False)
    created_at: int

    def verify(self, identity_key_ed: bytes, signed_pre_key: bytes | None) -> None:
        """Check sizes and the identity key's signature.

        ``signed_pre_key`` is the bundle's X25519 signed pre-key; a one-time KEM key's
        signature covers it, so a valid one also authenticates the signed pre-key.

        Raises:
            BundleVerificationError: naming the failed check.
        """
        if len(self.public) != KEM_PUBLIC_KEY_LEN:
            raise BundleVerificationError(f"Invalid {KEM_SUITE} pre-key length (expected {KEM_PUBLIC_KEY_LEN} bytes).")
        if len(self.signature) != 64:
            raise BundleVerificationError("Invalid KEM pre-key signature length.")
        if self.kind is KemKeyKind.ONE_TIME and (signed_pre_key is None or len(signed_pre_key) != KEY_LEN):
            raise BundleVerificationError("Invalid signed pre-key length (expected 32 bytes).")
        try:
            message = prekey_signed_message(self.kind, self.key_id, self.created_at, self.public, signed_pre_key)
        except MeshConfigError as exc:
            raise BundleVerificationError(f"invalid KEM pre-key: {exc}") from None
        if not ed25519_verify(identity_key_ed, self.signature, message):
            raise BundleVerificationError(
                f"{KEM_SUITE} pre-key signature verification FAILED (key {self.key_id}, "
                f"{self.kind.value}). The bundle may have been tampered with; do not establish a "
                "session with it."
            )

    def to_json(self) -> dict[str, Any]:
        """The registry form (base64url)."""
        return {
            "suite": KEM_SUITE,
            "key_id": self.key_id,
            "public_key": b64url_encode(self.public),
            "signature": b64url_encode(self.signature),
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, obj: Any, kind: KemKeyKind) -> SignedKemPreKey | None:
        """Parse the registry form; ``None`` for a suite we do not implement.

        Sizes are checked before anything is decoded.  The signature is *not* checked here.

        Raises:
            MeshRegistryError: for a malformed record of our suite (never ignored: a damaged
                KEM pre-key is a sign of tampering, not a reason to fall back).
        """
        if not isinstance(obj, Mapping):
            raise MeshRegistryError("KEM pre-key record is not a JSON object")
        suite = obj.get("suite")
        if not isinstance(suite, str):
            raise MeshRegistryError("KEM pre-key record has no 'suite' string")
        if suite != KEM_SUITE:
            return None
        key_id, created_at = obj.get("key_id"), obj.get("created_at")
        if not isinstance(key_id, int) or isinstance(key_id, bool) or not 0 <= key_id <= _U32_MAX:
            raise MeshRegistryError("KEM pre-key 'key_id' must be an integer in 0..2^32-1")
        if not isinstance(created_at, int) or isinstance(created_at, bool) or not 0 <= created_at <= _U64_MAX:
            raise MeshRegistryError("KEM pre-key 'created_at' must be a non-negative integer")
        public = _decode(obj.get("public_key"), "public_key", _PUB_TEXT_MAX, KEM_PUBLIC_KEY_LEN, url=True)
        signature = _decode(obj.get("signature"), "signature", _SIG_TEXT_MAX, 64, url=True)
        return cls(kind, key_id, public, signature, created_at)


def _decode(value: Any, name: str, max_chars: int, size: int, *, url: bool) -> bytes:
    # registry records are base64url (a bad one is the registry's fault); KNOCK fields are
    # standard base64 (a bad one is a protocol error of the peer)
    error: type[MeshRegistryError | MeshProtocolError] = MeshRegistryError if url else MeshProtocolError
    if not isinstance(value, str) or len(value) > max_chars:
        raise error(f"KEM field {name!r} must be a base64 string of {size} bytes")
    try:
        raw = b64url_decode(value) if url else b64_decode(value)
    except ValueError:
        raise error(f"KEM field {name!r} is not valid base64") from None
    if len(raw) != size:
        raise error(f"KEM field {name!r} must be {size} bytes, got {len(raw)}")
    return raw


# -- our KEM pre-keys -------------------------------------------------------------------


class KemPreKeyStore:
    """Our ML-KEM pre-keys: one-time keys, the last-resort key (and retired ones), and
    the replay guard of the last-resort keys.  Pure state; ids count up from 0.

    A one-time key is removed when an establishment consumes it, so naming it again fails.
    A last-resort key stays (Signal PQXDH allows that when one-time keys run out), and the
    digest of every ciphertext it accepted is remembered (up to
    :data:`LAST_RESORT_REPLAY_LIMIT`), so a replayed KNOCK is refused too.
    """

    __slots__ = ("_one_time", "_retired", "_seen", "last_resort", "next_id", "replay_limit", "version")

    def __init__(self, *, replay_limit: int = LAST_RESORT_REPLAY_LIMIT) -> None:
        if replay_limit < 1:
            raise MeshConfigError("replay_limit must be >= 1")
        self._one_time: dict[int, KemPreKey] = {}
        self.last_resort: KemPreKey | None = None
        self._retired: dict[int, KemPreKey] = {}
        self._seen: dict[int, OrderedDict[bytes, None]] = {}
        self.next_id = 0
        self.replay_limit = replay_limit
        #: incremented on every change (lets a store know when to write)
        self.version = 0

    def _new(self, kind: KemKeyKind, random: RandomSource, created_at: int) -> KemPreKey:
        key = KemPreKey.from_seed(self.next_id, kind, random(KEM_SEED_LEN), created_at=created_at)
        self.next_id += 1
        return key

    def generate_one_time(self, count: int, random: RandomSource, *, created_at: int) -> list[KemPreKey]:
        """Make ``count`` one-time keys, drawing 64 bytes each."""
        if count < 0:
            raise MeshConfigError("count must be >= 0")
        out = [self._new(KemKeyKind.ONE_TIME, random, created_at) for _ in range(count)]
        for key in out:
            self._one_time[key.key_id] = key
        self.version += 1
        return out

    def generate_last_resort(self, random: RandomSource, *, created_at: int) -> KemPreKey:
        """Make a new last-resort key (64 bytes drawn); the previous one is retired, not dropped,
        so establishments made from the old advertisement still complete."""
        key = self._new(KemKeyKind.LAST_RESORT, random, created_at)
        self.add(key)
        return key

    def add(self, key: KemPreKey, *, current: bool = True, seen: Iterable[bytes] = ()) -> None:
        """Install an existing key (restoring state); ``seen`` are its accepted ciphertext digests."""
        if key.kind is KemKeyKind.ONE_TIME:
            self._one_time[key.key_id] = key
        elif current:
            if self.last_resort is not None:
                self._retired[self.last_resort.key_id] = self.last_resort
            self.last_resort = key
        else:
            self._retired[key.key_id] = key
        if key.kind is KemKeyKind.LAST_RESORT:
            cache = self._seen.setdefault(key.key_id, OrderedDict())
            for digest in seen:
                self._remember(cache, digest)
        self.next_id = max(self.next_id, key.key_id + 1)
        self.version += 1

    @property
    def one_time_keys(self) -> list[KemPreKey]:
        """The unused one-time keys, oldest first."""
        return list(self._one_time.values())

    @property
    def retired_last_resort(self) -> list[KemPreKey]:
        return list(self._retired.values())

    def seen_digests(self, key_id: int) -> list[bytes]:
        """The remembered ciphertext digests of a last-resort key, oldest first (for saving)."""
        return list(self._seen.get(key_id, ()))

    def peek(self, key_id: int) -> KemPreKey:
        """A key by id, without consuming it.

        Raises:
            PreKeyNotFoundError: if it is unknown or (one-time) already consumed.
        """
        key = self._one_time.get(key_id)
        if key is None and self.last_resort is not None and self.last_resort.key_id == key_id:
            key = self.last_resort
        if key is None:
            key = self._retired.get(key_id)
        if key is None:
            raise PreKeyNotFoundError(f"{KEM_SUITE} pre-key {key_id} not found or already consumed.")
        return key

    @staticmethod
    def digest(ciphertext: bytes) -> bytes:
        """What the replay guard remembers of a ciphertext."""
        return hashlib.sha256(ciphertext).digest()

    def check_unused(self, key_id: int, ciphertext: bytes) -> KemPreKey:
        """The key an establishment names, if it may still be used with this ciphertext.

        Raises:
            PreKeyNotFoundError: unknown key, consumed one-time key, or a last-resort key
                that already accepted this ciphertext (a replayed establishment).
        """
        key = self.peek(key_id)
        if key.kind is KemKeyKind.LAST_RESORT and self.digest(ciphertext) in self._seen.get(key_id, ()):
            raise PreKeyNotFoundError(
                f"{KEM_SUITE} last-resort pre-key {key_id} already accepted this ciphertext: "
                "a replayed establishment is refused."
            )
        return key

    def consume(self, key_id: int, ciphertext: bytes) -> KemPreKey:
        """Use a key for one establishment: a one-time key is removed, a last-resort key
        remembers the ciphertext.

        Raises:
            PreKeyNotFoundError: as :meth:`check_unused`.
        """
        key = self.check_unused(key_id, ciphertext)
        if key.kind is KemKeyKind.ONE_TIME:
            del self._one_time[key_id]
        else:
            self._remember(self._seen.setdefault(key_id, OrderedDict()), self.digest(ciphertext))
        self.version += 1
        return key

    def _remember(self, cache: OrderedDict[bytes, None], digest: bytes) -> None:
        cache[digest] = None
        while len(cache) > self.replay_limit:
            cache.popitem(last=False)

    def drop_retired_before(self, cutoff: int) -> list[KemPreKey]:
        """Forget retired last-resort keys created before ``cutoff`` (and their replay sets)."""
        drop = [k for k in self._retired.values() if k.created_at < cutoff]
        for key in drop:
            del self._retired[key.key_id]
            self._seen.pop(key.key_id, None)
        if drop:
            self.version += 1
        return drop

    def __repr__(self) -> str:
        lr = self.last_resort.key_id if self.last_resort else None
        return f"KemPreKeyStore(one_time={len(self._one_time)}, last_resort={lr}, retired={len(self._retired)})"


# -- registry carrier --------------------------------------------------------------------


def prekey_upload_body(
    identity: Identity,
    spk: SignedPreKey,
    otks: Sequence[OneTimePreKey],
    kem_otks: Sequence[KemPreKey],
) -> dict[str, Any]:
    """The ``PUT /v1/agents/{did}/prekeys`` body with a signed one-time KEM pre-key inside
    each one-time pre-key entry (``"pq"``), paired in order.

    Both AGT registries store each entry verbatim and hand it out once, with its X25519
    one-time pre-key, so the pair is consumed together (``docs/pq.md`` §1).  The
    TypeScript SDK reads only ``key_id``/``public_key`` of an entry.

    Raises:
        MeshConfigError: if there are more KEM keys than entries or one is not one-time.
    """
    if len(kem_otks) > len(otks):
        raise MeshConfigError("each one-time KEM pre-key rides with one X25519 one-time pre-key")
    body = registry_codec.prekey_upload_body(identity, spk, otks)
    for entry, kem in zip(body["one_time_pre_keys"], kem_otks, strict=False):
        if kem.kind is not KemKeyKind.ONE_TIME:
            raise MeshConfigError("only one-time KEM pre-keys ride in one-time pre-key entries")
        entry[PQ_OTK_FIELD] = kem.signed(identity, spk.public).to_json()
    return body


def advert_metadata(identity: Identity, last_resort: KemPreKey) -> dict[str, str]:
    """Registration ``metadata`` entries advertising post-quantum support: the signed
    last-resort KEM pre-key as one compact JSON string (metadata values are strings)."""
    if last_resort.kind is not KemKeyKind.LAST_RESORT:
        raise MeshConfigError("the advertised KEM pre-key must be a last-resort key")
    return {PQ_METADATA_KEY: compact_json(last_resort.signed(identity).to_json())}


def parse_bundle_kem_prekey(body: Any) -> SignedKemPreKey | None:
    """The one-time KEM pre-key riding in a fetched bundle's ``one_time_pre_key``, if any.

    Raises:
        MeshRegistryError: if it is present but malformed.
    """
    if not isinstance(body, Mapping):
        raise MeshRegistryError("pre-key bundle is not a JSON object")
    otk = body.get("one_time_pre_key")
    if not isinstance(otk, Mapping) or otk.get(PQ_OTK_FIELD) is None:
        return None
    return SignedKemPreKey.from_json(otk[PQ_OTK_FIELD], KemKeyKind.ONE_TIME)


def parse_advert(metadata: Any) -> SignedKemPreKey | None:
    """The signed last-resort KEM pre-key advertised in a registry record's metadata.

    Raises:
        MeshRegistryError: if the entry is present but malformed or too long.
    """
    if not isinstance(metadata, Mapping):
        return None
    text = metadata.get(PQ_METADATA_KEY)
    if text is None:
        return None
    if not isinstance(text, str) or len(text) > PQ_RECORD_TEXT_MAX:
        raise MeshRegistryError(
            f"metadata {PQ_METADATA_KEY!r} must be a JSON string of at most {PQ_RECORD_TEXT_MAX} characters"
        )
    try:  # strict: a deep or NaN-laden entry (any agent writes its own metadata) is just refused
        obj = loads_strict(text, max_bytes=PQ_RECORD_TEXT_MAX, what=f"metadata {PQ_METADATA_KEY!r}")
    except MalformedJsonError:
        raise MeshRegistryError(f"metadata {PQ_METADATA_KEY!r} is not valid JSON") from None
    return SignedKemPreKey.from_json(obj, KemKeyKind.LAST_RESORT)


# -- KNOCK extension ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PQEstablishment:
    """What a hybrid KNOCK adds to the X3DH establishment: which KEM pre-key and which
    signed pre-key were used (PQXDH's key identifiers), and the KEM ciphertext."""

    kem_key_id: int
    signed_pre_key_id: int
    ciphertext: bytes = field(repr=False)
    suite: str = KEM_SUITE


def encode_pq_establishment(pq: PQEstablishment) -> dict[str, Any]:
    """``{"suite", "kem", "spk", "ct"}`` with the ciphertext in standard base64 (relay frames)."""
    return {"suite": pq.suite, "kem": pq.kem_key_id, "spk": pq.signed_pre_key_id, "ct": b64_encode(pq.ciphertext)}


def parse_pq_establishment(value: Any) -> PQEstablishment:
    """Parse the ``pq`` object of a KNOCK establishment; sizes are checked before decoding.

    Raises:
        MeshProtocolError: if it is malformed or names another suite.
    """
    if not isinstance(value, dict):
        raise MeshProtocolError("establishment pq must be an object")
    if value.get("suite") != KEM_SUITE:
        raise MeshProtocolError(f"establishment pq suite must be {KEM_SUITE!r}")
    ids = []
    for name in ("kem", "spk"):
        v = value.get(name)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= _U32_MAX:
            raise MeshProtocolError(f"establishment pq {name!r} must be an integer in 0..2^32-1")
        ids.append(v)
    ct = _decode(value.get("ct"), "ct", _CT_TEXT_MAX, KEM_CIPHERTEXT_LEN, url=False)
    return PQEstablishment(ids[0], ids[1], ct)


def knock_with_pq(frame: Mapping[str, Any], pq: PQEstablishment) -> dict[str, Any]:
    """A copy of a ``knock`` frame (from :func:`agt_mesh.core.frames.knock_frame`) whose
    establishment carries the hybrid extension."""
    est = frame.get("establishment")
    if not isinstance(est, Mapping):
        raise MeshConfigError("a hybrid KNOCK needs the X3DH establishment")
    return {**frame, "establishment": {**est, PQ_ESTABLISHMENT_FIELD: encode_pq_establishment(pq)}}


# -- the hybrid key agreement --------------------------------------------------------------


def hybrid_kdf(dh_concat: bytes, kem_shared_secret: bytes) -> bytes:
    """``HKDF-SHA256(salt=00*32, IKM=FF*32 || DH1||DH2||DH3[||DH4] || SS, PQXDH_INFO, 32)``."""
    if len(dh_concat) not in (96, 128):
        raise MeshConfigError("dh_concat is DH1||DH2||DH3[||DH4]: 96 or 128 bytes")
    if len(kem_shared_secret) != KEM_SHARED_SECRET_LEN:
        raise MeshConfigError(f"the {KEM_SUITE} shared secret is {KEM_SHARED_SECRET_LEN} bytes")
    return hkdf_sha256(_ZERO32, _FF32 + dh_concat + kem_shared_secret, PQXDH_INFO, KEY_LEN)


@dataclass(frozen=True, slots=True)
class HybridInitiation:
    """The initiator's result: the root key and what the KNOCK carries."""

    shared_secret: bytes = field(repr=False)
    establishment: Establishment
    pq: PQEstablishment
    associated_data: bytes
    remote_signed_pre_key: bytes
    kem_key_kind: KemKeyKind


@dataclass(frozen=True, slots=True)
class HybridResponse:
    """The responder's result: one root key (the KNOCK names every key it used)."""

    shared_secret: bytes = field(repr=False)
    signed_pre_key: SignedPreKey = field(repr=False)
    kem_key_id: int
    kem_key_kind: KemKeyKind


def _check_bundle_shape(bundle: PreKeyBundle) -> None:
    # the size checks of PreKeyBundle.verify(), without its signed pre-key signature check
    if not isinstance(bundle.identity_key_ed, bytes) or len(bundle.identity_key_ed) != KEY_LEN:
        raise BundleVerificationError("Missing or invalid Ed25519 identity key (identityKeyEd).")
    if len(bundle.signed_pre_key_signature) != 64:
        raise BundleVerificationError("Invalid signed pre-key signature length.")
    if len(bundle.signed_pre_key) != KEY_LEN:
        raise BundleVerificationError("Invalid signed pre-key length (expected 32 bytes).")
    if len(bundle.identity_key) != KEY_LEN:
        raise BundleVerificationError("Invalid identity key length (expected 32 bytes).")
    if bundle.one_time_pre_key is not None and len(bundle.one_time_pre_key) != KEY_LEN:
        raise BundleVerificationError("Invalid one-time pre-key length (expected 32 bytes).")


def initiate_hybrid(
    identity: Identity,
    bundle: PreKeyBundle,
    kem_prekey: SignedKemPreKey,
    random: RandomSource,
    *,
    encapsulate: KemEncapsulator = kem_encapsulate,
) -> HybridInitiation:
    """Run the initiator side of the hybrid key agreement.

    Verifies the KEM pre-key's signature (for a one-time key it also covers the signed
    pre-key; with a last-resort key the signed pre-key's own signature is checked too),
    then draws one 32-byte ephemeral key from ``random`` — as :func:`x3dh.initiate` does —
    computes DH1..DH3 [DH4], encapsulates to the KEM key and derives the root key.

    Raises:
        BundleVerificationError: a bad size or signature, an invalid KEM public key, or an
            all-zero DH output.
    """
    _check_bundle_shape(bundle)
    if kem_prekey.kind is KemKeyKind.LAST_RESORT:
        bundle.verify()
    kem_prekey.verify(bundle.identity_key_ed, bundle.signed_pre_key)
    ek_priv = random(KEY_LEN)
    ek_pub = x25519_public(ek_priv)
    try:
        dh = (
            x25519(identity.x25519_private, bundle.signed_pre_key)
            + x25519(ek_priv, bundle.identity_key)
            + x25519(ek_priv, bundle.signed_pre_key)
        )
        if bundle.one_time_pre_key is not None:
            dh += x25519(ek_priv, bundle.one_time_pre_key)
    except ValueError as exc:
        raise BundleVerificationError(f"invalid key in pre-key bundle: {exc}") from None
    shared, ciphertext = encapsulate(kem_prekey.public)
    if len(shared) != KEM_SHARED_SECRET_LEN or len(ciphertext) != KEM_CIPHERTEXT_LEN:
        raise BundleVerificationError(f"{KEM_SUITE} encapsulation returned the wrong sizes")
    otk_id = bundle.one_time_pre_key_id if bundle.one_time_pre_key is not None else None
    return HybridInitiation(
        shared_secret=hybrid_kdf(dh, shared),
        establishment=Establishment(identity.x25519_public, ek_pub, otk_id),
        pq=PQEstablishment(kem_prekey.key_id, bundle.signed_pre_key_id, ciphertext),
        associated_data=identity.x25519_public + bundle.identity_key,
        remote_signed_pre_key=bundle.signed_pre_key,
        kem_key_kind=kem_prekey.kind,
    )


def _find_signed_pre_key(prekeys: PreKeyStore, key_id: int) -> SignedPreKey:
    if prekeys.signed_pre_key is not None and prekeys.signed_pre_key.key_id == key_id:
        return prekeys.signed_pre_key
    for spk in reversed(prekeys.retired_signed_pre_keys):
        if spk.key_id == key_id:
            return spk
    raise PreKeyNotFoundError(f"Signed pre-key {key_id} not found (rotated out and dropped, or never ours).")


def respond_hybrid(
    prekeys: PreKeyStore,
    kem_prekeys: KemPreKeyStore,
    establishment: Establishment,
    pq: PQEstablishment,
) -> HybridResponse:
    """Run the responder side; consumes the X25519 one-time pre-key (if named) and the KEM
    one-time pre-key, or records the ciphertext against the last-resort key — only once
    every step succeeded, so a failed attempt consumes nothing.

    Unlike a classic KNOCK, a hybrid one names the signed pre-key, so there is exactly one
    candidate root key.

    Raises:
        PreKeyNotFoundError: an unknown or consumed one-time pre-key (X25519 or KEM), an
            unknown signed pre-key, or a ciphertext the last-resort key already accepted.
        BundleVerificationError: a malformed or low-order key in the establishment.
        MeshProtocolError: a ciphertext of the wrong size.
    """
    ik_a = establishment.initiator_identity_key
    ek = establishment.ephemeral_public_key
    if len(ik_a) != KEY_LEN or len(ek) != KEY_LEN:
        raise BundleVerificationError("establishment keys must be 32 bytes")
    if pq.suite != KEM_SUITE:
        raise MeshProtocolError(f"unsupported KEM suite {pq.suite!r}")
    spk = _find_signed_pre_key(prekeys, pq.signed_pre_key_id)
    kem = kem_prekeys.check_unused(pq.kem_key_id, pq.ciphertext)
    otk_id = establishment.one_time_pre_key_id
    otk = prekeys.peek_one_time_pre_key(otk_id) if otk_id is not None else None
    try:
        dh = (
            x25519(spk.private, ik_a)
            + x25519(prekeys.identity.x25519_private, ek)
            + x25519(spk.private, ek)
            + (x25519(otk.private, ek) if otk is not None else b"")
        )
    except ValueError as exc:
        raise BundleVerificationError(f"invalid key in establishment: {exc}") from None
    shared = hybrid_kdf(dh, kem.decapsulate(pq.ciphertext))
    if otk_id is not None:
        prekeys.take_one_time_pre_key(otk_id)
    kem_prekeys.consume(kem.key_id, pq.ciphertext)
    return HybridResponse(shared, spk, kem.key_id, kem.kind)


# -- no downgrade -----------------------------------------------------------------------------


def choose_kem_prekey(
    one_time: SignedKemPreKey | None,
    last_resort: SignedKemPreKey | None,
    *,
    pinned_pq: bool,
    peer: str = "the peer",
) -> SignedKemPreKey | None:
    """Which KEM pre-key to initiate with: the one-time key riding in the fetched bundle,
    else the advertised last-resort key, else none (a classic session).

    No fallback past a bad key: the chosen key's signature is checked by
    :func:`initiate_hybrid`, and a failure there is an error, never a reason to try the
    other key or to go classic.

    Raises:
        DowngradeError: ``pinned_pq`` (the peer was seen PQ-capable and pinned with its
            identity key) and the registry offered no KEM pre-key of ours.
    """
    chosen = one_time if one_time is not None else last_resort
    if chosen is None and pinned_pq:
        raise DowngradeError(
            f"{peer} is pinned as post-quantum capable, but the registry returned no {KEM_SUITE} "
            "pre-key for it (neither a one-time key in the bundle nor a last-resort key in its "
            "registration). Refusing a classic session: the registry may be stripping them. "
            "Reset trust in the peer only if you know it stopped supporting post-quantum sessions."
        )
    return chosen


def require_hybrid(*, pinned_pq: bool, hybrid: bool, peer: str = "the peer") -> None:
    """The responder's rule: a peer pinned as PQ-capable may only set up hybrid sessions.

    Raises:
        DowngradeError: ``pinned_pq`` and the KNOCK's establishment is classic.
    """
    if pinned_pq and not hybrid:
        raise DowngradeError(
            f"{peer} is pinned as post-quantum capable but sent a classic KNOCK; refused. "
            "Reset trust in the peer only if you know it stopped supporting post-quantum sessions."
        )
