"""Helpers shared by the commands.

Only the standard library is imported at module level; SDK modules that pull in the
crypto, HTTP or WebSocket libraries are imported inside the functions that need them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as _dt
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from agt_mesh.cli.errors import EXIT_IO, EXIT_USAGE, CliError

if TYPE_CHECKING:
    from agt_mesh.core.identity import Identity
    from agt_mesh.core.session import PeerSession
    from agt_mesh.core.trust import KeyPin, NameBinding
    from agt_mesh.core.x3dh import PreKeyStore
    from agt_mesh.shell.client import MeshClient
    from agt_mesh.shell.store import PeerMeta, StateStore

T = TypeVar("T")

IDENTITY_NAME = "identity.json"
STORE_NAME = "state.db"
#: state-store meta key of the display name chosen with --display-name
META_DISPLAY_NAME = "display_name"
#: environment variable holding the relay's shared secret (as on the AGT relay itself)
RELAY_TOKEN_ENV = "AGENTMESH_RELAY_TOKEN"


# -- paths and configuration ------------------------------------------------------------


def default_state_dir() -> Path:
    env = os.environ.get("AGT_MESH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".agt-mesh"


def state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir).expanduser() if args.state_dir else default_state_dir()


def identity_path(args: argparse.Namespace) -> Path:
    path = getattr(args, "path", None)
    return Path(path).expanduser() if path else state_dir(args) / IDENTITY_NAME


def need_relay(args: argparse.Namespace) -> str:
    if not args.relay:
        raise CliError(
            "no relay URL: pass --relay URL or set AGT_RELAY_URL "
            "(`agt-mesh relay` runs a development relay on http://127.0.0.1:8083)"
        )
    return str(args.relay)


def need_registry(args: argparse.Namespace) -> str:
    if not args.registry:
        raise CliError(
            "no registry URL: pass --registry URL or set AGT_REGISTRY_URL "
            "(`agt-mesh relay` runs a development registry on http://127.0.0.1:8082)"
        )
    return str(args.registry)


def relay_token() -> str | None:
    from agt_mesh.config_env import relay_token_from_env

    return relay_token_from_env()


def profile(args: argparse.Namespace) -> str:
    return str(args.profile or "current")


# -- output -----------------------------------------------------------------------------


def emit(args: argparse.Namespace, data: Any, text: str | None) -> None:
    """The command's result: ``data`` as one JSON line with ``--json``, else ``text``."""
    if args.json:
        print(json.dumps(data, ensure_ascii=False), flush=True)
    elif text is not None:
        print(text, flush=True)


def diag(message: str) -> None:
    """A diagnostic line on stderr."""
    print(f"agt-mesh: {message}", file=sys.stderr, flush=True)


def payload_text(payload: Any) -> str:
    """A payload on one line: compact JSON (strings keep their quotes, so types stay visible)."""
    return json.dumps(payload, ensure_ascii=False, separators=(",", ":"))


def iso(ts: float | None) -> str | None:
    if ts is None or ts <= 0:
        return None
    t = _dt.datetime.fromtimestamp(ts, tz=_dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + f".{int(ts * 1000) % 1000:03d}Z"


def ago(ts: float | None, now: float | None = None) -> str:
    if ts is None or ts <= 0:
        return "never"
    delta = (time.time() if now is None else now) - ts
    if delta < 0:
        return "in the future (clock?)"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if delta >= size:
            return f"{delta / size:.0f} {unit} ago"
    return f"{delta:.0f} s ago"


def parse_time(text: str | None) -> float | None:
    """Epoch seconds of an ISO 8601 timestamp (``Z`` or an offset; naive means UTC)."""
    if not text:
        return None
    try:
        t = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    if t.tzinfo is None:
        t = t.replace(tzinfo=_dt.UTC)
    return t.timestamp()


def short(did: str, n: int = 8) -> str:
    """``did:mesh:0123abcd…`` for tables."""
    prefix = "did:mesh:"
    if did.startswith(prefix) and len(did) > len(prefix) + n:
        return did[: len(prefix) + n] + "…"
    return did


class Progress:
    """A status line on stderr, rewritten in place — only when stderr is a terminal."""

    def __init__(self, text: str = "") -> None:
        self.enabled = sys.stderr.isatty() and os.environ.get("TERM") != "dumb"
        self.text = text
        self.started = time.monotonic()
        self._task: asyncio.Task[None] | None = None
        self._shown = False

    def start(self) -> Progress:
        if self.enabled:
            self._task = asyncio.ensure_future(self._run())
        return self

    def set(self, text: str) -> None:
        self.text = text

    async def _run(self) -> None:
        frames = "|/-\\"
        i = 0
        while True:
            elapsed = time.monotonic() - self.started
            sys.stderr.write(f"\r\x1b[K{frames[i % 4]} {self.text} ({elapsed:.0f} s)")
            sys.stderr.flush()
            self._shown = True
            i += 1
            await asyncio.sleep(0.25)

    def clear(self) -> None:
        if self._shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._shown = False

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
            self._task = None
        self.clear()


# -- running coroutines -----------------------------------------------------------------


class Terminated(CliError):
    """SIGTERM arrived (exit 143, as a shell reports a process killed by it)."""

    def __init__(self) -> None:
        super().__init__("terminated (SIGTERM)", 143)


def run(coro_fn: Callable[[], Coroutine[Any, Any, T]], *, timeout: float | None = None, what: str = "") -> T:
    """Run ``coro_fn()`` to completion; SIGTERM cancels it cleanly.

    Raises:
        CliError: (exit 3) when ``timeout`` seconds pass first.
        Terminated: on SIGTERM (after the coroutine cleaned up).
    """
    terminated = False

    async def main() -> T:
        nonlocal terminated
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def on_term() -> None:
            nonlocal terminated
            terminated = True
            if task is not None:
                task.cancel()

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, on_term)
        if timeout is None:
            return await coro_fn()
        try:
            async with asyncio.timeout(timeout):
                return await coro_fn()
        except TimeoutError:
            raise CliError(f"{what or 'the command'} did not finish within {timeout:g} s", EXIT_IO) from None

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if terminated:
            raise Terminated() from None
        raise


