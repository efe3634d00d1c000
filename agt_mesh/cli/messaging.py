"""``agt-mesh send|listen|inbox|discover|peer``.

JSON output (stable keys):

* ``send`` → ``{"id", "to", "to_input", "knock", "queued"}`` — ``knock`` is true when a
  KNOCK (new session) preceded the message.
* ``listen`` and ``inbox`` → one object per line per message:
  ``{"from", "from_name", "payload", "id", "received_at", "plaintext"}``
  (``received_at``: Unix seconds).
* ``discover`` → ``{"capability", "claimants", "bound", "results": [{"did", "display_name",
  "capabilities", "last_seen", "reputation_score", "metadata", "claims_name", "bound"}]}`` —
  ``claimants`` counts the results claiming CAPABILITY as their display name (more than one:
  the name is ambiguous), ``bound`` is the DID the name is bound to locally (or null).
* ``peer`` → ``{"did", "display_name", "registry", "local", "session", "fingerprint"}`` —
  ``registry`` is the record (as above, or null when unknown), ``local`` is
  ``{"display_name", "kdf_profile", "e2e_verified"}`` or null, ``session`` the ``session
  show`` object or null, ``fingerprint`` the pinned key's (or null).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agt_mesh.cli.common import (
    LocalState,
    Progress,
    add_frame_tap,
    ago,
    check_peer_arg,
    check_timeout,
    connect,
    diag,
    emit,
    install_error_printer,
    iso,
    lines,
    load_identity,
    make_client,
    need_registry,
    parse_time,
    payload_text,
    profile_label,
    remember_display_name,
    run,
    save_frames,
    session_line,
    shutdown,
    stored_display_name,
)
from agt_mesh.cli.errors import EXIT_IO, EXIT_OK, CliError

if TYPE_CHECKING:
    from agt_mesh.shell.client import MeshClient
    from agt_mesh.shell.inbox import InboundMessage
    from agt_mesh.shell.registry import AgentRecord


def _display_name(args: argparse.Namespace, did: str) -> tuple[str | None, bool]:
    """(name, chosen now): --display-name, else the one remembered in the state store."""
    given = getattr(args, "display_name", None)
    if given is not None:
        if not given.strip():
            raise CliError("--display-name must not be empty")
        return given, True
    return stored_display_name(args, did), False


# -- send -------------------------------------------------------------------------------


def _payload(args: argparse.Namespace) -> Any:
    given = [x for x in (args.message, args.file, args.json_payload) if x is not None]
    if len(given) != 1:
        raise CliError("give exactly one of MESSAGE, --file F or --json-payload JSON")
    if args.json_payload is not None:
        try:
            return json.loads(args.json_payload)
        except ValueError as exc:
            raise CliError(f"--json-payload is not valid JSON: {exc}") from None
    if args.file is not None:
        try:
            data = sys.stdin.buffer.read() if args.file == "-" else Path(args.file).read_bytes()
        except OSError as exc:
            raise CliError(f"cannot read {args.file}: {exc.strerror or exc}") from None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            raise CliError(
                f"{args.file} is not UTF-8 text; send binary data as JSON, e.g. "
                '--json-payload \'{"data_b64": "..."}\''
            ) from None
    return args.message


def send(args: argparse.Namespace) -> int:
    check_timeout(args.timeout)
    check_peer_arg(args.to)
    payload = _payload(args)
    ident = load_identity(args)
    name, chosen = _display_name(args, ident.did)
    mesh = make_client(args, timeout=args.timeout, display_name=name)
    install_error_printer(mesh)
    save_frames(mesh, args.save_frames)
    handed_over: set[str] = set()
    add_frame_tap(mesh, lambda frame: handed_over.add(str(frame.get("id"))))

    async def go() -> dict[str, Any]:
        progress = Progress("connecting").start()
        try:
            await connect(mesh, progress)
            await remember_display_name(mesh, name, chosen=chosen)
            progress.set(f"resolving {args.to}")
            did = await mesh.resolve(args.to)
            knock = mesh.protocol.needs_session(did)
            progress.set(f"sending to {did}" + (" (KNOCK first)" if knock else ""))
            mid = await mesh.send(did, payload, message_id=args.message_id)
            queued = mesh.protocol.queued(did)
            if queued:
                # We answered the peer's KNOCK but have no sending chain until its first
                # message arrives; the message waits in memory, so wait with it.
                progress.set("waiting for the peer's first message (we are the responder)")
                diag(
                    "this session was opened by the peer and we have not received its first message "
                    "yet; the message is sent as soon as it arrives"
                )
                while mid not in handed_over:
                    await asyncio.sleep(0.05)
            return {"id": mid, "to": did, "to_input": args.to, "knock": knock, "queued": bool(queued)}
        finally:
            await progress.stop()
            await shutdown(mesh)

    result = run(go, timeout=args.timeout, what=f"sending to {args.to}")
    emit(
        args,
        result,
        f"sent {result['id']} to {result['to']}" + (" (new session: KNOCK sent)" if result["knock"] else ""),
    )
    return EXIT_OK


# -- listen / inbox ---------------------------------------------------------------------


def _message_json(msg: InboundMessage, names: dict[str, str]) -> dict[str, Any]:
    out = msg.to_json()
    if not out.get("from_name"):
        out["from_name"] = names.get(msg.sender)
    return out


def _message_text(msg: InboundMessage, names: dict[str, str]) -> str:
    name = msg.sender_name or names.get(msg.sender)
    who = f"{name} ({msg.sender})" if name else msg.sender
    flag = " [PLAINTEXT]" if msg.plaintext else ""
    return f"{iso(msg.received_at)} {who}{flag}: {payload_text(msg.payload)}"


async def _learn_name(mesh: MeshClient, did: str, names: dict[str, str]) -> None:
    """The sender's registered display name (for output, and remembered in the store)."""
    if did in names:
        return
    names[did] = ""
    try:
        async with asyncio.timeout(5):
            record = await mesh.registry.get_agent(did)
    except Exception:
        return
    if record is not None and record.display_name:
        names[did] = record.display_name
        if mesh.store is not None and mesh.store.db_open:
            from agt_mesh.shell.store import PeerMeta

            with contextlib.suppress(Exception):
                mesh.store.commit(peers=[PeerMeta(did, display_name=record.display_name)])


