"""Relay frame codec: exact builder output, parsing, and hostile input."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from helpers import identity

from agt_mesh.core import frames as fr
from agt_mesh.core.identity import Identity
from agt_mesh.core.x3dh import Establishment
from agt_mesh.errors import MeshProtocolError

A = "did:mesh:498aaf869b0fb551d0b8077f1b07e32d"
B = "did:mesh:11fa3d578a434f7e65697fa3bb9fd7df"
FID = "00000000-0000-4000-8000-000000000001"
TS = "2026-01-01T00:00:00.000Z"
IK = bytes(range(32))
EK = bytes(range(100, 132))
DH = bytes(range(200, 232))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def roundtrip(frame: dict[str, Any]) -> fr.Frame:
    return fr.parse_frame(fr.decode_frame(fr.encode_frame(frame)))


def parse_text(text: str | bytes, **kw: Any) -> fr.Frame:
    return fr.parse_frame(fr.decode_frame(text, **kw))


def message(**overrides: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "v": 1,
        "type": "message",
        "from": A,
        "to": B,
        "id": FID,
        "ts": TS,
        "header": {"dh": b64(DH), "pn": 3, "n": 7},
        "ciphertext": b64(b"\x01" * 40),
    }
    for key, value in overrides.items():
        if value is _DROP:
            del frame[key]
        else:
            frame[key] = value
    return frame


_DROP = object()


# --------------------------------------------------------------------------------------
# builders: exact text (key order and fields of wire.md §4.2 / §5.3)
# --------------------------------------------------------------------------------------


def test_connect_pop_frame_matches_published_ts_frame() -> None:
    """The verbatim HEAD connect frame of wire.md §10.2 (Alice's KAT identity)."""
    alice = Identity(hashlib.sha256(b"agentmesh-kat/alice/ed25519-seed").digest())
    text = fr.encode_frame(fr.connect_frame(alice.did, identity=alice, timestamp=TS))
    assert text == (
        '{"v":1,"type":"connect","from":"did:mesh:498aaf869b0fb551d0b8077f1b07e32d",'
        '"public_key":"vOcSZWw08WA8tx8M2JtE9PqpVdK3Y+7/kbei5qcV+T8=",'
        '"timestamp":"2026-01-01T00:00:00.000Z",'
        '"signature":"E7bB3WbPsv8K4Wsoc9v8Yw9+x3FFjKob0e+QGxCAWalfjYptjkIDpqZu1/ApFWCJ7qHv7Dk2HWRGpAjA2Pb+Cw=="}'
    )


def test_connect_frames() -> None:
    assert fr.encode_frame(fr.connect_frame(A)) == '{"v":1,"type":"connect","from":"' + A + '"}'
    ident = identity("alice")
    text = fr.encode_frame(fr.connect_frame(A, identity=ident, timestamp=TS, token="tok"))
    sig = ident.sign(TS.encode())
    assert text == (
        '{"v":1,"type":"connect","from":"'
        + A
        + '","public_key":"'
        + b64(ident.ed25519_public)
        + '","timestamp":"'
        + TS
        + '","signature":"'
        + b64(sig)
        + '","token":"tok"}'
    )
    frame = json.loads(text)
    Ed25519PublicKey.from_public_bytes(base64.b64decode(frame["public_key"])).verify(
        base64.b64decode(frame["signature"]), frame["timestamp"].encode("utf-8")
    )
    with pytest.raises(ValueError):
        fr.connect_frame(A, identity=ident)


def test_knock_frames() -> None:
    with_otk = fr.knock_frame(A, B, FID, TS, Establishment(IK, EK, 5))
    assert fr.encode_frame(with_otk) == (
        '{"v":1,"type":"knock","from":"'
        + A
        + '","to":"'
        + B
        + '","id":"'
        + FID
        + '","ts":"'
        + TS
        + '","intent":{"action":"establish_session"},"establishment":{"ik":"'
        + b64(IK)
        + '","ek":"'
        + b64(EK)
        + '","otk":5}}'
    )
    no_otk = fr.knock_frame(A, B, FID, TS, Establishment(IK, EK, None))
    assert fr.encode_frame(no_otk) == (
        '{"v":1,"type":"knock","from":"'
        + A
        + '","to":"'
        + B
        + '","id":"'
        + FID
        + '","ts":"'
        + TS
        + '","intent":{"action":"establish_session"},"establishment":{"ik":"'
        + b64(IK)
        + '","ek":"'
        + b64(EK)
        + '"}}'
    )
    bare = fr.knock_frame(A, B, FID, TS, None)
    assert fr.encode_frame(bare) == (
        '{"v":1,"type":"knock","from":"'
        + A
        + '","to":"'
        + B
        + '","id":"'
        + FID
        + '","ts":"'
        + TS
        + '","intent":{"action":"establish_session"}}'
    )
    # the module-level intent is not shared with (or mutated through) built frames
    bare["intent"]["action"] = "changed"
    assert fr.KNOCK_INTENT == {"action": "establish_session"}


def test_knock_reply_frames() -> None:
    assert fr.encode_frame(fr.knock_accept_frame(B, A, FID, "k-1", TS)) == (
        '{"v":1,"type":"knock_accept","from":"'
        + B
        + '","to":"'
        + A
        + '","id":"'
        + FID
        + '","knock_id":"k-1","ts":"'
        + TS
        + '"}'
    )
    assert fr.encode_frame(fr.knock_reject_frame(B, A, FID, "k-1", TS)) == (
        '{"v":1,"type":"knock_reject","from":"'
        + B
        + '","to":"'
        + A
        + '","id":"'
        + FID
        + '","knock_id":"k-1","reason":"policy_denied","ts":"'
        + TS
        + '"}'
    )


def test_message_frame() -> None:
    header = DH + (3).to_bytes(4, "big") + (0xFFFFFFFF).to_bytes(4, "big")
    blob = bytes(range(50))
    assert fr.encode_frame(fr.message_frame(A, B, FID, TS, header, blob)) == (
        '{"v":1,"type":"message","from":"'
        + A
        + '","to":"'
        + B
        + '","id":"'
        + FID
        + '","ts":"'
        + TS
        + '","header":{"dh":"'
        + b64(DH)
        + '","pn":3,"n":4294967295},"ciphertext":"'
        + b64(blob)
        + '"}'
    )


def test_plaintext_message_frame_latin1() -> None:
    payload = {"text": "café ÿ", "n": 1}
    frame = fr.plaintext_message_frame(A, B, FID, TS, payload)
    json_text = '{"text":"café ÿ","n":1}'
    assert fr.encode_frame(frame) == (
        '{"v":1,"type":"message","from":"'
        + A
        + '","to":"'
        + B
        + '","id":"'
        + FID
        + '","ts":"'
        + TS
        + '","ciphertext":"'
        + b64(json_text.encode("latin-1"))
        + '","plaintext":true}'
    )
    assert base64.b64decode(frame["ciphertext"]) == b'{"text":"caf\xe9 \xff","n":1}'
    parsed = roundtrip(frame)
    assert isinstance(parsed, fr.MessageFrame)
    assert parsed.plaintext_flag is True and parsed.header is None
    assert json.loads(parsed.ciphertext.decode("latin-1")) == payload


@pytest.mark.parametrize("payload", ["✓", {"k": "日本"}, ["ok", "\u0100"], "😀"])
def test_plaintext_message_frame_refuses_non_latin1(payload: Any) -> None:
    with pytest.raises(MeshProtocolError, match="Latin-1"):
        fr.plaintext_message_frame(A, B, FID, TS, payload)


def test_small_frames() -> None:
    assert fr.encode_frame(fr.ack_frame(FID)) == '{"v":1,"type":"ack","id":"' + FID + '"}'
    assert fr.encode_frame(fr.heartbeat_frame(A, TS)) == (
        '{"v":1,"type":"heartbeat","from":"' + A + '","ts":"' + TS + '"}'
    )
    assert fr.encode_frame(fr.disconnect_frame(A)) == ('{"v":1,"type":"disconnect","from":"' + A + '"}')
    assert fr.encode_frame(fr.fetch_pending_frame(A)) == ('{"v":1,"type":"fetch_pending","from":"' + A + '"}')


def test_encode_frame_is_compact_and_keeps_non_ascii() -> None:
    assert fr.encode_frame({"v": 1, "type": "x", "from": "did:é✓"}) == ('{"v":1,"type":"x","from":"did:é✓"}')


# --------------------------------------------------------------------------------------
# parsing round trips
# --------------------------------------------------------------------------------------


def test_parse_round_trips() -> None:
    ident = identity("alice")
    assert roundtrip(fr.connect_frame(A)) == fr.ConnectFrame(A)
    assert roundtrip(fr.connect_frame(A, identity=ident, timestamp=TS, token="t")) == (
        fr.ConnectFrame(A, ident.ed25519_public, TS, ident.sign(TS.encode()), "t")
    )
    assert roundtrip(fr.fetch_pending_frame(A)) == fr.FetchPendingFrame(A)
    est = Establishment(IK, EK, 0)
    assert roundtrip(fr.knock_frame(A, B, FID, TS, est)) == fr.KnockFrame(
        A, B, FID, TS, {"action": "establish_session"}, est, None
    )
    assert roundtrip(fr.knock_frame(A, B, FID, TS, None)) == fr.KnockFrame(
        A, B, FID, TS, {"action": "establish_session"}, None, None
    )
    assert roundtrip(fr.knock_accept_frame(B, A, FID, "k", TS)) == fr.KnockReplyFrame(True, B, A, FID, "k", TS, None)
    assert roundtrip(fr.knock_reject_frame(B, A, FID, "k", TS, "busy")) == fr.KnockReplyFrame(
        False, B, A, FID, "k", TS, "busy"
    )
    header = DH + (1).to_bytes(4, "big") + (2).to_bytes(4, "big")
    assert roundtrip(fr.message_frame(A, B, FID, TS, header, b"blob")) == fr.MessageFrame(
        A, B, FID, TS, header, b"blob", False
    )
    assert roundtrip(fr.ack_frame(FID)) == fr.AckFrame(FID)
    assert roundtrip(fr.heartbeat_frame(A, TS)) == fr.HeartbeatFrame(A, TS)
    assert roundtrip(fr.disconnect_frame(A)) == fr.DisconnectFrame(A)
    pending = {"type": "pending_messages", "messages": [message(), 5, None]}
    assert roundtrip(pending) == fr.PendingMessagesFrame((message(), 5, None))
    assert roundtrip({"type": "error", "detail": "boom"}) == fr.ErrorFrame("boom")
    assert roundtrip({"type": "error", "detail": {"a": [1]}}) == fr.ErrorFrame('{"a":[1]}')


def test_optional_fields_default() -> None:
    parsed = parse_text('{"type":"message","from":"x","id":"i","ciphertext":""}')
    assert parsed == fr.MessageFrame("x", "", "i", None, None, b"", False)
    parsed = parse_text('{"type":"knock_accept","from":"x"}')
    assert parsed == fr.KnockReplyFrame(True, "x", "", "", None, None, None)
    # the reason is only read from a reject
    parsed = parse_text('{"type":"knock_accept","from":"x","reason":"r"}')
    assert isinstance(parsed, fr.KnockReplyFrame) and parsed.reason is None
    # only a literal JSON true sets the plaintext flag
    for flag in ("1", '"true"', "false", "null"):
        parsed = parse_text('{"type":"message","from":"x","id":"i","ciphertext":"","plaintext":' + flag + "}")
        assert isinstance(parsed, fr.MessageFrame) and parsed.plaintext_flag is False


def test_frame_keeps_unknown_fields_out() -> None:
    parsed = roundtrip(message(extra="ignored", v=99))
    assert isinstance(parsed, fr.MessageFrame)
    assert parsed.header is not None and parsed.header[32:] == bytes([0, 0, 0, 3, 0, 0, 0, 7])


# --------------------------------------------------------------------------------------
# lenient base64
# --------------------------------------------------------------------------------------


def _variants(data: bytes) -> list[str]:
    std = base64.b64encode(data).decode()
    url = base64.urlsafe_b64encode(data).decode()
    return [std, std.rstrip("="), url, url.rstrip("=")]


def test_lenient_base64_in_frames() -> None:
    # chosen so that the encodings contain '+', '/' (std) and '-', '_' (url) and need padding
    blob = bytes([0xFB, 0xFF, 0xBF, 0xFE, 0x00])
    dh = bytes([0xFB, 0xEF, 0xFF]) * 10 + b"\xfe\xff"
    assert "+" in b64(blob) and "/" in b64(blob) and b64(blob).endswith("=")
    for ct_text in _variants(blob):
        for dh_text in _variants(dh):
            parsed = roundtrip(message(ciphertext=ct_text, header={"dh": dh_text, "pn": 0, "n": 0}))
            assert isinstance(parsed, fr.MessageFrame)
            assert parsed.ciphertext == blob
            assert parsed.header is not None and parsed.header[:32] == dh
    for ik_text in _variants(dh):
        est = {"ik": ik_text, "ek": b64(EK), "otk": 1}
        parsed = roundtrip({"type": "knock", "from": A, "id": FID, "establishment": est})
        assert isinstance(parsed, fr.KnockFrame)
        assert parsed.establishment == Establishment(dh, EK, 1)


@pytest.mark.parametrize("bad", ["!!!!", "AAA*", "AA AA", "AAAA\x00", "é" * 4, "A", "AA=A"])
def test_invalid_base64_rejected(bad: str) -> None:
    with pytest.raises(MeshProtocolError, match="base64"):
        roundtrip(message(ciphertext=bad))
    with pytest.raises(MeshProtocolError):
        roundtrip(message(header={"dh": bad, "pn": 0, "n": 0}))
    with pytest.raises(MeshProtocolError, match="public_key"):
        roundtrip({"type": "connect", "from": A, "public_key": bad})
    parsed = roundtrip({"type": "knock", "from": A, "id": FID, "establishment": {"ik": bad, "ek": b64(EK)}})
    assert isinstance(parsed, fr.KnockFrame) and parsed.establishment is None
    assert parsed.establishment_error is not None and "base64" in parsed.establishment_error


# --------------------------------------------------------------------------------------
# malformed frames
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "not json",
        "{",
        '{"type":"message"',
        "[]",
        '[{"type":"ack","id":"x"}]',
        '"a string"',
        "42",
        "null",
        b"\xff\xfe{}",
        b'{"type":"ack","id":"\xc3"}',
        "[" * 100_000,
        "[" * 100_000 + "]" * 100_000,
        '{"a":' * 100_000,
        "1" * 5000,  # beyond Python's default int digit limit
    ],
)
def test_decode_frame_rejects(text: str | bytes) -> None:
    with pytest.raises(MeshProtocolError):
        fr.decode_frame(text)


