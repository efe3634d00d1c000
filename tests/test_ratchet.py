"""Double Ratchet: conversation mechanics, transactional failures, limits, persistence."""

from __future__ import annotations

import base64
import pickle
import struct

import msgpack
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as c_hmac
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from helpers import LOW_ORDER_POINTS, Drbg, Net, Pair, flip, make_pair, received

from agt_mesh.core import frames as fr
from agt_mesh.core.events import ErrorEvent
from agt_mesh.core.primitives import kdf_chain
from agt_mesh.core.ratchet import (
    MAX_OLD_CHAINS,
    MAX_SKIPPED_KEYS,
    DoubleRatchet,
    pack_header,
    unpack_header,
)
from agt_mesh.core.x3dh import KdfProfile
from agt_mesh.errors import (
    DecryptError,
    DuplicateMessageError,
    MalformedMessageError,
    MeshError,
    MeshProtocolError,
    MeshStateError,
    MessageAuthError,
    TooManySkippedError,
)

Msg = tuple[bytes, bytes]


def _pair(label: str, **kw: object) -> tuple[Pair, Drbg]:
    rng = Drbg(label)
    return make_pair(rng, **kw), rng  # type: ignore[arg-type]


def _send(r: DoubleRatchet, rng: Drbg, count: int, tag: str) -> list[Msg]:
    return [r.encrypt(f"{tag} #{i}".encode(), rng) for i in range(count)]


def _counters(header: bytes) -> tuple[int, int]:
    pn, n = struct.unpack(">II", header[32:40])
    return pn, n


def _reject(r: DoubleRatchet, msg: Msg, rng: Drbg, exc: type[DecryptError] = DecryptError) -> DecryptError:
    """Assert that decrypting ``msg`` raises ``exc`` and leaves the state byte-identical."""
    before = r.to_bytes()
    summary = r.summary()
    with pytest.raises(exc) as err:
        r.decrypt(msg[0], msg[1], rng)
    assert r.to_bytes() == before
    assert r.summary() == summary
    return err.value


# --------------------------------------------------------------------------------------
# mechanics
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("profile", [KdfProfile.SPEC, KdfProfile.LEGACY])
@pytest.mark.parametrize("use_otk", [True, False])
def test_basic_conversation_both_directions(profile: KdfProfile, use_otk: bool) -> None:
    p, rng = _pair(f"basic/{profile}/{use_otk}", profile=profile, use_otk=use_otk)
    for turn in range(4):
        snd, rcv = (p.alice, p.bob) if turn % 2 == 0 else (p.bob, p.alice)
        for i in range(3):
            pt = f"turn {turn} msg {i} ✓".encode()
            dh_before = snd.dhs_pub
            header, blob = snd.encrypt(pt, rng)
            assert len(header) == 40
            assert header[:32] == dh_before
            assert _counters(header)[1] == i
            assert len(blob) == len(pt) + 28
            assert rcv.decrypt(header, blob, rng) == pt
    assert p.alice.skipped_count == p.bob.skipped_count == 0


def test_empty_and_large_plaintexts() -> None:
    p, rng = _pair("sizes")
    for pt in (b"", b"\x00", bytes(range(256)) * 200):
        header, blob = p.alice.encrypt(pt, rng)
        assert len(blob) == len(pt) + 28
        assert p.bob.decrypt(header, blob, rng) == pt


def test_responder_cannot_send_first() -> None:
    p, rng = _pair("responder-first")
    assert p.alice.can_send and not p.bob.can_send
    with pytest.raises(MeshProtocolError, match="Send chain not initialized"):
        p.bob.encrypt(b"too early", rng)
    h, b = p.alice.encrypt(b"hi", rng)
    assert p.bob.decrypt(h, b, rng) == b"hi"
    assert p.bob.can_send
    h, b = p.bob.encrypt(b"hello", rng)
    assert p.alice.decrypt(h, b, rng) == b"hello"


def test_dh_public_changes_on_turn_change() -> None:
    p, rng = _pair("turns")
    a1 = _send(p.alice, rng, 3, "a1")
    assert len({h[:32] for h, _ in a1}) == 1
    for h, b in a1:
        p.bob.decrypt(h, b, rng)
    b1 = _send(p.bob, rng, 2, "b1")
    # Bob's first ratchet key is fresh, not his signed pre-key.
    assert b1[0][0][:32] not in (p.bob_spk_public, a1[0][0][:32])
    assert _counters(b1[0][0]) == (0, 0)
    for h, b in b1:
        p.alice.decrypt(h, b, rng)
    a2 = _send(p.alice, rng, 1, "a2")
    assert a2[0][0][:32] != a1[0][0][:32]
    assert _counters(a2[0][0]) == (3, 0)  # pn = length of Alice's previous chain
    assert p.bob.decrypt(*a2[0], rng) == b"a2 #0"
    b2 = _send(p.bob, rng, 1, "b2")
    assert b2[0][0][:32] != b1[0][0][:32]
    assert _counters(b2[0][0]) == (2, 0)


def test_out_of_order_within_a_chain() -> None:
    p, rng = _pair("ooo")
    msgs = _send(p.alice, rng, 6, "a")
    for idx, expected_skipped in ((4, 4), (0, 3), (2, 2), (5, 2), (1, 1), (3, 0)):
        assert p.bob.decrypt(*msgs[idx], rng) == f"a #{idx}".encode()
        assert p.bob.skipped_count == expected_skipped


