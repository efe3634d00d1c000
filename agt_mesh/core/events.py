"""Events the protocol core reports to the application (through the ``MeshClient`` hooks)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "E2EVerified",
    "ErrorEvent",
    "Event",
    "KnockAccepted",
    "KnockDecision",
    "KnockRejected",
    "MessageReceived",
    "SessionEstablished",
    "SessionRekeyed",
]


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A message from ``peer``; ``payload`` is the decoded JSON value.

    ``text`` is the payload's JSON text as received (already checked to be strict JSON),
    so the shell stores it without serialising the value again; it is not part of
    equality.
    """

    peer: str
    payload: Any
    message_id: str
    plaintext: bool = False
    ts: str | None = None
    text: str | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class KnockDecision:
    """A KNOCK awaits the policy verdict: call ``MeshProtocol.resolve_knock(knock_id, ...)``."""

    peer: str
    intent: Any
    knock_id: str


@dataclass(frozen=True, slots=True)
class KnockAccepted:
    """``peer`` accepted our KNOCK."""

    peer: str


@dataclass(frozen=True, slots=True)
class KnockRejected:
    """``peer`` rejected our KNOCK.

    ``ignored`` is true when the session had already decrypted messages from the peer:
    a ``knock_reject`` is unauthenticated on pre-5.0 relays, so it does not destroy a
    proven session.
    """

    peer: str
    reason: str | None
    ignored: bool = False


@dataclass(frozen=True, slots=True)
class SessionEstablished:
    """A session with ``peer`` decrypted its first message or was initiated by us."""

    peer: str
    role: str
    profile: str


@dataclass(frozen=True, slots=True)
class SessionRekeyed:
    """``peer`` started a new session (after a restart or a KNOCK race) and we switched to it."""

    peer: str
    profile: str


@dataclass(frozen=True, slots=True)
class E2EVerified:
    """The first successful decryption from ``peer`` (the downgrade latch is now set)."""

    peer: str
    first_peer: bool


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """Something went wrong with an inbound frame; no session was harmed.

    ``kind`` is one of ``frame``, ``decrypt``, ``duplicate``, ``knock``, ``relay``, ``gap``,
    ``limit`` (a byte or count limit refused or dropped something), ``identity_binding`` (a
    key presented for a DID it does not belong to) and ``identity_changed`` (a pinned peer
    presented another key); ``peer`` is the claimed sender when known.
    """

    kind: str
    peer: str | None
    detail: str
    frame_id: str | None = field(default=None)


Event = (
    MessageReceived
    | KnockDecision
    | KnockAccepted
    | KnockRejected
    | SessionEstablished
    | SessionRekeyed
    | E2EVerified
    | ErrorEvent
)
