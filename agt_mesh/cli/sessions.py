"""``agt-mesh session list|show|reset`` and ``agt-mesh bundle show|upload``.

Reading needs no writer lock (SQLite WAL lets us read while ``listen`` writes), so these
work while an agent is running; ``session reset`` and ``bundle upload`` write and take the
lock (exit 3 naming the holder's PID when another process has it).

JSON output (stable keys):

* ``session show`` → ``{"peer", "peer_name", "status", "status_text", "role",
  "kdf_profile", "e2e_verified", "verified", "accepted", "knock_pending", "knock_id",
  "candidates", "has_previous", "last_activity", "peer_identity_key", "peer_fingerprint",
  "ratchet", "inbox", "sequence"}`` where ``ratchet`` is ``{"send_n", "recv_n",
  "previous_send_chain_length", "can_send", "has_receive_chain", "skipped_keys"}`` or null.
  ``status`` is one of ``established``, ``knock_sent``, ``accepted``, ``knock_received``,
  ``empty``.  Times are Unix seconds.  No key bytes, only the peer's public identity key.
* ``session list`` → ``{"sessions": [<session show object>, ...]}``.
* ``session reset`` → ``{"peer", "reset": true}``.
* ``bundle show`` → ``{"did", "identity_key", "identity_key_ed", "signed_pre_key":
  {"key_id", "public_key", "created_at"} | null, "retired_signed_pre_keys",
  "one_time_pre_keys", "one_time_pre_key_ids": [first, last] | null}``.
* ``bundle upload`` → ``{"did", "registry", "registered", "signed_pre_key_id",
  "one_time_pre_keys", "registry_otk_count", "display_name"}``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from agt_mesh.cli.common import (
    META_DISPLAY_NAME,
    LocalState,
    ago,
    check_state_dir_perms,
    diag,
    emit,
    iso,
    lines,
    load_identity,
    need_registry,
    open_store,
    profile_label,
    run,
    session_line,
    state_dir,
    stored_prekeys,
)
from agt_mesh.cli.errors import EXIT_OK, CliError

#: signed pre-key rotation period of MeshClient (7 days)
SPK_ROTATION = 7 * 86400.0


def session_list(args: argparse.Namespace) -> int:
    ident = load_identity(args)
    local = LocalState.load(args, ident.did)
    infos = [local.info(did) for did in sorted(local.sessions, key=lambda d: -local.sessions[d].last_activity)]
    if not infos and not args.json:
        diag("no sessions yet")
    emit(args, {"sessions": infos}, "\n".join(session_line(i) for i in infos) or None)
    return EXIT_OK


def session_show(args: argparse.Namespace) -> int:
    ident = load_identity(args)
    local = LocalState.load(args, ident.did)
    info = local.info(local.find(args.peer))
    r = info["ratchet"]
    text = lines(
        [
            ("peer", info["peer"] + (f" ({info['peer_name']})" if info["peer_name"] else "")),
            ("status", f"{info['status']} — {info['status_text']}"),
            ("role", "initiator (we KNOCKed)" if info["role"] == "initiator" else "responder (they KNOCKed)"),
            (
                "kdf profile",
                profile_label(info["kdf_profile"]) if info["kdf_profile"] else "undecided (first message decides)",
            ),
            ("e2e verified", "yes (plaintext from this peer is refused)" if info["e2e_verified"] else "no"),
            ("knock", f"{info['knock_id']} (unanswered)" if info["knock_pending"] else info["knock_id"]),
            ("sending chain", f"{r['send_n']} message(s)" + ("" if r["can_send"] else " (no chain yet)") if r else "-"),
            (
                "receiving chain",
                f"{r['recv_n']} message(s)" + ("" if r["has_receive_chain"] else " (no chain yet)") if r else "-",
            ),
            ("previous chain", f"{r['previous_send_chain_length']} message(s) sent" if r else "-"),
            ("skipped keys", r["skipped_keys"] if r else "-"),
            ("candidates", info["candidates"]),
            ("previous ratchet", "kept (peer re-keyed; old frames still decrypt)" if info["has_previous"] else "none"),
            (
                "last activity",
                f"{iso(info['last_activity'])} ({ago(info['last_activity'])})" if info["last_activity"] else "never",
            ),
            ("peer identity", info["peer_identity_key"]),
            ("fingerprint", info["peer_fingerprint"] or "no key pinned yet"),
            ("unread", f"{info['inbox']} message(s) in the inbox"),
            (
                "held back",
                f"{info['sequence']['held_back']} message(s) waiting for an earlier one (re-sent by the peer)",
            ),
        ]
    )
    emit(args, info, text)
    return EXIT_OK


def session_reset(args: argparse.Namespace) -> int:
    from agt_mesh.shell.lock import WriterLock

    ident = load_identity(args)
    local = LocalState.load(args, ident.did)
    did = local.find(args.peer)
    with WriterLock(state_dir(args)):
        store = open_store(args, ident.did)
        assert store is not None  # a session was found in it
        try:
            moved = store.delete_session(did)
        finally:
            store.close()
    if not args.json:
        if moved:
            diag(f"{moved} message(s) held back for an earlier one were moved to the inbox")
        diag("the next message to this peer starts a new session (KNOCK); the peer re-keys automatically")
    emit(args, {"peer": did, "reset": True, "moved_to_inbox": moved}, f"session with {did} reset")
    return EXIT_OK


# -- pre-key bundle -----------------------------------------------------------------------


def bundle_show(args: argparse.Namespace) -> int:
    from agt_mesh.core.encoding import b64url_encode

    ident = load_identity(args)
    prekeys = stored_prekeys(args, ident)
    spk = prekeys.signed_pre_key
    otks = prekeys.one_time_pre_keys
    ids = [o.key_id for o in otks]
    data: dict[str, Any] = {
        "did": ident.did,
        "identity_key": b64url_encode(ident.x25519_public),
        "identity_key_ed": b64url_encode(ident.ed25519_public),
        "signed_pre_key": (
            {"key_id": spk.key_id, "public_key": b64url_encode(spk.public), "created_at": spk.created_at}
            if spk is not None
            else None
        ),
        "retired_signed_pre_keys": len(prekeys.retired_signed_pre_keys),
        "one_time_pre_keys": len(otks),
        "one_time_pre_key_ids": [min(ids), max(ids)] if ids else None,
    }
    if spk is None:
        spk_text = "none yet (created by the first listen, send or bundle upload)"
    else:
        due = ""
        if spk.created_at:
            left = spk.created_at + SPK_ROTATION - time.time()
            due = f", rotates {'now' if left <= 0 else f'in {left / 86400:.1f} d'}"
        spk_text = f"#{spk.key_id} {b64url_encode(spk.public)} (created {ago(spk.created_at)}{due})"
    text = lines(
        [
            ("did", ident.did),
            ("identity key", data["identity_key"]),
            ("identity key (ed25519)", data["identity_key_ed"]),
            ("signed pre-key", spk_text),
            ("retired signed pre-keys", data["retired_signed_pre_keys"]),
            (
                "one-time pre-keys",
                f"{len(otks)} unused"
                + (f" (ids {min(ids)}..{max(ids)})" if ids else "")
                + " — the registry holds at most these (each KNOCK uses one; bundle fetches "
                "without a KNOCK use them up too)",
            ),
        ]
    )
    emit(args, data, text)
    return EXIT_OK


def bundle_upload(args: argparse.Namespace) -> int:
    from agt_mesh import __version__
    from agt_mesh.core.x3dh import PreKeyStore
    from agt_mesh.shell.lock import WriterLock
    from agt_mesh.shell.registry import RegistryClient
    from agt_mesh.shell.store import StateStore

    if not 1 <= args.otks <= 200:
        raise CliError("--otks must be between 1 and 200")
    ident = load_identity(args)
    url = need_registry(args)
    sdir = state_dir(args)
    check_state_dir_perms(sdir)
    name = getattr(args, "display_name", None)

    with WriterLock(sdir):
        store = StateStore(sdir, did=ident.did).open()
        try:
            if name is None:
                name = store.get_meta(META_DISPLAY_NAME)
            prekeys = PreKeyStore(ident)
            store.load_prekeys(prekeys)
            now = time.time()
            if prekeys.signed_pre_key is None or args.rotate:
                prekeys.generate_signed_pre_key(os.urandom, created_at=now)
            missing = args.otks - len(prekeys.one_time_pre_keys)
            if missing > 0:
                prekeys.generate_one_time_pre_keys(missing, os.urandom)
            store.save_prekeys(prekeys)  # private keys are durable before the public ones go out
            if args.display_name is not None:
                store.set_meta(META_DISPLAY_NAME, args.display_name)
        finally:
            store.close()
        caps = [name] if name else []
        meta = {
            **({"display_name": name} if name else {}),
            "runtime": "python",
            "library": f"kars-agt-mesh/{__version__}",
        }
        spk = prekeys.signed_pre_key
        assert spk is not None
        otks = prekeys.one_time_pre_keys

        async def go() -> tuple[str, int | None]:
            async with RegistryClient(url, ident, timeout=10) as registry:
                record = await registry.get_agent(ident.did)
                if record is not None and name and record.display_name != name:
                    diag(f"re-registering: the registry lists {record.display_name!r}, we want {name!r}")
                    await registry.delete()
                    record = None
                reg = await registry.register(caps, meta)
                count = await registry.upload_prekeys(spk, otks)
                return ("created" if reg.created else "existing"), count

        registered, count = run(go, timeout=40, what="bundle upload")
    data = {
        "did": ident.did,
        "registry": url,
        "registered": registered,
        "signed_pre_key_id": spk.key_id,
        "one_time_pre_keys": len(otks),
        "registry_otk_count": count,
        "display_name": name,
    }
    emit(
        args,
        data,
        f"uploaded signed pre-key #{spk.key_id} and {len(otks)} one-time pre-keys to {url} "
        f"({'new registration' if registered == 'created' else 'already registered'}"
        + (f"; registry reports {count}" if count is not None else "")
        + ")",
    )
    return EXIT_OK