def test_late_message_from_previous_chain() -> None:
    p, rng = _pair("late")
    a1 = _send(p.alice, rng, 4, "a1")
    p.bob.decrypt(*a1[0], rng)
    reply = p.bob.encrypt(b"reply", rng)
    p.alice.decrypt(*reply, rng)
    a2 = _send(p.alice, rng, 2, "a2")
    assert _counters(a2[0][0]) == (4, 0)
    assert p.bob.decrypt(*a2[1], rng) == b"a2 #1"
    # a1 #1..#3 (via pn) and a2 #0 are cached
    assert p.bob.skipped_count == 4
    for idx in (3, 1, 2):
        assert p.bob.decrypt(*a1[idx], rng) == f"a1 #{idx}".encode()
    assert p.bob.decrypt(*a2[0], rng) == b"a2 #0"
    assert p.bob.skipped_count == 0


def test_gap_of_exactly_100_is_allowed() -> None:
    p, rng = _pair("gap100")
    msgs = _send(p.alice, rng, 101, "a")
    assert p.bob.decrypt(*msgs[100], rng) == b"a #100"
    assert p.bob.skipped_count == 100
    msgs2 = _send(p.alice, rng, 101, "b")  # same chain, n = 101..201
    assert p.bob.decrypt(*msgs2[100], rng) == b"b #100"
    assert p.bob.skipped_count == 200
    assert p.bob.decrypt(*msgs[0], rng) == b"a #0"


def test_header_helpers() -> None:
    dh = bytes(range(32))
    header = pack_header(dh, 7, 0xFFFFFFFF)
    assert header == dh + b"\x00\x00\x00\x07\xff\xff\xff\xff"
    assert unpack_header(header) == (dh, 7, 0xFFFFFFFF)
    for bad in ((dh[:31], 0, 0), (dh, -1, 0), (dh, 0, 1 << 32)):
        with pytest.raises(MalformedMessageError):
            pack_header(*bad)
    with pytest.raises(MalformedMessageError):
        unpack_header(header[:39])


# --------------------------------------------------------------------------------------
# transactional failures: exact class, state unchanged, the next valid message decrypts
# --------------------------------------------------------------------------------------


def _blob_part(blob: bytes, part: str) -> int:
    return {"nonce": 3, "body": 12, "tag": len(blob) - 1}[part]


@pytest.mark.parametrize("part", ["nonce", "body", "tag"])
@pytest.mark.parametrize("path", ["first", "current", "skipped", "new-chain"])
def test_tampered_ciphertext(part: str, path: str) -> None:
    p, rng = _pair(f"tamper/{part}/{path}")
    msgs = _send(p.alice, rng, 4, "a")
    target = msgs[0]
    if path in ("current", "skipped", "new-chain"):
        p.bob.decrypt(*msgs[0], rng)
        target = msgs[1]
    if path == "skipped":
        p.bob.decrypt(*msgs[3], rng)
        assert p.bob.skipped_count == 2
    if path == "new-chain":
        for m in msgs[1:]:
            p.bob.decrypt(*m, rng)
        p.alice.decrypt(*p.bob.encrypt(b"r", rng), rng)
        target = p.alice.encrypt(b"new chain", rng)
    header, blob = target
    _reject(p.bob, (header, flip(blob, _blob_part(blob, part), 0x80)), rng, MessageAuthError)
    expected = b"new chain" if path == "new-chain" else (b"a #1" if path != "first" else b"a #0")
    assert p.bob.decrypt(header, blob, rng) == expected


@pytest.mark.parametrize(
    ("index", "mask", "exc"),
    [
        (0, 0x01, MessageAuthError),  # dh: treated as a new ratchet key, tag fails
        (31, 0x40, MessageAuthError),
        (35, 0x01, MessageAuthError),  # pn (authenticated as AAD)
        (32, 0x80, MessageAuthError),
        (39, 0x01, MessageAuthError),  # n: 2 -> 3, a later key: tag fails
        (36, 0x01, TooManySkippedError),  # n + 2^24: too far ahead
    ],
)
def test_tampered_header_byte(index: int, mask: int, exc: type[DecryptError]) -> None:
    p, rng = _pair(f"hdr/{index}/{mask}")
    msgs = _send(p.alice, rng, 4, "a")
    p.bob.decrypt(*msgs[0], rng)
    header, blob = msgs[2]  # n = 2; flipping bit 0 of n gives 3 (ahead, skipped keys)
    _reject(p.bob, (flip(header, index, mask), blob), rng, exc)
    assert p.bob.decrypt(header, blob, rng) == b"a #2"
    assert p.bob.decrypt(*msgs[1], rng) == b"a #1"


def test_tampered_header_pointing_at_a_used_counter() -> None:
    p, rng = _pair("hdr-dup")
    msgs = _send(p.alice, rng, 3, "a")
    p.bob.decrypt(*msgs[0], rng)
    header, blob = msgs[1]  # n = 1 -> flip to n = 0, already used
    _reject(p.bob, (flip(header, 39, 0x01), blob), rng, DuplicateMessageError)
    assert p.bob.decrypt(header, blob, rng) == b"a #1"


