"""X3DH key agreement (Signal X3DH with AgentMesh's constants).

Initiator A, responder B, ``DH(priv, pub)`` = X25519::

    DH1 = DH(IK_A, SPK_B)   DH2 = DH(EK_A, IK_B)   DH3 = DH(EK_A, SPK_B)   [DH4 = DH(EK_A, OPK_B)]

Two KDF profiles exist, and nothing on the wire says which one a peer uses:

* ``spec`` (default; Signal form, the AGT Python SDK and the TypeScript SDK after 4.0.0):
  ``SK = HKDF-SHA256(salt=00*32, IKM=FF*32 || DH1||DH2||DH3[||DH4], info="AgentMesh_X3DH_v1", 32)``
* ``legacy`` (npm ``@microsoft/agent-governance-sdk@4.0.0``):
  ``SK = HKDF-SHA256(salt=FF*32, IKM=DH1||DH2||DH3[||DH4], info="AgentMesh_X3DH_v1", 32)``

The X3DH associated data is ``IK_A || IK_B`` (X25519).  The channel AD used by the
ratchet prepends ``utf8(initiatorDID + "|" + responderDID)`` (see :func:`channel_ad`).
"""

from __future__ import annotations

import enum
import hmac
from dataclasses import dataclass, field

from agt_mesh.core.identity import Identity
from agt_mesh.core.primitives import (
    KEY_LEN,
    RandomSource,
    ed25519_verify,
    hkdf_sha256,
    x25519,
    x25519_public,
)
from agt_mesh.errors import BundleVerificationError, MeshConfigError, PreKeyNotFoundError

__all__ = [
    "X3DH_INFO",
    "Establishment",
    "KdfProfile",
    "OneTimePreKey",
    "PreKeyBundle",
    "PreKeyStore",
    "ResponderCandidate",
    "SignedPreKey",
    "X3DHInitiation",
    "channel_ad",
    "initiate",
    "respond",
    "x3dh_kdf",
]

X3DH_INFO = b"AgentMesh_X3DH_v1"
_ZERO32 = b"\x00" * 32
_FF32 = b"\xff" * 32


class KdfProfile(enum.StrEnum):
    """Which X3DH KDF derives the shared secret."""

    SPEC = "spec"
    LEGACY = "legacy"

    @classmethod
    def parse(cls, value: str | KdfProfile) -> KdfProfile:
        """Accept ``spec``/``legacy`` and the profile names ``current``/``ts-sdk-4``."""
        if isinstance(value, KdfProfile):
            return value
        aliases = {
            "spec": cls.SPEC,
            "current": cls.SPEC,
            "legacy": cls.LEGACY,
            "ts-sdk-4": cls.LEGACY,
        }
        try:
            return aliases[value]
        except (KeyError, TypeError):
            raise MeshConfigError(
                f"unknown X3DH KDF profile {value!r}; use 'spec' (alias 'current') or 'legacy' (alias 'ts-sdk-4')"
            ) from None


def x3dh_kdf(dh_concat: bytes, profile: KdfProfile = KdfProfile.SPEC) -> bytes:
    """Derive the 32-byte X3DH shared secret from ``DH1||DH2||DH3[||DH4]``."""
    if profile is KdfProfile.SPEC:
        return hkdf_sha256(_ZERO32, _FF32 + dh_concat, X3DH_INFO, KEY_LEN)
    if profile is KdfProfile.LEGACY:
        return hkdf_sha256(_FF32, dh_concat, X3DH_INFO, KEY_LEN)
    raise MeshConfigError(f"unknown X3DH KDF profile {profile!r}")


def channel_ad(initiator_did: str, responder_did: str, ik_initiator: bytes, ik_responder: bytes) -> bytes:
    """The channel associated data: ``utf8(initiatorDID|responderDID) || IK_A || IK_B``."""
    return f"{initiator_did}|{responder_did}".encode() + ik_initiator + ik_responder


