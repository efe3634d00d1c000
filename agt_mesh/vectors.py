"""Verifier for known-answer vector files in format ``agt-mesh-vectors/1``.

The files are produced by running the real TypeScript SDK (or another implementation)
with recorded randomness; this module replays every case through this package's own
identity, X3DH, ratchet, frame and registry code and compares the bytes.  The format is
specified in ``vectors/README.md``; the contract is:

* one line per case, ``ok <file>: <name>`` or ``FAIL <file>: <name>: what differed``;
* a final ``N passed, M failed`` line;
* success only if every case of every file passed; unknown case kinds fail.

A random draw that a case did not record (or a recorded draw left unused where the case
says one happened) is a failure too: the draws are part of what is compared.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from agt_mesh.core import frames as fr
from agt_mesh.core import pq
from agt_mesh.core import registry_codec as rc
from agt_mesh.core.identity import Identity, ed25519_seed_to_x25519
from agt_mesh.core.primitives import x25519_public
from agt_mesh.core.ratchet import DoubleRatchet
from agt_mesh.core.x3dh import (
    Establishment,
    KdfProfile,
    OneTimePreKey,
    PreKeyStore,
    SignedPreKey,
    channel_ad,
    initiate,
    respond,
    x3dh_kdf,
)
from agt_mesh.errors import (
    DecryptError,
    DuplicateMessageError,
    MalformedMessageError,
    MeshError,
    MessageAuthError,
    TooManySkippedError,
)

__all__ = ["FORMAT", "CaseResult", "main", "verify_document", "verify_files"]

FORMAT = "agt-mesh-vectors/1"


class Mismatch(MeshError):
    """A case did not reproduce."""


@dataclass(frozen=True)
class CaseResult:
    file: str
    name: str
    ok: bool
    detail: str = ""

    def line(self) -> str:
        if self.ok:
            return f"ok {self.file}: {self.name}"
        return f"FAIL {self.file}: {self.name}: {self.detail}"


class _Replay:
    """A random source that returns recorded draws, in order, and checks their sizes."""

    def __init__(self, draws: Iterable[bytes]) -> None:
        self._draws = list(draws)

    def __call__(self, n: int) -> bytes:
        if not self._draws:
            raise Mismatch(f"an unexpected random draw of {n} bytes (none recorded)")
        value = self._draws.pop(0)
        if len(value) != n:
            raise Mismatch(f"recorded draw has {len(value)} bytes, the operation drew {n}")
        return value

    @property
    def unused(self) -> int:
        return len(self._draws)


def _hex(value: Any, name: str, size: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise Mismatch(f"{name} is not a hex string")
    try:
        data = bytes.fromhex(value)
    except ValueError:
        raise Mismatch(f"{name} is not valid hex") from None
    if size is not None and len(data) != size:
        raise Mismatch(f"{name} must be {size} bytes, got {len(data)}")
    return data


def _get(obj: Any, key: str) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise Mismatch(f"missing field {key!r}")
    return obj[key]


def _expect_eq(what: str, got: Any, want: Any) -> None:
    if got != want:
        if isinstance(got, bytes) and isinstance(want, bytes):
            raise Mismatch(f"{what}: got {got.hex()[:64]}, expected {want.hex()[:64]}")
        raise Mismatch(f"{what}: got {got!r:.200}, expected {want!r:.200}")


def _error_class(exc: DecryptError) -> str:
    # A duplicate is an AEAD failure in the TypeScript SDK (it decrypts with the wrong key).
    if isinstance(exc, MessageAuthError | DuplicateMessageError):
        return "auth"
    if isinstance(exc, TooManySkippedError):
        return "too_many_skipped"
    if isinstance(exc, MalformedMessageError):
        return "malformed"
    return exc.kind


# -- case kinds -----------------------------------------------------------------------


def _case_identity(case: dict[str, Any], profile: KdfProfile) -> None:
    seed = _hex(_get(case, "ed25519_seed"), "ed25519_seed", 32)
    expect = _get(case, "expect")
    ident = Identity(seed)
    x_priv, x_pub = ed25519_seed_to_x25519(seed)
    _expect_eq("ed25519_pub", ident.ed25519_public, _hex(_get(expect, "ed25519_pub"), "expect.ed25519_pub"))
    _expect_eq("x25519_priv", x_priv, _hex(_get(expect, "x25519_priv"), "expect.x25519_priv"))
    _expect_eq("x25519_pub", x_pub, _hex(_get(expect, "x25519_pub"), "expect.x25519_pub"))
    _expect_eq("did", ident.did, _get(expect, "did"))


def _case_x3dh_kdf(case: dict[str, Any], profile: KdfProfile) -> None:
    dh = _hex(_get(case, "dh_concat"), "dh_concat")
    if len(dh) not in (96, 128):
        raise Mismatch(f"dh_concat must be 96 or 128 bytes, got {len(dh)}")
    _expect_eq("sk", x3dh_kdf(dh, profile), _hex(_get(_get(case, "expect"), "sk"), "expect.sk"))


def _case_session(case: dict[str, Any], profile: KdfProfile) -> None:
    alice_in, bob_in = _get(case, "alice"), _get(case, "bob")
    alice = Identity(_hex(_get(alice_in, "ed25519_seed"), "alice.ed25519_seed", 32))
    bob = Identity(_hex(_get(bob_in, "ed25519_seed"), "bob.ed25519_seed", 32))
    alice_did, bob_did = _get(alice_in, "did"), _get(bob_in, "did")
    if not isinstance(alice_did, str) or not isinstance(bob_did, str):
        raise Mismatch("alice.did and bob.did must be strings")
    expect = _get(case, "expect")

    store = PreKeyStore(bob)
    spk_in = _get(case, "bob_spk")
    spk = SignedPreKey.create(bob, int(_get(spk_in, "id")), _hex(_get(spk_in, "priv"), "bob_spk.priv", 32))
    store.add_signed_pre_key(spk)
    _expect_eq("bob_spk_pub", spk.public, _hex(_get(expect, "bob_spk_pub"), "expect.bob_spk_pub"))
    _expect_eq("bob_spk_sig", spk.signature, _hex(_get(expect, "bob_spk_sig"), "expect.bob_spk_sig"))
    otk_pubs = []
    for i, item in enumerate(_get(case, "bob_otks") or []):
        priv = _hex(_get(item, "priv"), f"bob_otks[{i}].priv", 32)
        otk = OneTimePreKey(int(_get(item, "id")), priv, x25519_public(priv))
        store.add_one_time_pre_key(otk)
        otk_pubs.append(otk.public.hex())
    if "bob_otk_pubs" in expect:
        _expect_eq("bob_otk_pubs", otk_pubs, [str(x).lower() for x in expect["bob_otk_pubs"]])
    use_otk = case.get("use_otk")
    bundle = store.public_bundle(int(use_otk) if use_otk is not None else None)

    rng = _Replay([_hex(_get(case, "alice_ek_priv"), "alice_ek_priv", 32)])
    init = initiate(alice, bundle, rng, profile=profile)
    _expect_eq(
        "alice_ek_pub",
        init.establishment.ephemeral_public_key,
        _hex(_get(expect, "alice_ek_pub"), "expect.alice_ek_pub"),
    )
    want_sk = _hex(_get(expect, "sk"), "expect.sk")
    _expect_eq("sk (initiator)", init.shared_secret, want_sk)
    ad = channel_ad(alice_did, bob_did, alice.x25519_public, bob.x25519_public)
    _expect_eq("ad", ad, _hex(_get(expect, "ad"), "expect.ad"))
    candidates = respond(store, init.establishment, profiles=(profile,))
    _expect_eq("sk (responder)", candidates[0].shared_secret, want_sk)

    sides = {
        "alice": DoubleRatchet.init_sender(
            init.shared_secret,
            bundle.signed_pre_key,
            ad,
            _Replay([_hex(_get(case, "alice_ratchet_priv"), "alice_ratchet_priv", 32)]),
        ),
        "bob": DoubleRatchet.init_receiver(candidates[0].shared_secret, spk.private, spk.public, ad),
    }
    _run_events(case, sides)


def _run_events(case: dict[str, Any], sides: dict[str, DoubleRatchet]) -> None:
    """Replay a session case's ``events`` on Alice's and Bob's ratchets."""
    events = _get(case, "events")
    if not isinstance(events, list):
        raise Mismatch("events must be a list")
    sent: dict[int, tuple[bytes, bytes]] = {}
    for idx, ev in enumerate(events):
        where = f"event {idx}"
        op = _get(ev, "op")
        by = _get(ev, "by")
        if by not in sides:
            raise Mismatch(f"{where}: unknown party {by!r}")
        ratchet = sides[by]
        ev_expect = _get(ev, "expect")
        if op == "encrypt":
            pt = _hex(_get(ev, "plaintext"), f"{where}.plaintext")
            rng = _Replay([_hex(_get(ev, "nonce"), f"{where}.nonce", 12)])
            header, blob = ratchet.encrypt(pt, rng)
            want_header = _hex(_get(ev_expect, "header"), f"{where}.expect.header")
            want_ct = _hex(_get(ev_expect, "ciphertext"), f"{where}.expect.ciphertext")
            _expect_eq(f"{where} header", header, want_header)
            _expect_eq(f"{where} ciphertext", blob, want_ct)
            sent[idx] = (want_header, want_ct)
            continue
        if op == "decrypt":
            ref = _get(ev, "message")
            if not isinstance(ref, int) or ref not in sent:
                raise Mismatch(f"{where}: message {ref!r} is not an earlier encrypt event")
            header, blob = sent[ref]
        elif op == "decrypt_raw":
            header = _hex(_get(ev, "header"), f"{where}.header")
            blob = _hex(_get(ev, "ciphertext"), f"{where}.ciphertext")
        else:
            raise Mismatch(f"{where}: unknown op {op!r}")
        rp = ev.get("ratchet_priv")
        rng = _Replay([_hex(rp, f"{where}.ratchet_priv", 32)] if rp is not None else [])
        if "error" in ev_expect:
            try:
                got = ratchet.decrypt(header, blob, rng)
            except DecryptError as exc:
                _expect_eq(f"{where} error class", _error_class(exc), ev_expect["error"])
                return  # nothing after an error event is checked
            raise Mismatch(f"{where}: decrypted {got[:32]!r} but expected error {ev_expect['error']!r}")
        try:
            got = ratchet.decrypt(header, blob, rng)
        except DecryptError as exc:
            raise Mismatch(f"{where}: decrypt failed ({_error_class(exc)}: {exc})") from None
        _expect_eq(
            f"{where} plaintext",
            got,
            _hex(_get(ev_expect, "plaintext"), f"{where}.expect.plaintext"),
        )
        if rng.unused:
            raise Mismatch(f"{where}: the case records a DH ratchet step, but none happened")