def test_wrong_associated_data() -> None:
    p, rng = _pair("wrong-ad")
    msg = p.alice.encrypt(b"secret", rng)
    for bad_ad in (p.ad[:-1], p.ad + b"\x00", flip(p.ad, 0), flip(p.ad, len(p.ad) - 1), b""):
        wrong = p.bob.copy()
        wrong.ad = bad_ad
        _reject(wrong, msg, rng, MessageAuthError)
    assert p.bob.decrypt(*msg, rng) == b"secret"


def test_duplicate_of_decrypted_message() -> None:
    p, rng = _pair("dup")
    msgs = _send(p.alice, rng, 3, "a")
    p.bob.decrypt(*msgs[0], rng)
    p.bob.decrypt(*msgs[1], rng)
    _reject(p.bob, msgs[0], rng, DuplicateMessageError)
    _reject(p.bob, msgs[1], rng, DuplicateMessageError)
    assert p.bob.decrypt(*msgs[2], rng) == b"a #2"
    _reject(p.bob, msgs[2], rng, DuplicateMessageError)


def test_duplicate_of_message_from_the_skipped_cache() -> None:
    p, rng = _pair("dup-cache")
    msgs = _send(p.alice, rng, 4, "a")
    p.bob.decrypt(*msgs[2], rng)  # caches 0 and 1
    assert p.bob.decrypt(*msgs[0], rng) == b"a #0"
    assert p.bob.skipped_count == 1
    _reject(p.bob, msgs[0], rng, DuplicateMessageError)
    assert p.bob.skipped_count == 1
    assert p.bob.decrypt(*msgs[1], rng) == b"a #1"
    assert p.bob.decrypt(*msgs[3], rng) == b"a #3"


def test_duplicate_of_cached_message_from_previous_chain() -> None:
    p, rng = _pair("dup-prev-cache")
    a1 = _send(p.alice, rng, 3, "a1")
    p.bob.decrypt(*a1[0], rng)
    p.alice.decrypt(*p.bob.encrypt(b"r", rng), rng)
    a2 = _send(p.alice, rng, 2, "a2")
    p.bob.decrypt(*a2[0], rng)  # caches a1 #1, #2 via pn
    assert p.bob.decrypt(*a1[1], rng) == b"a1 #1"
    _reject(p.bob, a1[1], rng)  # some DecryptError; state unchanged
    assert p.bob.decrypt(*a1[2], rng) == b"a1 #2"
    assert p.bob.decrypt(*a2[1], rng) == b"a2 #1"


def test_replay_of_old_chain_message_after_dh_step() -> None:
    p, rng = _pair("replay-old")
    a1 = _send(p.alice, rng, 2, "a1")
    for m in a1:
        p.bob.decrypt(*m, rng)
    p.alice.decrypt(*p.bob.encrypt(b"r", rng), rng)
    a2 = _send(p.alice, rng, 2, "a2")
    p.bob.decrypt(*a2[0], rng)
    for m in a1:  # old chain, keys gone: would trigger a bogus DH step in the TS SDK
        _reject(p.bob, m, rng)
    assert p.bob.decrypt(*a2[1], rng) == b"a2 #1"
    b = p.bob.encrypt(b"still in sync", rng)
    assert p.alice.decrypt(*b, rng) == b"still in sync"


def test_gap_of_101_on_current_chain() -> None:
    p, rng = _pair("gap101")
    msgs = _send(p.alice, rng, 103, "a")
    p.bob.decrypt(*msgs[0], rng)
    draws = rng.draws
    _reject(p.bob, msgs[102], rng, TooManySkippedError)  # nr = 1, gap 101
    assert rng.draws == draws  # no DH step: nothing drawn
    assert p.bob.decrypt(*msgs[101], rng) == b"a #101"  # gap 100: fine
    assert p.bob.decrypt(*msgs[102], rng) == b"a #102"


def test_gap_of_101_on_first_message() -> None:
    """Like the TS SDK, the DH step (and its random draw) happens before the skip check."""
    p, rng = _pair("gap101-first")
    msgs = _send(p.alice, rng, 102, "a")
    draws = rng.draws
    _reject(p.bob, msgs[101], rng, TooManySkippedError)
    assert rng.draws == draws + 1
    assert p.bob.decrypt(*msgs[0], rng) == b"a #0"


def test_gap_of_101_via_pn_on_previous_chain() -> None:
    p, rng = _pair("gap101-pn")
    a1 = _send(p.alice, rng, 102, "a1")
    p.bob.decrypt(*a1[0], rng)
    p.alice.decrypt(*p.bob.encrypt(b"r", rng), rng)
    a2 = _send(p.alice, rng, 1, "a2")
    assert _counters(a2[0][0]) == (102, 0)
    draws = rng.draws
    _reject(p.bob, a2[0], rng, TooManySkippedError)  # pn - nr = 101
    assert rng.draws == draws  # refused before the DH step
    # Delivering one more message of the old chain brings the gap down to 100.
    assert p.bob.decrypt(*a1[1], rng) == b"a1 #1"
    assert p.bob.decrypt(*a2[0], rng) == b"a2 #0"
    assert p.bob.skipped_count == 100


