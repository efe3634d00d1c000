"""One peer's session: the active ratchet plus the ratchets that may replace it.

A session can hold, besides its **primary** ratchet:

* **candidates** — responder ratchets derived from a KNOCK whose KDF profile (and signed
  pre-key) is not yet known; the first message whose AEAD tag verifies under one of
  them decides, and that one becomes primary.  Until then nothing is assumed.
* a **previous** ratchet — the primary that was replaced when the peer re-keyed (after a
  restart, or when both sides KNOCKed at once), kept to decrypt frames still in flight.

It also holds the per-session message sequence of ``agt_mesh`` peers (``"sq"`` on the
wire): how many receipted messages we sent on the primary, how far the peer's messages
were delivered in order, and the messages **held back** because an earlier one is still
missing (it is re-sent by the peer; see :mod:`agt_mesh.core.protocol`).  Held messages are
decrypted and committed with the ratchet state, so a crash loses none of them.

Decryption tries the primary, then the candidates, then the previous ratchet.  Every
try is transactional (see :mod:`agt_mesh.core.ratchet`), so a failed try costs time but
never state.

The saved state is a named, versioned map (:data:`SESSION_FORMAT`, see
:mod:`agt_mesh.core.state_format`); every earlier version still loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from agt_mesh.core import state_format as sf
from agt_mesh.core.primitives import RandomSource
from agt_mesh.core.ratchet import DoubleRatchet
from agt_mesh.core.x3dh import KdfProfile
from agt_mesh.errors import DecryptError, DuplicateMessageError, MeshStateError

__all__ = [
    "MAX_CANDIDATES",
    "SESSION_FORMAT",
    "SESSION_STATE_VERSION",
    "Candidate",
    "DecryptOutcome",
    "HeldMessage",
    "PeerSession",
]

#: Re-key candidates kept per peer (bounds the work a flood of KNOCKs can cause).
MAX_CANDIDATES = 8


@dataclass(slots=True)
class Candidate:
    profile: KdfProfile
    ratchet: DoubleRatchet
    #: the KNOCK that produced it (replays of the same KNOCK are ignored)
    knock_ek: bytes = b""
    #: made from a KNOCK that crossed our own, still unproven, KNOCK (simultaneous open)
    glare: bool = False


@dataclass(slots=True)
class HeldMessage:
    """A decrypted message waiting for an earlier one of the same sender."""

    seq: int
    message_id: str
    #: the payload as compact JSON text; ``None`` marks a slot filled without a message
    #: (a re-sent duplicate of one already delivered)
    payload: str | None
    ts: str | None
    #: when it was held (the protocol clock): it waits ``reorder_timeout`` at most
    held_at: float


@dataclass(slots=True)
class DecryptOutcome:
    plaintext: bytes
    #: "primary", "candidate" or "previous"
    source: str
    switched: bool = False


@dataclass(slots=True)
class PeerSession:
    """Everything we hold for one peer."""

    peer: str
    role: str  # "initiator" or "responder" of the primary
    profile: KdfProfile | None
    primary: DoubleRatchet | None
    candidates: list[Candidate] = field(default_factory=list)
    previous: DoubleRatchet | None = None
    #: the primary has decrypted at least one message
    verified: bool = False
    #: the peer accepted our KNOCK (initiator) or we accepted theirs (responder)
    accepted: bool = False
    #: No longer changed by the protocol: it counted undecryptable frames, which may be
    #: forged, so it let anyone who can write the peer's DID in ``from`` change (and tear
    #: down) the session.  Kept only so saved states keep their fields; it stays 0 (and
    #: unwritten) in every session made since.
    failures: int = 0
    last_activity: float = 0.0
    establishment_ek: bytes = b""
    #: our KNOCK frame while the peer has neither accepted it nor answered through the
    #: session: re-sent after a reconnect or restart, in case it never reached the relay
    pending_knock: dict[str, Any] | None = None
    #: id of our KNOCK that made the primary (a ``knock_reject`` naming another is stale)
    knock_id: str | None = None
    #: the peer's timestamp on its ``knock_accept`` of our KNOCK: a KNOCK it sent later is
    #: a re-key (it dropped our session), not a simultaneous open
    accept_ts: str | None = None
    #: receipted messages we sent on the primary (the last ``"sq"`` used)
    send_seq: int = 0
    #: the peer's messages on the primary are delivered in order up to this ``"sq"``
    recv_seq: int = 0
    #: messages held back until the ones before them arrive, by ``seq``
    held: list[HeldMessage] = field(default_factory=list)

    @property
    def held_back(self) -> int:
        """Messages held back (slots taken by duplicates do not count)."""
        return sum(1 for h in self.held if h.payload is not None)

    def peer_identity_key(self) -> bytes | None:
        """The peer's X25519 identity key, pinned by the primary (the AD ends ``IK_A || IK_B``)."""
        r = self.primary
        if r is None or len(r.ad) < 64:
            return None
        return r.ad[-32:] if self.role == "initiator" else r.ad[-64:-32]

    def peer_keys(self, own_key: bytes) -> set[bytes]:
        """The peer identity keys of every ratchet held (primary, candidates, previous).

        Each ratchet's AD ends ``IK_initiator || IK_responder``; the peer's is the one that
        is not ``own_key`` (our X25519 identity key).
        """
        keys = set()
        for r in (self.primary, *(c.ratchet for c in self.candidates), self.previous):
            if r is not None and len(r.ad) >= 64:
                first, second = r.ad[-64:-32], r.ad[-32:]
                keys.add(second if first == own_key else first)
        return keys

    @property
    def can_send(self) -> bool:
        return self.primary is not None and self.primary.can_send

    def knows_knock(self, ek: bytes) -> bool:
        """Whether the KNOCK with ephemeral key ``ek`` made this session or a candidate."""
        return ek == self.establishment_ek or any(c.knock_ek == ek for c in self.candidates)

    def add_candidates(self, cands: list[Candidate]) -> bool:
        """Add the candidates of one KNOCK; False if that KNOCK was already seen."""
        if not cands or (cands[0].knock_ek and self.knows_knock(cands[0].knock_ek)):
            return False
        self.candidates.extend(cands)
        if len(self.candidates) > MAX_CANDIDATES:
            del self.candidates[: len(self.candidates) - MAX_CANDIDATES]
        return True

    def decrypt(self, header: bytes, blob: bytes, random: RandomSource, *, keep_own: bool) -> DecryptOutcome:
        """Decrypt with the primary, else a candidate, else the previous ratchet.

        ``keep_own``: when a *candidate* decrypts but our unverified primary is a session
        we initiated and we win the tie-break of a simultaneous KNOCK, the candidate is
        used for this message without replacing the primary.

        Raises:
            DecryptError: the error of the primary (or of the first candidate when there
                is no primary) if nothing decrypts; ``DuplicateMessageError`` at once for
                a duplicate on the primary.
        """
        first_error: DecryptError | None = None
        if self.primary is not None:
            try:
                pt = self.primary.decrypt(header, blob, random)
            except DuplicateMessageError:
                raise
            except DecryptError as exc:
                first_error = exc
            else:
                self.verified = True
                self.pending_knock = None
                return DecryptOutcome(pt, "primary")
        for cand in list(self.candidates):
            try:
                pt = cand.ratchet.decrypt(header, blob, random)
            except DecryptError as exc:
                first_error = first_error or exc
                continue
            # the other candidates of the same KNOCK are now known to be wrong
            self.candidates = [c for c in self.candidates if c.knock_ek != cand.knock_ek]
            if self.primary is not None and keep_own and cand.glare:
                # keep our primary; remember the peer's session for its later frames
                self.previous = cand.ratchet
                return DecryptOutcome(pt, "candidate")
            if self.primary is not None:
                self.previous = self.primary
            self.primary = cand.ratchet
            self.profile = cand.profile
            self.role = "responder"
            self.establishment_ek = cand.knock_ek
            self.verified = True
            self.accepted = True
            switched = self.previous is not None
            if switched:
                self.candidates.clear()
            return DecryptOutcome(pt, "candidate", switched=switched)
        if self.previous is not None:
            try:
                pt = self.previous.decrypt(header, blob, random)
            except DecryptError as exc:
                first_error = first_error or exc
            else:
                return DecryptOutcome(pt, "previous")
        assert first_error is not None
        raise first_error

    def summary(self) -> dict[str, Any]:
        """Counters and flags only — never key material."""
        return {
            "peer": self.peer,
            "role": self.role,
            "kdf_profile": self.profile.value if self.profile else None,
            "verified": self.verified,
            "accepted": self.accepted,
            "pending_candidates": len(self.candidates),
            "has_previous": self.previous is not None,
            "held_back": self.held_back,
            "last_activity": self.last_activity,
            "ratchet": self.primary.summary() if self.primary else None,
        }

    # -- persistence --------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """The session as a named map of the current version (see :data:`SESSION_FORMAT`);
        its ratchets are nested ratchet state maps."""
        return SESSION_FORMAT.dump(self)

    @classmethod
    def from_state(cls, state: Any) -> PeerSession:
        """Restore a session from a state map (or positional array) of any version this SDK reads.

        Raises:
            MeshStateError: for unknown versions or corrupted data.
        """
        return cls(**SESSION_FORMAT.load(state))

    def to_bytes(self) -> bytes:
        """Serialise (a msgpack map of version :data:`SESSION_STATE_VERSION`; see the README)."""
        return SESSION_FORMAT.pack(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerSession:
        """Restore a session written by :meth:`to_bytes` (this or any earlier version).

        Raises:
            MeshStateError: for unknown versions or corrupted data.
        """
        return cls(**SESSION_FORMAT.unpack_and_load(data))

    def __repr__(self) -> str:
        return (
            f"PeerSession(peer={self.peer!r}, role={self.role!r}, profile={self.profile}, "
            f"verified={self.verified}, candidates={len(self.candidates)})"
        )


# -- saved state ------------------------------------------------------------------------
#
# Version 3 (current) is a map: the keys below, plus "v"; the ratchets are nested ratchet
# state maps (each with its own version, migrated by the ratchet format).  Versions 1 and 2
# were positional arrays whose ratchets were nested msgpack blobs; version 2 appended the
# message sequence (send_seq, recv_seq, held) to version 1's 15 slots.

#: The version :meth:`PeerSession.to_bytes` writes.
SESSION_STATE_VERSION = 3

#: counters are bounded only by what msgpack stores: whatever the protocol writes must load
_uint = sf.count((1 << 64) - 1)


def _load_ratchet(value: Any) -> DoubleRatchet:
    return DoubleRatchet.from_state(value)


def _load_opt_ratchet(value: Any) -> DoubleRatchet | None:
    return None if value is None else DoubleRatchet.from_state(value)


def _dump_opt_ratchet(r: DoubleRatchet | None) -> dict[str, Any] | None:
    return None if r is None else r.to_state()


def _dump_profile(profile: KdfProfile | None) -> str | None:
    return None if profile is None else profile.value


def _load_knock(value: Any) -> dict[str, Any] | None:
    if value is None:
        return None
    knock = json.loads(sf.text(value))
    if type(knock) is not dict:
        raise ValueError("pending knock")
    return knock


def _dump_knock(knock: dict[str, Any] | None) -> str | None:
    return None if knock is None else json.dumps(knock, separators=(",", ":"))


_opt_text = sf.optional(sf.text)
#: the ephemeral key of the KNOCK that made a ratchet; empty for one not made by a KNOCK
_knock_ek = sf.binary(0, 32)

#: A re-key candidate inside a session state.
_CANDIDATE_RECORD = sf.Record(
    "session candidate",
    [
        sf.Field("kdf", "profile", KdfProfile, lambda p: p.value),
        sf.Field("r", "ratchet", _load_ratchet, DoubleRatchet.to_state),
        sf.Field("ek", "knock_ek", _knock_ek, default=b""),
        sf.Field("gl", "glare", sf.flag, default=False),
    ],
)

#: A held-back message inside a session state.
_HELD_RECORD = sf.Record(
    "held message",
    [
        sf.Field("q", "seq", _uint),
        sf.Field("id", "message_id", sf.text),
        sf.Field("p", "payload", _opt_text, default=None),  # compact JSON text; nil: a slot taken by a duplicate
        sf.Field("ts", "ts", _opt_text, default=None),
        sf.Field("at", "held_at", sf.number),
    ],
)


def _load_candidates(value: Any) -> list[Candidate]:
    if type(value) is not list or len(value) > MAX_CANDIDATES:
        raise ValueError("candidates")
    return [Candidate(**_CANDIDATE_RECORD.load(c)) for c in value]


def _load_held(value: Any) -> list[HeldMessage]:
    if type(value) is not list:
        raise ValueError("held messages")
    return [HeldMessage(**_HELD_RECORD.load(h)) for h in value]


def _dump_candidates(cands: list[Candidate]) -> list[dict[str, Any]]:
    return [_CANDIDATE_RECORD.dump(c) for c in cands]


def _dump_held(held: list[HeldMessage]) -> list[dict[str, Any]]:
    return [_HELD_RECORD.dump(h) for h in held]


def _nested_ratchet(blob: Any) -> Any:
    """A version 1/2 session's nested ratchet blob (or nil) -> the unpacked ratchet state."""
    return None if blob is None else sf.unpack(sf.binary()(blob), "ratchet state")