def _frame_from_context(ftype: str, ctx: dict[str, Any]) -> dict[str, Any]:
    if ftype == "connect":
        seed = ctx.get("ed25519_seed")
        if seed is not None:
            ident = Identity(_hex(seed, "context.ed25519_seed", 32))
            return fr.connect_frame(_get(ctx, "from"), identity=ident, timestamp=_get(ctx, "timestamp"))
        return fr.connect_frame(_get(ctx, "from"))
    if ftype == "fetch_pending":
        return fr.fetch_pending_frame(_get(ctx, "from"))
    if ftype == "knock":
        otk = ctx.get("otk")
        est = Establishment(_hex(_get(ctx, "ik"), "context.ik", 32), _hex(_get(ctx, "ek"), "context.ek", 32), otk)
        return fr.knock_frame(_get(ctx, "from"), _get(ctx, "to"), _get(ctx, "id"), _get(ctx, "ts"), est)
    if ftype == "message":
        return fr.message_frame(
            _get(ctx, "from"),
            _get(ctx, "to"),
            _get(ctx, "id"),
            _get(ctx, "ts"),
            _hex(_get(ctx, "header"), "context.header", 40),
            _hex(_get(ctx, "ciphertext"), "context.ciphertext"),
        )
    if ftype == "knock_accept":
        return fr.knock_accept_frame(
            _get(ctx, "from"),
            _get(ctx, "to"),
            _get(ctx, "id"),
            _get(ctx, "knock_id"),
            _get(ctx, "ts"),
        )
    if ftype == "knock_reject":
        return fr.knock_reject_frame(
            _get(ctx, "from"),
            _get(ctx, "to"),
            _get(ctx, "id"),
            _get(ctx, "knock_id"),
            _get(ctx, "ts"),
            _get(ctx, "reason"),
        )
    if ftype == "ack":
        return fr.ack_frame(_get(ctx, "id"))
    if ftype == "heartbeat":
        return fr.heartbeat_frame(_get(ctx, "from"), _get(ctx, "ts"))
    if ftype == "disconnect":
        return fr.disconnect_frame(_get(ctx, "from"))
    raise Mismatch(f"unknown frame type {ftype!r}")


