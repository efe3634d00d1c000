"""Identity: key derivation, DID, secrecy of private bytes, and the identity file."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from helpers import Drbg, identity
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl import bindings as sodium

from agt_mesh.core.identity import (
    Identity,
    did_from_ed25519,
    ed25519_seed_to_x25519,
    is_mesh_did,
)
from agt_mesh.errors import IdentityFileError, MeshConfigError
from agt_mesh.shell.identity_file import load_identity, save_identity

# Published known answers (wire.md §1.2/§1.3/§10, vectors/ts-npm-4.0.0.json "identity/alice").
KAT_SEED = hashlib.sha256(b"agentmesh-kat/alice/ed25519-seed").digest()
KAT_ED_PUB = "bce712656c34f1603cb71f0cd89b44f4faa955d2b763eeff91b7a2e6a715f93f"
KAT_X_PRIV = "103c37899ee8ddd065f889a9fbdbd5363c1cf373a4a1beccc6f87de420579642"
KAT_X_PUB = "d53d0f363ea24ebfe3f8fe665dce1ac888a99e1d6c32a8fc84ce6b1cd2d9c252"
KAT_DID = "did:mesh:498aaf869b0fb551d0b8077f1b07e32d"


def _encodings(secret: bytes) -> list[str]:
    """Every textual form a secret could leak in: hex (both cases), base64 and base64url,
    padded and not, and a 12-character prefix of each (a partial leak)."""
    forms = [
        secret.hex(),
        secret.hex().upper(),
        base64.b64encode(secret).decode(),
        base64.b64encode(secret).decode().rstrip("="),
        base64.urlsafe_b64encode(secret).decode(),
        base64.urlsafe_b64encode(secret).decode().rstrip("="),
        repr(secret),
    ]
    return forms + [f[:12] for f in forms[:6]]


def _secrets(ident: Identity) -> list[bytes]:
    seed = ident.export_seed()
    return [seed, seed + ident.ed25519_public, ident.x25519_private]


def _assert_no_secret(text: str, secrets: list[bytes]) -> None:
    for secret in secrets:
        for form in _encodings(secret):
            assert form not in text, f"secret leaked as {form!r}"


# --------------------------------------------------------------------------------------
# derivation
# --------------------------------------------------------------------------------------


def test_kat_alice() -> None:
    ident = Identity.from_seed(KAT_SEED)
    assert ident.ed25519_public.hex() == KAT_ED_PUB
    assert ident.x25519_private.hex() == KAT_X_PRIV
    assert ident.x25519_public.hex() == KAT_X_PUB
    assert ident.did == KAT_DID
    assert did_from_ed25519(bytes.fromhex(KAT_ED_PUB)) == KAT_DID
    assert ed25519_seed_to_x25519(KAT_SEED) == (
        bytes.fromhex(KAT_X_PRIV),
        bytes.fromhex(KAT_X_PUB),
    )


@settings(max_examples=300, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32))
def test_conversion_matches_libsodium_and_cryptography(seed: bytes) -> None:
    ident = Identity(seed)
    ed_pub = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    assert ident.ed25519_public == ed_pub
    assert ident.x25519_private == sodium.crypto_sign_ed25519_sk_to_curve25519(seed + ed_pub)
    assert ident.x25519_public == sodium.crypto_sign_ed25519_pk_to_curve25519(ed_pub)
    assert ident.did == "did:mesh:" + hashlib.sha256(ed_pub).hexdigest()[:32]
    assert is_mesh_did(ident.did)


def test_signatures_verify_with_cryptography() -> None:
    ident = identity("signer")
    msg = b"2026-01-01T00:00:00.000Z"
    sig = ident.sign(msg)
    assert len(sig) == 64
    Ed25519PublicKey.from_public_bytes(ident.ed25519_public).verify(sig, msg)
    assert ident.verify(sig, msg)
    assert not ident.verify(sig, msg + b"x")
    assert not ident.verify(sig[:63], msg)
    assert not identity("other").verify(sig, msg)
    # Ed25519 is deterministic: the same message gives the same signature.
    assert ident.sign(msg) == sig


def test_generate_uses_the_random_source() -> None:
    a = Identity.generate(Drbg("gen"))
    b = Identity.generate(Drbg("gen"))
    c = Identity.generate(Drbg("gen-2"))
    assert a == b
    assert a != c
    assert a.export_seed() == Drbg("gen")(32)


def test_64_byte_seed_and_public_accepted() -> None:
    ident = Identity(KAT_SEED + bytes.fromhex(KAT_ED_PUB))
    assert ident.did == KAT_DID
    assert ident.export_seed() == KAT_SEED
    assert Identity(bytearray(KAT_SEED)).did == KAT_DID
    assert Identity(KAT_SEED, ed25519_public=bytes.fromhex(KAT_ED_PUB)).did == KAT_DID


def test_mismatched_public_key_rejected() -> None:
    other = identity("other").ed25519_public
    with pytest.raises(MeshConfigError, match="does not belong"):
        Identity(KAT_SEED + other)
    with pytest.raises(MeshConfigError, match="does not belong"):
        Identity(KAT_SEED, ed25519_public=other)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 63, 65, 96])
def test_bad_seed_size_rejected(size: int) -> None:
    with pytest.raises(MeshConfigError):
        Identity(b"\x07" * size)


def test_non_bytes_seed_rejected() -> None:
    with pytest.raises(MeshConfigError):
        Identity(KAT_SEED.hex())  # type: ignore[arg-type]


def test_did_helpers() -> None:
    assert is_mesh_did(KAT_DID)
    assert not is_mesh_did(KAT_DID.upper())
    assert not is_mesh_did(KAT_DID[:-1])
    assert not is_mesh_did(KAT_DID + "0")
    assert not is_mesh_did("did:mesh:alice")
    with pytest.raises(MeshConfigError):
        did_from_ed25519(b"\x00" * 31)


def test_equality_and_hash_follow_the_public_key() -> None:
    a1, a2, b = Identity(KAT_SEED), Identity(KAT_SEED), identity("bob")
    assert a1 == a2 and hash(a1) == hash(a2)
    assert a1 != b
    assert a1 != "not an identity"


def test_public_dict() -> None:
    ident = Identity(KAT_SEED)
    assert ident.public_dict() == {
        "did": KAT_DID,
        "ed25519_public": base64.urlsafe_b64encode(bytes.fromhex(KAT_ED_PUB)).decode().rstrip("="),
        "x25519_public": base64.urlsafe_b64encode(bytes.fromhex(KAT_X_PUB)).decode().rstrip("="),
    }
    _assert_no_secret(json.dumps(ident.public_dict()), _secrets(ident))


# --------------------------------------------------------------------------------------
# secrecy
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", ["alice", "bob", "carol", "dave"])
def test_repr_and_str_hide_private_bytes(label: str) -> None:
    ident = identity(label)
    for text in (repr(ident), str(ident), f"{ident}", f"{ident!r}", repr([ident])):
        assert ident.did in text
        _assert_no_secret(text, _secrets(ident))


def test_error_messages_hide_private_bytes() -> None:
    ident = identity("alice")
    with pytest.raises(MeshConfigError) as err:
        Identity(ident.export_seed(), ed25519_public=identity("bob").ed25519_public)
    _assert_no_secret(str(err.value), _secrets(ident))


def test_pickling_refused() -> None:
    ident = identity("alice")
    with pytest.raises(TypeError, match="not picklable"):
        pickle.dumps(ident)


# --------------------------------------------------------------------------------------
# identity file
# --------------------------------------------------------------------------------------


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_save_creates_0600_and_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "id.json"
    ident = identity("alice")
    assert save_identity(path, ident) == path
    assert _mode(path) == 0o600
    loaded = load_identity(path)
    assert loaded == ident
    assert loaded.export_seed() == ident.export_seed()
    assert loaded.did == ident.did
    data = json.loads(path.read_text())
    assert data["format"] == "agt-mesh-identity"
    assert data["version"] == 1
    assert data["did"] == ident.did
    assert data["created_at"].endswith("Z")


def test_save_is_0600_even_with_a_permissive_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        save_identity(tmp_path / "id.json", identity("alice"))
    finally:
        os.umask(old)
    assert _mode(tmp_path / "id.json") == 0o600


def test_second_save_without_force_refused_and_first_file_intact(tmp_path: Path) -> None:
    path = tmp_path / "id.json"
    save_identity(path, identity("alice"))
    before = path.read_bytes()
    with pytest.raises(IdentityFileError, match="already exists"):
        save_identity(path, identity("bob"))
    assert path.read_bytes() == before
    assert load_identity(path) == identity("alice")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["id.json"]


def test_force_replaces_atomically_with_0600(tmp_path: Path) -> None:
    path = tmp_path / "id.json"
    save_identity(path, identity("alice"))
    os.chmod(path, 0o644)  # a loose mode on the old file must not carry over
    old_inode = os.stat(path).st_ino
    save_identity(path, identity("bob"), force=True)
    assert _mode(path) == 0o600
    # A new file was renamed into place: the old inode was not rewritten in place.
    assert os.stat(path).st_ino != old_inode
    assert load_identity(path) == identity("bob")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["id.json"]


def test_force_on_a_new_path(tmp_path: Path) -> None:
    path = tmp_path / "new.json"
    save_identity(path, identity("alice"), force=True)
    assert _mode(path) == 0o600
    assert load_identity(path) == identity("alice")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.json"]


def test_force_save_survives_a_stale_temp_file(tmp_path: Path) -> None:
    """A crash between creating the temporary file and renaming it leaves the temp file
    behind.  Its name depends only on the PID, which is often the same on the next run
    (PID 1 in a container), so a later ``force=True`` save must still succeed."""
    path = tmp_path / "id.json"
    save_identity(path, identity("alice"))
    stale = tmp_path / f".id.json.tmp-{os.getpid()}"
    stale.write_text("left over by a crash")
    save_identity(path, identity("bob"), force=True)
    assert load_identity(path) == identity("bob")


def test_save_refuses_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "target"
    target.write_text("keep me")
    link = tmp_path / "id.json"
    link.symlink_to(target)
    with pytest.raises(IdentityFileError):
        save_identity(link, identity("alice"))
    assert target.read_text() == "keep me"


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o606, 0o620, 0o602, 0o644, 0o700 | 0o077])
def test_load_refuses_group_or_other_access(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "id.json"
    save_identity(path, identity("alice"))
    os.chmod(path, mode)
    with pytest.raises(IdentityFileError) as err:
        load_identity(path)
    assert str(path) in str(err.value)
    assert "chmod 600" in str(err.value)


def test_load_accepts_0400(tmp_path: Path) -> None:
    path = tmp_path / "id.json"
    save_identity(path, identity("alice"))
    os.chmod(path, 0o400)
    assert load_identity(path) == identity("alice")


def _edit(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def test_load_refuses_mismatched_public_key(tmp_path: Path) -> None:
    path = tmp_path / "id.json"
    save_identity(path, identity("alice"))
    _edit(path, ed25519_public=identity("bob").public_dict()["ed25519_public"])
    with pytest.raises(IdentityFileError, match="does not match"):
        load_identity(path)


def test_load_refuses_mismatched_x25519_key_and_did(tmp_path: Path) -> None:
    path = tmp_path / "id.json"
    save_identity(path, identity("alice"))
    _edit(path, x25519_public=identity("bob").public_dict()["x25519_public"])
    with pytest.raises(IdentityFileError, match="X25519"):
        load_identity(path)
    save_identity(path, identity("alice"), force=True)
    _edit(path, did=identity("bob").did)
    with pytest.raises(IdentityFileError, match="DID"):
        load_identity(path)


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_load_refuses_unknown_version(tmp_path: Path, version: object) -> None:
    path = tmp_path / "id.json"
    save_identity(path, identity("alice"))
    data = json.loads(path.read_text())
    data["version"] = version
    path.write_text(json.dumps(data))
    with pytest.raises(IdentityFileError, match="version"):
        load_identity(path)


@pytest.mark.parametrize(
    "changes",
    [
        {"format": "something-else"},
        {"format": None},
        {"ed25519_seed": None},
        {"ed25519_seed": "!!!not base64!!!"},
        {"ed25519_seed": 12345},
        {"ed25519_seed": "AAAA"},  # 3 bytes: not a seed
        {"ed25519_public": None},
    ],
)
def test_load_refuses_inconsistent_fields(tmp_path: Path, changes: dict[str, object]) -> None:
    path = tmp_path / "id.json"
    save_identity(path, identity("alice"))
    _edit(path, **changes)
    with pytest.raises(IdentityFileError):
        load_identity(path)


@pytest.mark.parametrize("content", [b"", b"not json", b"[1, 2", b"\xff\xfe\x00", b"[]", b"42"])
def test_load_refuses_non_json_or_non_object(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "id.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, content)
    os.close(fd)
    with pytest.raises(IdentityFileError):
        load_identity(path)


def test_load_refuses_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "id.json"
    save_identity(path, identity("alice"))
    raw = path.read_bytes()
    for cut in (1, len(raw) // 3, len(raw) // 2, len(raw) - 3):
        path.write_bytes(raw[:cut])
        with pytest.raises(IdentityFileError, match="not valid JSON"):
            load_identity(path)


def test_load_refuses_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    save_identity(real, identity("alice"))
    link = tmp_path / "link.json"
    link.symlink_to(real)
    with pytest.raises(IdentityFileError, match=str(link)):
        load_identity(link)
    assert load_identity(real) == identity("alice")


def test_load_refuses_directory(tmp_path: Path) -> None:
    with pytest.raises(IdentityFileError):
        load_identity(tmp_path)


def test_load_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(IdentityFileError) as err:
        load_identity(path)
    assert str(path) in str(err.value)
    assert "agt-mesh identity new" in str(err.value)


def test_file_content_holds_seed_only_in_the_seed_field(tmp_path: Path) -> None:
    path = tmp_path / "id.json"
    ident = identity("alice")
    save_identity(path, ident)
    data = json.loads(path.read_text())
    seed_b64url = base64.urlsafe_b64encode(ident.export_seed()).decode().rstrip("=")
    assert data.pop("ed25519_seed") == seed_b64url
    _assert_no_secret(json.dumps(data), _secrets(ident))