def check_timeout(value: float | None, name: str = "--timeout") -> None:
    if value is not None and not (value > 0):
        raise CliError(f"{name} must be a positive number of seconds")


# -- identity and state -----------------------------------------------------------------


def check_state_dir_perms(path: Path) -> None:
    """Refuse (exit 1, with the fix) a state directory or store others can write or read.

    The same checks as the SDK (:mod:`agt_mesh.shell.safefs`), made a usage error here.
    """
    from agt_mesh.errors import MeshStateError
    from agt_mesh.shell.safefs import check_sqlite_files, check_state_dir

    if not path.exists() and not path.is_symlink():
        return
    try:
        check_state_dir(path, create=False)
        check_sqlite_files(path / STORE_NAME)
    except MeshStateError as exc:
        raise CliError(str(exc)) from None


def load_identity(args: argparse.Namespace) -> Identity:
    from agt_mesh.shell.identity_file import load_identity as _load

    return _load(identity_path(args))


def open_store(args: argparse.Namespace, did: str) -> StateStore | None:
    """The state store for reading (no writer lock), or None if there is none yet.

    SQLite in WAL mode lets us read while another process (``listen``) writes.
    """
    from agt_mesh.shell.store import StateStore

    sdir = state_dir(args)
    check_state_dir_perms(sdir)
    if not (sdir / STORE_NAME).exists():
        return None
    return StateStore(sdir, did=did).open()


def stored_prekeys(args: argparse.Namespace, ident: Identity) -> PreKeyStore:
    """Our pre-keys as stored (read-only; empty if there is no store yet)."""
    from agt_mesh.core.x3dh import PreKeyStore as _PreKeyStore

    prekeys = _PreKeyStore(ident)
    store = open_store(args, ident.did)
    if store is not None:
        try:
            store.load_prekeys(prekeys)
        finally:
            store.close()
    return prekeys


def stored_display_name(args: argparse.Namespace, did: str) -> str | None:
    store = open_store(args, did)
    if store is None:
        return None
    try:
        return store.get_meta(META_DISPLAY_NAME)
    finally:
        store.close()


def make_client(
    args: argparse.Namespace,
    *,
    timeout: float | None,
    display_name: str | None,
) -> MeshClient:
    """A ``MeshClient`` for this identity and state directory (not connected yet)."""
    from agt_mesh.shell.client import MeshClient

    sdir = state_dir(args)
    check_state_dir_perms(sdir)
    step = min(10.0, timeout) if timeout else 10.0
    return MeshClient(
        identity_path(args),
        relay_url=need_relay(args),
        registry_url=need_registry(args),
        state_dir=sdir,
        display_name=display_name,
        profile=profile(args),
        relay_token=relay_token(),
        connect_timeout=step,
        registry_timeout=step,
        send_timeout=timeout or 30.0,
    )


