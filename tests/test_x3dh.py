"""X3DH: KDF known answers, agreement, bundle checks, one-time and rotated pre-keys."""

from __future__ import annotations

import dataclasses
import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from helpers import LOW_ORDER_POINTS, Drbg, identity

from agt_mesh.core.identity import Identity
from agt_mesh.core.x3dh import (
    Establishment,
    KdfProfile,
    PreKeyBundle,
    PreKeyStore,
    ResponderCandidate,
    SignedPreKey,
    X3DHInitiation,
    channel_ad,
    initiate,
    respond,
    x3dh_kdf,
)
from agt_mesh.errors import (
    BundleVerificationError,
    MeshConfigError,
    PreKeyNotFoundError,
)

BOTH = (KdfProfile.SPEC, KdfProfile.LEGACY)


class Recorder:
    """A random source that remembers what it handed out."""

    def __init__(self, label: str) -> None:
        self._rng = Drbg(label)
        self.draws: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        out = self._rng(n)
        self.draws.append(out)
        return out


def _bob_store(rng: Drbg | Recorder, label: str = "bob", otks: int = 3) -> PreKeyStore:
    store = PreKeyStore(identity(label))
    store.generate_signed_pre_key(rng)
    store.generate_one_time_pre_keys(otks, rng)
    return store


# --------------------------------------------------------------------------------------
# KDF
# --------------------------------------------------------------------------------------


def test_kdf_published_kats() -> None:
    dh = bytes(range(96))
    assert x3dh_kdf(dh, KdfProfile.SPEC).hex() == "f8682588506e56d9b602f353a83910760692d4939a18b8043305b82f705a5bfa"
    assert x3dh_kdf(dh, KdfProfile.LEGACY).hex() == "4d1a12faac5d3f02cfbf818d22cb0fd421fc4f06705ff05aa90e4e069552e22b"
    assert x3dh_kdf(dh) == x3dh_kdf(dh, KdfProfile.SPEC)


@pytest.mark.parametrize("size", [96, 128])
def test_kdf_matches_cryptography_hkdf(size: int) -> None:
    dh = hashlib.sha512(b"dh").digest() * 2
    dh = dh[:size]
    spec = HKDF(hashes.SHA256(), 32, b"\x00" * 32, b"AgentMesh_X3DH_v1").derive(b"\xff" * 32 + dh)
    legacy = HKDF(hashes.SHA256(), 32, b"\xff" * 32, b"AgentMesh_X3DH_v1").derive(dh)
    assert x3dh_kdf(dh, KdfProfile.SPEC) == spec
    assert x3dh_kdf(dh, KdfProfile.LEGACY) == legacy


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("spec", KdfProfile.SPEC),
        ("current", KdfProfile.SPEC),
        ("legacy", KdfProfile.LEGACY),
        ("ts-sdk-4", KdfProfile.LEGACY),
        (KdfProfile.LEGACY, KdfProfile.LEGACY),
    ],
)
def test_profile_aliases(name: str, expected: KdfProfile) -> None:
    assert KdfProfile.parse(name) is expected


@pytest.mark.parametrize("name", ["SPEC", "npm", "", "ts-sdk-5", None, 1, []])
def test_profile_unknown_name(name: object) -> None:
    with pytest.raises(MeshConfigError, match="unknown X3DH KDF profile"):
        KdfProfile.parse(name)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# agreement
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", BOTH)
@pytest.mark.parametrize("use_otk", [True, False])
def test_initiate_and_respond_agree(profile: KdfProfile, use_otk: bool) -> None:
    rng = Drbg(f"agree/{profile}/{use_otk}")
    alice = identity("alice")
    store = _bob_store(rng)
    bundle = store.public_bundle(1 if use_otk else None)
    init = initiate(alice, bundle, rng, profile=profile)
    assert init.establishment.initiator_identity_key == alice.x25519_public
    assert init.establishment.one_time_pre_key_id == (1 if use_otk else None)
    assert init.associated_data == alice.x25519_public + store.identity.x25519_public
    assert init.remote_signed_pre_key == bundle.signed_pre_key
    (cand,) = respond(store, init.establishment, profiles=(profile,))
    assert cand.profile is profile
    assert cand.shared_secret == init.shared_secret
    assert len(init.shared_secret) == 32
    assert cand.signed_pre_key == store.signed_pre_key
    assert store.has_one_time_pre_key(1) is not use_otk