def _check_parsed(ftype: str, parsed: Any, ctx: dict[str, Any]) -> None:
    def eq(attr: str, key: str, conv: Callable[[Any], Any] = lambda v: v) -> None:
        _expect_eq(f"decoded {key}", getattr(parsed, attr), conv(ctx[key]))

    if ftype in (
        "connect",
        "fetch_pending",
        "heartbeat",
        "disconnect",
        "knock",
        "message",
        "knock_accept",
        "knock_reject",
    ):
        eq("from_did", "from")
    if ftype in ("knock", "message", "knock_accept", "knock_reject"):
        eq("to_did", "to")
        eq("id", "id")
        eq("ts", "ts")
    if ftype == "heartbeat":
        eq("ts", "ts")
    if ftype == "ack":
        eq("id", "id")
    if ftype in ("knock_accept", "knock_reject"):
        eq("knock_id", "knock_id")
        _expect_eq("decoded accepted", parsed.accepted, ftype == "knock_accept")
    if ftype == "knock_reject":
        eq("reason", "reason")
    if ftype == "knock":
        est = parsed.establishment
        if est is None:
            raise Mismatch("decoded knock has no establishment")
        _expect_eq("decoded ik", est.initiator_identity_key, _hex(ctx["ik"], "ik"))
        _expect_eq("decoded ek", est.ephemeral_public_key, _hex(ctx["ek"], "ek"))
        _expect_eq("decoded otk", est.one_time_pre_key_id, ctx.get("otk"))
    if ftype == "message":
        _expect_eq("decoded header", parsed.header, _hex(ctx["header"], "header"))
        _expect_eq("decoded ciphertext", parsed.ciphertext, _hex(ctx["ciphertext"], "ciphertext"))
    if ftype == "connect" and ctx.get("ed25519_seed") is not None:
        ident = Identity(_hex(ctx["ed25519_seed"], "ed25519_seed", 32))
        _expect_eq("decoded public_key", parsed.public_key, ident.ed25519_public)
        _expect_eq("decoded timestamp", parsed.timestamp, ctx["timestamp"])
        if parsed.signature is None or not ident.verify(parsed.signature, ctx["timestamp"].encode()):
            raise Mismatch("connect signature does not verify")