def check_peer_arg(text: str) -> None:
    """A ``did:`` argument must be a well-formed ``did:mesh:`` DID (exit 1 otherwise)."""
    from agt_mesh.core.identity import is_mesh_did

    if text.startswith("did:") and not is_mesh_did(text):
        raise CliError(
            f"{text!r} is not a valid did:mesh DID (expected did:mesh: followed by 32 lowercase hex digits)",
            EXIT_USAGE,
        )
    if not text.strip():
        raise CliError("the peer must be a DID or a display name, not empty")


def save_frames(mesh: MeshClient, path: str | None) -> None:
    """Append every frame the client sends to ``path`` as JSON lines (for ``agt-mesh decode``)."""
    if not path:
        return
    try:
        fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None

    def tap(frame: dict[str, Any]) -> None:
        fh.write(json.dumps(frame, separators=(",", ":"), ensure_ascii=False) + "\n")
        fh.flush()

    add_frame_tap(mesh, tap)


def add_frame_tap(mesh: MeshClient, tap: Callable[[dict[str, Any]], None]) -> None:
    """Also call ``tap`` with every frame the client hands to the relay (before connect)."""
    previous = mesh.frame_tap

    def both(frame: dict[str, Any]) -> None:
        if previous is not None:
            previous(frame)
        tap(frame)

    mesh.frame_tap = both


def profile_label(value: str | None) -> str:
    """``spec``/``legacy`` (the SDK's names) with the CLI's ``--profile`` names."""
    return {"spec": "spec (--profile current)", "legacy": "legacy (--profile ts-sdk-4)"}.get(value or "", value or "?")


async def connect(mesh: MeshClient, progress: Progress | None = None) -> None:
    if progress is not None:
        progress.set(f"connecting to {mesh.relay_url}")
    await mesh.connect()


async def shutdown(mesh: MeshClient) -> None:
    """Disconnect; ``MeshClient.disconnect()`` reads and commits what is still arriving."""
    await mesh.disconnect()


def install_error_printer(mesh: MeshClient, progress: Progress | None = None) -> None:
    """Print the client's error events (decrypt failures, KNOCK rejections ...) on stderr."""

    verbose = logging_enabled()

    def show(kind: str, peer: str | None, detail: str) -> None:
        if kind == "duplicate" and not verbose:
            return  # a relay redelivery, de-duplicated as designed: noise unless -v
        if progress is not None:
            progress.clear()
        diag(f"{kind}{' from ' + peer if peer else ''}: {detail}")

    mesh.on_error(show)


def logging_enabled() -> bool:
    """Whether -v was given (main() configures the root logger only then)."""
    import logging

    return logging.getLogger().level <= logging.INFO and bool(logging.getLogger().handlers)


async def remember_display_name(mesh: MeshClient, name: str | None, *, chosen: bool) -> None:
    """Persist a name given with --display-name; warn when the registry shows another."""
    if name is None:
        return
    if chosen and mesh.store is not None and mesh.store.db_open:
        mesh.store.set_meta(META_DISPLAY_NAME, name)
    with contextlib.suppress(Exception):
        record = await mesh.registry.get_agent(mesh.did)
        if record is not None and record.display_name not in (None, name):
            diag(
                f"warning: the registry still lists this DID as {record.display_name!r}, not {name!r} "
                "(a registry keeps the first registration); run `agt-mesh bundle upload "
                f"--display-name {name}` to re-register under the new name"
            )


# -- sessions ---------------------------------------------------------------------------


def session_status(session: PeerSession) -> tuple[str, str]:
    """A stable status word and a human explanation."""
    if session.primary is None:
        if session.candidates:
            return (
                "knock_received",
                "their KNOCK was accepted; waiting for their first message to settle the key",
            )
        return "empty", "no usable ratchet"
    if session.verified:
        return "established", "established: messages were decrypted in this session"
    if session.role == "initiator" and not session.accepted:
        return (
            "knock_sent",
            "no answer to our KNOCK has reached us yet (sending works meanwhile; if the peer never "
            "reads our messages, check that it is online and accepts KNOCKs)",
        )
    if session.role == "initiator":
        return "accepted", "the peer accepted our KNOCK; no reply decrypted yet"
    return "accepted", "we accepted their KNOCK; waiting for their first message (we cannot send before it)"