def _print_message(args: argparse.Namespace, msg: InboundMessage, names: dict[str, str], progress: Progress) -> None:
    progress.clear()
    clean = {k: v for k, v in names.items() if v}
    if args.json:
        print(json.dumps(_message_json(msg, clean), ensure_ascii=False), flush=True)
    else:
        print(_message_text(msg, clean), flush=True)


def listen(args: argparse.Namespace) -> int:
    check_timeout(args.timeout)
    if args.count is not None and args.count < 1:
        raise CliError("--count must be at least 1")
    if args.from_ is not None:
        check_peer_arg(args.from_)
    ident = load_identity(args)
    name, chosen = _display_name(args, ident.did)
    mesh = make_client(args, timeout=args.timeout, display_name=name)
    save_frames(mesh, args.save_frames)
    received = 0

    async def go() -> int:
        nonlocal received
        progress = Progress("connecting").start()
        install_error_printer(mesh, progress)
        names: dict[str, str] = {}

        def dropped(reason: str, code: int | None) -> None:
            if reason == "server":
                progress.clear()
                diag(f"relay closed the connection (code {code}); reconnecting")

        mesh.on_disconnect(dropped)
        try:
            await connect(mesh, progress)
            await remember_display_name(mesh, name, chosen=chosen)
            if mesh.store is not None:
                for meta in mesh.store.load_peers():
                    if meta.display_name:
                        names[meta.did] = meta.display_name
            sender = await mesh.resolve(args.from_) if args.from_ else None
            progress.clear()
            diag(
                f"listening as {mesh.did}{' (' + name + ')' if name else ''} on {mesh.relay_url}"
                + (f"; {args.count} message(s) to go" if args.count else "")
            )
            deadline = None if args.timeout is None else time.monotonic() + args.timeout
            while args.count is None or received < args.count:
                progress.set(
                    "waiting for messages" + (f" ({received}/{args.count})" if args.count else f" ({received} so far)")
                )
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError
                fatal = mesh.transport.fatal if mesh.transport is not None else None
                if fatal is not None:  # refused for good (credentials, or another client took our DID)
                    raise fatal
                try:
                    msg = await mesh.wait_for(
                        from_=sender, timeout=1.0 if remaining is None else min(1.0, remaining), consume=False
                    )
                except TimeoutError:
                    task = asyncio.current_task()
                    if task is not None and task.cancelling():
                        # asyncio.wait_for (3.11) can turn a cancellation that races its timeout
                        # into TimeoutError; SIGTERM must still stop us
                        raise asyncio.CancelledError from None
                    continue
                await _learn_name(mesh, msg.sender, names)
                _print_message(args, msg, names, progress)
                mesh.consume(msg)  # only now: a message that was not printed is not lost
                received += 1
            return EXIT_OK
        except TimeoutError:
            if args.count is None:
                return EXIT_OK  # "listen for S seconds"
            raise CliError(
                f"timed out after {args.timeout:g} s with {received} of {args.count} message(s)", EXIT_IO
            ) from None
        finally:
            await progress.stop()
            await shutdown(mesh)

    return run(go)


