"""The sans-I/O mesh protocol: KNOCK, sessions, buffering, plaintext peers, acks.

:class:`MeshProtocol` takes parsed relay frames and application calls and returns a
:class:`Step` — frames to send, events for the application and the id to acknowledge once
the caller has durably recorded the result.  It never touches a socket or a clock: ``now``
(seconds) and ``random`` are passed in, as :mod:`h11` does for HTTP.

Behaviour, compared with the TypeScript ``MeshClient`` (``wire.md`` §4–§5):

* KNOCK carries the X3DH establishment; the initiator sends ciphertext at once.  The
  responder asks the application's policy (``KnockDecision`` event →
  :meth:`MeshProtocol.resolve_knock`) and rejects after ``knock_timeout`` (10 s).
* As responder both X3DH KDFs are tried (``accept_profiles``): the first message's AEAD
  tag decides, and the peer's profile is remembered for when we initiate to it later.
* Frames that cannot be decrypted yet (no session, KNOCK verdict pending, or a re-keyed
  peer whose KNOCK is late) wait in the pre-KNOCK buffer: 5 frames / 3 s per peer, 100
  peers.  When a frame finally cannot be processed it is **acknowledged** (so the relay
  stops redelivering it) and reported as an ``ErrorEvent``.
* Duplicates (same message id, or an already-used key) are acknowledged and dropped;
  they never tear a session down.
* **Forgery never costs state.**  A frame that fails authentication is acknowledged and
  reported, and changes nothing — no counter, no teardown, no re-KNOCK: on relays that do
  not bind ``from`` to the connection (agentmesh-platform 3.7.0, AGT core 5.0.0) anyone can
  write a peer's DID there.  Recovery from a real desync is driven only by what the peer
  alone can produce: a KNOCK whose identity key is bound to its DID (and pinned), whose
  candidate session then decrypts a message — which takes the identity private key.
* **Identity binding and key continuity** (:mod:`agt_mesh.core.trust`): a KNOCK whose
  identity key does not hash to a canonical ``from`` DID is refused (``identity_binding``)
  before the policy is asked; so is a bundle for a DID it does not belong to.  The first
  key seen for a DID is pinned (by a bundle we initiate with, or by the first message that
  decrypts under a KNOCK's key); another key for a pinned DID is refused
  (``identity_changed``) until :meth:`MeshProtocol.trust_identity` accepts it.
* ``knock_accept``/``knock_reject`` are unauthenticated: one changes a session only if it
  names the id of that session's KNOCK (a random id only the relay and the peer saw), and
  a ``knock_reject`` never removes a session that has already decrypted messages.
* A peer that re-KNOCKs while we hold a session (it restarted, or both KNOCKed at once)
  gets a *candidate* session; its first decrypting message switches us over.  With
  ``establish(..., resync=True)`` our KNOCK is followed by a small control message that
  lets an ``agt_mesh`` peer switch without bothering its application.
* Between ``agt_mesh`` peers each receipted message carries a per-session sequence
  number (``"sq"``).  A message that arrives after a gap (its predecessor was lost in a
  dead socket and is being re-sent) is committed and receipted but **held back** until the
  gap fills, so the application sees each sender's messages in order; after
  ``reorder_timeout`` the gap is given up and reported (the late message, should it come,
  is then delivered as it arrives).
* Plaintext peers follow the upstream 5.0.0 downgrade latch: the wire ``plaintext``
  flag never selects plaintext; only an allow-listed peer without a live session that
  has never been decrypted is handled as plaintext.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from agt_mesh.core import frames as fr
from agt_mesh.core.encoding import b64url_encode, compact_json
from agt_mesh.core.events import (
    E2EVerified,
    ErrorEvent,
    Event,
    KnockAccepted,
    KnockDecision,
    KnockRejected,
    MessageReceived,
    SessionEstablished,
    SessionRekeyed,
)
from agt_mesh.core.primitives import RandomSource
from agt_mesh.core.ratchet import DoubleRatchet
from agt_mesh.core.session import Candidate, HeldMessage, PeerSession
from agt_mesh.core.strict_json import MAX_JSON_DEPTH, depth_exceeds, loads_strict
from agt_mesh.core.trust import KeyPin, check_bundle_binding, check_key_binding, fingerprint
from agt_mesh.core.x3dh import (
    KdfProfile,
    PreKeyBundle,
    PreKeyStore,
    channel_ad,
    initiate,
    respond,
)
from agt_mesh.errors import (
    BundleVerificationError,
    DecryptError,
    DuplicateMessageError,
    IdentityBindingError,
    IdentityChangedError,
    MalformedJsonError,
    MeshConfigError,
    MeshCryptoError,
    MeshProtocolError,
    TooManySkippedError,
)

__all__ = ["CONTROL_KEY", "MeshProtocol", "ProtocolConfig", "Step"]

#: Key of the control payload an ``agt_mesh`` peer sends after a resync KNOCK.
CONTROL_KEY = "agt_mesh_control"
_RESYNC_PAYLOAD = {CONTROL_KEY: "resync"}
_MAX_OUTBOX = 1000
#: marks a payload that was refused (``None`` is a valid JSON value)
_REFUSED: Any = object()
_MAX_PENDING_KNOCKS = 1000
_MAX_AWAITING_VERDICT = 1000
#: Largest KNOCK ``intent`` (compact JSON bytes) kept while its verdict is pending.  The
#: TypeScript SDK sends ``{"action":"establish_session"}`` (32 bytes); 1,000 pending
#: verdicts at this size hold at most 4 MiB, where a 16 MiB intent each would be 16 GiB.
MAX_INTENT_BYTES = 4096
#: Bookkeeping bytes counted per buffered frame besides its ciphertext (ids, DIDs,
#: header), so a flood of empty frames is bounded by the byte limits too.
_FRAME_OVERHEAD = 512
MiB = 1024 * 1024
#: unconfirmed messages kept for a peer that has not (yet) shown it sends receipts
_UNPROVEN_WINDOW = 200
#: undecryptable frames in a row from a peer after which the error event says how a real
#: desync is recovered (the frames themselves never change anything: they may be forged)
_STUCK_HINT = 3


@dataclass
class ProtocolConfig:
    """Tunables; the defaults match the TypeScript SDK where it defines them."""

    did: str
    #: X3DH KDF for sessions we initiate, unless the peer is known or overridden.
    initiator_profile: KdfProfile = KdfProfile.SPEC
    #: KDFs accepted as responder (the first message's AEAD decides).
    accept_profiles: tuple[KdfProfile, ...] = (KdfProfile.SPEC, KdfProfile.LEGACY)
    knock_timeout: float = 10.0
    pre_knock_buffer_size: int = 5
    pre_knock_buffer_ttl: float = 3.0
    max_buffered_peers: int = 100
    #: message ids remembered for de-duplication
    dedupe_window: int = 10_000
    #: end-to-end receipts between agt_mesh peers: our messages ask for one, we answer
    #: requests, and messages a receipting peer has not confirmed are sent again
    receipts: bool = True
    #: resend an unconfirmed message to a receipting peer after this many seconds
    receipt_timeout: float = 10.0
    #: collect receipts for this long before sending them in one control message
    receipt_delay: float = 0.3
    #: unconfirmed messages kept per peer (the oldest are forgotten beyond this)
    max_unconfirmed: int = 10_000
    #: hold a receipting peer's message back at most this long while an earlier one is
    #: missing (0 turns per-sender ordering off: messages are delivered as they decrypt)
    reorder_timeout: float = 30.0
    #: messages held back per peer; beyond this the oldest gap is given up
    max_held: int = 1000
    #: payload bytes held back per peer; beyond this the oldest gap is given up.  One
    #: maximal message fits (a smaller bound would give up the order of large messages
    #: whenever one is lost); held messages are part of the session state, rewritten at
    #: every commit for the peer, so this also bounds what one commit writes.
    max_held_bytes: int = 16 * MiB
    #: largest decrypted (or plaintext) payload accepted: the relays' own frame limit
    max_payload_bytes: int = fr.DEFAULT_MAX_FRAME_BYTES
    #: bytes of frames one peer may have waiting in the pre-KNOCK buffer (no session
    #: yet, or its KNOCK verdict is pending): one maximal frame fits; beyond it the
    #: peer's oldest waiting frame is dropped
    pre_knock_peer_bytes: int = 16 * MiB
    #: bytes of frames all peers together may have waiting there; beyond it the oldest
    #: frame of the peer with the most bytes waiting is dropped (a flood from many DIDs
    #: costs the biggest sender first, not the newcomer)
    max_buffered_bytes: int = 32 * MiB


@dataclass
class Step:
    """What one call produced.

    Send ``frames`` in order; deliver ``events``; after recording the result durably,
    send ``acks`` (ack frames for processed or unprocessable messages).  ``changed``
    names the peers whose session state changed (to persist).
    """

    frames: list[dict[str, Any]] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    acks: list[str] = field(default_factory=list)
    changed: set[str] = field(default_factory=set)
    #: message ids processed for good in this step (persist them for de-duplication)
    seen: list[str] = field(default_factory=list)
    #: ``(peer, id, frame)`` of messages sent awaiting an end-to-end receipt (persist them)
    sent: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    #: ids of our messages the peer confirmed (forget them)
    confirmed: list[str] = field(default_factory=list)
    #: DIDs whose pinned or offered identity key changed (persist ``pins``/``offered``)
    identities: set[str] = field(default_factory=set)

    def extend(self, other: Step) -> None:
        self.frames.extend(other.frames)
        self.events.extend(other.events)
        self.acks.extend(other.acks)
        self.changed |= other.changed
        self.seen.extend(other.seen)
        self.sent.extend(other.sent)
        self.confirmed.extend(other.confirmed)
        self.identities |= other.identities

    def ack_frames(self) -> list[dict[str, Any]]:
        return [fr.ack_frame(i) for i in self.acks]


@dataclass
class _PendingKnock:
    frame: fr.KnockFrame
    deadline: float
    #: it crossed our own unproven KNOCK to the same peer (simultaneous open)
    glare: bool = False


class MeshProtocol:
    """The protocol state for one local agent (one DID)."""

    def __init__(
        self,
        config: ProtocolConfig,
        prekeys: PreKeyStore,
        *,
        new_id: Callable[[], str],
    ) -> None:
        if prekeys.identity.did != config.did and not config.did.startswith("did:"):
            raise MeshConfigError("config.did must be a DID")
        self.config = config
        self.prekeys = prekeys
        self._new_id = new_id
        self.sessions: dict[str, PeerSession] = {}
        self.peer_profiles: dict[str, KdfProfile] = {}
        self.profile_overrides: dict[str, KdfProfile] = {}
        self.e2e_verified: set[str] = set()
        self.plaintext_peers: set[str] = set()
        self._seen_ids: OrderedDict[str, None] = OrderedDict()
        self._seen_knocks: OrderedDict[str, None] = OrderedDict()
        self._buffer: OrderedDict[str, deque[tuple[fr.MessageFrame, float]]] = OrderedDict()
        #: bytes waiting in ``_buffer`` per peer (kept in step with it by the _buf_* helpers)
        self._buffer_bytes: dict[str, int] = {}
        self._pending_knocks: dict[str, _PendingKnock] = {}
        self._outbox: dict[str, deque[tuple[str, Any]]] = {}
        #: peers that confirm receipt of our messages (so unconfirmed ones are resent)
        self.receipt_peers: set[str] = set()
        self._unconfirmed: dict[str, OrderedDict[str, list[Any]]] = {}
        self._receipts_due: dict[str, tuple[float, list[str]]] = {}
        #: peers whose session holds messages back (waiting for an earlier one)
        self._holding: set[str] = set()
        #: the identity key pinned for each peer DID (key continuity; persist on
        #: ``Step.identities``)
        self.pins: dict[str, KeyPin] = {}
        #: the last other key a pinned peer presented, refused until trusted
        self.offered: dict[str, KeyPin] = {}
        #: frames from a session peer that did not decrypt since the last one that did.
        #: Diagnostics only, outside the session state: it never changes a session.
        self.undecryptable: dict[str, int] = {}

    @property
    def did(self) -> str:
        return self.config.did

    # ------------------------------------------------------------------------------
    # inbound
    # ------------------------------------------------------------------------------

    def receive(self, obj: Any, now: float, random: RandomSource) -> Step:
        """Process one decoded frame (a JSON object from the relay)."""
        step = Step()
        self._dispatch(obj, now, random, step, in_batch=False)
        return step

    def receive_text(self, text: str | bytes, now: float, random: RandomSource, *, max_bytes: int) -> Step:
        """Decode and process one frame's text; malformed text becomes an ``ErrorEvent``."""
        try:
            obj = fr.decode_frame(text, max_bytes=max_bytes)
        except MeshProtocolError as exc:
            return Step(events=[ErrorEvent("frame", None, f"dropping malformed frame: {exc}")])
        return self.receive(obj, now, random)

    def _dispatch(self, obj: Any, now: float, random: RandomSource, step: Step, *, in_batch: bool) -> None:
        try:
            frame = fr.parse_frame(obj)
        except MeshProtocolError as exc:
            peer = obj.get("from") if isinstance(obj, dict) and isinstance(obj.get("from"), str) else None
            fid = obj.get("id") if isinstance(obj, dict) and isinstance(obj.get("id"), str) else None
            step.events.append(
                ErrorEvent(
                    "frame",
                    peer,
                    f"{'pending message' if in_batch else 'frame'} dropped: {exc}",
                    fid,
                )
            )
            if fid is not None and isinstance(obj, dict) and obj.get("type") in ("message", "knock"):
                step.acks.append(fid)  # it can never be processed; stop redelivery
            return
        if isinstance(frame, fr.MessageFrame):
            self._on_message(frame, now, random, step)
        elif isinstance(frame, fr.KnockFrame):
            self._on_knock(frame, now, step)
        elif isinstance(frame, fr.KnockReplyFrame):
            self._on_knock_reply(frame, now, step)
        elif isinstance(frame, fr.PendingMessagesFrame):
            for entry in frame.messages:
                self._dispatch(entry, now, random, step, in_batch=True)
        elif isinstance(frame, fr.ErrorFrame):
            step.events.append(ErrorEvent("relay", None, frame.detail))

    # -- messages -------------------------------------------------------------------

    def _remember_id(self, frame_id: str, step: Step | None = None) -> None:
        if step is not None:
            step.seen.append(frame_id)
        self._seen_ids[frame_id] = None
        if len(self._seen_ids) > self.config.dedupe_window:
            self._seen_ids.popitem(last=False)

    def _on_message(self, f: fr.MessageFrame, now: float, random: RandomSource, step: Step) -> None:
        peer = f.from_did
        session = self.sessions.get(peer)
        if f.id in self._seen_ids:
            step.acks.append(f.id)
            step.events.append(ErrorEvent("duplicate", peer, "duplicate message id — dropped", f.id))
            self._want_receipt(f, now)  # the sender may have missed our receipt
            if session is not None and f.seq is not None and f.header is not None:
                self._fill_duplicate(session, f, now, random, step)
            return
        if f.header is None:
            plaintext_ok = (
                peer in self.plaintext_peers
                and (session is None or session.primary is None)
                and peer not in self.e2e_verified
            )
            if not plaintext_ok:
                step.acks.append(f.id)
                detail = (
                    "plaintext frame refused (peer is not an allow-listed plaintext peer, or "
                    "it has an encrypted session or was verified before)"
                    if f.plaintext_flag
                    else "encrypted message missing ratchet header — dropping"
                )
                step.events.append(ErrorEvent("decrypt", peer, detail, f.id))
                return
            self._deliver_plaintext(f, step)
            return
        if session is None:  # no session yet (its KNOCK may be late or awaiting a verdict)
            self._buffer_frame(f, now, step)
            return
        self._decrypt_into(session, f, now, random, step, from_buffer=False)

    def _parse_payload(self, data: str | bytes, f: fr.MessageFrame, what: str, step: Step, suffix: str = "") -> Any:
        """Strict JSON of a payload, or ``_REFUSED`` after reporting why (per frame: a
        hostile payload costs its own frame and nothing else)."""
        try:
            return loads_strict(data, max_bytes=self.config.max_payload_bytes, what=what)
        except MalformedJsonError as exc:
            detail = f"{what} is not JSON" if exc.reason in ("syntax", "utf8") else str(exc)
            step.events.append(ErrorEvent("decrypt", f.from_did, detail + suffix, f.id))
            return _REFUSED

    def _deliver_plaintext(self, f: fr.MessageFrame, step: Step) -> None:
        text = f.ciphertext.decode("latin-1")
        payload = self._parse_payload(text, f, "plaintext payload", step)
        step.acks.append(f.id)
        if payload is _REFUSED:
            return
        self._remember_id(f.id, step)
        step.events.append(MessageReceived(f.from_did, payload, f.id, plaintext=True, ts=f.ts, text=text))

    def _decrypt_into(
        self,
        session: PeerSession,
        f: fr.MessageFrame,
        now: float,
        random: RandomSource,
        step: Step,
        *,
        from_buffer: bool,
    ) -> bool:
        """Try to decrypt; on failure buffer it (first try) or give up. Returns success."""
        peer = f.from_did
        assert f.header is not None
        keep_own = session.role == "initiator" and self.did < peer
        before = session.primary
        try:
            out = session.decrypt(f.header, f.ciphertext, random, keep_own=keep_own)
        except DuplicateMessageError as exc:
            step.acks.append(f.id)
            step.events.append(ErrorEvent("duplicate", peer, f"{exc} — dropped", f.id))
            self._want_receipt(f, now)
            return False
        except DecryptError as exc:
            if not from_buffer:
                self._buffer_frame(f, now, step)
                return False
            # a gap is not a failure: the missing messages may still come (re-sends)
            self._give_up(f, f"{exc.kind}: {exc}", step, counts=not isinstance(exc, TooManySkippedError))
            return False
        step.changed.add(peer)
        self.undecryptable.pop(peer, None)
        session.last_activity = now
        if peer not in self.pins:
            # the first message that decrypts proves the KNOCK's key (trust on first use)
            key = session.peer_identity_key()
            if key is not None:
                self._pin(peer, key, now, "knock", step)
        self._remember_id(f.id, step)
        step.acks.append(f.id)
        new_stream = session.primary is not before
        if new_stream:  # a new primary: a new message sequence in both directions
            self._release_held(session, step, reason="the peer started a new session")
            session.send_seq = session.recv_seq = 0
        ordered = out.source == "primary" or new_stream
        if out.source == "candidate" and session.primary is not None and session.profile is not None:
            self.peer_profiles[peer] = session.profile
            if out.switched:
                step.events.append(SessionRekeyed(peer, session.profile.value))
            else:
                step.events.append(SessionEstablished(peer, "responder", session.profile.value))
        if peer not in self.e2e_verified:
            self.e2e_verified.add(peer)
            step.events.append(E2EVerified(peer, len(self.e2e_verified) == 1))
        try:
            text = out.plaintext.decode("utf-8")
        except UnicodeDecodeError:
            text = ""
            payload = self._parse_payload(out.plaintext, f, "decrypted payload", step, " — dropped")
        else:
            payload = self._parse_payload(text, f, "decrypted payload", step, " — dropped")
        if payload is not _REFUSED:
            # a control payload (resync proof, receipts) is protocol business, not the app's
            if isinstance(payload, dict) and set(payload) == {CONTROL_KEY}:
                self._on_control(peer, payload[CONTROL_KEY], step)
            elif ordered and f.seq is not None and self._ordering:
                self._sequence(session, f.seq, f.id, payload, f.ts, now, step, text=text)
            else:
                step.events.append(MessageReceived(peer, payload, f.id, plaintext=False, ts=f.ts, text=text))
        self._want_receipt(f, now)
        if session.can_send:
            self._flush_outbox(peer, session, now, random, step)
        return True

    def _give_up(self, f: fr.MessageFrame, detail: str, step: Step, *, counts: bool = True) -> None:
        """A frame that cannot be processed: ack it and report it — and change nothing.

        It may be forged (anyone can write a peer's DID in ``from`` on relays that do not
        bind it), so it neither touches the session nor triggers a re-KNOCK.  A peer that
        really lost its session KNOCKs again when it next sends, and that KNOCK is
        authenticated by its identity key.
        """
        peer = f.from_did
        step.acks.append(f.id)
        session = self.sessions.get(peer)
        if session is not None and session.primary is not None and counts:
            n = self.undecryptable[peer] = self.undecryptable.get(peer, 0) + 1
            if n >= _STUCK_HINT:
                detail += (
                    f" ({n} frames from this peer in a row did not decrypt; the session is unchanged, as they "
                    "may be forged — a peer that lost its session re-KNOCKs when it next sends, and "
                    "`session reset` starts a new one from our side)"
                )
        step.events.append(ErrorEvent("decrypt", peer, detail, f.id))

    # -- pre-KNOCK buffer -----------------------------------------------------------

    def _buf_take(self, peer: str) -> deque[tuple[fr.MessageFrame, float]] | None:
        """Remove and return everything buffered for ``peer``."""
        self._buffer_bytes.pop(peer, None)
        return self._buffer.pop(peer, None)

    def _buf_popleft(self, peer: str) -> fr.MessageFrame:
        f, _ = self._buffer[peer].popleft()
        self._buffer_bytes[peer] -= _frame_cost(f)
        return f

    def _buf_replace(self, peer: str, keep: deque[tuple[fr.MessageFrame, float]]) -> None:
        if keep:
            self._buffer[peer] = keep
            self._buffer_bytes[peer] = sum(_frame_cost(f) for f, _ in keep)
        else:
            self._buf_take(peer)

    def buffered_bytes(self, peer: str | None = None) -> int:
        """Bytes of frames waiting in the pre-KNOCK buffer (for one peer, or all)."""
        if peer is not None:
            return self._buffer_bytes.get(peer, 0)
        return sum(self._buffer_bytes.values())

    def _buffer_frame(self, f: fr.MessageFrame, now: float, step: Step) -> None:
        peer = f.from_did
        cfg = self.config
        cost = _frame_cost(f)
        if cfg.pre_knock_buffer_size <= 0:
            self._give_up(f, "no session for encrypted message — dropping", step)
            return
        if cost > min(cfg.pre_knock_peer_bytes, cfg.max_buffered_bytes):
            self._give_up(f, f"frame of {cost} bytes does not fit the pre-knock buffer — dropping", step)
            return
        queue = self._buffer.get(peer)
        if queue is None:
            if len(self._buffer) >= cfg.max_buffered_peers:
                old_peer = next(iter(self._buffer))
                old_queue = self._buf_take(old_peer) or ()
                step.events.append(
                    ErrorEvent(
                        "frame",
                        old_peer,
                        f"pre-knock buffer evicted: global peer cap ({cfg.max_buffered_peers}) reached",
                    )
                )
                for old, _ in old_queue:
                    self._give_up(old, "pre-knock buffer evicted", step)
            queue = self._buffer[peer] = deque()
        if any(b.id == f.id for b, _ in queue):
            return
        # Frames behind a KNOCK whose verdict is pending wait for it (a relay replaying
        # stored frames delivers the KNOCK and everything after it at once), up to a
        # larger cap; otherwise the TypeScript SDK's 5-frame window applies.
        cap = _MAX_AWAITING_VERDICT if self._knock_pending_from(peer) else cfg.pre_knock_buffer_size
        if len(queue) >= cap:
            self._give_up(self._buf_popleft(peer), "pre-knock buffer full — oldest frame dropped", step)
        while queue and self._buffer_bytes.get(peer, 0) + cost > cfg.pre_knock_peer_bytes:
            dropped = self._buf_popleft(peer)
            self._give_up(
                dropped,
                f"pre-knock buffer full ({cfg.pre_knock_peer_bytes} bytes for this peer) — oldest frame dropped",
                step,
            )
        while self.buffered_bytes() + cost > cfg.max_buffered_bytes:
            # the sender with the most bytes waiting pays, not the newcomer
            biggest = max(self._buffer_bytes, key=self._buffer_bytes.__getitem__)
            dropped = self._buf_popleft(biggest)
            if not self._buffer[biggest] and biggest != peer:
                self._buf_take(biggest)
            self._give_up(
                dropped, f"pre-knock buffer full ({cfg.max_buffered_bytes} bytes in total) — oldest frame dropped", step
            )
        queue.append((f, now + cfg.pre_knock_buffer_ttl))
        self._buffer_bytes[peer] = self._buffer_bytes.get(peer, 0) + cost

    def _drain(self, peer: str, now: float, random: RandomSource, step: Step) -> None:
        queue = self._buf_take(peer)
        session = self.sessions.get(peer)
        if not queue:
            return
        for f, _ in queue:
            if session is None:
                self._give_up(f, "no session for encrypted message — dropping", step)
            elif f.id in self._seen_ids:
                step.acks.append(f.id)
            else:
                self._decrypt_into(session, f, now, random, step, from_buffer=True)

    def tick(self, now: float, random: RandomSource) -> Step:
        """Expire buffered frames and overdue KNOCK verdicts, send receipts, re-send what
        was not confirmed.  Call about once a second (or at :meth:`next_deadline`)."""
        step = Step()
        self._receipts_and_resends(now, random, step)
        for peer in list(self._holding):
            session = self.sessions.get(peer)
            if session is None:
                self._holding.discard(peer)
            else:
                self._expire_held(session, now, step)
        for knock_id, pending in list(self._pending_knocks.items()):
            if now >= pending.deadline:
                step.extend(self.resolve_knock(knock_id, False, now, random, reason="timeout"))
        for peer in list(self._buffer):
            queue = self._buffer[peer]
            session = self.sessions.get(peer)
            keep: deque[tuple[fr.MessageFrame, float]] = deque()
            waiting = self._knock_pending_from(peer)  # frames wait for the verdict, as in TS
            for f, expires in queue:
                if now < expires or waiting:
                    keep.append((f, expires))
                elif session is not None:
                    self._decrypt_into(session, f, now, random, step, from_buffer=True)
                else:
                    self._give_up(f, "no session for encrypted message (pre-knock buffer expired)", step)
            self._buf_replace(peer, keep)
        return step

    def _knock_pending_from(self, peer: str) -> bool:
        return any(p.frame.from_did == peer for p in self._pending_knocks.values())

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`tick` has something to do, if any."""
        times = [p.deadline for p in self._pending_knocks.values()]
        waiting = {p.frame.from_did for p in self._pending_knocks.values()}
        times += [q[0][1] for peer, q in self._buffer.items() if q and peer not in waiting]
        times += [due for due, _ in self._receipts_due.values()]
        for peer in self.receipt_peers:
            queue = self._unconfirmed.get(peer)
            if queue:
                times.append(next(iter(queue.values()))[1] + self.config.receipt_timeout)
        for peer in self._holding:
            session = self.sessions.get(peer)
            if session is not None and session.held:
                times.append(min(h.held_at for h in session.held) + self.config.reorder_timeout)
        return min(times) if times else None

    # -- KNOCK ------------------------------------------------------------------------

    def _on_knock(self, f: fr.KnockFrame, now: float, step: Step) -> None:
        # A KNOCK is acknowledged once its verdict is recorded (resolve_knock), so a crash
        # before that makes the relay redeliver it; replays are acknowledged at once.
        if f.id in self._pending_knocks:
            return
        if f.id in self._seen_knocks:
            step.acks.append(f.id)
            return
        session = self.sessions.get(f.from_did)
        if (
            session is not None
            and f.establishment is not None
            and session.knows_knock(f.establishment.ephemeral_public_key)
        ):
            step.acks.append(f.id)
            return  # a replay of the KNOCK that made this session
        if f.establishment is not None and not self._knock_identity_ok(f, now, step):
            return
        if len(self._pending_knocks) >= _MAX_PENDING_KNOCKS:
            step.acks.append(f.id)
            step.events.append(ErrorEvent("knock", f.from_did, "too many KNOCKs awaiting a verdict — dropped", f.id))
            return
        if f.intent is not None and _json_size(f.intent) > MAX_INTENT_BYTES:
            step.acks.append(f.id)
            step.events.append(
                ErrorEvent(
                    "knock", f.from_did, f"KNOCK intent is not JSON of at most {MAX_INTENT_BYTES} bytes — dropped", f.id
                )
            )
            return
        glare = (
            session is not None
            and session.role == "initiator"
            and not session.verified
            and (not session.accepted or _not_after(f.ts, session.accept_ts))
        )
        self._pending_knocks[f.id] = _PendingKnock(f, now + self.config.knock_timeout, glare)
        step.events.append(KnockDecision(f.from_did, f.intent, f.id))

    def _knock_identity_ok(self, f: fr.KnockFrame, now: float, step: Step) -> bool:
        """Binding and continuity of a KNOCK's identity key, before the policy is asked.

        A refused KNOCK is acknowledged (redelivery cannot change the verdict), remembered
        and consumes no one-time pre-key.
        """
        assert f.establishment is not None
        peer, key = f.from_did, f.establishment.initiator_identity_key
        try:
            check_key_binding(peer, key, what="the KNOCK's identity key")
        except IdentityBindingError as exc:
            # provably not the DID's owner: no reply (it would go to the real owner)
            self._refuse_knock(f, step, ErrorEvent("identity_binding", peer, f"KNOCK refused: {exc}", f.id))
            return False
        pin = self.pins.get(peer)
        if pin is None or pin.same_key(key):
            return True
        event = self._offer(peer, key, now, "knock", step, f.id)
        self._refuse_knock(f, step, event)
        # tell the sender: if it really is the peer with a new key, it learns why
        step.frames.append(
            fr.knock_reject_frame(self.did, peer, self._new_id(), f.id, fr.iso_timestamp(now), "identity_changed")
        )
        return False

    def _refuse_knock(self, f: fr.KnockFrame, step: Step, event: ErrorEvent) -> None:
        step.acks.append(f.id)
        step.events.append(event)
        self._seen_knocks[f.id] = None
        if len(self._seen_knocks) > self.config.dedupe_window:
            self._seen_knocks.popitem(last=False)

    # -- identity pins -------------------------------------------------------------------

    def _pin(self, peer: str, key: bytes, now: float, source: str, step: Step) -> None:
        self.pins[peer] = KeyPin(peer, key, now, source)
        step.identities.add(peer)

    def _offer(self, peer: str, key: bytes, now: float, source: str, step: Step, frame_id: str | None) -> ErrorEvent:
        """Record a refused key for a pinned peer; the ``identity_changed`` event for it."""
        pin = self.pins[peer]
        previous = self.offered.get(peer)
        if previous is None or not previous.same_key(key):
            self.offered[peer] = KeyPin(peer, key, now, source)
            step.identities.add(peer)
        # no fingerprint of the offered key here: it costs ~3 ms, and a forger chooses it
        return ErrorEvent(
            "identity_changed",
            peer,
            f"{peer} presented another identity key ({_b64(key)}, via {source}) than the one pinned for it "
            f"(fingerprint {_cached_fingerprint(peer, pin.identity_key)}); refused. If the peer really has a "
            f"new key, compare fingerprints out of band (`agt-mesh peer fingerprint {peer}`) and accept it "
            f"with `agt-mesh peer trust {peer} --key FINGERPRINT` (MeshClient.trust_identity)",
            frame_id,
        )

    def offer_identity(self, peer: str, key: bytes, now: float, *, source: str = "bundle") -> Step:
        """Record ``key``, refused for pinned ``peer`` (e.g. by :meth:`establish`), and report it."""
        step = Step()
        if peer in self.pins and not self.pins[peer].same_key(key):
            step.events.append(self._offer(peer, key, now, source, step, None))
        return step

    def trust_identity(self, peer: str, key: bytes, now: float) -> Step:
        """Pin ``key`` for ``peer`` by the user's explicit decision (replacing a pin).

        A session with another key is forgotten (its held messages are delivered), so the
        next send KNOCKs with the new key and the peer's next KNOCK is accepted.

        Raises:
            IdentityBindingError: ``key`` cannot belong to a canonical ``peer`` DID.
        """
        check_key_binding(peer, key)
        step = Step()
        self._pin(peer, key, now, "trusted", step)
        self.offered.pop(peer, None)
        session = self.sessions.get(peer)
        if session is not None and session.peer_keys(self.prekeys.identity.x25519_public) - {key}:
            step.extend(self.reset_session(peer))
        return step

    def restore_pin(self, pin: KeyPin, offered: KeyPin | None = None) -> None:
        """Install a persisted pin (and the last refused key, if any)."""
        self.pins[pin.did] = pin
        if offered is not None:
            self.offered[pin.did] = offered
        else:
            self.offered.pop(pin.did, None)

    def resolve_knock(
        self,
        knock_id: str,
        accept: bool,
        now: float,
        random: RandomSource,
        *,
        reason: str = "policy_denied",
    ) -> Step:
        """Apply the policy verdict for a KNOCK (``KnockDecision.knock_id``).

        Unknown or already-resolved ids are ignored (a late verdict after the timeout).
        """
        step = Step()
        pending = self._pending_knocks.pop(knock_id, None)
        if pending is None:
            return step
        f = pending.frame
        peer = f.from_did
        ts = fr.iso_timestamp(now)
        step.acks.append(f.id)
        self._seen_knocks[f.id] = None
        if len(self._seen_knocks) > self.config.dedupe_window:
            self._seen_knocks.popitem(last=False)
        if accept and f.establishment_error is not None:
            step.events.append(
                ErrorEvent(
                    "knock",
                    peer,
                    f"failed to bootstrap responder from KNOCK: {f.establishment_error}",
                    f.id,
                )
            )
            accept = False
        if accept and f.establishment is not None:
            try:
                self._accept_establishment(f, now, step, glare=pending.glare)
            except (MeshCryptoError, MeshConfigError) as exc:
                step.events.append(ErrorEvent("knock", peer, f"failed to bootstrap responder from KNOCK: {exc}", f.id))
                accept = False
        if not accept:
            step.frames.append(fr.knock_reject_frame(self.did, peer, self._new_id(), f.id, ts, "policy_denied"))
            queue = self._buf_take(peer)
            for bf, _ in queue or ():
                step.acks.append(bf.id)
            return step
        session = self.sessions.get(peer)
        if session is not None:
            session.accepted = True
        step.frames.append(fr.knock_accept_frame(self.did, peer, self._new_id(), f.id, ts))
        self._drain(peer, now, random, step)
        return step

    def _accept_establishment(self, f: fr.KnockFrame, now: float, step: Step, *, glare: bool = False) -> None:
        assert f.establishment is not None
        peer = f.from_did
        est = f.establishment
        pin = self.pins.get(peer)
        if pin is not None and not pin.same_key(est.initiator_identity_key):
            # the pin changed while the verdict was pending (checked first in _on_knock)
            raise IdentityChangedError(
                f"the KNOCK's identity key is not the one pinned for {peer}",
                did=peer,
                pinned=pin.fingerprint,
                offered=_b64(est.initiator_identity_key),
            )
        old = self.sessions.get(peer)
        pinned = old.peer_identity_key() if old is not None else None
        if pinned is not None and pinned != est.initiator_identity_key:
            # A re-key must come from the same identity: anyone can put a DID in "from"
            # on pre-5.0 relays, and this would otherwise hijack the session.
            raise BundleVerificationError(
                "the KNOCK's identity key differs from the one this session with the peer is bound to"
            )
        known = self.peer_profiles.get(peer)
        profiles = list(self.config.accept_profiles)
        if known in profiles:
            profiles.remove(known)
            profiles.insert(0, known)
        ad = channel_ad(peer, self.did, est.initiator_identity_key, self.prekeys.identity.x25519_public)
        cands = [
            Candidate(
                c.profile,
                DoubleRatchet.init_receiver(c.shared_secret, c.signed_pre_key.private, c.signed_pre_key.public, ad),
                est.ephemeral_public_key,
                glare,
            )
            for c in respond(self.prekeys, est, profiles=tuple(profiles))
        ]
        step.changed.add(peer)
        session = self.sessions.get(peer)
        if session is None:
            session = PeerSession(peer, "responder", None, None, last_activity=now, accepted=True)
            session.establishment_ek = b""
            self.sessions[peer] = session
        session.add_candidates(cands)

    def _on_knock_reply(self, f: fr.KnockReplyFrame, now: float, step: Step) -> None:
        if f.id:
            step.acks.append(f.id)
        peer = f.from_did
        session = self.sessions.get(peer)
        # Replies are unauthenticated: only one naming the KNOCK of our current session
        # (a random id that only the relay and the peer saw) may change that session.
        ours = (
            session is not None
            and session.role == "initiator"
            and session.knock_id is not None
            and f.knock_id == session.knock_id
        )
        if f.accepted:
            if not ours:
                return  # answers no KNOCK of ours: changes nothing
            assert session is not None
            session.accepted = True
            session.pending_knock = None
            if f.ts is not None:
                session.accept_ts = f.ts
            step.changed.add(peer)
            step.events.append(KnockAccepted(peer))
            return
        if session is None or not ours or session.verified:
            step.events.append(KnockRejected(peer, f.reason, ignored=True))
            return
        del self.sessions[peer]
        self._outbox.pop(peer, None)
        step.changed.add(peer)
        step.events.append(KnockRejected(peer, f.reason, ignored=False))

    # ------------------------------------------------------------------------------
    # outbound
    # ------------------------------------------------------------------------------

    def profile_for(self, peer: str) -> KdfProfile:
        """The KDF we use when initiating to ``peer``: override, else learned, else default."""
        return self.profile_overrides.get(peer) or self.peer_profiles.get(peer) or self.config.initiator_profile

    def needs_session(self, peer: str) -> bool:
        """Whether sending to ``peer`` needs :meth:`establish` first (fetch its bundle)."""
        if peer in self.plaintext_peers and peer not in self.e2e_verified and peer not in self.sessions:
            return False
        return peer not in self.sessions

    def establish(
        self,
        peer: str,
        bundle: PreKeyBundle,
        now: float,
        random: RandomSource,
        *,
        profile: KdfProfile | None = None,
        resync: bool = False,
    ) -> Step:
        """Start a session as initiator: X3DH against ``bundle`` and a KNOCK frame.

        With ``resync`` a small control message follows the KNOCK so an ``agt_mesh`` peer
        switches to the new session even before the application sends anything.

        Raises:
            BundleVerificationError: if the bundle does not verify.
            IdentityBindingError: the bundle's keys do not belong to ``peer``.
            IdentityChangedError: ``peer`` has another key pinned (nothing is recorded:
                call :meth:`offer_identity` to record and report it).
        """
        bundle.verify()
        check_bundle_binding(peer, bundle.identity_key, bundle.identity_key_ed)
        pin = self.pins.get(peer)
        if pin is not None and not pin.same_key(bundle.identity_key):
            offered = fingerprint(peer, bundle.identity_key)
            raise IdentityChangedError(
                f"the identity key of {peer} changed: pinned {pin.fingerprint} (since "
                f"{fr.iso_timestamp(pin.since)}), the registry now offers {offered}; refused. If the peer "
                "really has a new key, compare fingerprints out of band and accept it with "
                f"`agt-mesh peer trust {peer} --key {offered.replace(' ', '')}` (MeshClient.trust_identity)",
                did=peer,
                pinned=pin.fingerprint,
                offered=offered,
            )
        prof = profile or self.profile_for(peer)
        init = initiate(self.prekeys.identity, bundle, random, profile=prof)
        ad = channel_ad(self.did, peer, self.prekeys.identity.x25519_public, bundle.identity_key)
        ratchet = DoubleRatchet.init_sender(init.shared_secret, bundle.signed_pre_key, ad, random)
        old = self.sessions.get(peer)
        step = Step(changed={peer})
        if pin is None:
            self._pin(peer, bundle.identity_key, now, "bundle", step)
        if old is not None:
            self._release_held(old, step, reason="a new session was started")
        session = PeerSession(
            peer,
            "initiator",
            prof,
            ratchet,
            last_activity=now,
            establishment_ek=init.establishment.ephemeral_public_key,
        )
        if old is not None and old.primary is not None:
            session.previous = old.primary
        self.sessions[peer] = session
        ts = fr.iso_timestamp(now)
        session.pending_knock = fr.knock_frame(self.did, peer, self._new_id(), ts, init.establishment)
        session.knock_id = session.pending_knock["id"]
        step.frames.append(session.pending_knock)
        step.events.append(SessionEstablished(peer, "initiator", prof.value))
        if resync:
            step.frames.append(self._encrypt_frame(session, peer, _RESYNC_PAYLOAD, now, random, self._new_id()))
        self._flush_outbox(peer, session, now, random, step)
        return step

    def send(
        self,
        peer: str,
        payload: Any,
        now: float,
        random: RandomSource,
        *,
        message_id: str | None = None,
    ) -> tuple[Step, str]:
        """Encrypt ``payload`` (any JSON value) for ``peer``.

        If we are the responder and have not received the peer's first message yet, the
        message is queued and sent as soon as that happens (bounded).

        Raises:
            MeshProtocolError: if there is no session (call :meth:`establish`) or the
                queue for the peer is full; ``MeshConfigError`` for non-JSON payloads.
        """
        mid = message_id or self._new_id()
        try:
            text = compact_json(payload)
        except (TypeError, ValueError, RecursionError):
            raise MeshConfigError("payload must be a JSON-serialisable value") from None
        # never send what a receiver refuses (strict JSON limits, see loads_strict)
        if len(text) > self.config.max_payload_bytes:
            raise MeshConfigError(
                f"payload of {len(text)} bytes exceeds the {self.config.max_payload_bytes}-byte limit"
            )
        if text.count("[") + text.count("{") > MAX_JSON_DEPTH and depth_exceeds(payload, MAX_JSON_DEPTH):
            raise MeshConfigError(f"payload nests deeper than {MAX_JSON_DEPTH} levels")
        step = Step()
        pending = self._unconfirmed.get(peer)
        if message_id is not None and pending is not None and message_id in pending:
            # an application retry of a message still awaiting its receipt: the identical
            # frame again, not a second encryption under a new sequence number
            step.frames.append(pending[message_id][0])
            return step, mid
        session = self.sessions.get(peer)
        if session is None:
            if peer in self.plaintext_peers and peer not in self.e2e_verified:
                step.frames.append(fr.plaintext_message_frame(self.did, peer, mid, fr.iso_timestamp(now), payload))
                return step, mid
            raise MeshProtocolError(f"No encrypted session with {peer}. Call establish() first.")
        if not session.can_send:
            queue = self._outbox.setdefault(peer, deque())
            if len(queue) >= _MAX_OUTBOX:
                raise MeshProtocolError(f"too many messages queued for {peer} (waiting for its first message)")
            queue.append((mid, payload))
            return step, mid
        step.frames.append(self._encrypt_frame(session, peer, payload, now, random, mid, step))
        step.changed.add(peer)
        return step, mid

    def _encrypt_frame(
        self,
        session: PeerSession,
        peer: str,
        payload: Any,
        now: float,
        random: RandomSource,
        mid: str,
        step: Step | None = None,
    ) -> dict[str, Any]:
        """Encrypt one message; with ``step`` it asks for a receipt and is kept until confirmed."""
        assert session.primary is not None
        header, blob = session.primary.encrypt(compact_json(payload).encode(), random)
        session.last_activity = now
        frame = fr.message_frame(self.did, peer, mid, fr.iso_timestamp(now), header, blob)
        if self.config.receipts and step is not None:
            session.send_seq += 1
            frame["rr"] = 1
            frame["sq"] = session.send_seq
            step.sent.append((peer, mid, frame))
            self._track(peer, mid, frame, now, step)
        return frame

    def _flush_outbox(self, peer: str, session: PeerSession, now: float, random: RandomSource, step: Step) -> None:
        queue = self._outbox.pop(peer, None)
        while queue:
            mid, payload = queue.popleft()
            step.frames.append(self._encrypt_frame(session, peer, payload, now, random, mid, step))
            step.changed.add(peer)

    # -- per-sender order -----------------------------------------------------------------
    #
    # Each receipted message carries ``"sq"``: 1, 2, ... per session and direction.  The
    # receiver delivers them in that order.  One that arrives after a gap is committed (in
    # the session state), acknowledged and receipted, but held back until the gap fills —
    # the missing message is being re-sent, since it was never receipted.  A gap that does
    # not fill within ``reorder_timeout`` (the sender is gone for good) is given up and
    # reported; should the missing message still come, it is delivered as it arrives.
    # ``"sq"`` is outside the AEAD (the frame layout is the TypeScript SDK's), so a relay
    # that rewrites it can delay a message by ``reorder_timeout`` or reorder messages —
    # what it could do anyway — but never drop, alter or duplicate one.

    @property
    def _ordering(self) -> bool:
        # only a peer that receipts gets re-sends, so only then are gaps filled
        return self.config.receipts and self.config.reorder_timeout > 0

    def _sequence(
        self,
        session: PeerSession,
        seq: int,
        mid: str,
        payload: Any,
        ts: str | None,
        now: float,
        step: Step,
        *,
        slot: bool = False,
        text: str | None = None,
    ) -> None:
        """Deliver (or hold) the message with sequence number ``seq``; with ``slot`` (a
        duplicate of a message already handled) just mark its number taken.  ``text`` is
        the payload's JSON text as received."""
        peer = session.peer
        # not ordered: ordering is off, or the number is late (its gap was given up) or
        # taken (a rewritten number) — deliver at once, never drop a message
        ordered = self._ordering and _seq_open(session, seq)
        if not ordered or seq == session.recv_seq + 1:
            if not slot:
                step.events.append(MessageReceived(peer, payload, mid, plaintext=False, ts=ts, text=text))
            if ordered:
                session.recv_seq = seq
                step.changed.add(peer)
                self._release_ready(session, step)
            return
        body = None if slot else (text if text is not None else compact_json(payload))
        held = HeldMessage(seq, mid, body, ts, now)
        index = next((i for i, h in enumerate(session.held) if h.seq > seq), len(session.held))
        session.held.insert(index, held)
        step.changed.add(peer)
        self._holding.add(peer)
        cfg = self.config
        while len(session.held) > cfg.max_held:
            self._skip_gap(session, step, f"more than {cfg.max_held} messages held back")
        while session.held and sum(len(h.payload or "") for h in session.held) > cfg.max_held_bytes:
            self._skip_gap(session, step, f"more than {cfg.max_held_bytes} bytes held back")

    def _release_ready(self, session: PeerSession, step: Step) -> None:
        """Deliver held messages that no longer wait for anything."""
        held = session.held
        while held and held[0].seq <= session.recv_seq + 1:
            h = held.pop(0)
            session.recv_seq = max(session.recv_seq, h.seq)
            self._deliver_held(session.peer, h, step)
        if not held:
            self._holding.discard(session.peer)

    def _deliver_held(self, peer: str, h: HeldMessage, step: Step) -> None:
        if h.payload is not None:
            payload = json.loads(h.payload)  # checked to be strict JSON when it arrived
            step.events.append(MessageReceived(peer, payload, h.message_id, plaintext=False, ts=h.ts, text=h.payload))

    def _skip_gap(self, session: PeerSession, step: Step, why: str) -> None:
        """Give up the gap before the first held message and deliver what follows it."""
        first = session.held[0]
        gap = range(session.recv_seq + 1, first.seq)
        missing = f"{gap[0]}" if len(gap) == 1 else f"{gap[0]}..{gap[-1]}"
        step.events.append(
            ErrorEvent(
                "gap",
                session.peer,
                f"message(s) {missing} of this session did not arrive ({why}); delivering the later ones",
                first.message_id,
            )
        )
        session.recv_seq = first.seq - 1
        step.changed.add(session.peer)
        self._release_ready(session, step)

    def _expire_held(self, session: PeerSession, now: float, step: Step) -> None:
        """Deliver every held message that waited ``reorder_timeout`` (and those before it)."""
        timeout = self.config.reorder_timeout
        due = [h.seq for h in session.held if not self._ordering or now >= h.held_at + timeout]
        if due:
            last = max(due)
            while session.held and session.held[0].seq <= last:
                self._skip_gap(session, step, f"waited {timeout:g} s")
        if not session.held:
            self._holding.discard(session.peer)

    def _release_held(self, session: PeerSession, step: Step, *, reason: str) -> None:
        """Deliver everything held, in order (the session's sequence ends here)."""
        while session.held:
            self._skip_gap(session, step, reason)
        self._holding.discard(session.peer)

    def _fill_duplicate(
        self, session: PeerSession, f: fr.MessageFrame, now: float, random: RandomSource, step: Step
    ) -> None:
        """A message id seen before, carrying ``"sq"``: the application re-sent a message
        (same id, new encryption).  Its sequence slot is taken — if the primary ratchet
        decrypts it as a new message, so it really is one of this session's."""
        if not self._ordering or session.primary is None or f.seq is None or f.header is None:
            return
        if not _seq_open(session, f.seq):  # nothing to fill: spare the decryption
            return
        try:  # a replayed frame (its key already used) proves nothing about its number
            session.primary.decrypt(f.header, f.ciphertext, random)
        except DecryptError:
            return
        step.changed.add(session.peer)
        self._sequence(session, f.seq, f.id, None, f.ts, now, step, slot=True)

    def held_back(self, peer: str | None = None) -> int:
        """Messages decrypted but held back for an earlier one (for one peer, or all)."""
        if peer is not None:
            session = self.sessions.get(peer)
            return session.held_back if session is not None else 0
        return sum(s.held_back for s in self.sessions.values())

    # -- end-to-end receipts ------------------------------------------------------------
    #
    # AGT relays forget a frame once they have written it to the recipient's socket, so a
    # recipient that dies with frames unread loses them.  Between agt_mesh peers, messages
    # carry ``"rr": 1``; the recipient confirms processed ids in a control message, and the
    # sender re-sends (the identical frame: same id, same ciphertext) what a receipting peer
    # has not confirmed.  A re-sent frame is either de-duplicated by id or decrypts normally
    # (its key was skipped, hence cached, when later messages arrived).  Other clients
    # ignore the extra field and never send receipts, so nothing is ever re-sent to them.

    def _track(self, peer: str, mid: str, frame: dict[str, Any], now: float, step: Step | None = None) -> None:
        queue = self._unconfirmed.setdefault(peer, OrderedDict())
        queue[mid] = [frame, now]
        # A peer that never sent a receipt (e.g. a TypeScript client) will never confirm
        # anything: keep only a small window for it, in case it turns out to receipt.
        cap = self.config.max_unconfirmed if peer in self.receipt_peers else _UNPROVEN_WINDOW
        while len(queue) > cap:
            dropped, _ = queue.popitem(last=False)
            if step is not None:
                step.confirmed.append(dropped)  # forgotten: the store drops it too

    def _want_receipt(self, f: fr.MessageFrame, now: float) -> None:
        if not (self.config.receipts and f.receipt_requested):
            return
        due, ids = self._receipts_due.get(f.from_did, (now + self.config.receipt_delay, []))
        if f.id not in ids:
            ids.append(f.id)
        self._receipts_due[f.from_did] = (due, ids)

    def _on_control(self, peer: str, control: Any, step: Step) -> None:
        if not isinstance(control, dict):
            return  # "resync" and future string controls need nothing here
        ids = control.get("receipts")
        if not isinstance(ids, list):
            return
        self.receipt_peers.add(peer)
        step.changed.add(peer)
        queue = self._unconfirmed.get(peer)
        for mid in ids:
            if isinstance(mid, str) and queue is not None and queue.pop(mid, None) is not None:
                step.confirmed.append(mid)

    def _receipts_and_resends(self, now: float, random: RandomSource, step: Step) -> None:
        for peer, (due, ids) in list(self._receipts_due.items()):
            session = self.sessions.get(peer)
            if now < due or session is None or not session.can_send:
                continue
            del self._receipts_due[peer]
            for i in range(0, len(ids), 500):
                receipt = {CONTROL_KEY: {"receipts": ids[i : i + 500]}}
                step.frames.append(self._encrypt_frame(session, peer, receipt, now, random, self._new_id()))
            step.changed.add(peer)
        budget = 500  # frames re-sent per tick, so a backlog does not burst
        for peer in self.receipt_peers:
            queue = self._unconfirmed.get(peer)
            if not queue:
                continue
            for entry in queue.values():
                frame, sent_at = entry
                if now - sent_at < self.config.receipt_timeout or budget <= 0:
                    break
                entry[1] = now
                step.frames.append(frame)
                budget -= 1

    def unconfirmed(self, peer: str | None = None) -> int:
        """Messages sent and not yet confirmed by a receipt (for one peer, or all)."""
        if peer is not None:
            return len(self._unconfirmed.get(peer, ()))
        return sum(len(q) for q in self._unconfirmed.values())

    def restore_unconfirmed(self, peer: str, mid: str, frame: dict[str, Any], sent_at: float) -> None:
        """Install a persisted unconfirmed message (after a restart)."""
        self._track(peer, mid, frame, sent_at)

    def unanswered_knocks(self) -> list[dict[str, Any]]:
        """Our KNOCK frames that no reply or message has confirmed yet (re-send after reconnecting)."""
        return [s.pending_knock for s in self.sessions.values() if s.pending_knock is not None and not s.accepted]

    def queued(self, peer: str) -> int:
        """Messages waiting for the peer's first message before they can be encrypted."""
        return len(self._outbox.get(peer, ()))

    # ------------------------------------------------------------------------------
    # sessions
    # ------------------------------------------------------------------------------

    def reset_session(self, peer: str) -> Step:
        """Forget the session with ``peer`` (the next send KNOCKs again).

        Messages it held back are delivered (``MessageReceived`` events in the step).
        """
        self._outbox.pop(peer, None)
        self.undecryptable.pop(peer, None)
        step = Step()
        session = self.sessions.pop(peer, None)
        if session is not None:
            self._release_held(session, step, reason="the session was reset")
            step.changed.add(peer)
        return step

    def restore_session(self, session: PeerSession) -> None:
        """Install a persisted session."""
        self.sessions[session.peer] = session
        if session.held:
            self._holding.add(session.peer)
        if session.verified:
            self.e2e_verified.add(session.peer)
        if session.profile is not None and session.verified:
            self.peer_profiles.setdefault(session.peer, session.profile)

    def session_summaries(self) -> list[dict[str, Any]]:
        return [s.summary() for s in self.sessions.values()]

    def seen_ids(self) -> Iterable[str]:
        return self._seen_ids.keys()

    def mark_seen(self, ids: Iterable[str]) -> None:
        """Restore the de-duplication window."""
        for i in ids:
            self._remember_id(i)