@pytest.mark.parametrize("size", [0, 1, 32, 39, 41, 80])
def test_header_not_40_bytes(size: int) -> None:
    p, rng = _pair(f"hdr-size/{size}")
    header, blob = p.alice.encrypt(b"x", rng)
    bad = (header * 2)[:size]
    _reject(p.bob, (bad, blob), rng, MalformedMessageError)
    assert p.bob.decrypt(header, blob, rng) == b"x"


@pytest.mark.parametrize("size", [0, 1, 12, 27])
def test_blob_too_short(size: int) -> None:
    p, rng = _pair(f"blob-size/{size}")
    header, blob = p.alice.encrypt(b"x", rng)
    _reject(p.bob, (header, blob[:size]), rng, MalformedMessageError)
    # 28 bytes is the right shape for an empty plaintext: the tag decides
    _reject(p.bob, (header, bytes(28)), rng, MessageAuthError)
    assert p.bob.decrypt(header, blob, rng) == b"x"


@pytest.mark.parametrize("point", LOW_ORDER_POINTS)
@pytest.mark.parametrize("established", [False, True])
def test_low_order_ratchet_key_in_header(point: bytes, established: bool) -> None:
    p, rng = _pair(f"low-order/{established}")
    msgs = _send(p.alice, rng, 2, "a")
    if established:
        p.bob.decrypt(*msgs[0], rng)
    header, blob = msgs[1]
    _reject(p.bob, (point + header[32:], blob), rng, MalformedMessageError)
    assert p.bob.decrypt(header, blob, rng) == b"a #1"


def test_decrypt_error_kinds() -> None:
    assert MessageAuthError.kind == "auth"
    assert DuplicateMessageError.kind == "duplicate"
    assert TooManySkippedError.kind == "too_many_skipped"
    assert MalformedMessageError.kind == "malformed"


def test_typescript_semantics_would_desync_on_a_duplicate() -> None:
    """Contrast (wire.md §3.6): the TS SDK advances CKr/Nr before the tag check.

    We replay a duplicate of a0 against a copy of Bob's state with that TS rule applied by
    hand, and show the next valid message (a1) can then no longer be decrypted — while our
    transactional ratchet rejects the duplicate and still decrypts a1.
    """
    p, rng = _pair("ts-contrast")
    a0, a1 = _send(p.alice, rng, 2, "a")
    p.bob.decrypt(*a0, rng)

    ts = p.bob.copy()
    assert ts.ckr is not None
    # TS decrypt(a0 again): same dh, skipMessages(0) is a no-op, then KDF_CK + Nr++, tag fails.
    mk_wrong, ts.ckr = kdf_chain(ts.ckr)
    ts.nr += 1
    with pytest.raises(InvalidTag):
        ChaCha20Poly1305(mk_wrong).decrypt(a0[1][:12], a0[1][12:], ts.ad + a0[0])
    # TS decrypt(a1): n = 1 < Nr = 2, skipMessages(1) is a no-op, KDF_CK gives key #2: wrong.
    mk_ts_a1, _ = kdf_chain(ts.ckr)
    with pytest.raises(InvalidTag):
        ChaCha20Poly1305(mk_ts_a1).decrypt(a1[1][:12], a1[1][12:], ts.ad + a1[0])

    # Ours: duplicate refused, state untouched, a1 decrypts.
    _reject(p.bob, a0, rng, DuplicateMessageError)
    assert p.bob.decrypt(*a1, rng) == b"a #1"


def test_header_with_the_peers_signed_prekey_before_any_reply_is_refused() -> None:
    """The initiator's dhr is the peer's signed pre-key (public) until the first reply, and
    there is no receiving chain yet: a forged header carrying that key is refused as
    unauthentic (it used to trip an assertion, out of the receive path), state untouched."""
    p, rng = _pair("spk-as-ratchet-key")
    assert p.alice.dhr == p.bob_spk_public and p.alice.ckr is None
    for n in (0, 1, 500):
        _reject(p.alice, (p.bob_spk_public + struct.pack(">II", 0, n), bytes(40)), rng, MessageAuthError)
    reply = p.bob.decrypt(*p.alice.encrypt(b"hi", rng), rng) and p.bob.encrypt(b"real reply", rng)
    assert p.alice.decrypt(*reply, rng) == b"real reply"


def test_forged_frame_with_the_peers_signed_prekey_does_not_stop_the_receive_path() -> None:
    net = Net()
    a, b = net.agent("alice"), net.agent("bob")
    bundle = b.bundle()
    net.route(a.establish(b, bundle).frames)  # KNOCK, accepted; bob has not sent a message yet
    assert a.session(b).accepted and a.session(b).primary.ckr is None  # type: ignore[union-attr]
    header = bundle.signed_pre_key + bytes(8)
    forged = fr.message_frame(b.did, a.did, "forged-1", "2026-01-01T00:00:00.000Z", header, bytes(40))
    before = a.session(b).to_bytes()
    step = a.receive(forged)  # refused by the ratchet: buffered in case a re-key makes sense of it
    assert received(step) == [] and not [e for e in step.events if isinstance(e, ErrorEvent)]
    assert a.session(b).to_bytes() == before
    assert received(net.route([a.send_frame(b, "hi")])[b.did]) == ["hi"]  # the session goes on
    assert received(net.route([b.send_frame(a, "real")])[a.did]) == ["real"]
    net.now += 3600
    assert received(a.tick()) == []  # the buffered forgery is given up, never delivered


