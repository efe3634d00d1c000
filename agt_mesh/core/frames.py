"""Relay frame codec: build and parse the JSON frames exchanged through the relay.

Field names, key order and encodings follow what the TypeScript ``MeshClient`` emits
(``wire.md`` §4.2, §5.3): every frame carries ``"v": 1``; binary values are standard
base64 with padding; frames are compact JSON.  Builders return ``dict``s whose key order
reproduces TS bytes when passed to :func:`encode_frame`.

Parsing is strict about types and sizes (a hostile relay or peer can send anything) and
lenient about base64 flavour.  :func:`parse_frame` raises
:class:`~agt_mesh.errors.MeshProtocolError` for anything malformed; unknown frame types
parse to :class:`UnknownFrame` so callers can ignore them.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

from agt_mesh.core.encoding import b64_decode, b64_encode, compact_json
from agt_mesh.core.identity import Identity
from agt_mesh.core.ratchet import pack_header
from agt_mesh.core.strict_json import loads_strict
from agt_mesh.core.x3dh import Establishment
from agt_mesh.errors import MalformedJsonError, MalformedMessageError, MeshProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME_BYTES",
    "KNOCK_INTENT",
    "MAX_SEQ",
    "AckFrame",
    "ConnectFrame",
    "DisconnectFrame",
    "ErrorFrame",
    "FetchPendingFrame",
    "Frame",
    "HeartbeatFrame",
    "KnockFrame",
    "KnockReplyFrame",
    "MessageFrame",
    "PendingMessagesFrame",
    "UnknownFrame",
    "ack_frame",
    "connect_frame",
    "decode_frame",
    "disconnect_frame",
    "encode_frame",
    "fetch_pending_frame",
    "heartbeat_frame",
    "iso_timestamp",
    "knock_accept_frame",
    "knock_frame",
    "knock_reject_frame",
    "message_frame",
    "parse_frame",
    "plaintext_message_frame",
]

FRAME_VERSION = 1
KNOCK_INTENT: dict[str, Any] = {"action": "establish_session"}
#: Largest inbound frame accepted (the AGT relay's own limit is 16 MiB).
DEFAULT_MAX_FRAME_BYTES = 16 * 1024 * 1024
_MAX_ID_LEN = 256
_MAX_DID_LEN = 512
#: largest ``"sq"`` accepted (JSON numbers stay exact up to 2^53 in every language)
MAX_SEQ = 2**53 - 1
_U32_MAX = 0xFFFFFFFF


def iso_timestamp(epoch_seconds: float) -> str:
    """JavaScript ``Date.toISOString()`` form: ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (UTC)."""
    ms = round(epoch_seconds * 1000)
    t = _dt.datetime.fromtimestamp(ms // 1000, tz=_dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + f".{ms % 1000:03d}Z"


# --------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------


def connect_frame(
    did: str,
    *,
    identity: Identity | None = None,
    timestamp: str | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """The ``connect`` frame.

    With ``identity`` and ``timestamp`` it carries the proof of possession that AGT 5.x
    relays require (``public_key``, ``timestamp``, ``signature`` = Ed25519 over the UTF-8
    timestamp, standard base64); pre-POP relays ignore those fields.  ``token`` is the
    relay's shared secret or an Entra token, when configured.
    """
    frame: dict[str, Any] = {"v": FRAME_VERSION, "type": "connect", "from": did}
    if identity is not None:
        if timestamp is None:
            raise ValueError("a POP connect frame needs a timestamp")
        frame["public_key"] = b64_encode(identity.ed25519_public)
        frame["timestamp"] = timestamp
        frame["signature"] = b64_encode(identity.sign(timestamp.encode()))
    if token is not None:
        frame["token"] = token
    return frame


def fetch_pending_frame(did: str) -> dict[str, Any]:
    return {"v": FRAME_VERSION, "type": "fetch_pending", "from": did}


def knock_frame(
    from_did: str, to_did: str, frame_id: str, ts: str, establishment: Establishment | None
) -> dict[str, Any]:
    """A ``knock`` with the X3DH establishment embedded (``otk`` omitted when none was used)."""
    frame: dict[str, Any] = {
        "v": FRAME_VERSION,
        "type": "knock",
        "from": from_did,
        "to": to_did,
        "id": frame_id,
        "ts": ts,
        "intent": dict(KNOCK_INTENT),
    }
    if establishment is not None:
        est: dict[str, Any] = {
            "ik": b64_encode(establishment.initiator_identity_key),
            "ek": b64_encode(establishment.ephemeral_public_key),
        }
        if establishment.one_time_pre_key_id is not None:
            est["otk"] = establishment.one_time_pre_key_id
        frame["establishment"] = est
    return frame


def knock_accept_frame(from_did: str, to_did: str, frame_id: str, knock_id: str, ts: str) -> dict[str, Any]:
    return {
        "v": FRAME_VERSION,
        "type": "knock_accept",
        "from": from_did,
        "to": to_did,
        "id": frame_id,
        "knock_id": knock_id,
        "ts": ts,
    }


def knock_reject_frame(
    from_did: str, to_did: str, frame_id: str, knock_id: str, ts: str, reason: str = "policy_denied"
) -> dict[str, Any]:
    return {
        "v": FRAME_VERSION,
        "type": "knock_reject",
        "from": from_did,
        "to": to_did,
        "id": frame_id,
        "knock_id": knock_id,
        "reason": reason,
        "ts": ts,
    }


def message_frame(from_did: str, to_did: str, frame_id: str, ts: str, header: bytes, blob: bytes) -> dict[str, Any]:
    """An encrypted ``message`` frame from a 40-byte ratchet header and the AEAD blob."""
    pn = int.from_bytes(header[32:36], "big")
    n = int.from_bytes(header[36:40], "big")
    return {
        "v": FRAME_VERSION,
        "type": "message",
        "from": from_did,
        "to": to_did,
        "id": frame_id,
        "ts": ts,
        "header": {"dh": b64_encode(header[:32]), "pn": pn, "n": n},
        "ciphertext": b64_encode(blob),
    }


def plaintext_message_frame(from_did: str, to_did: str, frame_id: str, ts: str, payload: Any) -> dict[str, Any]:
    """An unencrypted message to an allow-listed plaintext peer (base64 of Latin-1 JSON).

    Raises:
        MeshProtocolError: if the JSON text has characters above U+00FF (the TypeScript
            SDK's ``btoa`` cannot carry them either).
    """
    try:
        data = compact_json(payload).encode("latin-1")
    except UnicodeEncodeError:
        raise MeshProtocolError(
            "plaintext payloads must be Latin-1 JSON (TypeScript peers decode them with atob); "
            "use an encrypted session for other text"
        ) from None
    return {
        "v": FRAME_VERSION,
        "type": "message",
        "from": from_did,
        "to": to_did,
        "id": frame_id,
        "ts": ts,
        "ciphertext": b64_encode(data),
        "plaintext": True,
    }


def ack_frame(frame_id: str) -> dict[str, Any]:
    return {"v": FRAME_VERSION, "type": "ack", "id": frame_id}


def heartbeat_frame(did: str, ts: str) -> dict[str, Any]:
    return {"v": FRAME_VERSION, "type": "heartbeat", "from": did, "ts": ts}


def disconnect_frame(did: str) -> dict[str, Any]:
    return {"v": FRAME_VERSION, "type": "disconnect", "from": did}


def encode_frame(frame: dict[str, Any]) -> str:
    """Serialise a frame as compact JSON text (``JSON.stringify`` form)."""
    return compact_json(frame)


# --------------------------------------------------------------------------------------
# parsed frames
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConnectFrame:
    from_did: str
    public_key: bytes | None = None
    timestamp: str | None = None
    signature: bytes | None = None
    token: str | None = field(default=None, repr=False)


@dataclass(frozen=True, slots=True)
class FetchPendingFrame:
    from_did: str


@dataclass(frozen=True, slots=True)
class KnockFrame:
    from_did: str
    to_did: str
    id: str
    ts: str | None
    intent: Any
    establishment: Establishment | None
    #: Why the establishment could not be parsed (it was present but malformed).
    establishment_error: str | None = None


@dataclass(frozen=True, slots=True)
class KnockReplyFrame:
    accepted: bool
    from_did: str
    to_did: str
    id: str
    knock_id: str | None
    ts: str | None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class MessageFrame:
    from_did: str
    to_did: str
    id: str
    ts: str | None
    #: 40-byte ratchet header, or ``None`` for a headerless (plaintext-style) frame.
    header: bytes | None
    ciphertext: bytes
    plaintext_flag: bool = False
    #: the sender asks for an end-to-end receipt (``"rr": 1``, an ``agt_mesh`` extension
    #: that relays forward and other clients ignore)
    receipt_requested: bool = False
    #: the sender's sequence number for this message on the current session (``"sq"``,
    #: an ``agt_mesh`` extension: 1, 2, ... over the receipted messages of one session)
    seq: int | None = None


@dataclass(frozen=True, slots=True)
class AckFrame:
    id: str


@dataclass(frozen=True, slots=True)
class HeartbeatFrame:
    from_did: str
    ts: str | None


@dataclass(frozen=True, slots=True)
class DisconnectFrame:
    from_did: str


@dataclass(frozen=True, slots=True)
class PendingMessagesFrame:
    #: Raw entries; each must be parsed on its own (one bad entry must not stop the rest).
    messages: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    detail: str


@dataclass(frozen=True, slots=True)
class UnknownFrame:
    type: str


Frame = (
    ConnectFrame
    | FetchPendingFrame
    | KnockFrame
    | KnockReplyFrame
    | MessageFrame
    | AckFrame
    | HeartbeatFrame
    | DisconnectFrame
    | PendingMessagesFrame
    | ErrorFrame
    | UnknownFrame
)


def decode_frame(text: str | bytes, *, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Any:
    """Parse frame text into a JSON object: strict JSON (UTF-8, no NaN/Infinity, numbers
    in range, at most :data:`~agt_mesh.core.strict_json.MAX_JSON_DEPTH` levels deep).

    Raises:
        MeshProtocolError: (:class:`~agt_mesh.errors.MalformedJsonError`) if the text is
            too large, not strict JSON, or not a JSON object.
    """
    obj = loads_strict(text, max_bytes=max_bytes, what="frame")
    if not isinstance(obj, dict):
        raise MalformedJsonError("frame is not a JSON object", reason="syntax")
    return obj


def _str(obj: dict[str, Any], key: str, *, required: bool = True, limit: int = _MAX_ID_LEN) -> Any:
    value = obj.get(key)
    if value is None:
        if required:
            raise MeshProtocolError(f"frame field {key!r} is missing")
        return None
    if not isinstance(value, str):
        raise MeshProtocolError(f"frame field {key!r} must be a string")
    if len(value) > limit:
        raise MeshProtocolError(f"frame field {key!r} is too long")
    return value


def _u32(value: Any, name: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U32_MAX:
        raise MeshProtocolError(f"header field {name!r} must be an integer in 0..2^32-1")
    return value


def _b64(value: Any, name: str) -> bytes:
    try:
        return b64_decode(value)
    except ValueError:
        raise MeshProtocolError(f"frame field {name!r} is not valid base64") from None


def parse_header(header: Any) -> bytes:
    """The 40-byte header from a frame's ``{"dh", "pn", "n"}`` object."""
    if not isinstance(header, dict):
        raise MeshProtocolError("message header must be an object with dh, pn and n")
    dh_text = header.get("dh")
    if not isinstance(dh_text, str) or len(dh_text) > 64:
        raise MeshProtocolError("message header dh must be a base64 string of 32 bytes")
    dh = _b64(dh_text, "header.dh")
    try:
        return pack_header(dh, _u32(header.get("pn"), "pn"), _u32(header.get("n"), "n"))
    except MalformedMessageError as exc:
        raise MeshProtocolError(str(exc)) from None


def parse_establishment(value: Any) -> Establishment:
    """Parse a KNOCK ``establishment`` object ``{"ik", "ek", "otk"?}``."""
    if not isinstance(value, dict):
        raise MeshProtocolError("establishment must be an object")
    ik, ek = value.get("ik"), value.get("ek")
    if not isinstance(ik, str) or not isinstance(ek, str) or len(ik) > 64 or len(ek) > 64:
        raise MeshProtocolError("establishment ik and ek must be base64 strings")
    ik_b, ek_b = _b64(ik, "establishment.ik"), _b64(ek, "establishment.ek")
    if len(ik_b) != 32 or len(ek_b) != 32:
        raise MeshProtocolError("establishment keys must be 32 bytes")
    otk = value.get("otk")
    otk_id: int | None = None
    if isinstance(otk, int) and not isinstance(otk, bool):
        if not 0 <= otk <= _U32_MAX:
            raise MeshProtocolError("establishment otk id out of range")
        otk_id = otk
    return Establishment(ik_b, ek_b, otk_id)


def _seq(value: Any) -> int | None:
    """A usable ``"sq"`` value, else ``None`` (the message is then simply not ordered)."""
    if type(value) is int and 0 < value <= MAX_SEQ:
        return value
    return None


def parse_frame(obj: Any) -> Frame:
    """Turn a decoded JSON object into a typed frame.

    Raises:
        MeshProtocolError: if a known frame type has missing or ill-typed fields.
    """
    if not isinstance(obj, dict):
        raise MeshProtocolError("frame is not a JSON object")
    ftype = obj.get("type")
    if not isinstance(ftype, str):
        raise MeshProtocolError("frame has no type")
    if ftype == "message":
        from_did = _str(obj, "from", limit=_MAX_DID_LEN)
        to_did = _str(obj, "to", required=False, limit=_MAX_DID_LEN) or ""
        frame_id = _str(obj, "id")
        ts = _str(obj, "ts", required=False)
        ct = obj.get("ciphertext")
        if not isinstance(ct, str):
            raise MeshProtocolError("message ciphertext must be a base64 string")
        raw_header = obj.get("header")
        header = parse_header(raw_header) if raw_header is not None else None
        return MessageFrame(
            from_did,
            to_did,
            frame_id,
            ts,
            header,
            _b64(ct, "ciphertext"),
            obj.get("plaintext") is True,
            obj.get("rr") == 1,
            _seq(obj.get("sq")),
        )
    if ftype == "knock":
        from_did = _str(obj, "from", limit=_MAX_DID_LEN)
        to_did = _str(obj, "to", required=False, limit=_MAX_DID_LEN) or ""
        frame_id = _str(obj, "id")
        ts = _str(obj, "ts", required=False)
        est_raw = obj.get("establishment")
        est: Establishment | None = None
        est_error: str | None = None
        if est_raw is not None:
            try:
                est = parse_establishment(est_raw)
            except MeshProtocolError as exc:
                est_error = str(exc)
        return KnockFrame(from_did, to_did, frame_id, ts, obj.get("intent"), est, est_error)
    if ftype in ("knock_accept", "knock_reject"):
        return KnockReplyFrame(
            ftype == "knock_accept",
            _str(obj, "from", limit=_MAX_DID_LEN),
            _str(obj, "to", required=False, limit=_MAX_DID_LEN) or "",
            _str(obj, "id", required=False) or "",
            _str(obj, "knock_id", required=False),
            _str(obj, "ts", required=False),
            _str(obj, "reason", required=False) if ftype == "knock_reject" else None,
        )
    if ftype == "ack":
        return AckFrame(_str(obj, "id"))
    if ftype == "pending_messages":
        msgs = obj.get("messages")
        if msgs is None:
            return PendingMessagesFrame(())
        if not isinstance(msgs, list):
            raise MeshProtocolError("pending_messages.messages must be a list")
        return PendingMessagesFrame(tuple(msgs))
    if ftype == "heartbeat":
        return HeartbeatFrame(_str(obj, "from", limit=_MAX_DID_LEN), _str(obj, "ts", required=False))
    if ftype == "disconnect":
        return DisconnectFrame(_str(obj, "from", limit=_MAX_DID_LEN))
    if ftype == "fetch_pending":
        return FetchPendingFrame(_str(obj, "from", limit=_MAX_DID_LEN))
    if ftype == "connect":
        pk = obj.get("public_key")
        sig = obj.get("signature")
        return ConnectFrame(
            _str(obj, "from", limit=_MAX_DID_LEN),
            _b64(pk, "public_key") if isinstance(pk, str) else None,
            _str(obj, "timestamp", required=False),
            _b64(sig, "signature") if isinstance(sig, str) else None,
            _str(obj, "token", required=False, limit=16384),
        )
    if ftype == "error":
        detail = obj.get("detail")
        if not isinstance(detail, str):
            try:
                detail = compact_json(detail)
            except (ValueError, RecursionError):
                detail = "(unprintable error detail)"
        return ErrorFrame(detail[:2000])
    return UnknownFrame(ftype[:64])
