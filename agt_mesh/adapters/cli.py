"""Command-line entry points of the adapters (wired into ``agt-mesh`` by the main CLI).

====================================  ==========================================================
``main_mcp(argv)``                    ``agt-mesh mcp``: MCP stdio server with the mesh tools
``main_hermes_install(argv)``         ``agt-mesh hermes-install [--hermes-home DIR] [--force]``
``main_openclaw_bundle(argv)``        ``agt-mesh openclaw-bundle DIR``: skill + ``.mcp.json``
``main_bridge_hermes(argv)``          ``agt-mesh bridge hermes``: answer peers through a Hermes
                                      agent's OpenAI-compatible API server
====================================  ==========================================================

Each takes the arguments after its subcommand and returns the exit status: 0 ok, 1 usage or
user error, 2 unexpected, 3 network/IO (unreachable servers, identity in use by another
process), 4 authentication.  Nothing but protocol output goes to stdout for ``mcp``; all
diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from agt_mesh.adapters.tools import AdapterConfig, MeshTools
from agt_mesh.cli.errors import CliError
from agt_mesh.config_env import relay_token_from_env

__all__ = ["main_bridge_hermes", "main_hermes_install", "main_mcp", "main_openclaw_bundle"]

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_UNEXPECTED = 2
EXIT_IO = 3
EXIT_AUTH = 4

DEFAULT_RELAY = "http://127.0.0.1:8083"
DEFAULT_REGISTRY = "http://127.0.0.1:8082"

log = logging.getLogger("agt_mesh.adapters.cli")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name) or default


def _mesh_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("mesh identity and servers")
    g.add_argument(
        "--state-dir",
        default=_env("AGT_MESH_HOME", str(Path.home() / ".agt-mesh")),
        metavar="DIR",
        help="identity and state directory (env AGT_MESH_HOME, default ~/.agt-mesh); one process per directory",
    )
    g.add_argument("--relay", default=_env("AGT_RELAY_URL", DEFAULT_RELAY), metavar="URL", help="relay URL")
    g.add_argument("--registry", default=_env("AGT_REGISTRY_URL", DEFAULT_REGISTRY), metavar="URL", help="registry URL")
    g.add_argument("--name", default=_env("AGT_MESH_NAME"), help="display name peers address us by (env AGT_MESH_NAME)")
    g.add_argument("--capability", action="append", default=[], help="extra capability to register (repeatable)")
    g.add_argument("--profile", default=_env("AGT_PROFILE", "current"), choices=("current", "ts-sdk-4"))
    g.add_argument(
        "--no-create-identity",
        action="store_true",
        help="fail if STATE_DIR/identity.json does not exist (default: create one)",
    )
    g.add_argument("--connect-timeout", type=float, default=10.0, help="seconds to reach the relay (default 10)")
    f = p.add_argument_group("tools")
    f.add_argument(
        "--files-root",
        default=_env("AGT_MESH_FILES_ROOT"),
        metavar="DIR",
        help="mesh_transfer_file sends only files below DIR (env AGT_MESH_FILES_ROOT; default "
        "STATE_DIR-files/outbox, next to the state directory; the state directory and hidden files are never sent)",
    )
    f.add_argument(
        "--incoming-dir",
        default=_env("AGT_MESH_INCOMING_DIR"),
        metavar="DIR",
        help="where received files are saved (env AGT_MESH_INCOMING_DIR; default STATE_DIR-files/incoming)",
    )
    f.add_argument("--max-file-mb", type=float, default=30.0, help="largest file sent or accepted (default 30)")
    f.add_argument("--roster", default=_env("KARS_MESH_ROSTER"), help="sibling roster: name=role,name2=role2 or JSON")
    f.add_argument(
        "--roster-from",
        default=_env("KARS_MESH_ROSTER_FROM", ""),
        metavar="DIDS",
        help="comma-separated DIDs whose peers_update messages may replace the roster (names are refused)",
    )
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"))


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _open_client(args: argparse.Namespace) -> tuple[Any, AdapterConfig]:
    from agt_mesh.adapters.hermes import parse_roster
    from agt_mesh.adapters.tools import is_did
    from agt_mesh.core.identity import Identity
    from agt_mesh.shell.client import MeshClient
    from agt_mesh.shell.identity_file import save_identity

    state_dir = Path(args.state_dir).expanduser()
    identity = state_dir / "identity.json"
    if not identity.exists():
        if args.no_create_identity:
            raise CliError(
                f"no identity at {identity}; create one with: agt-mesh identity new --state-dir {state_dir}", 1
            )
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ident = Identity.generate(os.urandom)
        save_identity(identity, ident)
        print(f"created a new identity {ident.did} at {identity}", file=sys.stderr)
    client = MeshClient(
        identity,
        relay_url=args.relay,
        registry_url=args.registry,
        display_name=args.name,
        capabilities=args.capability,
        profile=args.profile,
        relay_token=relay_token_from_env(),
        connect_timeout=args.connect_timeout,
    )
    sources = frozenset(s.strip() for s in (args.roster_from or "").split(",") if s.strip())
    names = sorted(s for s in sources if not is_did(s))
    if names:
        raise CliError(
            f"--roster-from takes DIDs (display names are claims anyone can register): {', '.join(names)}", EXIT_USAGE
        )
    config = AdapterConfig(
        incoming_dir=Path(args.incoming_dir).expanduser() if args.incoming_dir else None,
        files_root=Path(args.files_root).expanduser() if args.files_root else None,
        protected_paths=(identity,),
        max_file_bytes=int(args.max_file_mb * 1024 * 1024),
        roster=parse_roster(args.roster),
        roster_sources=sources,
    )
    return client, config


def _tools(client: Any, config: AdapterConfig) -> MeshTools:
    """The tools for ``client`` (before it connects, so a bad directory fails first)."""
    from agt_mesh.errors import MeshConfigError

    try:
        return MeshTools(client, config)
    except MeshConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None


async def _connect(client: Any) -> None:
    from agt_mesh.errors import MeshAuthError, MeshConfigError, MeshError

    try:
        await client.connect()
    except MeshAuthError as exc:
        raise CliError(str(exc), EXIT_AUTH) from None
    except MeshConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    except MeshError as exc:  # LockHeldError (a second server for this identity) lands here
        raise CliError(str(exc), EXIT_IO) from None
    except OSError as exc:
        raise CliError(f"cannot connect: {exc}", EXIT_IO) from None


@contextlib.asynccontextmanager
async def _connected_tools(args: argparse.Namespace) -> AsyncIterator[MeshTools]:
    """The tools on a connected client for ``args``, not started yet (hooks go in first);
    closed and disconnected on the way out."""
    client, config = _open_client(args)
    tools = _tools(client, config)
    await _connect(client)
    try:
        yield tools
    finally:
        await tools.close()
        await client.disconnect()


def _run(prog: str, coro: Any) -> int:
    try:
        return int(asyncio.run(coro))
    except CliError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        from agt_mesh.cli.errors import exit_code_for

        code = exit_code_for(exc)
        if code == EXIT_UNEXPECTED:
            import traceback

            traceback.print_exc(file=sys.stderr)
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return code


# -- agt-mesh mcp ------------------------------------------------------------------------


def _mcp_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="agt-mesh mcp",
        description="Serve the AgentMesh tools (mesh_send, mesh_inbox, mesh_await, mesh_transfer_file, "
        "mesh_discover, mesh_status) to an MCP client over stdio. Needs the 'mcp' extra.",
    )
    _mesh_options(p)
    p.add_argument("--server-name", default="agt-mesh", help="MCP server name (default agt-mesh)")
    return p


async def _serve_mcp(args: argparse.Namespace) -> int:
    from agt_mesh.adapters.mcp_server import _import_mcp, serve_stdio

    try:
        _import_mcp()
    except RuntimeError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    async with _connected_tools(args) as tools:
        tools.start()
        log.info("MCP server for %s (%s) on stdio", tools.client.did, tools.client.display_name)
        await serve_stdio(tools, args.server_name)
    return EXIT_OK


def main_mcp(argv: Sequence[str] | None = None) -> int:
    """``agt-mesh mcp``: run the MCP stdio server until the client disconnects."""
    args = _mcp_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    _setup_logging(args.log_level)
    return _run("agt-mesh mcp", _serve_mcp(args))


# -- agt-mesh hermes-install -----------------------------------------------------------------


def main_hermes_install(argv: Sequence[str] | None = None) -> int:
    """``agt-mesh hermes-install``: write the plugin folder into ``$HERMES_HOME/plugins``."""
    from agt_mesh.adapters.hermes import PLUGIN_NAME, install_plugin

    p = _Parser(
        prog="agt-mesh hermes-install",
        description="Install the AgentMesh tools as a Hermes Agent plugin (kars_mesh_* tools).",
    )
    p.add_argument(
        "--hermes-home",
        default=_env("HERMES_HOME", str(Path.home() / ".hermes")),
        metavar="DIR",
        help="Hermes home (env HERMES_HOME, default ~/.hermes)",
    )
    p.add_argument("--force", action="store_true", help="replace an installed copy")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        target = install_plugin(args.hermes_home, force=args.force)
    except FileExistsError as exc:
        print(f"agt-mesh hermes-install: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"agt-mesh hermes-install: error: {exc}", file=sys.stderr)
        return EXIT_IO
    print(target)
    print(
        f"installed the '{PLUGIN_NAME}' plugin. Next:\n"
        f"  1. make kars-agt-mesh importable by Hermes' Python (pip install kars-agt-mesh in its environment)\n"
        f"  2. hermes plugins enable {PLUGIN_NAME} --no-allow-tool-override  (it overrides no built-in tool)\n"
        "  3. set AGT_RELAY_URL / AGT_REGISTRY_URL / AGT_MESH_NAME (AGENTMESH_RELAY_TOKEN if the relay wants "
        "one; KARS_MESH_AUTO_RESPONDER=1 to answer peers) in Hermes' environment",
        file=sys.stderr,
    )
    return EXIT_OK


# -- agt-mesh openclaw-bundle ----------------------------------------------------------------


def _server_command(command: str | None, python_module: bool) -> tuple[str, list[str]]:
    """An absolute way to start ``agt-mesh mcp``: a host launches it with its own PATH, where
    this environment's ``bin`` usually is not (a bare ``agt-mesh`` fails to start there)."""
    module = ["-m", "agt_mesh.adapters.mcp_server"]
    if python_module:
        return os.path.abspath(sys.executable), module
    if command:
        found = shutil.which(command)
        if found is None:
            raise CliError(f"--command {command!r} is not an executable (nor on PATH)", EXIT_USAGE)
        return os.path.abspath(found), ["mcp"]
    beside = Path(sys.executable).parent / "agt-mesh"  # the script of the environment running us
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside.absolute()), ["mcp"]
    return os.path.abspath(sys.executable), module