def _json_size(value: Any) -> int:
    """Length of ``value`` as compact JSON; beyond any limit if it is not JSON."""
    try:
        return len(compact_json(value))
    except (TypeError, ValueError, RecursionError):
        return 1 << 62


def _frame_cost(f: fr.MessageFrame) -> int:
    """Bytes a buffered frame is counted for."""
    return len(f.ciphertext) + _FRAME_OVERHEAD


def _b64(key: bytes) -> str:
    return b64url_encode(key)


@functools.lru_cache(maxsize=256)
def _cached_fingerprint(did: str, key: bytes) -> str:
    """Fingerprints of pinned keys, which repeat (an offered key is never computed here)."""
    return fingerprint(did, key)


def _seq_open(session: PeerSession, seq: int) -> bool:
    """Whether sequence number ``seq`` is still to come (neither passed nor held)."""
    return seq > session.recv_seq and all(h.seq != seq for h in session.held)


def _not_after(ts: str | None, reference: str | None) -> bool:
    """Whether timestamp ``ts`` is not later than ``reference`` (both from the peer's clock).

    Unknown or unparsable times count as "later", i.e. not a simultaneous open.
    """
    if ts is None or reference is None:
        return False
    try:
        return _dt.datetime.fromisoformat(ts) <= _dt.datetime.fromisoformat(reference)
    except (ValueError, TypeError):
        return False