def test_encrypt_at_counter_limit_raises_a_mesh_error() -> None:
    """A state whose send counter reached 2^32 (accepted by ``from_bytes``) cannot encode
    another header; encrypt must fail with a MeshError, not a raw ``struct.error``."""
    p, rng = _pair("counter-limit")
    state = msgpack.unpackb(p.alice.to_bytes())
    state["ns"] = 1 << 32
    exhausted = DoubleRatchet.from_bytes(msgpack.packb(state, use_bin_type=True))
    with pytest.raises(MeshError):
        exhausted.encrypt(b"x", rng)


# --------------------------------------------------------------------------------------
# skipped-key cache limit
# --------------------------------------------------------------------------------------


def test_skipped_key_cache_keeps_2000_fifo() -> None:
    """21 chains, each delivering only its last message after a gap of 100: 2100 keys
    would be cached; exactly 2000 stay and the first chain's keys are evicted first."""
    p, rng = _pair("fifo")
    chains: list[list[Msg]] = []
    for turn in range(21):
        msgs = _send(p.alice, rng, 101, f"c{turn}")
        chains.append(msgs)
        assert p.bob.decrypt(*msgs[100], rng) == f"c{turn} #100".encode()
        assert p.bob.skipped_count == min(100 * (turn + 1), MAX_SKIPPED_KEYS)
        p.alice.decrypt(*p.bob.encrypt(b"ack", rng), rng)
    assert p.bob.skipped_count == MAX_SKIPPED_KEYS
    # the oldest inserted keys (chain 0) are gone ...
    _reject(p.bob, chains[0][0], rng)
    _reject(p.bob, chains[0][99], rng)
    # ... the oldest survivor and the newest still decrypt
    assert p.bob.decrypt(*chains[1][0], rng) == b"c1 #0"
    assert p.bob.decrypt(*chains[20][99], rng) == b"c20 #99"
    assert p.bob.skipped_count == MAX_SKIPPED_KEYS - 2


def test_skipped_key_cache_limit_within_one_chain() -> None:
    p, rng = _pair("fifo-one-chain")
    msgs = _send(p.alice, rng, 2121, "a")
    for last in range(100, 2121, 101):  # 21 receives, each skipping 100
        p.bob.decrypt(*msgs[last], rng)
    assert p.bob.skipped_count == MAX_SKIPPED_KEYS
    _reject(p.bob, msgs[0], rng)
    _reject(p.bob, msgs[99], rng)
    assert p.bob.decrypt(*msgs[101], rng) == b"a #101"
    assert p.bob.decrypt(*msgs[2119], rng) == b"a #2119"


# --------------------------------------------------------------------------------------
# serialisation
# --------------------------------------------------------------------------------------