@pytest.mark.parametrize("use_otk", [True, False])
def test_profiles_give_different_secrets(use_otk: bool) -> None:
    secrets = {}
    for profile in BOTH:
        rng = Drbg("same-randomness")
        store = _bob_store(rng)
        bundle = store.public_bundle(0 if use_otk else None)
        secrets[profile] = initiate(identity("alice"), bundle, rng, profile=profile)
    spec, legacy = secrets[KdfProfile.SPEC], secrets[KdfProfile.LEGACY]
    assert spec.establishment == legacy.establishment  # same keys ...
    assert spec.shared_secret != legacy.shared_secret  # ... different KDF
    # A responder trying both profiles lists them in the order asked for.
    rng = Drbg("same-randomness")
    store = _bob_store(rng)
    cands = respond(store, spec.establishment, profiles=(KdfProfile.LEGACY, KdfProfile.SPEC))
    assert [c.profile for c in cands] == [KdfProfile.LEGACY, KdfProfile.SPEC]
    assert [c.shared_secret for c in cands] == [legacy.shared_secret, spec.shared_secret]


def _x(priv: bytes, pub: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(priv).exchange(X25519PublicKey.from_public_bytes(pub))


def _x_pub(priv: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def test_shared_secret_recomputed_independently() -> None:
    """SK from first principles with `cryptography` only (wire.md §1.2, §2.3, §2.4)."""
    alice_seed = hashlib.sha256(b"independent/alice").digest()
    bob_seed = hashlib.sha256(b"independent/bob").digest()
    alice, bob = Identity(alice_seed), Identity(bob_seed)
    rec = Recorder("independent")
    store = PreKeyStore(bob)
    store.generate_signed_pre_key(rec)
    store.generate_one_time_pre_keys(2, rec)
    spk_priv, _otk0_priv, otk1_priv = rec.draws
    bundle = store.public_bundle(1)
    for profile in BOTH:
        n_before = len(rec.draws)
        init = initiate(alice, bundle, rec, profile=profile)
        ek_priv = rec.draws[n_before]
        assert len(rec.draws) == n_before + 1  # exactly one 32-byte draw: EK
        assert init.establishment.ephemeral_public_key == _x_pub(ek_priv)
        # IK private = SHA-512(seed)[0:32]; X25519 clamps it itself.
        ik_a = hashlib.sha512(alice_seed).digest()[:32]
        ik_b = hashlib.sha512(bob_seed).digest()[:32]
        dh = (
            _x(ik_a, _x_pub(spk_priv))
            + _x(ek_priv, _x_pub(ik_b))
            + _x(ek_priv, _x_pub(spk_priv))
            + _x(ek_priv, _x_pub(otk1_priv))
        )
        if profile is KdfProfile.SPEC:
            sk = HKDF(hashes.SHA256(), 32, b"\x00" * 32, b"AgentMesh_X3DH_v1").derive(b"\xff" * 32 + dh)
        else:
            sk = HKDF(hashes.SHA256(), 32, b"\xff" * 32, b"AgentMesh_X3DH_v1").derive(dh)
        assert init.shared_secret == sk
        assert init.associated_data == _x_pub(ik_a) + _x_pub(ik_b)


# --------------------------------------------------------------------------------------
# one-time pre-keys
# --------------------------------------------------------------------------------------


def test_one_time_pre_key_consumed_once() -> None:
    rng = Drbg("otk-once")
    store = _bob_store(rng)
    init = initiate(identity("alice"), store.public_bundle(2), rng)
    respond(store, init.establishment)
    assert not store.has_one_time_pre_key(2)
    assert [k.key_id for k in store.one_time_pre_keys] == [0, 1]
    with pytest.raises(PreKeyNotFoundError, match="not found or already consumed"):
        respond(store, init.establishment)
    with pytest.raises(PreKeyNotFoundError, match="not found or already consumed"):
        store.public_bundle(2)
    with pytest.raises(PreKeyNotFoundError, match="One-time pre-key 99 not found"):
        respond(
            store,
            Establishment(identity("alice").x25519_public, init.establishment.ephemeral_public_key, 99),
        )


def test_key_ids_count_from_zero() -> None:
    rng = Drbg("ids")
    store = PreKeyStore(identity("bob"))
    assert [store.generate_signed_pre_key(rng).key_id for _ in range(3)] == [0, 1, 2]
    assert [k.key_id for k in store.generate_one_time_pre_keys(3, rng)] == [0, 1, 2]
    assert [k.key_id for k in store.generate_one_time_pre_keys(2, rng)] == [3, 4]
    assert store.generate_one_time_pre_keys(0, rng) == []
    assert store.public_bundle().signed_pre_key_id == 2
    assert [s.key_id for s in store.retired_signed_pre_keys] == [0, 1]
    with pytest.raises(MeshConfigError):
        store.generate_one_time_pre_keys(-1, rng)


def test_restoring_keys_advances_the_counters() -> None:
    rng = Drbg("restore-ids")
    old = _bob_store(rng)
    assert old.signed_pre_key is not None
    fresh = PreKeyStore(old.identity)
    fresh.add_signed_pre_key(dataclasses.replace(old.signed_pre_key, key_id=7))
    fresh.add_one_time_pre_key(old.one_time_pre_keys[2])
    assert fresh.generate_signed_pre_key(rng).key_id == 8
    assert fresh.generate_one_time_pre_keys(1, rng)[0].key_id == 3
    assert [s.key_id for s in fresh.retired_signed_pre_keys] == [7]
    fresh.add_signed_pre_key(dataclasses.replace(old.signed_pre_key, key_id=1), current=False)
    assert fresh.signed_pre_key is not None and fresh.signed_pre_key.key_id == 8
    assert [s.key_id for s in fresh.retired_signed_pre_keys] == [7, 1]


def test_public_bundle_without_signed_pre_key() -> None:
    store = PreKeyStore(identity("bob"))
    with pytest.raises(MeshConfigError, match="generate_signed_pre_key"):
        store.public_bundle()
    est = Establishment(identity("alice").x25519_public, identity("carol").x25519_public)
    with pytest.raises(MeshConfigError):
        respond(store, est)


def test_signed_pre_key_signature_verifies_with_cryptography() -> None:
    rng = Drbg("spk-sig")
    store = _bob_store(rng)
    bundle = store.public_bundle()
    Ed25519PublicKey.from_public_bytes(bundle.identity_key_ed).verify(
        bundle.signed_pre_key_signature, bundle.signed_pre_key
    )
    assert bundle.identity_key == store.identity.x25519_public
    assert bundle.one_time_pre_key is None and bundle.one_time_pre_key_id is None
    bundle.verify()


# --------------------------------------------------------------------------------------
# bundle verification
# --------------------------------------------------------------------------------------


def _good_bundle() -> PreKeyBundle:
    return _bob_store(Drbg("bundle")).public_bundle(0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"identity_key_ed": None}, "identityKeyEd"),
        ({"identity_key_ed": b""}, "identityKeyEd"),
        ({"identity_key_ed": b"\x01" * 31}, "identityKeyEd"),
        ({"identity_key_ed": "not bytes" * 4}, "identityKeyEd"),
        ({"signed_pre_key_signature": b"\x00" * 63}, "signature length"),
        ({"signed_pre_key_signature": b"\x00" * 65}, "signature length"),
        ({"signed_pre_key": b"\x00" * 31}, "signed pre-key length"),
        ({"identity_key": b"\x00" * 31}, "identity key length"),
        ({"identity_key": b"\x00" * 33}, "identity key length"),
        ({"one_time_pre_key": b"\x00" * 31}, "one-time pre-key length"),
    ],
)
def test_bundle_shape_checks(changes: dict[str, object], message: str) -> None:
    bad = dataclasses.replace(_good_bundle(), **changes)  # type: ignore[arg-type]
    with pytest.raises(BundleVerificationError, match=message):
        bad.verify()
    rng = Drbg("never-used")
    with pytest.raises(BundleVerificationError, match=message):
        initiate(identity("alice"), bad, rng)
    assert rng.draws == 0  # verification happens before any key is drawn