def test_decode_frame_size_limit() -> None:
    text = fr.encode_frame(fr.ack_frame("x" * 50))
    assert fr.decode_frame(text, max_bytes=len(text)) == json.loads(text)
    with pytest.raises(MeshProtocolError, match="exceeds"):
        fr.decode_frame(text, max_bytes=len(text) - 1)
    with pytest.raises(MeshProtocolError, match="exceeds"):
        fr.decode_frame(text.encode(), max_bytes=len(text) - 1)
    big = '{"type":"ack","id":"' + "x" * (fr.DEFAULT_MAX_FRAME_BYTES) + '"}'
    with pytest.raises(MeshProtocolError, match="exceeds"):
        fr.decode_frame(big)


def test_parse_frame_rejects_non_objects_and_missing_type() -> None:
    for obj in ([], "x", None, 5, {}, {"type": 5}, {"type": None}, {"type": ["message"]}):
        with pytest.raises(MeshProtocolError):
            fr.parse_frame(obj)


@pytest.mark.parametrize(
    "overrides",
    [
        {"from": _DROP},
        {"from": None},
        {"from": 5},
        {"from": ["did"]},
        {"from": "d" * 513},
        {"to": 7},
        {"id": _DROP},
        {"id": 12},
        {"id": "i" * 257},
        {"ts": 0},
        {"ciphertext": _DROP},
        {"ciphertext": None},
        {"ciphertext": 5},
        {"ciphertext": ["AAAA"]},
        {"header": "AAAA"},
        {"header": []},
        {"header": {"pn": 0, "n": 0}},
        {"header": {"dh": 5, "pn": 0, "n": 0}},
        {"header": {"dh": b64(DH[:31]), "pn": 0, "n": 0}},
        {"header": {"dh": b64(DH + b"\x00"), "pn": 0, "n": 0}},
        {"header": {"dh": "", "pn": 0, "n": 0}},
        {"header": {"dh": "A" * 65, "pn": 0, "n": 0}},
    ],
)
def test_message_frame_missing_or_ill_typed(overrides: dict[str, Any]) -> None:
    with pytest.raises(MeshProtocolError):
        roundtrip(message(**overrides))