def inbox(args: argparse.Namespace) -> int:
    check_timeout(args.wait, "--wait")
    ident = load_identity(args)
    if args.local or args.peek:
        return _inbox_local(args, ident.did)
    name, _ = _display_name(args, ident.did)
    mesh = make_client(args, timeout=args.wait + 20, display_name=name)
    install_error_printer(mesh)

    async def go() -> int:
        progress = Progress("connecting").start()
        names: dict[str, str] = {}
        last = time.monotonic()

        def seen(_msg: object) -> None:
            nonlocal last
            last = time.monotonic()

        mesh.on_message(seen)
        try:
            await connect(mesh, progress)
            if mesh.store is not None:
                names.update({m.did: m.display_name for m in mesh.store.load_peers() if m.display_name})
            progress.set("collecting waiting messages")
            start = time.monotonic()
            # stop after a quiet half second, or at --wait
            while time.monotonic() - start < args.wait:
                if time.monotonic() - max(last, start) >= 0.5 and time.monotonic() - start >= 0.5:
                    break
                await asyncio.sleep(0.05)
            msgs = mesh.drain(consume=False)
            for msg in msgs:
                await _learn_name(mesh, msg.sender, names)
                _print_message(args, msg, names, progress)
                mesh.consume(msg)
            if not msgs and not args.json:
                diag("no messages")
            return EXIT_OK
        finally:
            await progress.stop()
            await shutdown(mesh)

    return run(go, timeout=args.wait + 30, what="inbox")


def _inbox_local(args: argparse.Namespace, did: str) -> int:
    """The stored messages only: ``--peek`` reads, ``--local`` also marks them read (with the lock)."""
    from agt_mesh.cli.common import open_store, state_dir
    from agt_mesh.shell.lock import WriterLock

    with contextlib.ExitStack() as stack:
        if not args.peek:
            stack.enter_context(WriterLock(state_dir(args)))
        store = open_store(args, did)
        msgs = []
        if store is not None:
            stack.callback(store.close)
            msgs = store.load_inbox()
            names = {m.did: m.display_name for m in store.load_peers() if m.display_name}
            for msg in msgs:
                _print_message(args, msg, names, Progress())
                if not args.peek:
                    store.consume([msg.message_id])
    if not msgs and not args.json:
        diag("no messages")
    return EXIT_OK


# -- registry lookups ---------------------------------------------------------------------


def _record_json(r: AgentRecord) -> dict[str, Any]:
    return {
        "did": r.did,
        "display_name": r.display_name,
        "capabilities": list(r.capabilities),
        "last_seen": r.last_seen,
        "reputation_score": r.reputation_score,
        "metadata": r.metadata,
    }


def _ambiguous(name: str, dids: list[str]) -> CliError:
    from agt_mesh.cli.errors import EXIT_AUTH

    return CliError(
        f"{len(dids)} agents claim the name {name!r}: {', '.join(dids)}. Display names are claims anyone can "
        f"make: use the DID, or bind the name to one (`agt-mesh peer bind {name} DID`)",
        EXIT_AUTH,
    )


