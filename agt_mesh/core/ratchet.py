"""The Double Ratchet, byte-compatible with the TypeScript SDK — and transactional.

Wire constants (identical to ``@microsoft/agent-governance-sdk``)::

    KDF_RK(rk, dh)  = HKDF-SHA256(salt=rk, IKM=dh, info="AgentMesh_Ratchet_v1", 64) -> (rk', ck)
    KDF_CK(ck)      = (HMAC(ck, 0x01), HMAC(ck, 0x02))                            -> (mk, ck')
    header          = DHs_pub (32) || u32be(PN) || u32be(N)                       (40 bytes)
    blob            = nonce (12, random) || ChaCha20-Poly1305(mk, nonce, pt, AD || header)

Skipped message keys: at most :data:`MAX_SKIP` (100) per chain step and
:data:`MAX_SKIPPED_KEYS` (2000) in total, oldest evicted first.

The saved state is a named, versioned map (:data:`RATCHET_FORMAT`, see
:mod:`agt_mesh.core.state_format`); every earlier version still loads.

**Decryption is transactional.**  The TypeScript SDK advances its state before the tag
check and never rolls back, so one duplicate or forged frame corrupts the session.  Here
every decrypt works on local copies and commits only after the AEAD tag verified: any
failure raises a :class:`~agt_mesh.errors.DecryptError` subclass and leaves the state
exactly as it was.  Random draws happen in the same order as in the TypeScript SDK (the
new ratchet key is drawn before the tag check), so recorded TS randomness replays
exactly; the wire bytes are identical.
"""

from __future__ import annotations

import hmac
import struct
from typing import Any

from agt_mesh.core import state_format as sf
from agt_mesh.core.primitives import (
    AEAD_NONCE_LEN,
    AEAD_TAG_LEN,
    KEY_LEN,
    RandomSource,
    aead_decrypt,
    aead_encrypt,
    hkdf_sha256,
    kdf_chain,
    x25519,
    x25519_public,
)
from agt_mesh.errors import (
    DuplicateMessageError,
    MalformedMessageError,
    MeshProtocolError,
    MeshStateError,
    MessageAuthError,
    TooManySkippedError,
)

__all__ = [
    "HEADER_LEN",
    "MAX_SKIP",
    "MAX_SKIPPED_KEYS",
    "RATCHET_FORMAT",
    "RATCHET_INFO",
    "STATE_VERSION",
    "DoubleRatchet",
    "kdf_root",
    "pack_header",
    "unpack_header",
]

RATCHET_INFO = b"AgentMesh_Ratchet_v1"
MAX_SKIP = 100
MAX_SKIPPED_KEYS = 2000
HEADER_LEN = 40
MIN_BLOB_LEN = AEAD_NONCE_LEN + AEAD_TAG_LEN
#: earlier remote ratchet keys remembered to recognise replays from old chains
MAX_OLD_CHAINS = 8
_U32_MAX = 0xFFFFFFFF

_pack_counters = struct.Struct(">II").pack
_unpack_counters = struct.Struct(">II").unpack_from
_compare = hmac.compare_digest

SkippedKeys = dict[tuple[bytes, int], bytes]


def kdf_root(root_key: bytes, dh_out: bytes) -> tuple[bytes, bytes]:
    """KDF_RK: ``(new_root_key, chain_key)``."""
    out = hkdf_sha256(root_key, dh_out, RATCHET_INFO, 64)
    return out[:32], out[32:]


def pack_header(dh: bytes, pn: int, n: int) -> bytes:
    """Serialise a ratchet header (40 bytes).

    Raises:
        MalformedMessageError: if ``dh`` is not 32 bytes or a counter is not a u32.
    """
    if len(dh) != KEY_LEN:
        raise MalformedMessageError("ratchet header dh must be 32 bytes")
    if not (0 <= pn <= _U32_MAX and 0 <= n <= _U32_MAX):
        raise MalformedMessageError("ratchet header counters must be 32-bit unsigned integers")
    return dh + _pack_counters(pn, n)


