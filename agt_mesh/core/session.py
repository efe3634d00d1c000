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
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import msgpack

from agt_mesh.core.primitives import RandomSource
from agt_mesh.core.ratchet import DoubleRatchet
from agt_mesh.core.x3dh import KdfProfile
from agt_mesh.errors import DecryptError, DuplicateMessageError, MeshStateError

__all__ = ["MAX_CANDIDATES", "Candidate", "DecryptOutcome", "HeldMessage", "PeerSession"]

#: Re-key candidates kept per peer (bounds the work a flood of KNOCKs can cause).
MAX_CANDIDATES = 8
SESSION_STATE_VERSION = 2
_V1_FIELDS = 15
_V2_FIELDS = 18


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
            "consecutive_failures": self.failures,
            "last_activity": self.last_activity,
            "ratchet": self.primary.summary() if self.primary else None,
        }

    # -- persistence --------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Serialise (msgpack, version 2): the ratchets are nested ``DoubleRatchet`` states.

        Version 2 appended the message sequence (``send_seq``, ``recv_seq``, held messages);
        version 1 states load with an empty sequence.
        """
        return msgpack.packb(  # type: ignore[no-any-return]
            [
                SESSION_STATE_VERSION,
                self.peer,
                self.role,
                self.profile.value if self.profile else None,
                self.primary.to_bytes() if self.primary else None,
                [[c.profile.value, c.ratchet.to_bytes(), c.knock_ek, c.glare] for c in self.candidates],
                self.previous.to_bytes() if self.previous else None,
                self.verified,
                self.accepted,
                self.failures,
                self.last_activity,
                self.establishment_ek,
                json.dumps(self.pending_knock) if self.pending_knock is not None else None,
                self.knock_id,
                self.accept_ts,
                self.send_seq,
                self.recv_seq,
                [[h.seq, h.message_id, h.payload, h.ts, h.held_at] for h in self.held],
            ],
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> PeerSession:
        """Restore a session written by :meth:`to_bytes`.

        Raises:
            MeshStateError: for unknown versions or corrupted data.
        """
        failed = False  # raised outside ``except``: the msgpack error may hold the secret state
        try:
            obj = msgpack.unpackb(data, raw=False)
        except Exception:
            failed = True
        if failed:
            raise MeshStateError("session state is not valid msgpack")
        if not isinstance(obj, list) or not obj or (obj[0], len(obj)) not in ((1, _V1_FIELDS), (2, _V2_FIELDS)):
            raise MeshStateError("session state has an unknown version or layout")
        sequence: list[Any] = obj[_V1_FIELDS:] if obj[0] == 2 else [0, 0, []]
        try:
            (
                _,
                peer,
                role,
                profile,
                primary,
                cands,
                previous,
                verified,
                accepted,
                failures,
                last,
                ek,
                knock,
                knock_id,
                accept_ts,
            ) = obj[:_V1_FIELDS]
            send_seq, recv_seq, held = sequence
            pending = json.loads(knock) if knock is not None else None
            if pending is not None and not isinstance(pending, dict):
                raise ValueError("pending knock")
            return cls(
                peer=str(peer),
                role=str(role),
                profile=KdfProfile(profile) if profile else None,
                primary=DoubleRatchet.from_bytes(primary) if primary else None,
                candidates=[
                    Candidate(KdfProfile(p), DoubleRatchet.from_bytes(r), bytes(e), bool(g)) for p, r, e, g in cands
                ],
                previous=DoubleRatchet.from_bytes(previous) if previous else None,
                verified=bool(verified),
                accepted=bool(accepted),
                failures=int(failures),
                last_activity=float(last),
                establishment_ek=bytes(ek),
                pending_knock=pending,
                knock_id=str(knock_id) if knock_id is not None else None,
                accept_ts=str(accept_ts) if accept_ts is not None else None,
                send_seq=_count(send_seq),
                recv_seq=_count(recv_seq),
                held=[
                    HeldMessage(
                        _count(q),
                        str(i),
                        str(p) if p is not None else None,
                        str(t) if t is not None else None,
                        float(a),
                    )
                    for q, i, p, t, a in held
                ],
            )
        except MeshStateError:
            raise
        except (TypeError, ValueError):
            raise MeshStateError("session state is corrupted") from None

    def __repr__(self) -> str:
        return (
            f"PeerSession(peer={self.peer!r}, role={self.role!r}, profile={self.profile}, "
            f"verified={self.verified}, candidates={len(self.candidates)})"
        )


def _count(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError("counter")
    return value
