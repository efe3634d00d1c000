"""``agt-mesh vectors verify``, ``demo``, ``relay``, ``bench`` and the adapter commands.

``relay``, ``bench``, ``mcp``, ``hermes-install``, ``openclaw-bundle`` and ``bridge`` hand
their arguments to the programs they run (``agt_mesh.dev.server``, ``benchmarks/run.py``,
``agt_mesh.adapters.cli``).  Global options given before them reach the adapters through
their environment variables (``AGT_MESH_HOME``, ``AGT_RELAY_URL``, ``AGT_REGISTRY_URL``,
``AGT_PROFILE``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from agt_mesh.cli.errors import EXIT_USAGE, CliError


def vectors_verify(args: argparse.Namespace) -> int:
    """JSON: ``{"passed", "failed", "cases": [{"file", "name", "ok", "detail"}]}``."""
    from agt_mesh.vectors import main as verify_main
    from agt_mesh.vectors import verify_files

    if not args.json:
        return verify_main(args.files, sys.stdout)
    results = verify_files(args.files)
    passed = sum(r.ok for r in results)
    cases = [{"file": r.file, "name": r.name, "ok": r.ok, "detail": r.detail} for r in results]
    print(json.dumps({"passed": passed, "failed": len(results) - passed, "cases": cases}))
    return 0 if passed == len(results) and passed > 0 else 1


def demo(args: argparse.Namespace) -> int:
    from agt_mesh.demo import run_demo

    return run_demo(sys.stdout, as_json=args.json)


def relay(args: argparse.Namespace) -> int:
    from agt_mesh.dev.server import main as relay_main

    return relay_main(args.rest)


def benchmarks_dir() -> Path | None:
    """``benchmarks/`` of the source checkout this package runs from, if there is one."""
    import agt_mesh

    here = Path(agt_mesh.__file__).resolve().parent.parent / "benchmarks"
    return here if (here / "run.py").is_file() else None


def bench(args: argparse.Namespace) -> int:
    where = benchmarks_dir()
    if where is None:
        raise CliError(
            "the benchmarks are not installed with the package: run `agt-mesh bench` from a source "
            "checkout (an editable install, `pip install -e .`), or `python benchmarks/run.py` there",
            EXIT_USAGE,
        )
    cmd = [sys.executable, str(where / "run.py"), *args.rest]
    if not args.json:
        return subprocess.call(cmd, cwd=where.parent)
    # --json: the report goes to stderr, the results (run.py --json FILE) to stdout
    fd, out = tempfile.mkstemp(prefix="agt-mesh-bench-", suffix=".json")
    os.close(fd)
    try:
        code = subprocess.call([*cmd, "--json", out], cwd=where.parent, stdout=sys.stderr)
        if code == 0:
            with open(out) as fh:
                print(json.dumps(json.load(fh)))
        return code
    finally:
        os.unlink(out)


# -- adapters (agt_mesh.adapters.cli) ------------------------------------------------------


def _export_globals(args: argparse.Namespace) -> None:
    """Global options given before the command become the adapters' environment defaults."""
    for name, env in (
        ("state_dir", "AGT_MESH_HOME"),
        ("relay", "AGT_RELAY_URL"),
        ("registry", "AGT_REGISTRY_URL"),
        ("profile", "AGT_PROFILE"),
    ):
        value = getattr(args, name, None)
        if value:
            os.environ[env] = str(value)


def adapter_mcp(args: argparse.Namespace) -> int:
    from agt_mesh.adapters.cli import main_mcp

    _export_globals(args)
    return main_mcp(args.rest)


def adapter_hermes_install(args: argparse.Namespace) -> int:
    from agt_mesh.adapters.cli import main_hermes_install

    _export_globals(args)
    return main_hermes_install(args.rest)


def adapter_openclaw_bundle(args: argparse.Namespace) -> int:
    from agt_mesh.adapters.cli import main_openclaw_bundle

    _export_globals(args)
    return main_openclaw_bundle(args.rest)


def adapter_bridge(args: argparse.Namespace) -> int:
    from agt_mesh.adapters.cli import main_bridge_hermes

    rest = list(args.rest)
    if rest[:1] != ["hermes"]:
        raise CliError("usage: agt-mesh bridge hermes [options] (the only bridge so far)")
    _export_globals(args)
    return main_bridge_hermes(rest[1:])