def _assert_same(a: DoubleRatchet, b: DoubleRatchet) -> None:
    assert a == b
    assert a.to_bytes() == b.to_bytes()
    for name in ("dhs_priv", "dhs_pub", "dhr", "rk", "cks", "ckr", "ns", "nr", "pn", "ad"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.max_skip == b.max_skip
    assert list((a.skipped or {}).items()) == list((b.skipped or {}).items())


def _round_trip(r: DoubleRatchet) -> DoubleRatchet:
    restored = DoubleRatchet.from_bytes(r.to_bytes())
    _assert_same(r, restored)
    return restored


def test_round_trip_at_several_points() -> None:
    p, rng = _pair("serial")
    _round_trip(p.alice)  # fresh sender
    _round_trip(p.bob)  # fresh receiver: no dhr, no chains
    assert p.bob.dhr is None and p.bob.cks is None
    msgs = _send(p.alice, rng, 6, "a")
    _round_trip(p.alice)
    p.bob.decrypt(*msgs[4], rng)
    assert p.bob.skipped_count == 4
    restored = _round_trip(p.bob)  # with skipped keys, in insertion order
    assert restored.skipped_count == 4
    p.alice.decrypt(*p.bob.encrypt(b"r", rng), rng)
    _round_trip(p.alice)
    _round_trip(p.bob)
    custom = DoubleRatchet.init_receiver(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, b"", max_skip=7)
    assert _round_trip(custom).max_skip == 7


def test_continuing_after_restore_is_identical() -> None:
    p, rng = _pair("continue")
    msgs = _send(p.alice, rng, 5, "a")
    for m in (msgs[3], msgs[0]):
        p.bob.decrypt(*m, rng)
    copies = (
        DoubleRatchet.from_bytes(p.alice.to_bytes()),
        DoubleRatchet.from_bytes(p.bob.to_bytes()),
    )
    outputs: list[list[bytes]] = []
    for alice, bob in ((p.alice, p.bob), copies):
        r = Drbg("continue/after")
        out: list[bytes] = []
        for m in (msgs[4], msgs[1], msgs[2]):
            out.append(bob.decrypt(*m, r))
        for turn in range(3):
            snd, rcv = (bob, alice) if turn % 2 == 0 else (alice, bob)
            sent = _send(snd, r, 3, f"t{turn}")
            for h, b in reversed(sent):
                out += [h, b, rcv.decrypt(h, b, r)]
        out += [alice.to_bytes(), bob.to_bytes()]
        outputs.append(out)
    assert outputs[0] == outputs[1]
    assert len(outputs[0]) == 3 + 3 * 3 * 3 + 2


def _state(r: DoubleRatchet) -> dict[str, object]:
    state = msgpack.unpackb(r.to_bytes())
    assert isinstance(state, dict)
    return state


def _pack(value: object) -> bytes:
    return bytes(msgpack.packb(value, use_bin_type=True))


def _state_with_skipped() -> DoubleRatchet:
    p, rng = _pair("bad-state")
    msgs = _send(p.alice, rng, 3, "a")
    p.bob.decrypt(*msgs[2], rng)
    p.alice.decrypt(*p.bob.encrypt(b"r", rng), rng)
    p.bob.decrypt(*p.alice.encrypt(b"s", rng), rng)  # bob now has an old remote ratchet key
    assert p.bob.skipped_count == 2 and p.bob.old_dhrs and p.bob.ckr and p.bob.cks
    return p.bob


def _v1_fields(r: DoubleRatchet) -> list[object]:
    """``r`` in the positional layout of ratchet state version 1."""
    skipped = [[f"{dh.hex()}:{n}", mk] for (dh, n), mk in (r.skipped or {}).items()]
    fields = [r.dhs_priv, r.dhs_pub, r.dhr, r.rk, r.cks, r.ckr, r.ns, r.nr, r.pn, r.max_skip, r.ad, skipped]
    return [1, *fields, list(r.old_dhrs)]


def test_state_is_a_named_map_without_defaults() -> None:
    r = _state_with_skipped()
    state = _state(r)
    assert list(state) == ["v", "sk", "pk", "dhr", "rk", "cks", "ckr", "nr", "pn", "ad", "skip", "old"]
    assert state["v"] == 2 and state["sk"] == r.dhs_priv and state["rk"] == r.rk and state["nr"] == r.nr
    assert state["skip"] == [[dh, n, mk] for (dh, n), mk in (r.skipped or {}).items()]
    # ns == 0 and max_skip == 100 are the defaults: not written, and loaded back
    assert (r.ns, r.max_skip) == (0, 100) and "ns" not in state and "mx" not in state
    _round_trip(r)
    fresh = DoubleRatchet.init_receiver(b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, b"ad")
    assert list(_state(fresh)) == ["v", "sk", "pk", "rk", "ad"]


def test_version_1_state_loads() -> None:
    r = _state_with_skipped()
    _assert_same(DoubleRatchet.from_bytes(_pack(_v1_fields(r))), r)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xc1",
        b"garbage that is not msgpack at all",
        b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 billion items
        b"\xdf\xff\xff\xff\xff",  # map32 claiming 4 billion items
        b"\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GiB
        b"\x91" * 100_000 + b"\x00",  # nested 100000 deep
        b"\x93\x01\x02",  # array of 3 with only 2 items
        b"\x81\x01\x02",  # map with an integer key
        bytes(range(256)),
    ],
)
def test_from_bytes_garbage(data: bytes) -> None:
    with pytest.raises(MeshStateError):
        DoubleRatchet.from_bytes(data)


def test_from_bytes_truncated_or_extended() -> None:
    for good in (_state_with_skipped().to_bytes(), _pack(_v1_fields(_state_with_skipped()))):
        for cut in range(len(good)):
            with pytest.raises(MeshStateError) as err:
                DoubleRatchet.from_bytes(good[:cut])
            assert err.value.__context__ is None and err.value.__cause__ is None
        with pytest.raises(MeshStateError) as err:
            DoubleRatchet.from_bytes(good + b"\x00")
        # msgpack's ExtraData error holds the whole unpacked (secret) state: never kept
        assert err.value.__context__ is None and err.value.__cause__ is None


@pytest.mark.parametrize("value", [{"a": 1}, {"v": "2"}, {"v": True}, 5, [], ["1"], [None], "state", [1.0], [True]])
def test_from_bytes_wrong_layout(value: object) -> None:
    with pytest.raises(MeshStateError, match="layout"):
        DoubleRatchet.from_bytes(_pack(value))


@pytest.mark.parametrize("version", [0, 3, 255, -1])
def test_from_bytes_unknown_version(version: int) -> None:
    state = _state(_state_with_skipped())
    state["v"] = version
    with pytest.raises(MeshStateError, match=f"version {version} is"):
        DoubleRatchet.from_bytes(_pack(state))
    v1 = _v1_fields(_state_with_skipped())
    v1[0] = version
    with pytest.raises(MeshStateError, match=f"version {version} is"):
        DoubleRatchet.from_bytes(_pack(v1))


def test_from_bytes_newer_version_says_upgrade() -> None:
    state = _state(_state_with_skipped())
    state["v"] = 3
    with pytest.raises(MeshStateError, match="upgrade kars-agt-mesh"):
        DoubleRatchet.from_bytes(_pack(state))


def test_from_bytes_version_and_layout_mismatch() -> None:
    v1 = _v1_fields(_state_with_skipped())
    with pytest.raises(MeshStateError, match="version 2 is not a map"):
        DoubleRatchet.from_bytes(_pack([2, *v1[1:]]))
    with pytest.raises(MeshStateError, match="version 1 has the wrong layout"):
        DoubleRatchet.from_bytes(_pack({**_state(_state_with_skipped()), "v": 1}))


