"""``MeshClient``: the asyncio API agents use.

It ties the sans-I/O :class:`~agt_mesh.core.protocol.MeshProtocol` to the relay transport,
the registry client and the writer lock::

    async with MeshClient(identity, relay_url=..., registry_url=..., display_name="alice") as mesh:
        await mesh.send("bob", {"text": "hi"})          # a DID or a display name
        msg = await mesh.wait_for(from_="bob", timeout=30)
        print(msg.payload)

Concurrency: one task reads the relay and processes frames in order; sends and policy
verdicts take the same lock, so the protocol state is only touched by one coroutine at a
time.  Hooks (``on_message`` ...) are called in that order too; a hook that raises is
logged and otherwise ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agt_mesh import __version__
from agt_mesh.core import events as ev
from agt_mesh.core import frames as fr
from agt_mesh.core.encoding import compact_json
from agt_mesh.core.identity import Identity
from agt_mesh.core.primitives import RandomSource
from agt_mesh.core.protocol import MeshProtocol, ProtocolConfig, Step
from agt_mesh.core.trust import (
    KeyPin,
    NameBinding,
    fingerprint,
    key_binds,
    normalize_fingerprint,
    parse_identity_key,
    safety_number,
)
from agt_mesh.core.x3dh import KdfProfile, OneTimePreKey, PreKeyStore
from agt_mesh.errors import (
    AmbiguousNameError,
    IdentityBindingError,
    IdentityChangedError,
    MeshConfigError,
    MeshError,
    MeshProtocolError,
    MeshStateError,
    MeshTransportError,
    NameClaim,
    PeerNotFoundError,
)
from agt_mesh.shell.identity_file import load_identity
from agt_mesh.shell.inbound import FrameQueue, Health, Parking, frame_size, object_size
from agt_mesh.shell.inbox import DEFAULT_INBOX_BYTES, DEFAULT_INBOX_SIZE, InboundMessage, Inbox
from agt_mesh.shell.lock import WriterLock
from agt_mesh.shell.registry import AgentRecord, RegistryClient
from agt_mesh.shell.relay import RelayTransport
from agt_mesh.shell.safefs import check_state_dir
from agt_mesh.shell.store import PeerMeta, StateStore

__all__ = ["MeshClient"]

log = logging.getLogger("agt_mesh.client")

MessageHook = Callable[[InboundMessage], Awaitable[None] | None]
KnockPolicy = Callable[[str, Any], Awaitable[bool]]
ErrorHook = Callable[[str, str | None, str], Awaitable[None] | None]
DisconnectHook = Callable[[str, int | None], Awaitable[None] | None]
VerifiedHook = Callable[[str, bool], Awaitable[None] | None]

_DAY = 86400.0
#: frames processed per commit under load
_BATCH = 256


@dataclass(slots=True)
class _Batch:
    """Frames read from the relay and what processing them has produced so far."""

    texts: list[str]
    #: ``(frame, bytes, admitted)``: decoded frames and parked frames let back in
    items: list[tuple[Any, int, bool]] = field(default_factory=list)
    decoded: bool = False
    #: items processed (the next is ``items[done]``)
    done: int = 0
    step: Step = field(default_factory=Step)
    #: per sender: messages and bytes admitted to the inbox by this batch so far
    admitted: dict[str, list[int]] = field(default_factory=dict)
    #: the step is being committed and delivered
    applying: bool = False
    #: the final batch at shutdown
    last: bool = False


@dataclass(frozen=True, slots=True)
class _Malformed:
    """A frame text that could not be decoded (reported, never processed)."""

    detail: str


def _message_sender(obj: Any) -> str | None:
    """The claimed sender of a ``message`` frame (what the inbox share is counted for)."""
    if isinstance(obj, dict) and obj.get("type") == "message":
        sender = obj.get("from")
        if isinstance(sender, str):
            return sender
    return None


def _frame_id(obj: Any) -> str | None:
    fid = obj.get("id") if isinstance(obj, dict) else None
    return fid if isinstance(fid, str) else None


def _internal_error(obj: Any, exc: Exception) -> ev.ErrorEvent:
    peer = obj.get("from") if isinstance(obj, dict) and isinstance(obj.get("from"), str) else None
    return ev.ErrorEvent(
        "internal", peer, f"internal error, frame dropped: {type(exc).__name__}: {exc}", _frame_id(obj)
    )


def _parking_full(peer: str, obj: Any) -> ev.ErrorEvent:
    return ev.ErrorEvent(
        "limit",
        peer,
        "peer is over its inbox share and its set-aside frames are at their byte limit: frame dropped "
        "unacknowledged (a relay that stored it delivers it again; an agt_mesh sender re-sends it)",
        _frame_id(obj),
    )


#: claimants of an ambiguous name looked up in detail (registered_at) for the error
_CLAIM_DETAILS = 10


def _token_source(value: str | Callable[[], str | None] | None) -> Callable[[], str | None] | None:
    if value is None or callable(value):
        return value
    return lambda: value


def token_from_env(name: str) -> Callable[[], str | None]:
    """A token source reading environment variable ``name`` at every (re)connect."""
    return lambda: os.environ.get(name) or None


def token_from_file(path: str | os.PathLike[str]) -> Callable[[], str | None]:
    """A token source reading a file at every (re)connect (so rotation works)."""

    def read() -> str | None:
        try:
            return Path(path).read_text().strip() or None
        except OSError:
            return None

    return read


class MeshClient:
    """An agent's connection to the mesh: identity, sessions, relay and registry.

    Args:
        identity: an :class:`Identity`, or the path of an identity file.
        relay_url: ``http(s)://`` or ``ws(s)://`` URL of the relay.
        registry_url: base URL of the registry.
        state_dir: directory of the writer lock (default: the identity file's directory);
            ``None`` with an ``Identity`` object means no lock (ephemeral use).
        display_name: registered as the first capability and in the metadata, so peers
            can address this agent by name.
        capabilities: extra capabilities to register.
        profile: X3DH KDF for sessions we initiate: ``"current"`` (spec) or ``"ts-sdk-4"``
            (the legacy KDF of npm 4.0.0 peers).  As responder both are always accepted.
        peer_profiles: per-peer overrides of ``profile``.
        policy: ``async (peer_did, intent) -> bool`` deciding KNOCKs (default: accept).
        plaintext_peers: DIDs allowed to exchange unencrypted frames (see the downgrade latch).
        registration: ``"auto"`` (POP, falling back to the legacy body on 422), ``"pop"``,
            ``"legacy"``.
        relay_token: the relay's shared secret (``AGENTMESH_RELAY_TOKEN``), if it wants one.
        entra_token: an Entra token or a callable returning one, re-read on every connect.
        one_time_prekeys: OTKs uploaded at a time; replenished below ``replenish_below``.
        signed_prekey_rotation / signed_prekey_retention: seconds (7 and 14 days).
        heartbeat_interval: relay heartbeat period (30 s).
        connect_timeout: how long ``connect()`` may take against an unreachable relay.
        inbox_size / inbox_bytes: bounds of the inbox (10,000 messages, 64 MiB of payload
            JSON).  Each sender gets a fair share; a sender over it has its further
            frames set aside (unacknowledged) until the application reads — other
            senders' messages keep arriving.
        receipt_timeout: re-send a message an ``agt_mesh`` peer has not confirmed after
            this many seconds (10 s).
        reorder_timeout: hold an ``agt_mesh`` peer's message back at most this long while an
            earlier one is missing (30 s); then the gap is reported (``on_error`` kind
            ``"gap"``) and the later messages delivered.  0 delivers in arrival order.
        random / clock: injectable randomness and time.
    """

    def __init__(
        self,
        identity: Identity | str | os.PathLike[str],
        *,
        relay_url: str,
        registry_url: str,
        state_dir: str | os.PathLike[str] | None = None,
        display_name: str | None = None,
        capabilities: Sequence[str] = (),
        metadata: dict[str, str] | None = None,
        profile: str | KdfProfile = "current",
        peer_profiles: dict[str, str | KdfProfile] | None = None,
        policy: KnockPolicy | None = None,
        plaintext_peers: Iterable[str] = (),
        registration: str = "auto",
        relay_token: str | None = None,
        entra_token: str | Callable[[], str | None] | None = None,
        one_time_prekeys: int = 20,
        replenish_below: int = 5,
        signed_prekey_rotation: float = 7 * _DAY,
        signed_prekey_retention: float = 14 * _DAY,
        heartbeat_interval: float | None = 30.0,
        connect_timeout: float = 10.0,
        registry_timeout: float = 10.0,
        send_timeout: float = 30.0,
        reconnect: bool = True,
        inbox_size: int = DEFAULT_INBOX_SIZE,
        inbox_bytes: int = DEFAULT_INBOX_BYTES,
        durable: bool = True,
        synchronous: str = "NORMAL",
        knock_timeout: float = 10.0,
        receipt_timeout: float = 10.0,
        reorder_timeout: float = 30.0,
        random: RandomSource = os.urandom,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(identity, Identity):
            self.identity = identity
            self._identity_path: Path | None = None
        else:
            self._identity_path = Path(identity)
            if state_dir is None:
                state_dir = self._identity_path.parent
            if Path(state_dir).exists():  # before anything in it is opened
                check_state_dir(state_dir, create=False)
            self.identity = load_identity(self._identity_path)
        if registration not in ("auto", "pop", "legacy"):
            raise MeshConfigError("registration must be 'auto', 'pop' or 'legacy'")
        self.relay_url = relay_url
        self.registry_url = registry_url
        self.display_name = display_name
        self.capabilities = list(dict.fromkeys([*([display_name] if display_name else []), *capabilities]))
        self.metadata = {
            **(metadata or {}),
            **({"display_name": display_name} if display_name else {}),
            "runtime": "python",
            "library": f"kars-agt-mesh/{__version__}",
        }
        self._random = random
        self._clock = clock
        self._registration = registration
        self._relay_token = relay_token
        self._entra = _token_source(entra_token)
        self.one_time_prekeys = one_time_prekeys
        self.replenish_below = replenish_below
        self.signed_prekey_rotation = signed_prekey_rotation
        self.signed_prekey_retention = signed_prekey_retention
        #: how often a connected client checks pre-key rotation and replenishment (seconds)
        self.prekey_check_interval = 3600.0
        self.heartbeat_interval = heartbeat_interval
        self.connect_timeout = connect_timeout
        self.registry_timeout = registry_timeout
        self.send_timeout = send_timeout
        self.reconnect = reconnect
        self._lockfile = WriterLock(state_dir) if state_dir is not None else None
        self.store = (
            StateStore(state_dir, did=self.identity.did, synchronous=synchronous)
            if state_dir is not None and durable
            else None
        )
        self._loaded = False
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.prekeys = PreKeyStore(self.identity)
        self.protocol = MeshProtocol(
            ProtocolConfig(
                did=self.identity.did,
                initiator_profile=KdfProfile.parse(profile),
                knock_timeout=knock_timeout,
                receipt_timeout=receipt_timeout,
                reorder_timeout=reorder_timeout,
            ),
            self.prekeys,
            new_id=self._new_id,
        )
        for peer, prof in (peer_profiles or {}).items():
            self.protocol.profile_overrides[peer] = KdfProfile.parse(prof)
        self.protocol.plaintext_peers.update(plaintext_peers)
        self.inbox = Inbox(inbox_size, inbox_bytes)
        self.inbox.on_removed = self._on_inbox_space
        self._policy = policy
        self._message_hooks: list[MessageHook] = []
        self._error_hooks: list[ErrorHook] = []
        self._disconnect_hooks: list[DisconnectHook] = []
        self._verified_hooks: list[VerifiedHook] = []
        self._lock = asyncio.Lock()
        self._registry: RegistryClient | None = None
        self._transport: RelayTransport | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ticker: asyncio.Task[None] | None = None
        #: display labels of peers (what they call themselves; for output only, never resolved)
        self._names: dict[str, str] = {}
        #: display names bound to one DID each: what ``resolve`` answers (names are claims)
        self._bindings: dict[str, NameBinding] = {}
        self._registered = False
        #: optional tap called with every frame sent to the relay (diagnostics, demos)
        self.frame_tap: Callable[[dict[str, Any]], None] | None = None
        self._inbound = FrameQueue()
        self._parking = Parking()
        self._processor: asyncio.Task[None] | None = None
        #: the inbound batch in progress (resumed by a restarted processing task)
        self._batch: _Batch | None = None
        self._closing = False
        #: why committing received state fails right now (the receive path waits)
        self._stalled: str | None = None
        self._restarting = False
        self._restarts = 0
        self._internal_errors = 0
        self._replenishing = False
        self.uploaded_otks = 0
        #: first id of the last published one-time pre-key batch
        self._published_from = 0

    # ------------------------------------------------------------------------------
    # properties and hooks
    # ------------------------------------------------------------------------------

    @property
    def did(self) -> str:
        """Our ``did:mesh:`` DID."""
        return self.identity.did

    @property
    def is_connected(self) -> bool:
        return self._transport is not None and self._transport.is_connected

    @property
    def health(self) -> Health:
        """Whether messages are being received, not just whether the socket is open.

        ``health.ok`` is false while committing to the state store fails (``inbound ==
        "stalled"``), while the processing task restarts after a failure, and when it is
        not running at all; the counters show what the byte limits hold back.
        """
        proc = self._processor
        if proc is None or proc.done():
            inbound, detail = "stopped", None
        elif self._restarting:
            inbound, detail = "restarting", "the inbound processing task failed and is being restarted"
        elif self._stalled is not None:
            inbound, detail = "stalled", self._stalled
        else:
            inbound, detail = "running", None
        return Health(
            connected=self.is_connected,
            inbound=inbound,
            detail=detail,
            restarts=self._restarts,
            internal_errors=self._internal_errors,
            queued_frames=len(self._inbound),
            queued_bytes=self._inbound.bytes,
            parked_frames=len(self._parking),
            parked_bytes=self._parking.bytes,
            parked_dropped=self._parking.dropped,
            buffered_bytes=self.protocol.buffered_bytes(),
            inbox_messages=len(self.inbox),
            inbox_bytes=self.inbox.bytes,
        )

    @property
    def registry(self) -> RegistryClient:
        if self._registry is None:
            raise MeshTransportError("not connected: call connect() first")
        return self._registry

    @property
    def transport(self) -> RelayTransport | None:
        return self._transport

    def on_message(self, hook: MessageHook) -> MessageHook:
        """Register ``hook(message)``, called for every message (usable as a decorator).

        Messages also go to the inbox, which is bounded: an application that handles them
        here should still empty it (``drain()``), or each sender's share fills up and its
        further frames wait (see ``inbox_size``).
        """
        self._message_hooks.append(hook)
        return hook

    def on_knock(self, policy: KnockPolicy) -> KnockPolicy:
        """Set the KNOCK policy ``async (peer_did, intent) -> bool`` (default: accept all)."""
        self._policy = policy
        return policy

    def on_error(self, hook: ErrorHook) -> ErrorHook:
        """Register ``hook(kind, peer, detail)`` for problems: ``frame``, ``decrypt`` (including
        payloads refused as not strict JSON), ``duplicate``, ``knock``, ``gap``, ``limit`` (a
        byte limit held something back or dropped it unacknowledged), ``relay``, ``ws``,
        ``store`` (commits fail; receiving is paused) and ``internal`` (an unexpected error,
        contained to one frame or followed by a restart)."""
        self._error_hooks.append(hook)
        return hook

    def on_disconnect(self, hook: DisconnectHook) -> DisconnectHook:
        """Register ``hook(reason, code)``; ``reason`` is ``"client"`` or ``"server"``."""
        self._disconnect_hooks.append(hook)
        return hook

    def on_e2e_verified(self, hook: VerifiedHook) -> VerifiedHook:
        """Register ``hook(peer, first_peer)``, called at the first decryption from a peer."""
        self._verified_hooks.append(hook)
        return hook

    def add_plaintext_peer(self, did: str) -> None:
        """Allow unencrypted frames with ``did`` (only while it was never E2E-verified)."""
        self.protocol.plaintext_peers.add(did)

    def remove_plaintext_peer(self, did: str) -> None:
        self.protocol.plaintext_peers.discard(did)

    def is_plaintext_peer(self, did: str) -> bool:
        return did in self.protocol.plaintext_peers

    def set_peer_profile(self, did: str, profile: str | KdfProfile) -> None:
        """Use ``profile`` (``current``/``ts-sdk-4``) when initiating to ``did``."""
        self.protocol.profile_overrides[did] = KdfProfile.parse(profile)

    def _new_id(self) -> str:
        return str(uuid.UUID(bytes=self._random(16), version=4))

    # ------------------------------------------------------------------------------
    # lifecycle
    # ------------------------------------------------------------------------------

    async def __aenter__(self) -> MeshClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.disconnect()

    async def connect(self) -> None:
        """Take the writer lock, register, publish pre-keys and connect to the relay.

        Idempotent.  On any failure everything is released (lock included) and the error
        is raised.

        Raises:
            LockHeldError: another process uses this identity's state directory.
            MeshAuthError: the relay or registry refused our credentials.
            MeshTransportError / MeshRegistryError: unreachable or failing servers.
        """
        if self.is_connected:
            return
        try:
            if self._lockfile is not None:
                self._lockfile.acquire()
            if self.store is not None and not self._loaded:
                self._load_state()
            if self._registry is None:
                self._registry = RegistryClient(
                    self.registry_url,
                    self.identity,
                    timeout=self.registry_timeout,
                    registration=self._registration,  # type: ignore[arg-type]
                    clock=self._clock,
                )
            force_upload = False
            if (
                not self._registered
                and self.store is not None
                and self.store.get_meta("registered_at") == self.registry_url
            ):
                # resumed: no new registration unless the registry forgot us (it may be in-memory)
                if await self._registry.get_agent(self.did) is not None:
                    self._registered = True
                else:
                    force_upload = True
            if not self._registered:
                await self._registry.register(self.capabilities, self.metadata)
                self._registered = True
                if self.store is not None:
                    self.store.set_meta("registered_at", self.registry_url)
            await self._ensure_prekeys(force_upload=force_upload)
            if self._transport is None:
                self._transport = RelayTransport(
                    self.relay_url,
                    self.identity,
                    on_frame=self._on_frame,
                    token=self._token,
                    connect_timeout=self.connect_timeout,
                    heartbeat_interval=self.heartbeat_interval,
                    reconnect=self.reconnect,
                    clock=self._clock,
                    on_disconnect=self._on_transport_disconnect,
                    on_connect=self._on_transport_connect,
                    on_error=self._on_transport_error,
                )
            self._transport.on_send = self.frame_tap
            self._closing = False
            if self._processor is None or self._processor.done():
                self._inbound.reset()
                self._processor = asyncio.create_task(
                    self._supervised("inbound processing", self._process_loop), name="agt-mesh-inbound"
                )
            await self._transport.connect()
            if self._ticker is None or self._ticker.done():
                self._ticker = asyncio.create_task(
                    self._supervised("timer processing", self._tick_loop), name="agt-mesh-tick"
                )
        except BaseException:
            await self._teardown()
            raise

    def _token(self) -> str | None:
        if self._entra is not None:
            tok = self._entra()
            if tok:
                return tok
        return self._relay_token

    async def disconnect(self) -> None:
        """Close the relay connection, stop background work and release the writer lock."""
        await self._teardown()

    async def _teardown(self) -> None:
        # 1. stop the relay sending and read what it already wrote (it may not keep it)
        if self._transport is not None:
            with contextlib.suppress(Exception):
                await self._transport.close()
        # 2. process everything that was read; never cancel a batch half-way (its state
        #    could be ahead of what was committed)
        self._closing = True
        if self._processor is not None:
            if not self._processor.done():
                self._inbound.stop()
                try:
                    await asyncio.wait_for(asyncio.shield(self._processor), 30)
                except (TimeoutError, Exception):
                    self._processor.cancel()
                    with contextlib.suppress(BaseException):
                        await self._processor
            self._processor = None
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(BaseException):
                await self._ticker
            self._ticker = None
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        self._tasks.clear()
        if self._transport is not None:
            with contextlib.suppress(Exception):
                await self._transport.close()
            self._transport = None
        if self._registry is not None:
            with contextlib.suppress(Exception):
                await self._registry.aclose()
            self._registry = None
        if self.store is not None:
            self.store.close()
            self._loaded = False
        if self._lockfile is not None:
            self._lockfile.release()

    def _spawn(self, coro: Awaitable[Any], name: str) -> None:
        async def contained() -> None:  # a failing background job is reported, never silent
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._internal_errors += 1
                log.exception("%s failed", name)
                await self._emit_error("internal", None, f"{name} failed: {type(exc).__name__}: {exc}")

        task = asyncio.ensure_future(contained())
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------------------
    # pre-keys
    # ------------------------------------------------------------------------------

    def _load_state(self) -> None:
        """Resume from the durable store: pre-keys, sessions, peers, dedupe ids, inbox."""
        assert self.store is not None
        store = self.store.open()
        if self._loaded:
            return
        if self.prekeys.signed_pre_key is None:
            store.load_prekeys(self.prekeys)
            self._published_from = int(store.get_meta("otk_published_from") or 0)
        for stored_pin, offered in store.load_pins():
            self.protocol.restore_pin(stored_pin, offered)
        early = dict(self._bindings)  # bound before connect(): made durable now
        for binding in store.load_names():
            self._bindings[binding.name] = binding
        for name, binding in early.items():
            self._bindings[name] = binding
            store.bind_name(binding)
        own = self.identity.x25519_public
        unbound: list[str] = []
        new_pins: list[tuple[str, KeyPin | None, KeyPin | None]] = []
        for session in store.load_sessions():
            keys = session.peer_keys(own)
            pin = self.protocol.pins.get(session.peer)
            if any(not key_binds(session.peer, k) for k in keys) or (pin and keys - {pin.identity_key}):
                # made before keys were checked, with a key that is not the peer's
                log.error(
                    "dropping the stored session with %s: it is bound to a key that is not the peer's", session.peer
                )
                unbound.append(session.peer)
                continue
            self.protocol.restore_session(session)
            key = session.peer_identity_key()
            if pin is None and key is not None:
                found = KeyPin(session.peer, key, session.last_activity or self._clock(), "session")
                self.protocol.restore_pin(found)
                new_pins.append((session.peer, found, None))
        for peer in unbound:
            store.delete_session(peer)
        if new_pins:
            store.save_pins(new_pins)
        for meta in store.load_peers():
            if meta.profile is not None:
                self.protocol.peer_profiles[meta.did] = meta.profile
            if meta.e2e_verified:
                self.protocol.e2e_verified.add(meta.did)
            if meta.display_name:
                self._names.setdefault(meta.did, meta.display_name)
            if meta.receipts:
                self.protocol.receipt_peers.add(meta.did)
        for peer, mid, frame, sent_at in store.load_unconfirmed():
            self.protocol.restore_unconfirmed(peer, mid, frame, sent_at)
        self.protocol.mark_seen(store.load_seen_ids())
        known = {m.message_id for m in self.inbox.peek()}
        for msg in store.load_inbox():
            if msg.message_id not in known:
                self.inbox.add(msg)  # all of it: each was acknowledged, none may be dropped
        self._loaded = True

    async def _ensure_prekeys(self, *, force_upload: bool = False) -> None:
        now = self._clock()
        spk = self.prekeys.signed_pre_key
        upload = force_upload
        if spk is None or (spk.created_at is not None and now - spk.created_at >= self.signed_prekey_rotation):
            self.prekeys.generate_signed_pre_key(self._random, created_at=now)
            self.prekeys.drop_retired_before(now - self.signed_prekey_retention)
            upload = True
        batch = None
        if len(self._otks_on_registry()) < self.replenish_below or upload:
            # A fresh batch, never published before: the registry may already have handed
            # out any earlier one-time pre-key to an initiator whose KNOCK is still on its
            # way, so re-publishing it would give it to a second initiator.  Earlier keys
            # stay valid locally for those KNOCKs.
            batch = self.prekeys.generate_one_time_pre_keys(self.one_time_prekeys, self._random)
            self._published_from = self.prekeys.next_otk_id - len(batch)
            upload = True
        if upload:
            await self._upload_bundle(batch if batch is not None else self._otks_on_registry())

    def _otks_on_registry(self) -> list[OneTimePreKey]:
        """Our unused one-time pre-keys of the last published batch (what the registry may hold)."""
        return [o for o in self.prekeys.one_time_pre_keys if o.key_id >= self._published_from]

    async def _upload_bundle(self, otks: list[OneTimePreKey]) -> None:
        spk = self.prekeys.signed_pre_key
        assert spk is not None and self._registry is not None
        if self.store is not None:  # private keys are durable before the public keys are published
            self.store.save_prekeys(self.prekeys)
            self.store.set_meta("otk_published_from", str(self._published_from))
        await self._registry.upload_prekeys(spk, otks)
        self.uploaded_otks = len(otks)

    async def _replenish(self) -> None:
        try:
            await self._ensure_prekeys()
        except MeshError as exc:
            await self._emit_error("registry", None, f"pre-key replenishment failed: {exc}")
        finally:
            self._replenishing = False

    # ------------------------------------------------------------------------------
    # inbound
    # ------------------------------------------------------------------------------

    async def _on_frame(self, text: str) -> None:
        # bounded in bytes: a slow consumer slows the socket reader, nothing is dropped
        await self._inbound.put(text)

    def _on_inbox_space(self) -> None:
        if len(self._parking):
            self._inbound.kick()  # a parked peer may fit its share again

    async def _supervised(self, name: str, body: Callable[[], Awaitable[None]]) -> None:
        """Run ``body`` until it returns; restart it after an unexpected exception.

        The receive path must outlive any bug: a failure is logged, counted in
        :attr:`health` and reported through ``on_error`` (kind ``internal``), and the
        task starts again after a short pause (0.1 s doubling to 5 s).
        """
        delay = 0.1
        while True:
            try:
                await body()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing:
                    raise
                self._restarts += 1
                self._restarting = True
                log.exception("%s failed; restarting it", name)
                detail = f"{name} failed and was restarted: {type(exc).__name__}: {exc}"
                await self._emit_error("internal", None, detail)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                self._restarting = False

    async def _process_loop(self) -> None:
        """Process inbound frames in batches until the queue is stopped.

        The batch in progress lives on the client (``_batch``), with how far it got, so a
        task restarted by the supervisor resumes it: no frame that was read is lost, and
        none is processed twice (the frame that was being processed when the task failed
        is the one skipped).  A batch whose delivery had begun is not delivered again.
        """
        while True:
            batch = self._batch
            if batch is None:
                try:
                    texts = await self._inbound.get(_BATCH)
                except EOFError:
                    # shutting down: what was set aside is processed too (committed to the
                    # durable inbox), since AGT relays do not deliver a frame twice
                    batch = _Batch([], [(obj, 0, True) for obj in self._parking.take_all()], decoded=True, last=True)
                else:
                    batch = _Batch(texts or [])
                self._batch = batch
            if batch.applying:
                log.warning("dropping the delivery of a batch interrupted by a failure (it was committed)")
            else:
                if not batch.decoded:
                    batch.items.extend(self._unparked())
                    decoded = [item for text in batch.texts for item in self._decode(text)]
                    batch.items.extend(decoded)
                    batch.decoded = True
                if batch.items:
                    await self._process_batch(batch)
            self._batch = None
            if batch.last:
                return

    def _decode(self, text: str) -> list[tuple[Any, int, bool]]:
        """``(frame, bytes, admitted)`` items of one frame text (a relay's
        ``pending_messages`` batch becomes one item per stored frame)."""
        try:
            obj = fr.decode_frame(text, max_bytes=fr.DEFAULT_MAX_FRAME_BYTES)
        except MeshProtocolError as exc:
            return [(_Malformed(f"dropping malformed frame: {exc}"), 0, False)]
        entries = obj.get("messages")
        if obj.get("type") == "pending_messages" and isinstance(entries, list):
            return [(e, object_size(e), False) for e in entries]
        return [(obj, frame_size(text), False)]

    def _unparked(self) -> list[tuple[Any, int, bool]]:
        """Parked frames whose peer is back within its inbox share (admitted)."""
        out: list[tuple[Any, int, bool]] = []
        for peer in self._parking.peers():
            count = size = 0
            while (head := self._parking.head(peer)) is not None and self.inbox.admits(peer, count, size):
                out.append((self._parking.pop(peer), head[1], True))
                count, size = count + 1, size + head[1]
        return out

    async def _process_batch(self, batch: _Batch) -> None:
        """Process a batch's frames with one commit, then send the acks.

        A ``message`` frame from a peer that has its fair share of the inbox waiting is
        set aside (parked) instead, unacknowledged, until the application reads.  Each
        frame is processed on its own: an exception costs that frame only.
        """
        step = batch.step
        async with self._lock:
            while batch.done < len(batch.items):
                obj, size, ok = batch.items[batch.done]
                batch.done += 1  # before processing: a frame that brings the task down is not retried
                if isinstance(obj, _Malformed):
                    step.events.append(ev.ErrorEvent("frame", None, obj.detail))
                    continue
                peer = _message_sender(obj)
                if peer is not None:
                    extra = batch.admitted.setdefault(peer, [0, 0])
                    if not ok and (peer in self._parking or not self.inbox.admits(peer, *extra)):
                        for who, dropped in self._parking.park(peer, obj, size):
                            step.events.append(_parking_full(who, dropped))
                        continue
                    extra[0] += 1
                    extra[1] += size
                try:
                    step.extend(self.protocol.receive(obj, self._clock(), self._random))
                except Exception as exc:  # a bug must cost one frame, never the receive path
                    self._internal_errors += 1
                    log.exception("inbound frame processing failed")
                    step.events.append(_internal_error(obj, exc))
                    fid = _frame_id(obj)
                    if fid is not None and obj.get("type") in ("message", "knock"):
                        step.acks.append(fid)  # it can never be processed: stop redelivery
        batch.applying = True
        await self._apply(step)

    def _persist(self, step: Step, messages: list[InboundMessage], texts: list[str] | None = None) -> None:
        store = self.store
        if store is None:
            return
        sessions = {peer: self.protocol.sessions.get(peer) for peer in step.changed}
        proto = self.protocol
        peers = [
            PeerMeta(
                p, proto.peer_profiles.get(p), self._names.get(p), p in proto.e2e_verified, p in proto.receipt_peers
            )
            for p in step.changed
        ]
        store.commit(
            sessions=sessions,
            peers=peers,
            inbox=messages,
            inbox_json=texts,
            seen=step.seen,
            prekeys=self.prekeys,
            sent=step.sent,
            confirmed=step.confirmed,
            identities=[(d, proto.pins.get(d), proto.offered.get(d)) for d in step.identities],
        )

    async def _commit(self, step: Step, messages: list[InboundMessage], texts: list[str]) -> None:
        """Persist the step, retrying while the store fails.

        Nothing of the step is sent, delivered or acknowledged before it is committed, so
        a failing store stalls the receive path (reported by :attr:`health` and once
        through ``on_error`` kind ``store``) instead of losing or duplicating messages.
        """
        delay = 0.05
        while True:
            try:
                self._persist(step, messages, texts)
            except Exception as exc:
                if self._closing:
                    raise
                if self._stalled is None:
                    log.warning("cannot commit received state; retrying: %s", exc)
                    self._stalled = f"state store commit failing: {type(exc).__name__}: {exc}"
                    await self._emit_error("store", None, f"{self._stalled}; receiving is paused until it works")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            if self._stalled is not None:
                log.warning("state store commits work again; receiving resumed")
                self._stalled = None
            return

    def _inbox_rows(self, step: Step) -> tuple[list[InboundMessage], list[str], set[int]]:
        """The step's messages with their JSON text; indexes of those that cannot be kept."""
        messages: list[InboundMessage] = []
        texts: list[str] = []
        refused: set[int] = set()
        for i, e in enumerate(step.events):
            if not isinstance(e, ev.MessageReceived):
                continue
            text = e.text
            if text is None:
                try:
                    text = compact_json(e.payload)
                except (TypeError, ValueError, RecursionError):
                    refused.add(i)
                    continue
            name = self.display_name_of(e.peer)
            messages.append(InboundMessage(e.peer, e.payload, e.message_id, self._clock(), e.plaintext, name))
            texts.append(text)
        return messages, texts, refused

    async def _apply(self, step: Step) -> None:
        """Commit the step's state, send its frames, deliver its events, then acknowledge.

        Every part after the commit is contained: a failing hook, event or send costs
        that item only.
        """
        messages, texts, refused = self._inbox_rows(step)
        await self._commit(step, messages, texts)
        for frame in step.frames:
            await self._send_frame(frame)
        delivered = iter(zip(messages, texts, strict=True))
        for i, event in enumerate(step.events):
            try:
                if isinstance(event, ev.MessageReceived):
                    if i in refused:
                        await self._emit_error("decrypt", event.peer, "payload cannot be stored as JSON — dropped")
                    else:
                        msg, text = next(delivered)
                        await self._deliver(msg, len(text))
                else:
                    await self._handle_event(event)
            except Exception as exc:  # pragma: no cover - every branch contains its own errors
                self._internal_errors += 1
                log.exception("event delivery failed")
                await self._emit_error("internal", None, f"event delivery failed: {type(exc).__name__}: {exc}")
        for ack in step.ack_frames():
            await self._send_frame(ack)
        if (
            not self._replenishing
            and self._registry is not None
            and len(self._otks_on_registry()) < self.replenish_below
        ):
            self._replenishing = True
            self._spawn(self._replenish(), "agt-mesh-replenish")

    async def _send_frame(self, frame: dict[str, Any]) -> None:
        transport = self._transport
        if transport is None:
            return
        try:
            await transport.send(frame)
        except MeshTransportError as exc:
            log.debug("frame not sent: %s", exc)
        except Exception:  # never let one unsendable frame stop the receive path
            log.exception("frame not sent")

    async def _deliver(self, msg: InboundMessage, size: int | None = None) -> None:
        # never waits: admission to the inbox was decided before the frame was processed
        self.inbox.add(msg, size)
        await self.inbox.notify()
        for hook in list(self._message_hooks):
            await self._call(hook, msg)

    async def _handle_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.KnockDecision):
            self._spawn(self._decide_knock(event), "agt-mesh-knock")
        elif isinstance(event, ev.ErrorEvent):
            await self._emit_error(event.kind, event.peer, event.detail)
        elif isinstance(event, ev.E2EVerified):
            for vhook in list(self._verified_hooks):
                await self._call(vhook, event.peer, event.first_peer)
        elif isinstance(event, ev.KnockRejected) and not event.ignored:
            await self._emit_error("knock", event.peer, f"peer rejected our KNOCK ({event.reason})")

    async def _call(self, hook: Callable[..., Any], *args: Any) -> None:
        try:
            result = hook(*args)
            if asyncio.iscoroutine(result):
                await result
        except Exception:
            log.exception("hook %r failed", hook)

    async def _emit_error(self, kind: str, peer: str | None, detail: str) -> None:
        log.debug("mesh error %s from %s: %s", kind, peer, detail)
        for hook in list(self._error_hooks):
            await self._call(hook, kind, peer, detail)

    async def _decide_knock(self, event: ev.KnockDecision) -> None:
        accept = True
        if self._policy is not None:
            try:
                accept = bool(
                    await asyncio.wait_for(self._policy(event.peer, event.intent), self.protocol.config.knock_timeout)
                )
            except TimeoutError:
                accept = False
            except Exception as exc:
                await self._emit_error("knock", event.peer, f"policy hook failed, rejecting: {exc}")
                accept = False
        async with self._lock:
            step = self.protocol.resolve_knock(event.knock_id, accept, self._clock(), self._random)
        await self._apply(step)

    async def _tick_loop(self) -> None:
        next_prekey_check = time.monotonic() + self.prekey_check_interval
        while True:
            deadline = self.protocol.next_deadline()
            now = self._clock()
            delay = 0.5 if deadline is None else min(0.5, max(0.02, deadline - now))
            await asyncio.sleep(delay)
            async with self._lock:
                step = self.protocol.tick(self._clock(), self._random)
            if step.frames or step.events or step.acks:
                await self._apply(step)
            if time.monotonic() >= next_prekey_check and not self._replenishing:
                # a long-lived client rotates its signed pre-key without reconnecting
                next_prekey_check = time.monotonic() + self.prekey_check_interval
                self._replenishing = True
                self._spawn(self._replenish(), "agt-mesh-prekeys")

    async def _on_transport_connect(self) -> None:
        for frame in self.protocol.unanswered_knocks():
            await self._send_frame(frame)

    async def _on_transport_disconnect(self, reason: str, code: int | None) -> None:
        for hook in list(self._disconnect_hooks):
            await self._call(hook, reason, code)

    async def _on_transport_error(self, kind: str, detail: str) -> None:
        await self._emit_error(kind, None, detail)

    # ------------------------------------------------------------------------------
    # outbound
    # ------------------------------------------------------------------------------

    async def resolve(self, to: str) -> str:
        """The DID for ``to``: a DID as it is, or a display name — which is only a claim.

        Anyone can register any display name, so a name resolves only to the DID it is
        bound to locally.  The first resolution binds it, durably, when exactly one agent
        claims it; the binding then holds whatever the registry says later, until the user
        rebinds it (:meth:`bind_name`, :meth:`unbind_name`).  This is the one place names
        become DIDs: sending, :meth:`wait_for` and the adapters' tools all go through it.

        Raises:
            PeerNotFoundError: nobody claims that exact name (and it is not bound).
            AmbiguousNameError: several agents claim it and none is bound to it; the error
                lists them (DID, key fingerprint if we know the key, registration times).
        """
        if to.startswith("did:"):
            return to
        binding = self._bindings.get(to)
        if binding is not None:
            return binding.did
        claims = await self.name_claims(to, details=False)
        if not claims:
            raise PeerNotFoundError(f"no agent named {to!r} in the registry (names are exact)")
        if len(claims) > 1:
            claims = await self.name_claims(to)
            raise AmbiguousNameError(_ambiguous_text(to, claims), name=to, claims=claims)
        self._bind(NameBinding(to, claims[0].did, self._clock(), "registry"))
        return claims[0].did

    async def name_claims(self, name: str, *, details: bool = True) -> list[NameClaim]:
        """Every agent the registry lists as claiming display name ``name``, freshest first.

        ``details`` also asks the registry for each one's ``registered_at`` (at most 10).
        The claim whose DID the name is bound to is not marked here: see :meth:`name_bindings`.
        """
        records = await self.registry.find_all_by_display_name(name)
        out: list[NameClaim] = []
        for i, record in enumerate(records):
            registered = None
            if details and i < _CLAIM_DETAILS:
                with contextlib.suppress(MeshError):
                    full = await self.registry.get_agent(record.did)
                    value = full.raw.get("registered_at") if full is not None else None
                    registered = value if isinstance(value, str) else None
            pin = self.protocol.pins.get(record.did)
            out.append(NameClaim(record.did, pin.fingerprint if pin else None, registered, record.last_seen))
        return out

    def _bind(self, binding: NameBinding) -> None:
        self._bindings[binding.name] = binding
        self._names[binding.did] = binding.name
        if self.store is not None and self.store.db_open:
            self.store.bind_name(binding)

    def bind_name(self, name: str, did: str) -> None:
        """Bind display name ``name`` to ``did`` (the user's decision; replaces a binding).

        Durable in the state store (a binding made before :meth:`connect` is written then).
        """
        if not isinstance(name, str) or not name or name.startswith("did:"):
            raise MeshConfigError("a display name must be a non-empty string that is not a DID")
        if not isinstance(did, str) or not did.startswith("did:"):
            raise MeshConfigError(f"{did!r} is not a DID")
        self._bind(NameBinding(name, did, self._clock(), "user"))

    def unbind_name(self, name: str) -> bool:
        """Forget the binding of ``name`` (the next :meth:`resolve` asks the registry again)."""
        binding = self._bindings.pop(name, None)
        if binding is not None and self._names.get(binding.did) == name:
            del self._names[binding.did]
        if self.store is not None and self.store.db_open:
            self.store.unbind_name(name)
        return binding is not None

    def name_bindings(self) -> dict[str, NameBinding]:
        """The display names bound to DIDs (``name -> NameBinding``)."""
        return dict(self._bindings)

    def display_name_of(self, did: str) -> str | None:
        """A name to show for ``did``: the name bound to it, else what it calls itself —
        unless that name is bound to another DID (a squatter is never shown as the owner)."""
        for binding in self._bindings.values():
            if binding.did == did:
                return binding.name
        label = self._names.get(did)
        if label is None:
            return None
        bound = self._bindings.get(label)
        return label if bound is None or bound.did == did else None

    # -- identity keys ------------------------------------------------------------------

    def pinned_identity(self, did: str) -> KeyPin | None:
        """The identity key pinned for ``did`` (None if we never saw one)."""
        return self.protocol.pins.get(did)

    def offered_identity(self, did: str) -> KeyPin | None:
        """The last other key ``did`` presented and we refused (None if none)."""
        return self.protocol.offered.get(did)

    def fingerprint(self, did: str | None = None) -> str:
        """Our fingerprint, or the pinned key's of ``did`` (30 digits).

        Raises:
            PeerNotFoundError: no key is pinned for ``did``.
        """
        if did is None or did == self.did:
            return fingerprint(self.did, self.identity.x25519_public)
        pin = self._need_pin(did)
        return pin.fingerprint

    def safety_number(self, did: str) -> str:
        """Our and ``did``'s fingerprints in sorted order: the same 60 digits on both sides.

        Compare it with the peer over another channel (as Signal's safety numbers): equal
        numbers mean no one sits between the two keys.

        Raises:
            PeerNotFoundError: no key is pinned for ``did``.
        """
        pin = self._need_pin(did)
        return safety_number(self.did, self.identity.x25519_public, did, pin.identity_key)

    def _need_pin(self, did: str) -> KeyPin:
        pin = self.protocol.pins.get(did)
        if pin is None:
            raise PeerNotFoundError(f"no identity key is pinned for {did} yet (no session with it so far)")
        return pin

    async def trust_identity(self, did: str, key: str | bytes) -> KeyPin:
        """Accept a new identity key for ``did`` — only after checking it out of band.

        ``key`` is the fingerprint of the key ``did`` offered (see :meth:`offered_identity`,
        ``agt-mesh peer fingerprint``), or the X25519 key itself (32 bytes, base64url or hex
        text) to pin a key learned elsewhere.  A session with the old key is forgotten.

        Raises:
            MeshConfigError: ``key`` matches neither the offered key nor a valid key.
            IdentityBindingError: the key cannot belong to ``did`` (canonical DIDs).
        """
        if self.store is not None and not self._loaded:
            raise MeshStateError("trust_identity() needs the state store: call connect() first")
        raw = parse_identity_key(key)
        if raw is None:
            wanted = normalize_fingerprint(key) if isinstance(key, str) else None
            candidates = [p for p in (self.protocol.offered.get(did), self.protocol.pins.get(did)) if p is not None]
            match = [p for p in candidates if wanted is not None and p.fingerprint == wanted]
            if not match:
                raise MeshConfigError(
                    f"{key!r} is not the fingerprint of a key {did} offered (see `agt-mesh peer fingerprint {did}`), "
                    "nor a 32-byte X25519 key"
                )
            raw = match[0].identity_key
        async with self._lock:
            step = self.protocol.trust_identity(did, raw, self._clock())
        await self._apply(step)
        return self.protocol.pins[did]

    async def send(self, to: str, payload: Any, *, message_id: str | None = None) -> str:
        """Send ``payload`` (any JSON value) to ``to`` (DID or display name); returns the message id.

        The first message to a peer fetches its pre-key bundle and sends a KNOCK first.
        Returns once the frames were handed to the relay.

        Raises:
            PeerNotFoundError, AmbiguousNameError (a name several agents claim),
            BundleVerificationError, IdentityBindingError (the registry returned keys that
            are not the peer's), IdentityChangedError (the peer's pinned key changed),
            MeshTransportError (not connected within ``send_timeout``), MeshConfigError
            (payload not JSON).
        """
        did = await self.resolve(to)
        transport = self._transport
        if transport is None or not await transport.wait_connected(self.send_timeout):
            raise MeshTransportError("not connected to the relay; call connect() (or wait for reconnection)")
        if self.protocol.needs_session(did):
            bundle = await self.registry.fetch_bundle(did)
            try:
                async with self._lock:
                    step = (
                        self.protocol.establish(did, bundle, self._clock(), self._random)
                        if self.protocol.needs_session(did)
                        else Step()
                    )
            except IdentityBindingError as exc:
                await self._emit_error("identity_binding", did, str(exc))
                raise
            except IdentityChangedError:
                async with self._lock:
                    step = self.protocol.offer_identity(did, bundle.identity_key, self._clock())
                await self._apply(step)  # records the offered key, reports identity_changed
                raise
            await self._apply(step)
        async with self._lock:
            step, mid = self.protocol.send(did, payload, self._clock(), self._random, message_id=message_id)
            self._persist(step, [])  # the advanced sending chain is durable before the frame leaves
        for frame in step.frames:
            await transport.send(frame)
        return mid

    async def discover(self, capability: str, *, limit: int = 50) -> list[AgentRecord]:
        """Agents registered with ``capability`` (exact match), freshest first.

        Nothing here binds a name: several agents may claim the same one (see
        :meth:`name_claims`, :meth:`resolve`).
        """
        return await self.registry.discover(capability, limit=limit)

    async def verify_tier(self, token: str) -> dict[str, Any]:
        """Ask the registry to upgrade us to the verified tier with an OAuth (Entra) token."""
        return await self.registry.verify_tier(token)

    # ------------------------------------------------------------------------------
    # inbox
    # ------------------------------------------------------------------------------

    # Consumption: the in-memory inbox hands each message out once per process; the durable
    # copy is deleted only when it is consumed.  ``consume=False`` plus :meth:`consume` after
    # handling gives at-least-once delivery across crashes (with stable message ids).

    def consume(self, *messages: InboundMessage | str) -> None:
        """Mark messages (or message ids) handled: they will not be redelivered after a restart."""
        if self.store is not None and self.store.db_open:
            self.store.consume(m if isinstance(m, str) else m.message_id for m in messages)

    async def messages(self, *, consume: bool = True) -> AsyncIterator[InboundMessage]:
        """Messages forever, in arrival order (consumed as they are yielded unless ``consume=False``)."""
        async for msg in self.inbox:
            if consume:
                self.consume(msg)
            yield msg

    def drain(self, *, consume: bool = True) -> list[InboundMessage]:
        """Remove and return every waiting message without blocking."""
        out = self.inbox.drain()
        if consume and out:
            self.consume(*out)
        return out

    async def wait_for(
        self,
        *,
        from_: str | None = None,
        timeout: float | None = None,
        predicate: Callable[[InboundMessage], bool] | None = None,
        consume: bool = True,
    ) -> InboundMessage:
        """Wait for the first message from ``from_`` (a DID or an exact display name).

        Other messages stay in the inbox, in order.

        Raises:
            TimeoutError: nothing matched within ``timeout`` seconds.
            PeerNotFoundError: ``from_`` is a name that no registered agent has.
        """
        senders: set[str] | None = None
        if from_ is not None:
            senders = {from_} if from_.startswith("did:") else {await self.resolve(from_)}

        def match(m: InboundMessage) -> bool:
            if senders is not None and m.sender not in senders:
                return False
            return predicate is None or predicate(m)

        msg = await self.inbox.get(match, timeout)
        if consume:
            self.consume(msg)
        return msg

    def sessions(self) -> list[dict[str, Any]]:
        """A summary of every session (counters only, no key material).

        ``undecryptable`` counts frames from the peer that did not decrypt since the last
        one that did (they never change the session: they may be forged).
        """
        out = self.protocol.session_summaries()
        for summary in out:
            summary["undecryptable"] = self.protocol.undecryptable.get(summary["peer"], 0)
        return out

    def __repr__(self) -> str:
        return f"MeshClient(did={self.did!r}, connected={self.is_connected})"


def _ambiguous_text(name: str, claims: Sequence[NameClaim]) -> str:
    rows = "; ".join(
        f"{c.did} (key fingerprint {c.fingerprint or 'unknown: never talked to it'}, registered "
        f"{c.registered_at or '?'}, last seen {c.last_seen or '?'})"
        for c in claims
    )
    return (
        f"{len(claims)} agents claim the name {name!r}: {rows}. Display names are claims anyone can make: "
        f"send to the DID you mean, or bind the name to it (`agt-mesh peer bind {name} DID`, "
        "MeshClient.bind_name)"
    )
