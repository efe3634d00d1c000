"""Application payload envelopes shared with kars peers (OpenClaw-side and Hermes-side agents).

Every envelope is a JSON object with a ``type``.  We send them as JSON objects; peers that
wrap JSON in a JSON *string* (the kars Python client does) are accepted on receipt too.

Task envelopes::

    task_request   {type, content, request_id, from_agent, timestamp}
    task_response  {type, content, ok, in_reply_to, request_id, from_agent, timestamp}
    task_progress  {type, request_id, in_reply_to, stage, content, from_agent, timestamp}

``in_reply_to`` / ``request_id`` of a response or progress tick carry the ``request_id`` of
the request it answers (kars Hermes workers send ``in_reply_to``; some peers send
``in_reply_to_id``).  A ``task_request`` that carries ``in_reply_to`` is itself a reply and is
never auto-answered (loop guard).

File envelopes — a file that fits one chunk (≤ 256 KiB raw by default) goes as the kars
``file_transfer``; a bigger one as ``count`` ``file_transfer_chunk`` messages::

    file_transfer        {type, transfer_id, file_name, file_data (std base64), size_bytes,
                          sha256 (hex, whole file), description, from_agent, timestamp}
    file_transfer_chunk  {type, transfer_id, file_name, index (0-based), count, size_bytes
                          (whole file), sha256 (hex, whole file), data (std base64 of this
                          chunk), description, from_agent, timestamp}
    file_transfer_ack    {type, transfer_id, file_name (as sent), success, saved_as,
                          saved_to, size_bytes, sha256, error, timestamp}

Chunks may arrive in any order and more than once; the receiver reassembles by ``index``,
checks the total size and the sha256 and acknowledges once (a duplicate after completion is
acknowledged again with the same result).  ``transfer_id`` is optional on ``file_transfer``
(kars senders omit it; the ack then matches on ``file_name``).  A 256 KiB raw chunk is about
470 KB on the wire (base64, JSON, ciphertext base64): well under the relay's 16 MiB frame
limit and under the 1 MiB inbound limit of kars Python peers.
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

__all__ = [
    "FILE_ACK",
    "FILE_CHUNK",
    "FILE_FAILED",
    "FILE_RECEIVED",
    "FILE_TRANSFER",
    "INTERNAL_TYPES",
    "PEERS_UPDATE",
    "TASK_PROGRESS",
    "TASK_REQUEST",
    "TASK_RESPONSE",
    "correlation_id",
    "file_ack",
    "file_chunk",
    "file_transfer",
    "iso_now",
    "parse_envelope",
    "task_progress",
    "task_request",
    "task_response",
    "unwrap_file_transfer",
]

TASK_REQUEST = "task_request"
TASK_RESPONSE = "task_response"
TASK_PROGRESS = "task_progress"
FILE_TRANSFER = "file_transfer"
FILE_CHUNK = "file_transfer_chunk"
FILE_ACK = "file_transfer_ack"
PEERS_UPDATE = "peers_update"
#: Local notices the tools put in the inbox in place of a file transfer (never sent).
FILE_RECEIVED = "file_received"
FILE_FAILED = "file_transfer_failed"

#: Envelope types the tools never show to the model as messages.
INTERNAL_TYPES = frozenset({TASK_PROGRESS, FILE_ACK, FILE_CHUNK})

_CORRELATION_KEYS = ("in_reply_to", "in_reply_to_id", "reply_to", "request_id")


def iso_now() -> str:
    """The current UTC time as ISO 8601 with milliseconds and ``Z``."""
    now = _dt.datetime.now(_dt.UTC)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def parse_envelope(payload: Any) -> dict[str, Any] | None:
    """The envelope in ``payload`` (an object with a string ``type``), or None.

    Accepts the object itself or a JSON string holding it (kars' Python client sends JSON
    text as a JSON string).
    """
    if isinstance(payload, str):
        text = payload.lstrip()
        if not text.startswith("{") or len(text) > 64 * 1024 * 1024:
            return None
        try:
            payload = json.loads(text)
        except ValueError:
            return None
    if isinstance(payload, dict) and isinstance(payload.get("type"), str):
        return payload
    return None


def unwrap_file_transfer(env: dict[str, Any]) -> dict[str, Any]:
    """An OpenClaw sender may wrap a ``file_transfer`` as the JSON ``content`` of a
    ``task_request``: return the inner envelope in that case, else ``env``."""
    if env.get("type") == TASK_REQUEST and isinstance(env.get("content"), str):
        inner = parse_envelope(env["content"])
        if inner is not None and inner.get("type") in (FILE_TRANSFER, FILE_CHUNK):
            return inner
    return env


def correlation_id(env: dict[str, Any]) -> str | None:
    """The request id a response / progress tick / ack refers to, if it names one."""
    for key in _CORRELATION_KEYS:
        value = env.get(key)
        if isinstance(value, str) and value:
            return value
    return None


def _stamped(env: dict[str, Any], from_agent: str | None, extra: dict[str, Any]) -> dict[str, Any]:
    """``env`` with the sender's declared name, the extra fields and the timestamp, last."""
    if from_agent:
        env["from_agent"] = from_agent
    env.update(extra)
    env["timestamp"] = iso_now()
    return env