@dataclass(frozen=True, slots=True)
class SignedPreKey:
    """A signed pre-key: an X25519 pair plus the Ed25519 signature over its public key."""

    key_id: int
    private: bytes = field(repr=False)
    public: bytes
    signature: bytes
    created_at: float | None = None

    @classmethod
    def create(
        cls, identity: Identity, key_id: int, private: bytes, *, created_at: float | None = None
    ) -> SignedPreKey:
        """Build and sign the pre-key with 32 private bytes."""
        public = x25519_public(private)
        return cls(key_id, private, public, identity.sign(public), created_at)


@dataclass(frozen=True, slots=True)
class OneTimePreKey:
    """A one-time pre-key (X25519 pair), consumed by the first establishment naming it."""

    key_id: int
    private: bytes = field(repr=False)
    public: bytes


@dataclass(frozen=True, slots=True)
class PreKeyBundle:
    """A peer's public pre-key bundle, as fetched from the registry."""

    identity_key: bytes
    identity_key_ed: bytes
    signed_pre_key: bytes
    signed_pre_key_signature: bytes
    signed_pre_key_id: int
    one_time_pre_key: bytes | None = None
    one_time_pre_key_id: int | None = None

    def verify(self) -> None:
        """Check sizes and the signed pre-key signature, in the TypeScript SDK's order.

        Raises:
            BundleVerificationError: with a message naming the failed check.
        """
        if not isinstance(self.identity_key_ed, bytes) or len(self.identity_key_ed) != KEY_LEN:
            raise BundleVerificationError(
                "Missing or invalid Ed25519 identity key (identityKeyEd). Required for signed "
                "pre-key signature verification."
            )
        if len(self.signed_pre_key_signature) != 64:
            raise BundleVerificationError("Invalid signed pre-key signature length.")
        if len(self.signed_pre_key) != KEY_LEN:
            raise BundleVerificationError("Invalid signed pre-key length (expected 32 bytes).")
        if len(self.identity_key) != KEY_LEN:
            raise BundleVerificationError("Invalid identity key length (expected 32 bytes).")
        if self.one_time_pre_key is not None and len(self.one_time_pre_key) != KEY_LEN:
            raise BundleVerificationError("Invalid one-time pre-key length (expected 32 bytes).")
        if not ed25519_verify(self.identity_key_ed, self.signed_pre_key_signature, self.signed_pre_key):
            raise BundleVerificationError(
                "Signed pre-key signature verification FAILED. The bundle may have been "
                "tampered with; do not establish a session with it."
            )


@dataclass(frozen=True, slots=True)
class Establishment:
    """What the responder needs to complete X3DH (carried in the KNOCK frame)."""

    initiator_identity_key: bytes
    ephemeral_public_key: bytes
    one_time_pre_key_id: int | None = None


@dataclass(frozen=True, slots=True)
class X3DHInitiation:
    """The initiator's result: the shared secret and what to send to the responder."""

    shared_secret: bytes = field(repr=False)
    establishment: Establishment
    associated_data: bytes
    remote_signed_pre_key: bytes


@dataclass(frozen=True, slots=True)
class ResponderCandidate:
    """One candidate shared secret on the responder side.

    The establishment names neither the signed pre-key nor the KDF, so a responder may
    hold several candidates; the first message's AEAD tag decides which is right.
    """

    profile: KdfProfile
    shared_secret: bytes = field(repr=False)
    signed_pre_key: SignedPreKey = field(repr=False)