@pytest.mark.parametrize("field", ["pn", "n"])
@pytest.mark.parametrize("value", [-1, 2**32, 2**32 + 5, 10**30, True, False, 1.0, 0.5, "1", None, [1], {"n": 1}])
def test_header_counter_must_be_u32(field: str, value: Any) -> None:
    header = {"dh": b64(DH), "pn": 0, "n": 0, field: value}
    with pytest.raises(MeshProtocolError, match=r"0\.\.2"):
        roundtrip(message(header=header))


@pytest.mark.parametrize("value", [0, 1, 2**31, 2**32 - 1])
def test_header_counter_bounds_accepted(value: int) -> None:
    parsed = roundtrip(message(header={"dh": b64(DH), "pn": value, "n": value}))
    assert isinstance(parsed, fr.MessageFrame) and parsed.header is not None
    assert parsed.header == DH + value.to_bytes(4, "big") * 2


def test_header_counter_missing() -> None:
    for header in ({"dh": b64(DH), "n": 0}, {"dh": b64(DH), "pn": 0}):
        with pytest.raises(MeshProtocolError):
            roundtrip(message(header=header))


@pytest.mark.parametrize(
    "est",
    [
        {"ik": 123, "ek": b64(EK)},
        {"ek": b64(EK)},
        {"ik": b64(IK)},
        {"ik": b64(IK), "ek": None},
        {"ik": b64(IK[:31]), "ek": b64(EK)},
        {"ik": b64(IK), "ek": b64(EK + b"\x00")},
        {"ik": "A" * 65, "ek": b64(EK)},
        {"ik": b64(IK), "ek": b64(EK), "otk": -1},
        {"ik": b64(IK), "ek": b64(EK), "otk": 2**32},
        "a string",
        [b64(IK), b64(EK)],
        5,
    ],
)
def test_malformed_establishment_is_reported_not_raised(est: Any) -> None:
    parsed = roundtrip({"type": "knock", "from": A, "to": B, "id": FID, "establishment": est})
    assert isinstance(parsed, fr.KnockFrame)
    assert parsed.establishment is None
    assert parsed.establishment_error
    assert parsed.from_did == A and parsed.id == FID