def main_openclaw_bundle(argv: Sequence[str] | None = None) -> int:
    """``agt-mesh openclaw-bundle DIR``: write an OpenClaw bundle (skill + ``.mcp.json``)."""
    from agt_mesh.adapters.openclaw import install_command, write_bundle

    p = _Parser(
        prog="agt-mesh openclaw-bundle",
        description="Write an OpenClaw bundle (SKILL.md + .mcp.json starting `agt-mesh mcp` by absolute path) "
        "and print the command that installs it.",
    )
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--force", action="store_true", help="replace existing bundle files")
    p.add_argument(
        "--command",
        default=None,
        help="executable starting the server, made absolute (default: the agt-mesh beside this Python)",
    )
    p.add_argument(
        "--python-module",
        action="store_true",
        help="start the server as `<this python> -m agt_mesh.adapters.mcp_server` instead of the agt-mesh script",
    )
    p.add_argument(
        "--state-dir",
        default=str(Path.home() / ".agt-mesh-openclaw"),
        metavar="DIR",
        help="the server's own identity/state directory (default ~/.agt-mesh-openclaw; one process per directory)",
    )
    p.add_argument("--relay", default=_env("AGT_RELAY_URL"), metavar="URL")
    p.add_argument("--registry", default=_env("AGT_REGISTRY_URL"), metavar="URL")
    p.add_argument("--name", default=_env("AGT_MESH_NAME"), help="display name of the OpenClaw agent on the mesh")
    p.add_argument(
        "--files-root",
        metavar="DIR",
        help="the only directory files may be sent from (default STATE_DIR-files/outbox; on kars hosts the "
        "sandbox workspace, e.g. /sandbox/.openclaw/workspace)",
    )
    p.add_argument("--incoming-dir", metavar="DIR", help="where received files go (default STATE_DIR-files/incoming)")
    p.add_argument("--max-file-mb", type=float)
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    server_args: list[str] = ["--state-dir", str(Path(args.state_dir).expanduser().absolute())]
    for flag, value in (
        ("--relay", args.relay),
        ("--registry", args.registry),
        ("--name", args.name),
        ("--files-root", str(Path(args.files_root).expanduser().absolute()) if args.files_root else None),
        ("--incoming-dir", str(Path(args.incoming_dir).expanduser().absolute()) if args.incoming_dir else None),
        ("--max-file-mb", f"{args.max_file_mb:g}" if args.max_file_mb else None),
    ):
        if value:
            server_args += [flag, value]
    directory = Path(args.directory).expanduser().absolute()
    try:
        command, prefix = _server_command(args.command, args.python_module)
        written = write_bundle(directory, command=command, args=[*prefix, *server_args], force=args.force)
    except CliError as exc:
        print(f"agt-mesh openclaw-bundle: error: {exc}", file=sys.stderr)
        return exc.code
    except FileExistsError as exc:
        print(f"agt-mesh openclaw-bundle: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"agt-mesh openclaw-bundle: error: {exc}", file=sys.stderr)
        return EXIT_IO
    for path in written:
        print(path)
    print(f"install with: {install_command(directory)}", file=sys.stderr)
    return EXIT_OK


# -- agt-mesh bridge hermes ------------------------------------------------------------------


def _bridge_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="agt-mesh bridge hermes",
        description="Make a Hermes agent a mesh peer: answer task requests from other agents through the "
        "agent's OpenAI-compatible API server. In Hermes: `hermes gateway run` (or `hermes gateway start`) with "
        "API_SERVER_ENABLED=true, API_SERVER_KEY of at least 16 characters, and aiohttp installed.",
    )
    _mesh_options(p)
    h = p.add_argument_group("Hermes API server")
    h.add_argument("--api-url", default=_env("KARS_HERMES_API_URL", "http://127.0.0.1:8642"), metavar="URL")
    h.add_argument(
        "--api-key-env",
        default=_env("KARS_HERMES_API_KEY_ENV", "API_SERVER_KEY"),
        metavar="VAR",
        help="environment variable holding the bearer key (default API_SERVER_KEY)",
    )
    h.add_argument("--model", default="hermes-agent")
    h.add_argument("--timeout", type=float, default=1500.0, help="seconds before an answer is cancelled (1500)")
    h.add_argument("--rate-limit", type=int, default=6, help="requests per peer per minute (6)")
    h.add_argument("--concurrency", type=int, default=1, help="requests answered at once (1)")
    h.add_argument("--no-stream", action="store_true", help="do not stream (no progress ticks but heartbeats)")
    h.add_argument("--no-probe", action="store_true", help="start even if GET /health fails")
    h.add_argument("--session-per-peer", action="store_true", help="one Hermes session per peer")
    a = p.add_argument_group("who is answered")
    a.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="DID",
        help="answer task requests from this peer DID (repeatable, or comma-separated; env AGT_MESH_ALLOW). "
        "Required: requests from any other peer are never answered nor forwarded to the API server",
    )
    return p