def session_info(
    session: PeerSession, meta: PeerMeta | None, inbox: int = 0, pin: KeyPin | None = None
) -> dict[str, Any]:
    """The documented JSON view of a session — counters and flags, never key bytes."""
    from agt_mesh.core.encoding import b64url_encode

    status, text = session_status(session)
    ratchet = session.primary.summary() if session.primary is not None else None
    ik = session.peer_identity_key()
    return {
        "peer": session.peer,
        "peer_name": meta.display_name if meta else None,
        "status": status,
        "status_text": text,
        "role": session.role,
        "kdf_profile": session.profile.value if session.profile else None,
        "e2e_verified": bool(meta.e2e_verified) if meta else session.verified,
        "verified": session.verified,
        "accepted": session.accepted,
        "knock_pending": session.pending_knock is not None,
        "knock_id": session.knock_id,
        "candidates": len(session.candidates),
        "has_previous": session.previous is not None,
        "last_activity": session.last_activity or None,
        "peer_identity_key": b64url_encode(ik) if ik is not None else None,
        "peer_fingerprint": pin.fingerprint if pin is not None else None,
        "ratchet": ratchet,
        "inbox": inbox,
        "sequence": {
            "sent": session.send_seq,
            "delivered_in_order": session.recv_seq,
            "held_back": session.held_back,
        },
    }


class LocalState:
    """Everything the store says about sessions and peers (read once, store closed)."""

    def __init__(
        self,
        sessions: list[PeerSession],
        peers: list[PeerMeta],
        inbox_by_peer: dict[str, int],
        pins: list[tuple[KeyPin, KeyPin | None]] | None = None,
        names: list[NameBinding] | None = None,
    ) -> None:
        self.sessions = {s.peer: s for s in sessions}
        self.peers = {p.did: p for p in peers}
        self.inbox_by_peer = inbox_by_peer
        #: DID -> (pinned key, last refused key)
        self.pins = {p.did: (p, o) for p, o in pins or ()}
        #: display name -> binding
        self.names = {n.name: n for n in names or ()}

    @classmethod
    def load(cls, args: argparse.Namespace, did: str) -> LocalState:
        store = open_store(args, did)
        if store is None:
            return cls([], [], {})
        try:
            inbox: dict[str, int] = {}
            for msg in store.load_inbox():
                inbox[msg.sender] = inbox.get(msg.sender, 0) + 1
            return cls(store.load_sessions(), store.load_peers(), inbox, store.load_pins(), store.load_names())
        finally:
            store.close()

    def name_of(self, did: str) -> str | None:
        for binding in self.names.values():
            if binding.did == did:
                return binding.name
        meta = self.peers.get(did)
        label = meta.display_name if meta else None
        bound = self.names.get(label) if label else None
        return label if bound is None or bound.did == did else None

    def pin(self, did: str) -> KeyPin | None:
        entry = self.pins.get(did)
        return entry[0] if entry else None

    def info(self, did: str) -> dict[str, Any]:
        info = session_info(self.sessions[did], self.peers.get(did), self.inbox_by_peer.get(did, 0), self.pin(did))
        info["peer_name"] = self.name_of(did)
        return info

    def find(self, text: str) -> str:
        """The DID of a session peer: exact DID, bound name, known display name, or unique DID prefix."""
        check_peer_arg(text)
        if text in self.sessions:
            return text
        bound = self.names.get(text)
        if bound is not None and bound.did in self.sessions:
            return bound.did
        named = sorted({d for d, m in self.peers.items() if m.display_name == text and d in self.sessions})
        if len(named) == 1:
            return named[0]
        if len(named) > 1:
            raise CliError(f"several sessions have the display name {text!r}: {', '.join(named)}; use the DID")
        key = text if text.startswith("did:") else "did:mesh:" + text
        matches = sorted(d for d in self.sessions if d.startswith(key))
        if len(matches) == 1:
            return matches[0]
        if len(matches) > 1:
            raise CliError(f"{text!r} matches several sessions: {', '.join(matches)}")
        raise CliError(f"no session with {text!r} (see `agt-mesh session list`)")


def session_line(info: dict[str, Any]) -> str:
    r = info["ratchet"] or {}
    name = f" ({info['peer_name']})" if info["peer_name"] else ""
    return (
        f"{info['peer']}{name}  {info['status']}  {info['role']}  kdf={info['kdf_profile'] or '?'}  "
        f"sent={r.get('send_n', 0)} recv={r.get('recv_n', 0)} skipped={r.get('skipped_keys', 0)}  "
        f"e2e_verified={'yes' if info['e2e_verified'] else 'no'}  last={ago(info['last_activity'])}"
    )


def lines(pairs: Iterable[tuple[str, Any]]) -> str:
    """Aligned ``label: value`` lines."""
    items = [(k, v) for k, v in pairs if v is not None]
    width = max((len(k) for k, _ in items), default=0) + 1
    return "\n".join(f"{k + ':':<{width}} {v}" for k, v in items)