@pytest.mark.parametrize("otk", ["3", True, 1.0, None, [1]])
def test_establishment_otk_used_only_if_integer(otk: Any) -> None:
    est = {"ik": b64(IK), "ek": b64(EK), "otk": otk}
    parsed = roundtrip({"type": "knock", "from": A, "id": FID, "establishment": est})
    assert isinstance(parsed, fr.KnockFrame)
    assert parsed.establishment == Establishment(IK, EK, None)
    assert parsed.establishment_error is None


def test_knock_frame_requires_from_and_id() -> None:
    for frame in ({"type": "knock", "id": FID}, {"type": "knock", "from": A}):
        with pytest.raises(MeshProtocolError):
            roundtrip(frame)


def test_unknown_type() -> None:
    assert roundtrip({"type": "presence", "from": A}) == fr.UnknownFrame("presence")
    assert roundtrip({"type": "z" * 1000}) == fr.UnknownFrame("z" * 64)


def test_pending_messages() -> None:
    assert roundtrip({"type": "pending_messages"}) == fr.PendingMessagesFrame(())
    assert roundtrip({"type": "pending_messages", "messages": None}) == fr.PendingMessagesFrame(())
    assert roundtrip({"type": "pending_messages", "messages": []}) == fr.PendingMessagesFrame(())
    for bad in ({}, "x", 5):
        with pytest.raises(MeshProtocolError):
            roundtrip({"type": "pending_messages", "messages": bad})