class PreKeyStore:
    """Our pre-key material: the signed pre-key (with retired ones) and one-time pre-keys.

    Key ids count up from 0, like the TypeScript SDK's.  When the signed pre-key is
    rotated the old one is kept in :attr:`retired_signed_pre_keys` so establishments made
    from an older bundle still complete (the establishment carries no SPK id).
    """

    __slots__ = (
        "_otks",
        "identity",
        "next_otk_id",
        "next_spk_id",
        "retired_signed_pre_keys",
        "signed_pre_key",
        "version",
    )

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.signed_pre_key: SignedPreKey | None = None
        self.retired_signed_pre_keys: list[SignedPreKey] = []
        self._otks: dict[int, OneTimePreKey] = {}
        self.next_spk_id = 0
        self.next_otk_id = 0
        #: incremented on every change (lets a store know when to write)
        self.version = 0

    def generate_signed_pre_key(self, random: RandomSource, *, created_at: float | None = None) -> SignedPreKey:
        """Make, sign and install a new signed pre-key; the previous one is retired."""
        spk = SignedPreKey.create(self.identity, self.next_spk_id, random(KEY_LEN), created_at=created_at)
        self.next_spk_id += 1
        self.version += 1
        if self.signed_pre_key is not None:
            self.retired_signed_pre_keys.append(self.signed_pre_key)
        self.signed_pre_key = spk
        return spk

    def generate_one_time_pre_keys(self, count: int, random: RandomSource) -> list[OneTimePreKey]:
        """Make ``count`` new one-time pre-keys with fresh ids."""
        if count < 0:
            raise MeshConfigError("count must be >= 0")
        out = []
        for _ in range(count):
            priv = random(KEY_LEN)
            otk = OneTimePreKey(self.next_otk_id, priv, x25519_public(priv))
            self.next_otk_id += 1
            self._otks[otk.key_id] = otk
            out.append(otk)
        self.version += 1
        return out

    def add_signed_pre_key(self, spk: SignedPreKey, *, current: bool = True) -> None:
        """Install an existing signed pre-key (restoring state)."""
        if current:
            if self.signed_pre_key is not None:
                self.retired_signed_pre_keys.append(self.signed_pre_key)
            self.signed_pre_key = spk
        else:
            self.retired_signed_pre_keys.append(spk)
        self.next_spk_id = max(self.next_spk_id, spk.key_id + 1)
        self.version += 1

    def add_one_time_pre_key(self, otk: OneTimePreKey) -> None:
        """Install an existing one-time pre-key (restoring state)."""
        self._otks[otk.key_id] = otk
        self.next_otk_id = max(self.next_otk_id, otk.key_id + 1)
        self.version += 1

    def drop_retired_before(self, cutoff: float) -> list[SignedPreKey]:
        """Forget retired signed pre-keys created before ``cutoff``; returns what was dropped."""
        keep: list[SignedPreKey] = []
        drop: list[SignedPreKey] = []
        for spk in self.retired_signed_pre_keys:
            (drop if spk.created_at is not None and spk.created_at < cutoff else keep).append(spk)
        if drop:
            self.retired_signed_pre_keys = keep
            self.version += 1
        return drop

    @property
    def one_time_pre_keys(self) -> list[OneTimePreKey]:
        """The unused one-time pre-keys, oldest first."""
        return list(self._otks.values())

    def has_one_time_pre_key(self, key_id: int) -> bool:
        return key_id in self._otks

    def peek_one_time_pre_key(self, key_id: int) -> OneTimePreKey:
        """A one-time pre-key, without consuming it.

        Raises:
            PreKeyNotFoundError: if it is unknown or was already consumed.
        """
        otk = self._otks.get(key_id)
        if otk is None:
            raise PreKeyNotFoundError(f"One-time pre-key {key_id} not found or already consumed.")
        return otk

    def take_one_time_pre_key(self, key_id: int) -> OneTimePreKey:
        """Remove and return a one-time pre-key.

        Raises:
            PreKeyNotFoundError: if it is unknown or was already consumed.
        """
        try:
            otk = self._otks.pop(key_id)
        except KeyError:
            raise PreKeyNotFoundError(f"One-time pre-key {key_id} not found or already consumed.") from None
        self.version += 1
        return otk

    def public_bundle(self, otk_id: int | None = None) -> PreKeyBundle:
        """Our public bundle, optionally with one of our one-time pre-keys."""
        spk = self.signed_pre_key
        if spk is None:
            raise MeshConfigError("No signed pre-key: call generate_signed_pre_key() first")
        otk = self._otks.get(otk_id) if otk_id is not None else None
        if otk_id is not None and otk is None:
            raise PreKeyNotFoundError(f"One-time pre-key {otk_id} not found or already consumed.")
        return PreKeyBundle(
            identity_key=self.identity.x25519_public,
            identity_key_ed=self.identity.ed25519_public,
            signed_pre_key=spk.public,
            signed_pre_key_signature=spk.signature,
            signed_pre_key_id=spk.key_id,
            one_time_pre_key=otk.public if otk else None,
            one_time_pre_key_id=otk.key_id if otk else None,
        )

    def __repr__(self) -> str:
        spk = self.signed_pre_key.key_id if self.signed_pre_key else None
        return f"PreKeyStore(did={self.identity.did!r}, spk={spk}, otks={len(self._otks)})"