@pytest.mark.parametrize("count", [1, 12, 13, 15, 20])
def test_from_bytes_version_1_wrong_field_count(count: int) -> None:
    fields = _v1_fields(_state_with_skipped())
    fields = (fields + [None] * count)[:count]
    with pytest.raises(MeshStateError, match="version 1 has the wrong layout"):
        DoubleRatchet.from_bytes(_pack(fields))


@pytest.mark.parametrize("key", ["sk", "pk", "rk", "ad"])
def test_from_bytes_missing_required_field(key: str) -> None:
    state = _state(_state_with_skipped())
    del state[key]
    with pytest.raises(MeshStateError, match=f"wrong fields \\(missing {key}\\)"):
        DoubleRatchet.from_bytes(_pack(state))


@pytest.mark.parametrize("key", ["x", "V", "skipped", "ad ", b"sk"])
def test_from_bytes_unexpected_field(key: str | bytes) -> None:
    state: dict[object, object] = {**_state(_state_with_skipped()), key: 1}
    with pytest.raises(MeshStateError, match="wrong fields \\(unexpected"):
        DoubleRatchet.from_bytes(_pack(state))


_SKIP = [b"\x00" * 32, 1, b"\x00" * 32]


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("sk", b"\x00" * 31),
        ("sk", None),
        ("pk", b"\x00" * 33),
        ("dhr", b"\x00" * 31),
        ("dhr", "x" * 32),
        ("rk", b"\x00" * 16),
        ("rk", None),
        ("cks", b"\x00" * 31),
        ("ckr", 12345),
        ("ns", -1),
        ("ns", True),
        ("ns", 1.5),
        ("nr", (1 << 32) + 2),
        ("pn", "0"),
        ("mx", False),
        ("mx", None),
        ("ad", "ad as text"),
        ("ad", None),
        ("skip", {}),
        ("skip", None),
        ("skip", [_SKIP[:2]]),
        ("skip", [[*_SKIP, 0]]),
        ("skip", [[b"\x00" * 31, 1, b"\x00" * 32]]),
        ("skip", [[b"\x00" * 32, -1, b"\x00" * 32]]),
        ("skip", [[b"\x00" * 32, 1 << 32, b"\x00" * 32]]),
        ("skip", [[b"\x00" * 32, "1", b"\x00" * 32]]),
        ("skip", [[b"\x00" * 32, 1, b"\x00" * 31]]),
        ("skip", [[b"\x00" * 32, 1, None]]),
        ("skip", [_SKIP] * (MAX_SKIPPED_KEYS + 1)),
        ("skip", [5]),
        ("old", [b"\x00" * 31]),
        ("old", [b"\x00" * 32] * (MAX_OLD_CHAINS + 1)),
        ("old", b"\x00" * 32),
        ("old", None),
    ],
)
def test_from_bytes_invalid_fields(key: str, value: object) -> None:
    state = _state(_state_with_skipped())
    state[key] = value
    with pytest.raises(MeshStateError, match=f"field '{key}'") as err:
        DoubleRatchet.from_bytes(_pack(state))
    assert err.value.__context__ is None


def test_from_bytes_accepts_the_limits() -> None:
    state = _state(_state_with_skipped())
    state.update(ns=1 << 32, nr=0, mx=0, skip=[_SKIP] * MAX_SKIPPED_KEYS, old=[b"\x00" * 32] * MAX_OLD_CHAINS)
    r = DoubleRatchet.from_bytes(_pack(state))
    assert (r.ns, r.max_skip, r.skipped_count, len(r.old_dhrs)) == (1 << 32, 0, 1, MAX_OLD_CHAINS)


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (1, b"\x00" * 31),  # dhs_priv
        (7, -1),  # ns
        (11, None),  # ad
        (12, {}),  # skipped list
        (12, [["zz:1", b"\x00" * 32]]),
        (12, [["00" * 32 + ":x", b"\x00" * 32]]),
        (12, [["00" * 31 + ":1", b"\x00" * 32]]),
        (12, [["00" * 32 + ":-1", b"\x00" * 32]]),
        (12, [["00" * 32 + ": 1", b"\x00" * 32]]),
        (12, [["00" * 32 + ":1_0", b"\x00" * 32]]),
        (12, [["00" * 32 + ":1", b"\x00" * 31]]),
        (12, [["00" * 32 + ":1:2", b"\x00" * 32]]),
        (12, [["00" * 32 + ":1"]]),
        (12, [[b"\x00" * 32, b"\x00" * 32]]),
        (12, [5]),
        (13, None),  # old_dhrs
    ],
)
def test_from_bytes_invalid_version_1_fields(index: int, value: object) -> None:
    fields = _v1_fields(_state_with_skipped())
    fields[index] = value
    with pytest.raises(MeshStateError) as err:
        DoubleRatchet.from_bytes(_pack(fields))
    assert err.value.__context__ is None