def _case_frame(case: dict[str, Any], profile: KdfProfile) -> None:
    frame = _get(case, "frame")
    ctx = _get(case, "context")
    if not isinstance(frame, dict) or not isinstance(ctx, dict):
        raise Mismatch("frame and context must be objects")
    ftype = _get(frame, "type")
    built = _frame_from_context(ftype, ctx)
    if built != frame:
        diff = sorted(k for k in set(built) | set(frame) if built.get(k) != frame.get(k))
        raise Mismatch(f"rebuilt frame differs in {diff}: got {fr.encode_frame(built)[:300]}")
    _check_parsed(ftype, fr.parse_frame(frame), ctx)


def _case_registry(case: dict[str, Any], profile: KdfProfile) -> None:
    ctx = _get(case, "context")
    method, path, body = _get(case, "method"), _get(case, "path"), _get(case, "body")
    headers = case.get("headers") or {}
    ident = Identity(_hex(_get(ctx, "ed25519_seed"), "context.ed25519_seed", 32))
    did = _get(ctx, "did")
    if method == "POST" and path == "/v1/agents":
        shape = _get(ctx, "shape")
        caps, meta = _get(ctx, "capabilities"), _get(ctx, "metadata")
        if shape == "pop":
            built = rc.register_body_pop(ident, _get(ctx, "timestamp"), caps, meta)
        elif shape == "legacy":
            built = rc.register_body_legacy(did, ident, caps, meta)
        else:
            raise Mismatch(f"unknown registration shape {shape!r}")
    elif method == "PUT":
        _expect_eq("path", path, rc.prekeys_path(did))
        spk_in = _get(ctx, "spk")
        spk = SignedPreKey.create(ident, int(_get(spk_in, "id")), _hex(_get(spk_in, "priv"), "spk.priv", 32))
        otks = []
        for i, item in enumerate(_get(ctx, "otks")):
            priv = _hex(_get(item, "priv"), f"otks[{i}].priv", 32)
            otks.append(OneTimePreKey(int(_get(item, "id")), priv, x25519_public(priv)))
        built = rc.prekey_upload_body(ident, spk, otks)
    else:
        raise Mismatch(f"unknown registry request {method} {path}")
    if built != body:
        diff = sorted(k for k in set(built) | set(body) if built.get(k) != body.get(k))
        raise Mismatch(f"rebuilt body differs in {diff}")
    auth = {k.lower(): v for k, v in headers.items()}.get("authorization")
    if auth is not None:
        _expect_eq("authorization", rc.auth_header(ident, did, _get(ctx, "timestamp")), auth)