def test_bundle_tampered_signed_pre_key() -> None:
    good = _good_bundle()
    spk = bytearray(good.signed_pre_key)
    spk[5] ^= 0x40
    for bad in (
        dataclasses.replace(good, signed_pre_key=bytes(spk)),
        dataclasses.replace(good, signed_pre_key_signature=good.signed_pre_key_signature[::-1]),
    ):
        with pytest.raises(BundleVerificationError, match="verification FAILED"):
            initiate(identity("alice"), bad, Drbg("x"))


def test_bundle_signed_by_another_key() -> None:
    good = _good_bundle()
    mallory = identity("mallory")
    resigned = dataclasses.replace(good, signed_pre_key_signature=mallory.sign(good.signed_pre_key))
    with pytest.raises(BundleVerificationError, match="verification FAILED"):
        resigned.verify()
    # ... and a bundle claiming mallory's Ed25519 key with bob's signature fails too.
    swapped = dataclasses.replace(good, identity_key_ed=mallory.ed25519_public)
    with pytest.raises(BundleVerificationError, match="verification FAILED"):
        swapped.verify()


@pytest.mark.parametrize("point", LOW_ORDER_POINTS)
@pytest.mark.parametrize("where", ["identity_key", "signed_pre_key", "one_time_pre_key"])
def test_low_order_key_in_bundle(point: bytes, where: str) -> None:
    bob = identity("bob")
    good = _good_bundle()
    changes: dict[str, object] = {where: point}
    if where == "signed_pre_key":  # a malicious owner can sign a low-order SPK
        changes["signed_pre_key_signature"] = bob.sign(point)
    bad = dataclasses.replace(good, **changes)  # type: ignore[arg-type]
    bad.verify()  # the shape and signature checks pass ...
    with pytest.raises(BundleVerificationError, match="invalid key"):
        initiate(identity("alice"), bad, Drbg("x"))  # ... the DH refuses