def test_repr_summary_and_pickling_hide_keys() -> None:
    p, rng = _pair("repr")
    msgs = _send(p.alice, rng, 3, "a")
    p.bob.decrypt(*msgs[2], rng)
    p.alice.decrypt(*p.bob.encrypt(b"r", rng), rng)
    for r in (p.alice, p.bob):
        secrets = [r.dhs_priv, r.rk, p.shared_secret]
        secrets += [k for k in (r.cks, r.ckr) if k is not None]
        secrets += list((r.skipped or {}).values())
        summary = r.summary()
        assert set(summary) == {
            "send_n",
            "recv_n",
            "previous_send_chain_length",
            "can_send",
            "has_receive_chain",
            "skipped_keys",
        }
        assert all(isinstance(v, int) for v in summary.values())
        for text in (repr(r), str(r), repr(summary)):
            for s in secrets:
                for form in (
                    s.hex(),
                    s.hex()[:16],
                    base64.b64encode(s).decode()[:16],
                    base64.urlsafe_b64encode(s).decode()[:16],
                    repr(s)[:20],
                ):
                    assert form not in text
        with pytest.raises(TypeError, match="not picklable"):
            pickle.dumps(r)
    assert p.bob.summary()["skipped_keys"] == 2
    assert p.alice.summary()["send_n"] == 0 and p.alice.summary()["can_send"] is True
    assert p.alice.summary()["previous_send_chain_length"] == 3


def test_copy_is_independent() -> None:
    p, rng = _pair("copy")
    msgs = _send(p.alice, rng, 3, "a")
    p.bob.decrypt(*msgs[2], rng)
    clone = p.bob.copy()
    _assert_same(clone, p.bob)
    assert p.bob.decrypt(*msgs[0], rng) == b"a #0"
    assert clone.skipped_count == 2 and p.bob.skipped_count == 1
    assert clone != p.bob
    assert clone.decrypt(*msgs[0], rng) == b"a #0"


# --------------------------------------------------------------------------------------
# interop sanity: an independent minimal implementation of wire.md §3
# --------------------------------------------------------------------------------------


def _hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt, info).derive(ikm)


def _hmac(key: bytes, msg: bytes) -> bytes:
    h = c_hmac.HMAC(key, hashes.SHA256())
    h.update(msg)
    return h.finalize()


def _dh(priv: bytes, pub: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(priv).exchange(X25519PublicKey.from_public_bytes(pub))


def _pub(priv: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _ref_decrypt(ck: bytes, n: int, header: bytes, blob: bytes, ad: bytes) -> bytes:
    for _ in range(n):
        ck = _hmac(ck, b"\x02")
    mk = _hmac(ck, b"\x01")
    return ChaCha20Poly1305(mk).decrypt(blob[:12], blob[12:], ad + header)


class _Recording(Drbg):
    def __init__(self, label: str) -> None:
        super().__init__(label)
        self.log: list[bytes] = []

    def __call__(self, n: int) -> bytes:
        out = super().__call__(n)
        self.log.append(out)
        return out


def test_independent_implementation_decrypts_our_messages() -> None:
    rng = _Recording("interop")
    p = make_pair(rng)
    info = b"AgentMesh_Ratchet_v1"

    # Alice -> Bob, first chain.  Alice's first ratchet key is the draw made by init_sender.
    alice_ratchet_priv = rng.log[-1]
    msgs = []
    for i in range(3):
        msgs.append(p.alice.encrypt(f"hello {i}".encode(), rng))
        assert msgs[-1][1][:12] == rng.log[-1]  # the nonce is the 12-byte draw
    for i, (header, _blob) in enumerate(msgs):
        assert header == _pub(alice_ratchet_priv) + struct.pack(">II", 0, i)
    okm = _hkdf(p.shared_secret, _dh(p.bob_spk_private, msgs[0][0][:32]), info, 64)
    rk1, ckr_bob = okm[:32], okm[32:]
    for i in (2, 0, 1):
        assert _ref_decrypt(ckr_bob, i, *msgs[i], p.ad) == f"hello {i}".encode()
        assert p.bob.decrypt(*msgs[i], rng) == f"hello {i}".encode()

    # Bob -> Alice (Bob's ratchet key was drawn during his DH step; only its public half
    # in the header is needed on Alice's side).
    header, blob = p.bob.encrypt(b"reply", rng)
    # Alice's view: (RK, CKs) = KDF_RK(SK, DH(a, SPK)); then (RK, CKr) = KDF_RK(RK, DH(a, B)).
    rk_a = _hkdf(p.shared_secret, _dh(alice_ratchet_priv, p.bob_spk_public), info, 64)[:32]
    assert rk_a == rk1
    ckr_alice = _hkdf(rk_a, _dh(alice_ratchet_priv, header[:32]), info, 64)[32:]
    assert _ref_decrypt(ckr_alice, 0, header, blob, p.ad) == b"reply"
    assert p.alice.decrypt(header, blob, rng) == b"reply"

    # And the reverse: a message built by the reference code decrypts with our ratchet.
    ck_send = ckr_alice
    mk = _hmac(_hmac(ck_send, b"\x02"), b"\x01")  # Bob's message n = 1 of the same chain
    forged_header = header[:32] + struct.pack(">II", 0, 1)
    nonce = b"\x42" * 12
    ref_blob = nonce + ChaCha20Poly1305(mk).encrypt(nonce, b"from reference", p.ad + forged_header)
    assert p.alice.decrypt(forged_header, ref_blob, rng) == b"from reference"
