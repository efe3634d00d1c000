"""The ``agt-mesh`` command line.

Imports are lazy so ``agt-mesh --help`` starts fast.  Results go to stdout, diagnostics
to stderr.  Exit codes:

====  =====================================================
0     success
1     usage or user error (bad arguments, bad files)
2     unexpected error (a bug: please report it)
3     network or I/O error (relay/registry unreachable, lock held)
4     authentication or trust failure
5     rate limited
====  =====================================================
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_UNEXPECTED = 2
EXIT_IO = 3
EXIT_AUTH = 4
EXIT_RATE_LIMITED = 5


class CliError(Exception):
    """A failure with a chosen exit code and a message for stderr."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def default_state_dir() -> Path:
    env = os.environ.get("AGT_MESH_HOME")
    return Path(env) if env else Path.home() / ".agt-mesh"


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Options accepted before and after the subcommand."""
    d = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="machine-readable JSON output on stdout",
    )
    parser.add_argument(
        "--state-dir",
        default=d,
        metavar="DIR",
        help="state directory (env AGT_MESH_HOME, default ~/.agt-mesh)",
    )
    parser.add_argument("--relay", default=d, metavar="URL", help="relay URL (env AGT_RELAY_URL)")
    parser.add_argument("--registry", default=d, metavar="URL", help="registry URL (env AGT_REGISTRY_URL)")
    parser.add_argument(
        "--profile",
        default=d,
        choices=("current", "ts-sdk-4"),
        help="peer crypto profile for sessions we initiate (env AGT_PROFILE)",
    )


def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(data, ensure_ascii=False))
    else:
        print(text)


def _state_dir(args: argparse.Namespace) -> Path:
    return Path(args.state_dir) if args.state_dir else default_state_dir()


def _identity_path(args: argparse.Namespace) -> Path:
    path = getattr(args, "path", None)
    return Path(path) if path else _state_dir(args) / "identity.json"


# -- identity ---------------------------------------------------------------------------


def cmd_identity_new(args: argparse.Namespace) -> int:
    from agt_mesh.core.identity import Identity
    from agt_mesh.shell.identity_file import save_identity

    path = _identity_path(args)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, mode=0o700)
    ident = Identity.generate(os.urandom)
    save_identity(path, ident, force=args.force)
    pub = ident.public_dict()
    _emit(
        args,
        {**pub, "path": str(path)},
        f"{ident.did}\ned25519 public key: {pub['ed25519_public']}\n"
        f"x25519 public key:  {pub['x25519_public']}\nwritten to {path} (mode 0600)",
    )
    return EXIT_OK


def cmd_identity_show(args: argparse.Namespace) -> int:
    from agt_mesh.shell.identity_file import load_identity

    path = _identity_path(args)
    pub = load_identity(path).public_dict()
    _emit(
        args,
        {**pub, "path": str(path)},
        f"did:            {pub['did']}\ned25519 public: {pub['ed25519_public']}\n"
        f"x25519 public:  {pub['x25519_public']}\nfile:           {path}",
    )
    return EXIT_OK


def cmd_identity_did(args: argparse.Namespace) -> int:
    from agt_mesh.shell.identity_file import load_identity

    ident = load_identity(_identity_path(args))
    _emit(args, {"did": ident.did}, ident.did)
    return EXIT_OK


def cmd_identity_export_public(args: argparse.Namespace) -> int:
    from agt_mesh.shell.identity_file import load_identity

    pub = load_identity(_identity_path(args)).public_dict()
    print(json.dumps(pub, indent=None if args.json else 2))
    return EXIT_OK


# -- vectors / demo ---------------------------------------------------------------------


def cmd_vectors_verify(args: argparse.Namespace) -> int:
    from agt_mesh.vectors import main as verify_main

    return verify_main(args.files, sys.stdout)


def cmd_relay(args: argparse.Namespace) -> int:
    from agt_mesh.dev.server import main as relay_main

    return relay_main(args.relay_args)


def cmd_demo(args: argparse.Namespace) -> int:
    from agt_mesh.demo import run_demo

    return run_demo(sys.stdout, as_json=args.json)


# -- parser -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, top=False)
    parser = _Parser(
        prog="agt-mesh",
        description="Identities, sessions and debugging for AgentMesh end-to-end encrypted messaging.",
        epilog="Exit codes: 0 ok, 1 usage/user error, 2 unexpected, 3 network/IO, 4 auth/trust, 5 rate limited.",
    )
    _global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(group: Any, name: str, func: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, help=help_, description=help_, parents=[common])
        p.set_defaults(func=func)
        return p

    ident = sub.add_parser("identity", help="create and inspect the agent identity")
    isub = ident.add_subparsers(dest="identity_command", metavar="ACTION", parser_class=_Parser)
    isub.required = True
    p = add(
        isub,
        "new",
        cmd_identity_new,
        "create a new identity file (0600, never overwritten without --force)",
    )
    p.add_argument("--path", help="identity file (default STATE_DIR/identity.json)")
    p.add_argument("--force", action="store_true", help="replace an existing identity file")
    for name, func, help_ in (
        ("show", cmd_identity_show, "show the DID and public keys"),
        ("did", cmd_identity_did, "print the DID"),
        ("export-public", cmd_identity_export_public, "print the public parts as JSON"),
    ):
        p = add(isub, name, func, help_)
        p.add_argument("--path", help="identity file (default STATE_DIR/identity.json)")

    vec = sub.add_parser("vectors", help="known-answer vectors")
    vsub = vec.add_subparsers(dest="vectors_command", metavar="ACTION", parser_class=_Parser)
    vsub.required = True
    p = add(vsub, "verify", cmd_vectors_verify, "verify agt-mesh-vectors/1 files against this SDK")
    p.add_argument("files", nargs="+", metavar="FILE")

    add(sub, "demo", cmd_demo, "run a local two-agent end-to-end demo")
    p = sub.add_parser(
        "relay",
        help="run the development relay + registry on 127.0.0.1 (not for production)",
        add_help=False,
    )
    p.set_defaults(func=cmd_relay, relay_args=[])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["relay"]:  # the dev relay has its own option parser
        from agt_mesh.dev.server import main as relay_main

        return relay_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, env in (
        ("relay", "AGT_RELAY_URL"),
        ("registry", "AGT_REGISTRY_URL"),
        ("profile", "AGT_PROFILE"),
    ):
        if getattr(args, name, None) is None:
            setattr(args, name, os.environ.get(env))
    if not hasattr(args, "state_dir"):
        args.state_dir = None
    try:
        return int(args.func(args))
    except CliError as exc:
        print(f"agt-mesh: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # map the SDK's typed errors to exit codes
        from agt_mesh.cli.errors import exit_code_for

        code = exit_code_for(exc)
        if code == EXIT_UNEXPECTED:
            import traceback

            traceback.print_exc(file=sys.stderr)
        print(f"agt-mesh: error: {exc}", file=sys.stderr)
        return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