_V2_SLOTS = (
    "v",
    "peer",
    "role",
    "kdf",
    "pri",
    "cand",
    "prev",
    "ver",
    "acc",
    "fail",
    "last",
    "ek",
    "knock",
    "kid",
    "ats",
    "ssq",
    "rsq",
    "held",
)
_V1_SLOT_COUNT = 15


def _v1_to_v2(state: Any) -> list[Any]:
    """Version 1 -> 2: the message sequence is appended, empty."""
    if type(state) is not list or len(state) != _V1_SLOT_COUNT:
        raise MeshStateError(f"session state version 1 has the wrong layout (not an array of {_V1_SLOT_COUNT})")
    return [2, *state[1:], 0, 0, []]


def _v2_to_v3(state: Any) -> dict[str, Any]:
    """Version 2 (positional array) -> 3 (map): slots get their names, candidates and held
    messages become records, nested ratchet blobs become nested ratchet states."""
    if type(state) is not list or len(state) != len(_V2_SLOTS):
        raise MeshStateError(f"session state version 2 has the wrong layout (not an array of {len(_V2_SLOTS)})")
    out = dict(zip(_V2_SLOTS, state, strict=True))
    if type(out["cand"]) is not list or type(out["held"]) is not list:
        raise ValueError("candidates or held messages")
    out["v"] = 3
    out["pri"] = _nested_ratchet(out["pri"])
    out["prev"] = _nested_ratchet(out["prev"])
    out["cand"] = [{"kdf": p, "r": _nested_ratchet(r), "ek": e, "gl": g} for p, r, e, g in out["cand"]]
    out["held"] = [{"q": q, "id": i, "p": p, "ts": t, "at": a} for q, i, p, t, a in out["held"]]
    return out