def task_request(content: str, request_id: str, *, from_agent: str | None) -> dict[str, Any]:
    return _stamped({"type": TASK_REQUEST, "content": content, "request_id": request_id}, from_agent, {})


def task_response(
    content: str, in_reply_to: str | None, *, ok: bool, from_agent: str | None, **extra: Any
) -> dict[str, Any]:
    env: dict[str, Any] = {"type": TASK_RESPONSE, "content": content, "ok": ok}
    if in_reply_to:
        env.update(in_reply_to=in_reply_to, request_id=in_reply_to)
    return _stamped(env, from_agent, extra)


def task_progress(
    request_id: str | None, *, stage: str, content: str = "", from_agent: str | None, **extra: Any
) -> dict[str, Any]:
    env: dict[str, Any] = {"type": TASK_PROGRESS, "stage": stage, "content": content}
    if request_id:
        env.update(request_id=request_id, in_reply_to=request_id)
    return _stamped(env, from_agent, extra)


def file_transfer(
    *,
    transfer_id: str,
    file_name: str,
    data_b64: str,
    size_bytes: int,
    sha256: str,
    description: str,
    from_agent: str | None,
) -> dict[str, Any]:
    return {
        "type": FILE_TRANSFER,
        "transfer_id": transfer_id,
        "file_name": file_name,
        "file_data": data_b64,
        "size_bytes": size_bytes,
        "sha256": sha256,
        "description": description,
        "from_agent": from_agent or "unknown",
        "timestamp": iso_now(),
    }


def file_chunk(
    *,
    transfer_id: str,
    file_name: str,
    index: int,
    count: int,
    size_bytes: int,
    sha256: str,
    data_b64: str,
    description: str,
    from_agent: str | None,
) -> dict[str, Any]:
    return {
        "type": FILE_CHUNK,
        "transfer_id": transfer_id,
        "file_name": file_name,
        "index": index,
        "count": count,
        "size_bytes": size_bytes,
        "sha256": sha256,
        "data": data_b64,
        "description": description,
        "from_agent": from_agent or "unknown",
        "timestamp": iso_now(),
    }


def file_ack(
    *,
    transfer_id: str | None,
    file_name: str,
    success: bool,
    saved_as: str | None = None,
    saved_to: str | None = None,
    size_bytes: int | None = None,
    sha256: str | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    env: dict[str, Any] = {"type": FILE_ACK, "file_name": file_name, "success": success}
    if transfer_id:
        env["transfer_id"] = transfer_id
    for key, value in (
        ("saved_as", saved_as),
        ("saved_to", saved_to),
        ("size_bytes", size_bytes),
        ("sha256", sha256),
        ("error", error),
    ):
        if value is not None:
            env[key] = value
    env["timestamp"] = iso_now()
    return env