@pytest.mark.parametrize("point", LOW_ORDER_POINTS)
@pytest.mark.parametrize("where", ["ik", "ek"])
def test_low_order_key_in_establishment_restores_otk(point: bytes, where: str) -> None:
    rng = Drbg("low-order-est")
    store = _bob_store(rng)
    init = initiate(identity("alice"), store.public_bundle(1), rng)
    est = init.establishment
    if where == "ik":
        bad = dataclasses.replace(est, initiator_identity_key=point)
    else:
        bad = dataclasses.replace(est, ephemeral_public_key=point)
    with pytest.raises(BundleVerificationError, match="invalid key in establishment"):
        respond(store, bad)
    assert store.has_one_time_pre_key(1)
    # The honest establishment still completes with the restored OTK.
    (cand,) = respond(store, est)
    assert cand.shared_secret == init.shared_secret
    assert not store.has_one_time_pre_key(1)


def test_failed_respond_keeps_one_time_pre_key_order() -> None:
    """``one_time_pre_keys`` is documented as "oldest first"; a failed respond must not
    move the restored key to the end."""
    rng = Drbg("low-order-order")
    store = _bob_store(rng, otks=4)
    init = initiate(identity("alice"), store.public_bundle(0), rng)
    bad = dataclasses.replace(init.establishment, ephemeral_public_key=LOW_ORDER_POINTS[0])
    with pytest.raises(BundleVerificationError):
        respond(store, bad)
    assert [k.key_id for k in store.one_time_pre_keys] == [0, 1, 2, 3]


@pytest.mark.parametrize("size", [0, 31, 33])
def test_establishment_wrong_key_size(size: int) -> None:
    rng = Drbg("est-size")
    store = _bob_store(rng)
    ik = identity("alice").x25519_public
    for est in (Establishment(b"\x09" * size, ik, 0), Establishment(ik, b"\x09" * size, 0)):
        with pytest.raises(BundleVerificationError, match="32 bytes"):
            respond(store, est)
    assert store.has_one_time_pre_key(0)


