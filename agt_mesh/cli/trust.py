"""``agt-mesh peer fingerprint|trust|bind|unbind|names``: keys and names, decided locally.

Nothing here asks a server: the keys are the ones pinned in the state store (the first
key seen for each peer), and names mean what they are bound to locally.

JSON output (stable keys):

* ``peer fingerprint`` → ``{"did", "our_did", "our_fingerprint", "peer_fingerprint",
  "safety_number", "peer_identity_key", "pinned_since", "pinned_source", "offered"}`` —
  ``offered`` is ``{"fingerprint", "identity_key", "since", "source"}`` (a different key the
  peer presented, refused until trusted) or null.  The safety number is the same 60 digits
  on both sides.
* ``peer trust`` → ``{"did", "trusted", "previous", "session_reset"}`` (fingerprints).
* ``peer bind`` → ``{"name", "did", "previous"}``; ``peer unbind`` → ``{"name", "unbound"}``;
  ``peer names`` → ``{"names": [{"name", "did", "since", "source"}]}``.
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from agt_mesh.cli.common import (
    LocalState,
    ago,
    check_peer_arg,
    check_state_dir_perms,
    diag,
    emit,
    iso,
    lines,
    load_identity,
    state_dir,
)
from agt_mesh.cli.errors import EXIT_AUTH, EXIT_OK, CliError

if TYPE_CHECKING:
    from agt_mesh.core.trust import KeyPin


def _peer_did(local: LocalState, text: str) -> str:
    """A DID we hold a key for (any DID form), a bound name, or a session peer."""
    if text in local.pins:
        return text
    if text.startswith("did:"):
        check_peer_arg(text)
        return text
    bound = local.names.get(text)
    if bound is not None:
        return bound.did
    return local.find(text)


def _pin_json(pin: KeyPin | None) -> dict[str, Any] | None:
    from agt_mesh.core.encoding import b64url_encode

    if pin is None:
        return None
    return {
        "fingerprint": pin.fingerprint,
        "identity_key": b64url_encode(pin.identity_key),
        "since": pin.since,
        "source": pin.source,
    }


def fingerprint(args: argparse.Namespace) -> int:
    from agt_mesh.core.encoding import b64url_encode
    from agt_mesh.core.trust import fingerprint as fp
    from agt_mesh.core.trust import safety_number

    ident = load_identity(args)
    local = LocalState.load(args, ident.did)
    did = _peer_did(local, args.peer)
    entry = local.pins.get(did)
    if entry is None:
        raise CliError(
            f"no identity key is pinned for {did} yet: there has been no session with it (send it a message "
            f"first, or pin a key learned out of band with `agt-mesh peer trust {did} --key KEY`)"
        )
    pin, offered = entry
    ours = fp(ident.did, ident.x25519_public)
    number = safety_number(ident.did, ident.x25519_public, did, pin.identity_key)
    data: dict[str, Any] = {
        "did": did,
        "our_did": ident.did,
        "our_fingerprint": ours,
        "peer_fingerprint": pin.fingerprint,
        "safety_number": number,
        "peer_identity_key": b64url_encode(pin.identity_key),
        "pinned_since": pin.since,
        "pinned_source": pin.source,
        "offered": _pin_json(offered),
    }
    sn = number.split()
    rows: list[tuple[str, Any]] = [
        ("peer", did + (f" ({local.name_of(did)})" if local.name_of(did) else "")),
        ("peer fingerprint", f"{pin.fingerprint}  (pinned {ago(pin.since)}, from its {pin.source})"),
        ("our fingerprint", ours),
        ("safety number", " ".join(sn[:6]) + "\n" + " " * 18 + " ".join(sn[6:])),
    ]
    if offered is not None:
        rows.append(
            (
                "REFUSED KEY",
                f"{offered.fingerprint}  (offered {ago(offered.since)} via {offered.source}; accept it only after "
                f"checking with the peer: agt-mesh peer trust {did} --key {offered.fingerprint.replace(' ', '')})",
            )
        )
    emit(args, data, lines(rows))
    if not args.json:
        diag(
            "compare the safety number with the peer over another channel: equal on both sides means "
            "the keys are theirs"
        )
    return EXIT_OK


def trust(args: argparse.Namespace) -> int:
    from agt_mesh.core.trust import KeyPin, check_key_binding, normalize_fingerprint, parse_identity_key
    from agt_mesh.errors import IdentityBindingError
    from agt_mesh.shell.lock import WriterLock
    from agt_mesh.shell.store import StateStore

    ident = load_identity(args)
    sdir = state_dir(args)
    check_state_dir_perms(sdir)
    local = LocalState.load(args, ident.did)
    did = _peer_did(local, args.peer)
    pin, offered = local.pins.get(did, (None, None))
    key = parse_identity_key(args.key)
    if key is None:
        wanted = normalize_fingerprint(args.key)
        match = [p for p in (offered, pin) if p is not None and wanted is not None and p.fingerprint == wanted]
        if not match:
            raise CliError(
                f"{args.key!r} is neither the fingerprint of a key {did} presented (see `agt-mesh peer fingerprint "
                f"{did}`) nor an X25519 key (base64url or hex)"
            )
        key = match[0].identity_key
    try:
        check_key_binding(did, key)
    except IdentityBindingError as exc:
        raise CliError(str(exc), EXIT_AUTH) from None
    new = KeyPin(did, key, time.time(), "trusted")
    with WriterLock(sdir):
        store = StateStore(sdir, did=ident.did).open()
        try:
            store.save_pins([(did, new, None)])
            session = local.sessions.get(did)
            reset = session is not None and bool(session.peer_keys(ident.x25519_public) - {key})
            moved = store.delete_session(did) if reset else 0
        finally:
            store.close()
    if not args.json:
        if pin is not None and pin.same_key(key):
            diag("that key was already pinned; nothing changed")
        if reset:
            diag(
                f"the session with {did} was bound to the old key and is gone"
                + (f" ({moved} held message(s) moved to the inbox)" if moved else "")
                + "; the next message starts a new one"
            )
    data = {
        "did": did,
        "trusted": new.fingerprint,
        "previous": pin.fingerprint if pin is not None else None,
        "session_reset": reset,
    }
    emit(args, data, f"{did} is now pinned to the key with fingerprint {new.fingerprint}")
    return EXIT_OK


def bind(args: argparse.Namespace) -> int:
    from agt_mesh.core.trust import NameBinding
    from agt_mesh.shell.lock import WriterLock
    from agt_mesh.shell.store import StateStore

    if not args.name.strip() or args.name.startswith("did:"):
        raise CliError("NAME must be a display name, not a DID")
    check_peer_arg(args.did)
    if not args.did.startswith("did:"):
        raise CliError(f"{args.did!r} is not a DID")
    ident = load_identity(args)
    sdir = state_dir(args)
    check_state_dir_perms(sdir)
    local = LocalState.load(args, ident.did)
    previous = local.names.get(args.name)
    with WriterLock(sdir):
        store = StateStore(sdir, did=ident.did).open()
        try:
            store.bind_name(NameBinding(args.name, args.did, time.time(), "user"))
        finally:
            store.close()
    data = {"name": args.name, "did": args.did, "previous": previous.did if previous else None}
    text = f"{args.name!r} now means {args.did}"
    if previous is not None and previous.did != args.did:
        text += f" (it meant {previous.did})"
    emit(args, data, text)
    return EXIT_OK


def unbind(args: argparse.Namespace) -> int:
    from agt_mesh.shell.lock import WriterLock
    from agt_mesh.shell.store import StateStore

    ident = load_identity(args)
    sdir = state_dir(args)
    check_state_dir_perms(sdir)
    with WriterLock(sdir):
        store = StateStore(sdir, did=ident.did).open()
        try:
            gone = store.unbind_name(args.name)
        finally:
            store.close()
    emit(
        args,
        {"name": args.name, "unbound": gone},
        f"{args.name!r} is no longer bound (the next send to it asks the registry)" if gone else None,
    )
    if not gone and not args.json:
        diag(f"{args.name!r} was not bound")
    return EXIT_OK


def names(args: argparse.Namespace) -> int:
    ident = load_identity(args)
    local = LocalState.load(args, ident.did)
    rows = [
        {"name": b.name, "did": b.did, "since": b.since, "source": b.source}
        for b in sorted(local.names.values(), key=lambda b: b.name)
    ]
    text = "\n".join(
        f"{b.name}  {b.did}  ({b.source}, {iso(b.since)})" for b in sorted(local.names.values(), key=lambda b: b.name)
    )
    if not rows and not args.json:
        diag("no names bound yet (the first send to a name binds it, when exactly one agent claims it)")
    emit(args, {"names": rows}, text or None)
    return EXIT_OK