async def _bridge(args: argparse.Namespace) -> int:
    from agt_mesh.adapters.responder import AutoResponder, HermesAPIBackend, HermesAPIError, parse_allow
    from agt_mesh.errors import MeshConfigError

    try:
        allow = parse_allow([*args.allow, _env("AGT_MESH_ALLOW", "") or ""])
    except MeshConfigError as exc:
        raise CliError(str(exc), EXIT_USAGE) from None
    if not allow:
        # the bridge spends the user's API key on what peers write: nobody by default
        raise CliError(
            "no peer is allowed: name the DIDs whose requests this bridge answers with --allow DID "
            "(repeatable) or AGT_MESH_ALLOW; requests from anyone else are never forwarded to the API server",
            EXIT_USAGE,
        )
    backend = HermesAPIBackend(
        args.api_url,
        model=args.model,
        api_key_env=args.api_key_env,
        stream=not args.no_stream,
        session_per_peer=args.session_per_peer,
    )
    try:
        if not args.no_probe:
            try:
                await backend.health()
            except HermesAPIError as exc:
                raise CliError(str(exc), EXIT_AUTH if exc.kind == "unauthorized" else EXIT_IO) from None
        async with _connected_tools(args) as tools:
            client = tools.client
            responder = AutoResponder(
                tools,
                backend,
                allow=allow,
                max_per_peer=args.rate_limit,
                concurrency=args.concurrency,
                timeout=args.timeout,
            )
            responder.attach()

            def other(msg: Any) -> None:  # nobody reads this agent's inbox: log and drop the rest
                view = tools.view(msg)
                log.info("message from %s (%s, not an allowed task request) dropped", msg.sender, view.get("type"))
                log.debug("dropped message text: %r", view.get("content"))
                client.inbox.drain(lambda m: m is msg)
                client.consume(msg)

            tools.add_listener(other)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, stop.set)
            tools.start()
            print(
                f"agt-mesh bridge hermes: {client.did} ({client.display_name or 'no display name'}) answers "
                f"{len(allow)} allowed peer(s) through {args.api_url}",
                file=sys.stderr,
                flush=True,
            )
            await stop.wait()
    finally:
        await backend.aclose()
    return EXIT_OK


def main_bridge_hermes(argv: Sequence[str] | None = None) -> int:
    """``agt-mesh bridge hermes``: run until SIGINT/SIGTERM."""
    args = _bridge_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    _setup_logging(args.log_level if args.log_level != "warning" else "info")
    return _run("agt-mesh bridge hermes", _bridge(args))
