"""Shared test helpers: a deterministic random source and ready-made sessions.

Nothing here touches global random state: every random byte a test uses comes from a
:class:`Drbg` seeded by a label, so failures reproduce exactly.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from agt_mesh.core.identity import Identity
from agt_mesh.core.ratchet import DoubleRatchet
from agt_mesh.core.x3dh import (
    KdfProfile,
    PreKeyStore,
    channel_ad,
    initiate,
    respond,
)

#: The low-order points of Curve25519 (Montgomery u-coordinates, little endian).  X25519
#: with any of them gives an all-zero shared secret.
LOW_ORDER_POINTS: tuple[bytes, ...] = (
    bytes(32),
    b"\x01" + bytes(31),
    bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
    bytes.fromhex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
    b"\xec" + b"\xff" * 30 + b"\x7f",
    b"\xed" + b"\xff" * 30 + b"\x7f",
    b"\xee" + b"\xff" * 30 + b"\x7f",
)


class Drbg:
    """A deterministic byte stream: SHA256(label || u32be(0)) || SHA256(label || u32be(1)) || ...

    Calling it with ``n`` returns the next ``n`` bytes (the ``RandomSource`` signature).
    ``draws`` counts the calls, ``position`` the bytes handed out so far.
    """

    def __init__(self, label: str | bytes) -> None:
        self._label = label.encode() if isinstance(label, str) else label
        self._counter = 0
        self._buffer = b""
        self.draws = 0
        self.position = 0

    def __call__(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._buffer += hashlib.sha256(self._label + struct.pack(">I", self._counter)).digest()
            self._counter += 1
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        self.draws += 1
        self.position += n
        return out


def identity(label: str) -> Identity:
    """A fixed identity derived from ``label``."""
    return Identity.from_seed(hashlib.sha256(f"agt-mesh-tests/{label}".encode()).digest())


@dataclass
class Pair:
    """A connected session: Alice initiated, Bob responded."""

    alice: DoubleRatchet
    bob: DoubleRatchet
    alice_id: Identity
    bob_id: Identity
    shared_secret: bytes
    ad: bytes
    bob_spk_private: bytes
    bob_spk_public: bytes


def make_pair(
    rng: Drbg,
    *,
    use_otk: bool = True,
    profile: KdfProfile = KdfProfile.SPEC,
    alice_label: str = "alice",
    bob_label: str = "bob",
) -> Pair:
    """Run X3DH between two fixed identities and build both ratchets."""
    alice_id, bob_id = identity(alice_label), identity(bob_label)
    store = PreKeyStore(bob_id)
    store.generate_signed_pre_key(rng)
    otks = store.generate_one_time_pre_keys(2, rng)
    bundle = store.public_bundle(otks[0].key_id if use_otk else None)
    init = initiate(alice_id, bundle, rng, profile=profile)
    ad = channel_ad(alice_id.did, bob_id.did, alice_id.x25519_public, bob_id.x25519_public)
    (cand,) = respond(store, init.establishment, profiles=(profile,))
    assert cand.shared_secret == init.shared_secret
    alice = DoubleRatchet.init_sender(init.shared_secret, bundle.signed_pre_key, ad, rng)
    bob = DoubleRatchet.init_receiver(cand.shared_secret, cand.signed_pre_key.private, cand.signed_pre_key.public, ad)
    return Pair(
        alice,
        bob,
        alice_id,
        bob_id,
        init.shared_secret,
        ad,
        cand.signed_pre_key.private,
        cand.signed_pre_key.public,
    )


def flip(data: bytes, index: int, mask: int = 0x01) -> bytes:
    """``data`` with byte ``index`` XOR-ed with ``mask`` (non-zero)."""
    assert mask & 0xFF
    out = bytearray(data)
    out[index] ^= mask
    return bytes(out)