def initiate(
    identity: Identity,
    bundle: PreKeyBundle,
    random: RandomSource,
    *,
    profile: KdfProfile = KdfProfile.SPEC,
) -> X3DHInitiation:
    """Run the initiator side of X3DH against a verified bundle.

    Draws one 32-byte ephemeral private key from ``random``.

    Raises:
        BundleVerificationError: if the bundle fails :meth:`PreKeyBundle.verify` or a DH
            output is all zeros.
    """
    bundle.verify()
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
    otk_id = bundle.one_time_pre_key_id if bundle.one_time_pre_key is not None else None
    return X3DHInitiation(
        shared_secret=x3dh_kdf(dh, profile),
        establishment=Establishment(identity.x25519_public, ek_pub, otk_id),
        associated_data=identity.x25519_public + bundle.identity_key,
        remote_signed_pre_key=bundle.signed_pre_key,
    )


def respond(
    prekeys: PreKeyStore,
    establishment: Establishment,
    *,
    profiles: tuple[KdfProfile, ...] = (KdfProfile.SPEC,),
    try_retired: bool = True,
) -> list[ResponderCandidate]:
    """Run the responder side of X3DH; consumes the named one-time pre-key.

    Returns one candidate per (signed pre-key, profile), current signed pre-key first
    and ``profiles`` in the given order.  With one profile and no retired keys that is a
    single, certain result.

    Raises:
        PreKeyNotFoundError: if the named one-time pre-key is unknown or already used.
        MeshCryptoError: (``BundleVerificationError``) if a key in the establishment is
            malformed or low-order.
        MeshConfigError: if we have no signed pre-key.
    """
    ik_a = establishment.initiator_identity_key
    ek = establishment.ephemeral_public_key
    if len(ik_a) != KEY_LEN or len(ek) != KEY_LEN:
        raise BundleVerificationError("establishment keys must be 32 bytes")
    if prekeys.signed_pre_key is None:
        raise MeshConfigError("No signed pre-key: cannot respond to an establishment")
    spks = [prekeys.signed_pre_key]
    if try_retired:
        spks.extend(reversed(prekeys.retired_signed_pre_keys))
    otk_id = establishment.one_time_pre_key_id
    otk = prekeys.peek_one_time_pre_key(otk_id) if otk_id is not None else None
    ik_b_priv = prekeys.identity.x25519_private
    out: list[ResponderCandidate] = []
    try:
        dh2 = x25519(ik_b_priv, ek)
        dh4 = x25519(otk.private, ek) if otk is not None else b""
        for spk in spks:
            dh = x25519(spk.private, ik_a) + dh2 + x25519(spk.private, ek) + dh4
            out.extend(ResponderCandidate(p, x3dh_kdf(dh, p), spk) for p in profiles)
    except ValueError as exc:
        raise BundleVerificationError(f"invalid key in establishment: {exc}") from None
    if otk_id is not None:
        prekeys.take_one_time_pre_key(otk_id)  # consumed only once everything succeeded
    return out


def same_key(a: bytes, b: bytes) -> bool:
    """Constant-time equality of two keys."""
    return hmac.compare_digest(a, b)