def unpack_header(header: bytes) -> tuple[bytes, int, int]:
    """Parse a 40-byte header into ``(dh, pn, n)``."""
    if len(header) != HEADER_LEN:
        raise MalformedMessageError(f"ratchet header must be {HEADER_LEN} bytes, got {len(header)}")
    pn, n = _unpack_counters(header, 32)
    return header[:32], pn, n


class DoubleRatchet:
    """One endpoint of a Double Ratchet session, bound to its channel associated data.

    Create with :meth:`init_sender` (initiator) or :meth:`init_receiver` (responder);
    restore with :meth:`from_bytes`.  Not thread-safe: use one task per session.
    """

    __slots__ = (
        "ad",
        "ckr",
        "cks",
        "dhr",
        "dhs_priv",
        "dhs_pub",
        "max_skip",
        "nr",
        "ns",
        "old_dhrs",
        "pn",
        "rk",
        "skipped",
    )

    def __init__(
        self,
        *,
        dhs_priv: bytes,
        dhs_pub: bytes,
        dhr: bytes | None,
        rk: bytes,
        cks: bytes | None,
        ckr: bytes | None,
        ns: int,
        nr: int,
        pn: int,
        ad: bytes,
        skipped: SkippedKeys | None = None,
        max_skip: int = MAX_SKIP,
        old_dhrs: tuple[bytes, ...] = (),
    ) -> None:
        self.dhs_priv = dhs_priv
        self.dhs_pub = dhs_pub
        self.dhr = dhr
        self.rk = rk
        self.cks = cks
        self.ckr = ckr
        self.ns = ns
        self.nr = nr
        self.pn = pn
        self.ad = ad
        self.skipped: SkippedKeys | None = skipped or None
        self.max_skip = max_skip
        #: the last few remote ratchet keys we moved on from: a message on one of those
        #: chains whose key is not cached is a replay, refused without any DH work
        self.old_dhrs = old_dhrs

    # -- construction ---------------------------------------------------------------

    @classmethod
    def init_sender(
        cls,
        shared_secret: bytes,
        remote_public: bytes,
        associated_data: bytes,
        random: RandomSource,
        *,
        max_skip: int = MAX_SKIP,
    ) -> DoubleRatchet:
        """Initiator side: draws the first ratchet key (32 bytes) and derives the send chain.

        ``remote_public`` is the responder's signed pre-key.
        """
        priv = random(KEY_LEN)
        rk, cks = kdf_root(shared_secret, x25519(priv, remote_public))
        return cls(
            dhs_priv=priv,
            dhs_pub=x25519_public(priv),
            dhr=remote_public,
            rk=rk,
            cks=cks,
            ckr=None,
            ns=0,
            nr=0,
            pn=0,
            ad=associated_data,
            max_skip=max_skip,
        )

    @classmethod
    def init_receiver(
        cls,
        shared_secret: bytes,
        own_private: bytes,
        own_public: bytes,
        associated_data: bytes,
        *,
        max_skip: int = MAX_SKIP,
    ) -> DoubleRatchet:
        """Responder side, keyed by our signed pre-key pair; it can send after its first receive."""
        return cls(
            dhs_priv=own_private,
            dhs_pub=own_public,
            dhr=None,
            rk=shared_secret,
            cks=None,
            ckr=None,
            ns=0,
            nr=0,
            pn=0,
            ad=associated_data,
            max_skip=max_skip,
        )

    @property
    def can_send(self) -> bool:
        """Whether a sending chain exists (the responder needs one message first)."""
        return self.cks is not None

    @property
    def skipped_count(self) -> int:
        """Number of cached skipped message keys."""
        return len(self.skipped) if self.skipped else 0

    # -- encrypt ------------------------------------------------------------------------

    def encrypt(self, plaintext: bytes, random: RandomSource) -> tuple[bytes, bytes]:
        """Encrypt one message; returns ``(header, blob)`` (40-byte header, nonce||ct||tag).

        Draws one 12-byte nonce from ``random``.

        Raises:
            MeshProtocolError: if there is no sending chain yet (responder before its
                first received message).
        """
        cks = self.cks
        if cks is None:
            raise MeshProtocolError("Send chain not initialized. Receive a message first.")
        n = self.ns
        if n > _U32_MAX or self.pn > _U32_MAX:
            raise MeshProtocolError("send chain exhausted (2^32 messages): start a new session")
        mk, next_ck = kdf_chain(cks)
        header = self.dhs_pub + _pack_counters(self.pn, n)
        nonce = random(AEAD_NONCE_LEN)
        blob = nonce + aead_encrypt(mk, nonce, plaintext, self.ad + header)
        self.cks = next_ck
        self.ns = n + 1
        return header, blob

    # -- decrypt ------------------------------------------------------------------------

    def decrypt(self, header: bytes, blob: bytes, random: RandomSource) -> bytes:
        """Decrypt one message; commits the new state only if it authenticates.

        ``random`` is used only for a DH ratchet step (one 32-byte draw).

        Raises:
            MalformedMessageError: header not 40 bytes, blob shorter than 28 bytes, or a
                low-order ratchet key.
            DuplicateMessageError: the message key was already used.
            TooManySkippedError: the message is more than ``max_skip`` ahead.
            MessageAuthError: the AEAD tag did not verify.
        """
        if len(header) != HEADER_LEN:
            raise MalformedMessageError(f"ratchet header must be {HEADER_LEN} bytes, got {len(header)}")
        if len(blob) < MIN_BLOB_LEN:
            raise MalformedMessageError(f"ciphertext too short ({len(blob)} < {MIN_BLOB_LEN} bytes)")
        dh = header[:32]
        pn, n = _unpack_counters(header, 32)
        aad = self.ad + header
        nonce = blob[:AEAD_NONCE_LEN]
        body = blob[AEAD_NONCE_LEN:]

        skipped = self.skipped
        if skipped:
            mk = skipped.get((dh, n))
            if mk is not None:
                plaintext = aead_decrypt(mk, nonce, body, aad)
                del skipped[(dh, n)]
                return plaintext

        max_skip = self.max_skip
        dhr = self.dhr
        if dhr is not None and _compare(dh, dhr):
            ck = self.ckr
            if ck is None:
                # An initiator that has not heard back yet knows the peer's signed pre-key
                # (public: the registry hands it out) as dhr, but has no receiving chain.
                # No honest message carries that key: the responder draws a new one first.
                raise MessageAuthError("message on a receiving chain that does not exist yet")
            nr = self.nr
            if n < nr:
                raise DuplicateMessageError(f"message {n} of the current chain was already received")
            if n - nr > max_skip:
                raise TooManySkippedError(f"Too many skipped messages ({n - nr} > {max_skip})")
            staged: list[tuple[tuple[bytes, int], bytes]] | None = None
            if n > nr:
                staged = []
                for i in range(nr, n):
                    mk_i, ck = kdf_chain(ck)
                    staged.append(((dh, i), mk_i))
            mk, ck = kdf_chain(ck)
            plaintext = aead_decrypt(mk, nonce, body, aad)
            self.ckr = ck
            self.nr = n + 1
            if staged:
                self._store_skipped(staged)
            return plaintext

        if self.old_dhrs and any(_compare(dh, old) for old in self.old_dhrs):
            raise DuplicateMessageError("message of an earlier receiving chain was already received (or expired)")
        # New remote ratchet key: finish the current receiving chain, then a DH step.
        staged = []
        ckr = self.ckr
        if ckr is not None and dhr is not None:
            nr = self.nr
            if pn - nr > max_skip:
                raise TooManySkippedError(f"Too many skipped messages ({pn - nr} > {max_skip})")
            for i in range(nr, pn):
                mk_i, ckr = kdf_chain(ckr)
                staged.append(((dhr, i), mk_i))
        try:
            rk, ck = kdf_root(self.rk, x25519(self.dhs_priv, dh))
            new_priv = random(KEY_LEN)
            new_pub = x25519_public(new_priv)
            rk, cks = kdf_root(rk, x25519(new_priv, dh))
        except ValueError:
            raise MalformedMessageError("invalid ratchet public key in header") from None
        if n > max_skip:
            raise TooManySkippedError(f"Too many skipped messages ({n} > {max_skip})")
        for i in range(n):
            mk_i, ck = kdf_chain(ck)
            staged.append(((dh, i), mk_i))
        mk, ck = kdf_chain(ck)
        plaintext = aead_decrypt(mk, nonce, body, aad)
        # commit
        self.pn = self.ns
        self.ns = 0
        self.nr = n + 1
        if dhr is not None:
            self.old_dhrs = (*self.old_dhrs, dhr)[-MAX_OLD_CHAINS:]
        self.dhr = dh
        self.rk = rk
        self.ckr = ck
        self.cks = cks
        self.dhs_priv = new_priv
        self.dhs_pub = new_pub
        if staged:
            self._store_skipped(staged)
        return plaintext

    def _store_skipped(self, staged: list[tuple[tuple[bytes, int], bytes]]) -> None:
        skipped = self.skipped
        if skipped is None:
            skipped = self.skipped = {}
        skipped.update(staged)
        excess = len(skipped) - MAX_SKIPPED_KEYS
        if excess > 0:
            for key in list(skipped)[:excess]:
                del skipped[key]

    # -- serialisation ------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """The full state as a named map of the current version (see :data:`RATCHET_FORMAT`).

        It contains secret keys: store it only where the identity is stored.
        """
        return RATCHET_FORMAT.dump(self)

    @classmethod
    def from_state(cls, state: Any) -> DoubleRatchet:
        """Restore a state returned by :meth:`to_state` (of this or any earlier version, as
        unpacked from msgpack).

        Raises:
            MeshStateError: if it is not a valid state of a known version.
        """
        return cls(**RATCHET_FORMAT.load(state))

    def to_bytes(self) -> bytes:
        """Serialise the full state (a msgpack map; the format is documented in the README).

        The result contains secret keys: store it only where the identity is stored.
        """
        return RATCHET_FORMAT.pack(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> DoubleRatchet:
        """Restore a state written by :meth:`to_bytes` (this or any earlier version).

        Raises:
            MeshStateError: if the data is not a valid state of a known version.
        """
        return cls(**RATCHET_FORMAT.unpack_and_load(data))

    def copy(self) -> DoubleRatchet:
        """An independent copy of this state."""
        return DoubleRatchet(
            dhs_priv=self.dhs_priv,
            dhs_pub=self.dhs_pub,
            dhr=self.dhr,
            rk=self.rk,
            cks=self.cks,
            ckr=self.ckr,
            ns=self.ns,
            nr=self.nr,
            pn=self.pn,
            ad=self.ad,
            skipped=dict(self.skipped) if self.skipped else None,
            max_skip=self.max_skip,
            old_dhrs=self.old_dhrs,
        )

    def summary(self) -> dict[str, Any]:
        """Counters only (no key material), for diagnostics."""
        return {
            "send_n": self.ns,
            "recv_n": self.nr,
            "previous_send_chain_length": self.pn,
            "can_send": self.cks is not None,
            "has_receive_chain": self.ckr is not None,
            "skipped_keys": self.skipped_count,
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DoubleRatchet):
            return NotImplemented
        return _compare(self.to_bytes(), other.to_bytes())

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"DoubleRatchet(send_n={self.ns}, recv_n={self.nr}, pn={self.pn}, skipped={self.skipped_count})"

    def __reduce__(self) -> Any:
        raise TypeError("DoubleRatchet is not picklable; use to_bytes()")


# -- saved state ------------------------------------------------------------------------
#
# Version 2 (current) is a map: the keys below, plus "v".  Version 1 was the positional
# array [1, dhs_priv, dhs_pub, dhr, rk, cks, ckr, ns, nr, pn, max_skip, ad,
# [["<hex dh>:<n>", mk], ...], old_dhrs]; it is migrated on load.

#: The version :meth:`DoubleRatchet.to_bytes` writes.
STATE_VERSION = 2


_key = sf.binary(KEY_LEN)
_opt_key = sf.optional(_key)
#: 2^32 itself is a valid resting value: the chain is exhausted and encrypt refuses
_counter = sf.count(_U32_MAX + 1)


def _load_skipped(value: Any) -> SkippedKeys:
    if type(value) is not list or len(value) > MAX_SKIPPED_KEYS:
        raise ValueError("skipped keys")
    skipped: SkippedKeys = {}
    for dh, n, mk in value:
        if type(dh) is not bytes or len(dh) != KEY_LEN or type(mk) is not bytes or len(mk) != KEY_LEN:
            raise ValueError("skipped key")
        if type(n) is not int or not 0 <= n <= _U32_MAX:
            raise ValueError("skipped key number")
        skipped[(dh, n)] = mk
    return skipped


def _dump_skipped(skipped: SkippedKeys | None) -> list[list[Any]]:
    return [[dh, n, mk] for (dh, n), mk in skipped.items()] if skipped else []


def _load_old_dhrs(value: Any) -> tuple[bytes, ...]:
    if type(value) is not list or len(value) > MAX_OLD_CHAINS:
        raise ValueError("old ratchet keys")
    return tuple(_key(k) for k in value)


def _v1_skipped_entry(item: Any) -> list[Any]:
    """``["<hex dh>:<n>", mk]`` (version 1) -> ``[dh, n, mk]``."""
    key_id, mk = item
    dh_hex, n_text = key_id.split(":")
    if not (n_text.isascii() and n_text.isdigit()):
        raise ValueError("skipped key number")
    return [bytes.fromhex(dh_hex), int(n_text), mk]


_V1_SLOTS = ("v", "sk", "pk", "dhr", "rk", "cks", "ckr", "ns", "nr", "pn", "mx", "ad", "skip", "old")


def _v1_to_v2(state: Any) -> dict[str, Any]:
    """Version 1 (positional array) -> version 2 (map); skipped-key ids become ``[dh, n, mk]``."""
    if type(state) is not list or len(state) != len(_V1_SLOTS):
        raise MeshStateError(f"ratchet state version 1 has the wrong layout (not an array of {len(_V1_SLOTS)})")
    out = dict(zip(_V1_SLOTS, state, strict=True))
    out["v"] = 2
    if type(out["skip"]) is not list:
        raise ValueError("skipped keys")
    out["skip"] = [_v1_skipped_entry(item) for item in out["skip"]]
    return out


#: The ratchet state format: one line per field (key, attribute, check, conversion back).
RATCHET_FORMAT = sf.StateFormat(
    "ratchet state",
    STATE_VERSION,
    [
        sf.Field("sk", "dhs_priv", _key),  # our current ratchet private key
        sf.Field("pk", "dhs_pub", _key),  # ... and its public key
        sf.Field("dhr", "dhr", _opt_key, default=None),  # the peer's current ratchet public key
        sf.Field("rk", "rk", _key),  # root key
        sf.Field("cks", "cks", _opt_key, default=None),  # sending chain key
        sf.Field("ckr", "ckr", _opt_key, default=None),  # receiving chain key
        sf.Field("ns", "ns", _counter, default=0),  # messages sent on the sending chain
        sf.Field("nr", "nr", _counter, default=0),  # messages received on the receiving chain
        sf.Field("pn", "pn", _counter, default=0),  # length of the previous sending chain
        sf.Field("mx", "max_skip", _counter, default=MAX_SKIP),  # skipped-key limit per chain step
        sf.Field("ad", "ad", sf.binary()),  # channel associated data
        sf.Field("skip", "skipped", _load_skipped, _dump_skipped, default=[]),  # [[dh, n, mk], ...], oldest first
        sf.Field("old", "old_dhrs", _load_old_dhrs, list, default=[]),  # earlier remote ratchet keys, oldest first
    ],
    {1: _v1_to_v2},
)
