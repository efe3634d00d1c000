"""The ``agt-mesh`` command line (also ``python -m agt_mesh``).

Only the parser lives here; every command is in its own module, imported when it runs,
so ``agt-mesh --help`` starts without loading the crypto, HTTP or WebSocket libraries.
Results go to stdout (one JSON object with ``--json``; ``listen --json`` writes one object
per line), diagnostics to stderr.  Exit codes (see :mod:`agt_mesh.cli.errors`):

====  =====================================================================
0     success
1     usage or user error (bad arguments, bad or unsafe files, unknown peer)
2     unexpected error (a bug: please report it)
3     network or I/O error (relay/registry unreachable, timeouts, lock held)
4     authentication or trust failure
5     rate limited
====  =====================================================================

Global options are accepted before and after the subcommand.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from agt_mesh.cli.errors import (
    EXIT_AUTH,
    EXIT_IO,
    EXIT_OK,
    EXIT_RATE_LIMITED,
    EXIT_UNEXPECTED,
    EXIT_USAGE,
    CliError,
)

__all__ = [
    "EXIT_AUTH",
    "EXIT_IO",
    "EXIT_OK",
    "EXIT_RATE_LIMITED",
    "EXIT_UNEXPECTED",
    "EXIT_USAGE",
    "CliError",
    "build_parser",
    "main",
]

PROFILES = ("current", "ts-sdk-4")
#: SIGTERM (as shells report it); Ctrl-C gives 130
EXIT_TERMINATED = 143
#: commands whose arguments go verbatim to another parser: command -> "module:function"
PASSTHROUGH = {
    "relay": "tools:relay",
    "bench": "tools:bench",
    "mcp": "tools:adapter_mcp",
    "hermes-install": "tools:adapter_hermes_install",
    "openclaw-bundle": "tools:adapter_openclaw_bundle",
    "bridge": "tools:adapter_bridge",
}
#: global options that take a value (for finding the command word in argv)
_VALUE_OPTIONS = ("--state-dir", "--relay", "--registry", "--profile")
#: ``agt-mesh peer ACTION ...``; any other word after ``peer`` means ``peer show WORD``
PEER_ACTIONS = ("show", "fingerprint", "trust", "bind", "unbind", "names")

EPILOG = """\
environment: AGT_MESH_HOME (state dir), AGT_RELAY_URL, AGT_REGISTRY_URL, AGT_PROFILE,
AGENTMESH_RELAY_TOKEN (relay shared secret; AGT_RELAY_TOKEN is a deprecated alias).
exit codes: 0 ok, 1 usage or user error, 2 unexpected, 3 network or I/O (incl. lock held),
4 authentication or trust failure, 5 rate limited.
"""


class _Parser(argparse.ArgumentParser):
    """Usage errors exit 1 (argparse's default is 2, which we keep for bugs)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Options accepted before and after the subcommand.

    After the subcommand their default is SUPPRESS, so a value given before the
    subcommand is not overwritten by the subparser's default.
    """

    def d(value: Any) -> Any:
        return value if top else argparse.SUPPRESS

    g = parser.add_argument_group("global options") if top else parser
    g.add_argument("--json", action="store_true", default=d(False), help="machine-readable JSON on stdout")
    g.add_argument(
        "--state-dir",
        default=d(None),
        metavar="DIR",
        help="state directory holding identity.json and state.db (env AGT_MESH_HOME, default ~/.agt-mesh)",
    )
    g.add_argument("--relay", default=d(None), metavar="URL", help="relay URL (env AGT_RELAY_URL)")
    g.add_argument("--registry", default=d(None), metavar="URL", help="registry URL (env AGT_REGISTRY_URL)")
    g.add_argument(
        "--profile",
        default=d(None),
        choices=PROFILES,
        help="X3DH KDF for sessions we initiate: current (spec) or ts-sdk-4 (npm 4.0.0 peers) (env AGT_PROFILE)",
    )
    g.add_argument("-v", "--verbose", action="count", default=d(0), help="log SDK activity to stderr (-vv for debug)")


def _cmd(parser: argparse.ArgumentParser, target: str) -> None:
    """Bind a parser to ``module:function`` (``module`` relative to ``agt_mesh.cli``)."""
    parser.set_defaults(cmd=target)


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, top=False)
    parser = _Parser(
        prog="agt-mesh",
        description="Identities, messaging and debugging for AgentMesh end-to-end encrypted agents.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    def add(group: Any, name: str, help_: str, target: str | None = None, **kw: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(name, help=help_, description=help_, parents=[common], **kw)
        if target is not None:
            _cmd(p, target)
        return p

    def group(name: str, help_: str, dest: str) -> Any:
        p = add(sub, name, help_)
        g = p.add_subparsers(dest=dest, metavar="ACTION", parser_class=_Parser)
        g.required = True
        return g

    # -- identity -----------------------------------------------------------------------
    ident = group("identity", "create and inspect the agent identity", "identity_command")
    p = add(ident, "new", "create a new identity file (0600, never overwritten without --force)", "identity:new")
    p.add_argument("--path", help="identity file (default STATE_DIR/identity.json)")
    p.add_argument("--force", action="store_true", help="replace an existing identity file")
    for name, help_, target in (
        ("show", "show the DID, the public keys and the display name", "identity:show"),
        ("did", "print the DID", "identity:did"),
        ("export-public", "print the public parts as JSON (never the seed)", "identity:export_public"),
    ):
        p = add(ident, name, help_, target)
        p.add_argument("--path", help="identity file (default STATE_DIR/identity.json)")

    # -- messaging ----------------------------------------------------------------------
    p = add(sub, "send", "send one message (KNOCKs first if there is no session) and exit", "messaging:send")
    p.add_argument("--to", required=True, metavar="DID|NAME", help="recipient DID or exact display name")
    p.add_argument("message", nargs="?", metavar="MESSAGE", help="text, sent as a JSON string")
    p.add_argument("--file", metavar="FILE", help="send the UTF-8 text of FILE ('-' for stdin) as a JSON string")
    p.add_argument("--json-payload", metavar="JSON", help="send this JSON value as the payload")
    p.add_argument("--message-id", metavar="ID", help="message id (makes retries idempotent; default a UUID)")
    p.add_argument("--display-name", metavar="NAME", help="register under NAME (remembered for later commands)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S", help="give up after S seconds (default 30)")
    p.add_argument("--save-frames", metavar="FILE", help="append the frames we send to FILE (JSON lines, for decode)")

    p = add(sub, "listen", "stay connected and print each received message on one line", "messaging:listen")
    p.add_argument("--count", type=int, metavar="N", help="exit 0 right after the Nth message")
    p.add_argument("--timeout", type=float, metavar="S", help="stop after S seconds (exit 3 if --count not reached)")
    p.add_argument("--from", dest="from_", metavar="DID|NAME", help="only messages from this peer")
    p.add_argument("--display-name", metavar="NAME", help="register under NAME (remembered for later commands)")
    p.add_argument("--save-frames", metavar="FILE", help="append the frames we send to FILE (JSON lines, for decode)")

    p = add(sub, "inbox", "fetch what is waiting, print it and mark it read", "messaging:inbox")
    p.add_argument("--wait", type=float, default=2.0, metavar="S", help="collect from the relay for up to S s")
    p.add_argument("--local", action="store_true", help="only the messages already stored; do not connect")
    p.add_argument("--peek", action="store_true", help="show stored messages without marking them read")

    p = add(
        sub, "discover", "agents registered with a capability (display names are capabilities)", "messaging:discover"
    )
    p.add_argument("capability", metavar="CAPABILITY")
    p.add_argument("--limit", type=int, default=50, metavar="N", help="at most N results (1..200, default 50)")

    peer = group("peer", "a peer: its record and session, its key (fingerprint, trust), names", "peer_command")
    p = add(peer, "show", "the peer's registry record and our session with it (`peer DID|NAME` for short)")
    _cmd(p, "messaging:peer")
    p.add_argument("peer", metavar="DID|NAME")
    p = add(peer, "fingerprint", "fingerprints of both identity keys and the safety number, to compare out of band")
    _cmd(p, "trust:fingerprint")
    p.add_argument("peer", metavar="DID|NAME")
    p = add(peer, "trust", "accept a new identity key for a peer (after checking its fingerprint out of band)")
    _cmd(p, "trust:trust")
    p.add_argument("peer", metavar="DID")
    p.add_argument(
        "--key",
        required=True,
        metavar="FINGERPRINT|KEY",
        help="the offered key's fingerprint, or the X25519 key itself",
    )
    p = add(peer, "bind", "bind a display name to one DID (names are claims: this is our choice)", "trust:bind")
    p.add_argument("name", metavar="NAME")
    p.add_argument("did", metavar="DID")
    p = add(peer, "unbind", "forget the binding of a display name", "trust:unbind")
    p.add_argument("name", metavar="NAME")
    add(peer, "names", "the display names bound to DIDs", "trust:names")

    bundle = group("bundle", "our pre-key bundle", "bundle_command")
    add(bundle, "show", "our signed pre-key and one-time pre-keys (public parts, counts)", "sessions:bundle_show")
    p = add(bundle, "upload", "register and publish a fresh pre-key bundle", "sessions:bundle_upload")
    p.add_argument("--otks", type=int, default=20, metavar="N", help="one-time pre-keys to publish (default 20)")
    p.add_argument("--rotate", action="store_true", help="also make a new signed pre-key")
    p.add_argument("--display-name", metavar="NAME", help="register under NAME (remembered for later commands)")

    # -- sessions -----------------------------------------------------------------------
    sess = group("session", "inspect and reset sessions (counters only, never keys)", "session_command")
    add(sess, "list", "every session, one line each", "sessions:session_list")
    p = add(sess, "show", "one session in detail", "sessions:session_show")
    p.add_argument("peer", metavar="PEER", help="DID, known display name or unique DID prefix")
    p = add(sess, "reset", "forget a session; the next send KNOCKs again", "sessions:session_reset")
    p.add_argument("peer", metavar="PEER", help="DID, known display name or unique DID prefix")

    # -- debugging ----------------------------------------------------------------------
    p = add(sub, "decode", "parse and explain relay frames (optionally decrypt one of ours)", "decode:decode")
    p.add_argument("frame", metavar="FRAME|-", help="frame JSON, or - to read frames (one per line) from stdin")
    p.add_argument(
        "--identity",
        action="store_true",
        help="use our identity and state to explain and decrypt (read-only: stored state never changes)",
    )

    p = add(sub, "doctor", "check identity, state, lock, relay, registry, pre-keys and clock", "doctor:doctor")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="per network check (default 10)")

    # -- tools --------------------------------------------------------------------------
    vec = group("vectors", "known-answer vectors", "vectors_command")
    p = add(vec, "verify", "verify agt-mesh-vectors/1 files against this SDK", "tools:vectors_verify")
    p.add_argument("files", nargs="+", metavar="FILE")
    add(sub, "demo", "run a local two-agent end-to-end demo", "tools:demo")
    # documented here; their arguments are parsed by the programs they run (see main())
    for name, help_ in (
        ("relay", "run the development relay + registry on 127.0.0.1 (not for production)"),
        ("bench", "run the benchmarks (benchmarks/run.py of a source checkout)"),
        ("mcp", "MCP stdio server exposing the mesh tools (agt_mesh.adapters)"),
        ("hermes-install", "install the Hermes agent plugin"),
        ("openclaw-bundle", "write an OpenClaw bundle (skill + .mcp.json) into DIR"),
        ("bridge", "bridge hermes: answer mesh peers through a Hermes agent's API server"),
    ):
        sub.add_parser(name, help=help_, add_help=False).set_defaults(cmd=PASSTHROUGH[name], rest=[])
    return parser


def _split_passthrough(argv: list[str]) -> tuple[list[str], str, list[str]] | None:
    """``(global options, command, rest)`` when the command is ``relay`` or ``bench``."""
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            return None
        if tok.startswith("-"):
            i += 2 if tok in _VALUE_OPTIONS else 1
            continue
        return (argv[:i], tok, argv[i + 1 :]) if tok in PASSTHROUGH else None
    return None


def _peer_shorthand(argv: list[str]) -> list[str]:
    """``peer DID|NAME`` (the original form) is ``peer show DID|NAME``."""
    i, command = 0, None
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            return argv
        if tok.startswith("-"):
            i += 2 if tok in _VALUE_OPTIONS else 1
            continue
        if command is None:
            if tok != "peer":
                return argv
            command = i
            i += 1
            continue
        return argv if tok in PEER_ACTIONS else [*argv[:i], "show", *argv[i:]]
    return argv


def _finish_globals(args: argparse.Namespace) -> None:
    """Fill unset global options from the environment and check them."""
    for name in ("state_dir", "relay", "registry", "profile"):
        if not hasattr(args, name):
            setattr(args, name, None)
    for name, env in (
        ("state_dir", "AGT_MESH_HOME"),
        ("relay", "AGT_RELAY_URL"),
        ("registry", "AGT_REGISTRY_URL"),
        ("profile", "AGT_PROFILE"),
    ):
        if getattr(args, name) is None:
            setattr(args, name, os.environ.get(env) or None)
    if args.profile is not None and args.profile not in PROFILES:
        raise CliError(f"AGT_PROFILE must be one of {', '.join(PROFILES)}, not {args.profile!r}")
    args.json = bool(getattr(args, "json", False))
    args.verbose = int(getattr(args, "verbose", 0) or 0)


def _report(exc: BaseException, code: int) -> int:
    if code == EXIT_TERMINATED:
        print("agt-mesh: stopped (SIGTERM)", file=sys.stderr)
        return code
    if code == EXIT_UNEXPECTED:
        import traceback

        traceback.print_exception(exc, file=sys.stderr)
    print(f"agt-mesh: error: {exc}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    split = _split_passthrough(argv)
    try:
        if split is not None:
            head, command, rest = split
            gparser = _Parser(prog="agt-mesh", add_help=False)
            _global_options(gparser, top=True)
            args = gparser.parse_args(head)
            args.command, args.rest = command, rest
            args.cmd = PASSTHROUGH[command]
        else:
            args = build_parser().parse_args(_peer_shorthand(argv))
        _finish_globals(args)
        module, func = str(args.cmd).split(":")
        import importlib

        handler = getattr(importlib.import_module(f"agt_mesh.cli.{module}"), func)
        if args.verbose:
            import logging

            logging.basicConfig(
                level=logging.DEBUG if args.verbose > 1 else logging.INFO,
                stream=sys.stderr,
                format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            )
        return int(handler(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader of stdout went away (e.g. `| head`); nothing more to say
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - avoid a second error at exit
        return EXIT_IO
    except Exception as exc:  # map the SDK's typed errors to exit codes
        from agt_mesh.cli.errors import exit_code_for

        return _report(exc, exit_code_for(exc))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