# --------------------------------------------------------------------------------------
# rotated signed pre-keys
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("use_otk", [True, False])
def test_retired_signed_pre_key_still_answers(use_otk: bool) -> None:
    rng = Drbg(f"rotate/{use_otk}")
    store = _bob_store(rng)
    old_bundle = store.public_bundle(0 if use_otk else None)
    old_spk = store.signed_pre_key
    store.generate_signed_pre_key(rng)
    store.generate_signed_pre_key(rng)
    assert [s.key_id for s in store.retired_signed_pre_keys] == [0, 1]
    init = initiate(identity("alice"), old_bundle, rng)

    without = respond(store, init.establishment, try_retired=False)
    assert len(without) == 1
    assert all(c.shared_secret != init.shared_secret for c in without)
    if use_otk:  # that respond consumed the OTK; give it back for the second attempt
        assert not store.has_one_time_pre_key(0)
        store.add_one_time_pre_key(_bob_store(Drbg(f"rotate/{use_otk}")).one_time_pre_keys[0])

    cands = respond(store, init.establishment, profiles=BOTH)
    # current SPK first, then retired ones newest first, each with both profiles
    assert [(c.signed_pre_key.key_id, c.profile) for c in cands] == [
        (2, KdfProfile.SPEC),
        (2, KdfProfile.LEGACY),
        (1, KdfProfile.SPEC),
        (1, KdfProfile.LEGACY),
        (0, KdfProfile.SPEC),
        (0, KdfProfile.LEGACY),
    ]
    matching = [c for c in cands if c.shared_secret == init.shared_secret]
    assert len(matching) == 1
    assert matching[0].signed_pre_key == old_spk
    assert matching[0].profile is KdfProfile.SPEC


def test_drop_retired_before() -> None:
    rng = Drbg("drop")
    store = PreKeyStore(identity("bob"))
    store.generate_signed_pre_key(rng, created_at=100.0)
    store.generate_signed_pre_key(rng, created_at=200.0)
    store.generate_signed_pre_key(rng)  # created_at unknown: kept
    store.generate_signed_pre_key(rng, created_at=50.0)
    dropped = store.drop_retired_before(150.0)
    assert [s.key_id for s in dropped] == [0]
    assert [s.key_id for s in store.retired_signed_pre_keys] == [1, 2]
    assert store.signed_pre_key is not None and store.signed_pre_key.key_id == 3


# --------------------------------------------------------------------------------------
# associated data and secrecy
# --------------------------------------------------------------------------------------


def test_channel_ad_layout() -> None:
    ik_a, ik_b = b"\xaa" * 32, b"\xbb" * 32
    ad = channel_ad("did:mesh:a", "did:mesh:b", ik_a, ik_b)
    assert ad == b"did:mesh:a|did:mesh:b" + ik_a + ik_b
    ad = channel_ad("did:é", "did:✓", ik_a, ik_b)
    assert ad == "did:é|did:✓".encode() + ik_a + ik_b
    alice, bob = identity("alice"), identity("bob")
    ad = channel_ad(alice.did, bob.did, alice.x25519_public, bob.x25519_public)
    assert len(ad) == len(alice.did) + 1 + len(bob.did) + 64 == 147


def test_reprs_hide_private_keys() -> None:
    rec = Recorder("reprs")
    store = _bob_store(rec)
    init = initiate(identity("alice"), store.public_bundle(0), rec)
    (cand,) = respond(store, init.establishment)
    assert store.signed_pre_key is not None
    objects: list[object] = [
        store,
        store.signed_pre_key,
        *store.one_time_pre_keys,
        init,
        cand,
        init.establishment,
    ]
    secrets = [*rec.draws, init.shared_secret, store.identity.x25519_private]
    for obj in objects:
        text = repr(obj)
        for secret in secrets:
            assert secret.hex() not in text
            assert secret.hex()[:16] not in text
            assert repr(secret) not in text
    assert isinstance(init, X3DHInitiation)
    assert isinstance(cand, ResponderCandidate)
    assert isinstance(store.signed_pre_key, SignedPreKey)