# -- post-quantum hybrid cases (vectors/pq-hybrid-v1.json; see vectors/README.md) -------


def _kem_kind(value: Any, name: str) -> pq.KemKeyKind:
    try:
        return pq.KemKeyKind(value)
    except ValueError:
        raise Mismatch(f"{name} must be 'one_time' or 'last_resort', got {value!r}") from None


def _int(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise Mismatch(f"{name} must be an integer")
    return value


def _case_mlkem768_keygen(case: dict[str, Any], profile: KdfProfile) -> None:
    key = pq.KemPreKey.from_seed(0, pq.KemKeyKind.ONE_TIME, _hex(_get(case, "seed"), "seed", 64), created_at=0)
    _expect_eq("public_key", key.public, _hex(_get(_get(case, "expect"), "public_key"), "expect.public_key"))


def _case_mlkem768_decaps(case: dict[str, Any], profile: KdfProfile) -> None:
    # Decapsulation only: cryptography offers no encapsulation with given randomness, so the
    # recorded ciphertext is checked by what this key makes of it (FIPS 203 implicit
    # rejection included).  ``encaps_m`` is for independent checkers.
    key = pq.KemPreKey.from_seed(0, pq.KemKeyKind.ONE_TIME, _hex(_get(case, "seed"), "seed", 64), created_at=0)
    ct = _hex(_get(case, "ciphertext"), "ciphertext", pq.KEM_CIPHERTEXT_LEN)
    want = _hex(_get(_get(case, "expect"), "shared_secret"), "expect.shared_secret")
    _expect_eq("shared_secret", key.decapsulate(ct), want)


def _case_pq_kdf(case: dict[str, Any], profile: KdfProfile) -> None:
    dh = _hex(_get(case, "dh_concat"), "dh_concat")
    if len(dh) not in (96, 128):
        raise Mismatch(f"dh_concat must be 96 or 128 bytes, got {len(dh)}")
    ss = _hex(_get(case, "kem_ss"), "kem_ss", pq.KEM_SHARED_SECRET_LEN)
    _expect_eq("sk", pq.hybrid_kdf(dh, ss), _hex(_get(_get(case, "expect"), "sk"), "expect.sk"))


def _case_pq_prekey(case: dict[str, Any], profile: KdfProfile) -> None:
    ident = Identity(_hex(_get(case, "ed25519_seed"), "ed25519_seed", 32))
    kind = _kem_kind(_get(case, "kem_kind"), "kem_kind")
    spk_text = case.get("spk_pub")
    spk = _hex(spk_text, "spk_pub", 32) if spk_text is not None else None
    key = pq.KemPreKey.from_seed(
        _int(_get(case, "key_id"), "key_id"),
        kind,
        _hex(_get(case, "kem_seed"), "kem_seed", 64),
        created_at=_int(_get(case, "created_at"), "created_at"),
    )
    expect = _get(case, "expect")
    _expect_eq("public_key", key.public, _hex(_get(expect, "public_key"), "expect.public_key"))
    message = pq.prekey_signed_message(kind, key.key_id, key.created_at, key.public, spk)
    _expect_eq("signed_message", message, _hex(_get(expect, "signed_message"), "expect.signed_message"))
    signed = key.signed(ident, spk)
    _expect_eq("signature", signed.signature, _hex(_get(expect, "signature"), "expect.signature"))
    _expect_eq("record", signed.to_json(), _get(expect, "record"))
    parsed = pq.SignedKemPreKey.from_json(_get(expect, "record"), kind)
    if parsed is None:
        raise Mismatch("record names another suite")
    parsed.verify(ident.ed25519_public, spk)
    if "metadata" in expect:
        _expect_eq("metadata", pq.advert_metadata(ident, key), expect["metadata"])
        advert = pq.parse_advert(expect["metadata"])
        if advert != signed:
            raise Mismatch("metadata does not parse back to the signed record")


def _case_pq_upload(case: dict[str, Any], profile: KdfProfile) -> None:
    ident = Identity(_hex(_get(case, "ed25519_seed"), "ed25519_seed", 32))
    spk_in = _get(case, "spk")
    spk = SignedPreKey.create(ident, _int(_get(spk_in, "id"), "spk.id"), _hex(_get(spk_in, "priv"), "spk.priv", 32))
    otks = []
    for i, item in enumerate(_get(case, "otks")):
        priv = _hex(_get(item, "priv"), f"otks[{i}].priv", 32)
        otks.append(OneTimePreKey(_int(_get(item, "id"), f"otks[{i}].id"), priv, x25519_public(priv)))
    kems = [
        pq.KemPreKey.from_seed(
            _int(_get(item, "id"), f"kem_otks[{i}].id"),
            pq.KemKeyKind.ONE_TIME,
            _hex(_get(item, "seed"), f"kem_otks[{i}].seed", 64),
            created_at=_int(_get(item, "created_at"), f"kem_otks[{i}].created_at"),
        )
        for i, item in enumerate(_get(case, "kem_otks"))
    ]
    built = pq.prekey_upload_body(ident, spk, otks, kems)
    want = _get(_get(case, "expect"), "body")
    if built != want:
        raise Mismatch(f"rebuilt body differs: got {fr.encode_frame(built)[:200]}")


def _case_pq_session(case: dict[str, Any], profile: KdfProfile) -> None:
    alice_in, bob_in = _get(case, "alice"), _get(case, "bob")
    alice = Identity(_hex(_get(alice_in, "ed25519_seed"), "alice.ed25519_seed", 32))
    bob = Identity(_hex(_get(bob_in, "ed25519_seed"), "bob.ed25519_seed", 32))
    alice_did, bob_did = _get(alice_in, "did"), _get(bob_in, "did")
    if not isinstance(alice_did, str) or not isinstance(bob_did, str):
        raise Mismatch("alice.did and bob.did must be strings")
    expect = _get(case, "expect")

    store = PreKeyStore(bob)
    spk_in = _get(case, "bob_spk")
    spk = SignedPreKey.create(
        bob, _int(_get(spk_in, "id"), "bob_spk.id"), _hex(_get(spk_in, "priv"), "bob_spk.priv", 32)
    )
    store.add_signed_pre_key(spk)
    _expect_eq("bob_spk_pub", spk.public, _hex(_get(expect, "bob_spk_pub"), "expect.bob_spk_pub"))
    _expect_eq("bob_spk_sig", spk.signature, _hex(_get(expect, "bob_spk_sig"), "expect.bob_spk_sig"))
    for i, item in enumerate(_get(case, "bob_otks") or []):
        priv = _hex(_get(item, "priv"), f"bob_otks[{i}].priv", 32)
        store.add_one_time_pre_key(
            OneTimePreKey(_int(_get(item, "id"), f"bob_otks[{i}].id"), priv, x25519_public(priv))
        )
    kem_store = pq.KemPreKeyStore()
    for i, item in enumerate(_get(case, "bob_kem_keys")):
        kem_store.add(
            pq.KemPreKey.from_seed(
                _int(_get(item, "id"), f"bob_kem_keys[{i}].id"),
                _kem_kind(_get(item, "kind"), f"bob_kem_keys[{i}].kind"),
                _hex(_get(item, "seed"), f"bob_kem_keys[{i}].seed", 64),
                created_at=_int(_get(item, "created_at"), f"bob_kem_keys[{i}].created_at"),
            )
        )
    use_otk = case.get("use_otk")
    bundle = store.public_bundle(_int(use_otk, "use_otk") if use_otk is not None else None)
    kem_key = kem_store.peek(_int(_get(case, "use_kem"), "use_kem"))
    published = kem_key.signed(bob, spk.public)
    _expect_eq("bob_kem_pub", published.public, _hex(_get(expect, "bob_kem_pub"), "expect.bob_kem_pub"))
    _expect_eq("bob_kem_sig", published.signature, _hex(_get(expect, "bob_kem_sig"), "expect.bob_kem_sig"))

    # the recorded encapsulation stands in for OpenSSL's (whose randomness cannot be set)
    recorded = (
        _hex(_get(expect, "kem_ss"), "expect.kem_ss", pq.KEM_SHARED_SECRET_LEN),
        _hex(_get(case, "kem_ciphertext"), "kem_ciphertext", pq.KEM_CIPHERTEXT_LEN),
    )

    def encapsulate(public: bytes) -> tuple[bytes, bytes]:
        _expect_eq("encapsulation key", public, published.public)
        return recorded

    rng = _Replay([_hex(_get(case, "alice_ek_priv"), "alice_ek_priv", 32)])
    init = pq.initiate_hybrid(alice, bundle, published, rng, encapsulate=encapsulate)
    _expect_eq(
        "alice_ek_pub",
        init.establishment.ephemeral_public_key,
        _hex(_get(expect, "alice_ek_pub"), "expect.alice_ek_pub"),
    )
    want_sk = _hex(_get(expect, "sk"), "expect.sk")
    _expect_eq("sk (initiator)", init.shared_secret, want_sk)
    ad = channel_ad(alice_did, bob_did, alice.x25519_public, bob.x25519_public)
    _expect_eq("ad", ad, _hex(_get(expect, "ad"), "expect.ad"))
    knock = pq.knock_with_pq(fr.knock_frame(alice_did, bob_did, "id", "ts", init.establishment), init.pq)
    _expect_eq("knock establishment", knock["establishment"], _get(expect, "knock_establishment"))
    parsed = fr.parse_frame(json.loads(fr.encode_frame(knock)))
    if not isinstance(parsed, fr.KnockFrame) or parsed.establishment is None:
        raise Mismatch("the hybrid KNOCK does not parse back")
    ext = pq.parse_pq_establishment(knock["establishment"][pq.PQ_ESTABLISHMENT_FIELD])
    resp = pq.respond_hybrid(store, kem_store, parsed.establishment, ext)  # decapsulates the recorded ciphertext
    _expect_eq("sk (responder)", resp.shared_secret, want_sk)

    sides = {
        "alice": DoubleRatchet.init_sender(
            init.shared_secret,
            bundle.signed_pre_key,
            ad,
            _Replay([_hex(_get(case, "alice_ratchet_priv"), "alice_ratchet_priv", 32)]),
        ),
        "bob": DoubleRatchet.init_receiver(resp.shared_secret, spk.private, spk.public, ad),
    }
    _run_events(case, sides)


_KINDS: dict[str, Callable[[dict[str, Any], KdfProfile], None]] = {
    "identity": _case_identity,
    "x3dh_kdf": _case_x3dh_kdf,
    "session": _case_session,
    "frame": _case_frame,
    "registry": _case_registry,
    "mlkem768_keygen": _case_mlkem768_keygen,
    "mlkem768_decaps": _case_mlkem768_decaps,
    "pq_kdf": _case_pq_kdf,
    "pq_prekey": _case_pq_prekey,
    "pq_upload": _case_pq_upload,
    "pq_session": _case_pq_session,
}


def verify_document(doc: Any, *, file: str = "<vectors>") -> list[CaseResult]:
    """Verify every case of a parsed vector document."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        return [CaseResult(file, "<file>", False, f"not an {FORMAT} document")]
    kdf = doc.get("x3dh_kdf")
    if kdf not in ("legacy", "spec"):
        return [CaseResult(file, "<file>", False, f"x3dh_kdf must be 'legacy' or 'spec', got {kdf!r}")]
    profile = KdfProfile(kdf)
    cases = doc.get("cases")
    if not isinstance(cases, list) or not cases:
        return [CaseResult(file, "<file>", False, "no cases")]
    results = []
    for i, case in enumerate(cases):
        name = case.get("name") if isinstance(case, dict) else None
        name = name if isinstance(name, str) else f"case[{i}]"
        kind = case.get("kind") if isinstance(case, dict) else None
        check = _KINDS.get(kind) if isinstance(kind, str) else None
        if check is None:
            results.append(CaseResult(file, name, False, f"unknown case kind {kind!r}"))
            continue
        try:
            check(case, profile)
        except Mismatch as exc:
            results.append(CaseResult(file, name, False, str(exc)))
        except (MeshError, ValueError, TypeError, KeyError) as exc:
            results.append(CaseResult(file, name, False, f"{type(exc).__name__}: {exc}"))
        else:
            results.append(CaseResult(file, name, True))
    return results


def verify_files(paths: Sequence[str | Path]) -> list[CaseResult]:
    """Verify vector files; an unreadable file counts as one failed case."""
    results: list[CaseResult] = []
    for path in paths:
        name = str(path)
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            results.append(CaseResult(name, "<file>", False, f"cannot read: {exc}"))
            continue
        results.extend(verify_document(doc, file=name))
    return results


def main(paths: Sequence[str | Path], out: TextIO) -> int:
    """Print the contract's report for ``paths``; return 0 only if every case passed."""
    results = verify_files(paths)
    for r in results:
        print(r.line(), file=out)
    passed = sum(r.ok for r in results)
    failed = len(results) - passed
    print(f"{passed} passed, {failed} failed", file=out)
    return 0 if failed == 0 and passed > 0 else 1
