"""``agt-mesh identity new|show|did|export-public``.

JSON keys: ``new`` → ``did, ed25519_public, x25519_public, path``; ``show`` → the same plus
``created_at`` (string or null) and ``display_name`` (string or null); ``did`` → ``did``;
``export-public`` → ``did, ed25519_public, x25519_public`` (printed as JSON in both modes).
Keys are base64url without padding, as in the identity file.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path

from agt_mesh.cli.common import (
    STORE_NAME,
    check_state_dir_perms,
    diag,
    emit,
    identity_path,
    lines,
    load_identity,
    stored_display_name,
)
from agt_mesh.cli.errors import EXIT_OK, CliError


def new(args: argparse.Namespace) -> int:
    from agt_mesh.core.identity import Identity
    from agt_mesh.shell.identity_file import save_identity

    path = identity_path(args)
    in_state_dir = not getattr(args, "path", None)
    parent = path.parent
    if not parent.exists():
        parent.mkdir(parents=True, mode=0o700)
    elif in_state_dir:
        check_state_dir_perms(parent)
    old_did: str | None = None
    if args.force and path.exists():
        try:
            old_did = load_identity(args).did
        except Exception:
            old_did = None
    ident = Identity.generate(os.urandom)
    save_identity(path, ident, force=args.force)
    pub = ident.public_dict()
    if old_did is not None and old_did != ident.did and (parent / STORE_NAME).exists() and in_state_dir:
        diag(
            f"warning: {parent / STORE_NAME} holds the state of the replaced identity {old_did}; "
            "commands will refuse it — move it away to start fresh (sessions are re-established)"
        )
    if not args.json and sys.stderr.isatty():
        diag(f"identity written to {path} (mode 0600); keep it private")
    emit(
        args,
        {**pub, "path": str(path)},
        f"{ident.did}\ned25519 public key: {pub['ed25519_public']}\nx25519 public key:  {pub['x25519_public']}",
    )
    return EXIT_OK


def _created_at(path: Path) -> str | None:
    try:
        value = json.loads(path.read_text()).get("created_at")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def show(args: argparse.Namespace) -> int:
    path = identity_path(args)
    ident = load_identity(args)
    pub = ident.public_dict()
    name = None
    if not getattr(args, "path", None):  # the identity of the state directory
        try:
            name = stored_display_name(args, ident.did)
        except Exception as exc:  # the identity is fine; the state is another matter
            diag(f"warning: cannot read the state store: {exc}")
    created = _created_at(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    emit(
        args,
        {**pub, "path": str(path), "created_at": created, "display_name": name},
        lines(
            [
                ("did", pub["did"]),
                ("ed25519 public", pub["ed25519_public"]),
                ("x25519 public", pub["x25519_public"]),
                ("display name", name or "(none chosen yet: use --display-name with listen or send)"),
                ("created", created),
                ("file", f"{path} (mode {mode:04o})"),
            ]
        ),
    )
    return EXIT_OK


def did(args: argparse.Namespace) -> int:
    ident = load_identity(args)
    emit(args, {"did": ident.did}, ident.did)
    return EXIT_OK


def export_public(args: argparse.Namespace) -> int:
    pub = load_identity(args).public_dict()
    print(json.dumps(pub, indent=None if args.json else 2))
    return EXIT_OK


__all__ = ["CliError", "did", "export_public", "new", "show"]