def discover(args: argparse.Namespace) -> int:
    from agt_mesh.shell.registry import RegistryClient

    if not 1 <= args.limit <= 200:
        raise CliError("--limit must be between 1 and 200")
    ident = load_identity(args)
    url = need_registry(args)

    from agt_mesh.shell.registry import claims_name

    local = LocalState.load(args, ident.did)

    async def go() -> list[AgentRecord]:
        async with RegistryClient(url, ident, timeout=10) as registry:
            return await registry.discover(args.capability, limit=args.limit)

    records = run(go, timeout=30, what="discover")
    binding = local.names.get(args.capability)
    bound = binding.did if binding is not None else None
    out = [
        {**_record_json(r), "claims_name": claims_name(r, args.capability), "bound": r.did == bound} for r in records
    ]
    claimants = sorted({r["did"] for r in out if r["claims_name"]})
    text = "\n".join(
        f"{r['did']}  {r['display_name'] or '-'}  caps={','.join(r['capabilities'])}  "
        f"last_seen={ago(parse_time(r['last_seen']))}" + ("  [bound to this name]" if r["bound"] else "")
        for r in out
    )
    if not out and not args.json:
        diag(f"no agent registered with capability {args.capability!r} (capabilities are exact)")
    if len(claimants) > 1 and not args.json:
        diag(
            f"{len(claimants)} agents claim the name {args.capability!r} — names are claims, not identities: "
            + (
                f"here it is bound to {bound}"
                if bound
                else f"sending to it fails until you bind it (`agt-mesh peer bind {args.capability} DID`) or use a DID"
            )
        )
    data = {"capability": args.capability, "claimants": len(claimants), "bound": bound, "results": out}
    emit(args, data, text or None)
    return EXIT_OK


def _kdf_text(meta: Any, session: dict[str, Any] | None) -> str:
    if session and session["kdf_profile"]:
        label = profile_label(session["kdf_profile"])
        return label if session["verified"] else label + " (not confirmed by a reply yet)"
    if meta is not None and meta.profile is not None:
        return profile_label(meta.profile.value) + " (learned earlier)"
    return "not known yet (the first session decides)"


def peer(args: argparse.Namespace) -> int:
    from agt_mesh.shell.registry import RegistryClient

    check_peer_arg(args.peer)
    ident = load_identity(args)
    local = LocalState.load(args, ident.did)
    url = args.registry

    async def go() -> tuple[str, AgentRecord | None]:
        did = args.peer if args.peer.startswith("did:") else None
        if did is None and args.peer in local.names:
            did = local.names[args.peer].did  # a bound name means its DID, whatever the registry says
        if did is None:
            with contextlib.suppress(CliError):
                did = local.find(args.peer)
        if url is None:
            if did is None:
                raise CliError(f"{args.peer!r} is no DID or known name; pass --registry to look it up")
            return did, None
        async with RegistryClient(url, ident, timeout=10) as registry:
            if did is None:
                found = await registry.find_all_by_display_name(args.peer)
                if not found:
                    raise CliError(f"no agent named {args.peer!r} in the registry (names are exact)")
                if len(found) > 1:
                    raise _ambiguous(args.peer, [r.did for r in found])
                return found[0].did, found[0]
            return did, await registry.get_agent(did)

    did, record = run(go, timeout=30, what="peer lookup")
    meta = local.peers.get(did)
    session = local.info(did) if did in local.sessions else None
    pin = local.pin(did)
    data = {
        "did": did,
        "display_name": (record.display_name if record else None) or local.name_of(did),
        "registry": _record_json(record) if record else None,
        "local": (
            {
                "display_name": meta.display_name,
                "kdf_profile": meta.profile.value if meta.profile else None,
                "e2e_verified": meta.e2e_verified,
            }
            if meta
            else None
        ),
        "session": session,
        "fingerprint": pin.fingerprint if pin is not None else None,
    }
    if record is not None:
        software = record.metadata.get("library") or record.metadata.get("runtime")
        reg = (
            f"registered; capabilities {', '.join(record.capabilities) or '(none)'}; last seen "
            f"{ago(parse_time(record.last_seen))}" + (f"; {software}" if software else "")
        )
    elif url is None:
        reg = "(not checked: no --registry)"
    else:
        reg = "NOT REGISTERED with this registry — messages to it cannot start a session"
    text = lines(
        [
            ("peer", did),
            ("display name", data["display_name"] or "-"),
            ("registry", reg),
            ("kdf profile", _kdf_text(meta, session)),
            ("e2e verified", "yes" if meta and meta.e2e_verified else "no"),
            ("fingerprint", pin.fingerprint if pin is not None else "no key pinned yet (no session so far)"),
            ("session", session_line(session) if session else "none (the next send KNOCKs)"),
            ("status", session["status_text"] if session else None),
        ]
    )
    emit(args, data, text)
    return EXIT_OK