def test_other_frames_require_their_fields() -> None:
    for frame in (
        {"type": "ack"},
        {"type": "ack", "id": 5},
        {"type": "heartbeat"},
        {"type": "disconnect", "from": 1},
        {"type": "fetch_pending"},
        {"type": "connect"},
        {"type": "knock_reject", "from": A, "reason": 5},
        {"type": "connect", "from": A, "token": "t" * 16385},
    ):
        with pytest.raises(MeshProtocolError):
            roundtrip(frame)


def test_connect_parse_ignores_non_string_key_fields() -> None:
    parsed = roundtrip({"type": "connect", "from": A, "public_key": 5, "signature": None})
    assert parsed == fr.ConnectFrame(A)


# --------------------------------------------------------------------------------------
# timestamps
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (0, "1970-01-01T00:00:00.000Z"),
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1.0004, "1970-01-01T00:00:01.000Z"),
        (1.0006, "1970-01-01T00:00:01.001Z"),
        (1.25, "1970-01-01T00:00:01.250Z"),
        (59.9996, "1970-01-01T00:01:00.000Z"),  # rounding carries into the seconds
        (-0.001, "1969-12-31T23:59:59.999Z"),
        (1767225600, "2026-01-01T00:00:00.000Z"),
        (1767225599.9999, "2026-01-01T00:00:00.000Z"),
        (951782400.123, "2000-02-29T00:00:00.123Z"),
    ],
)
def test_iso_timestamp(epoch: float, expected: str) -> None:
    assert fr.iso_timestamp(epoch) == expected


def test_ack_for_a_hostile_id_is_sendable() -> None:
    """A frame id with an escaped lone surrogate parses fine; the ack we build for it must
    still be valid UTF-8 text (the WebSocket send encodes it)."""
    parsed = parse_text('{"type":"message","from":"x","id":"\\ud800","ciphertext":""}')
    assert isinstance(parsed, fr.MessageFrame) and parsed.id == "\ud800"
    text = fr.encode_frame(fr.ack_frame(parsed.id))
    assert json.loads(text.encode("utf-8")) == {"v": 1, "type": "ack", "id": "\ud800"}