#: The session state format: one line per field (key, attribute, check, conversion back).
SESSION_FORMAT = sf.StateFormat(
    "session state",
    SESSION_STATE_VERSION,
    [
        sf.Field("peer", "peer", sf.text),  # the peer's DID
        sf.Field("role", "role", sf.one_of(("initiator", "responder"))),  # ours, in the primary
        sf.Field("kdf", "profile", sf.optional(KdfProfile), _dump_profile, default=None),  # "spec" | "legacy" | nil
        sf.Field("pri", "primary", _load_opt_ratchet, _dump_opt_ratchet, default=None),
        sf.Field("cand", "candidates", _load_candidates, _dump_candidates, default=[]),
        sf.Field("prev", "previous", _load_opt_ratchet, _dump_opt_ratchet, default=None),
        sf.Field("ver", "verified", sf.flag, default=False),
        sf.Field("acc", "accepted", sf.flag, default=False),
        sf.Field("fail", "failures", _uint, default=0),  # no longer changed (see PeerSession.failures)
        sf.Field("last", "last_activity", sf.number, default=0.0),
        sf.Field("ek", "establishment_ek", _knock_ek, default=b""),
        sf.Field("knock", "pending_knock", _load_knock, _dump_knock, default=None),  # our KNOCK frame as JSON text
        sf.Field("kid", "knock_id", _opt_text, default=None),
        sf.Field("ats", "accept_ts", _opt_text, default=None),
        sf.Field("ssq", "send_seq", _uint, default=0),
        sf.Field("rsq", "recv_seq", _uint, default=0),
        sf.Field("held", "held", _load_held, _dump_held, default=[]),
    ],
    {1: _v1_to_v2, 2: _v2_to_v3},
)
