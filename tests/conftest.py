"""Shared fixtures: the pinned TypeScript SDK and the real AGT server venvs.

These are installed by ``make test`` (and ``.ci/run``); a missing install is an error,
never a skip, so a green run always means the real reference code was exercised.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "interop"))

import agt_venvs  # noqa: E402


@pytest.fixture(scope="session")
def node_modules() -> Path:
    sdk = ROOT / "node_modules" / "@microsoft" / "agent-governance-sdk" / "package.json"
    if not sdk.exists():
        pytest.fail("the TypeScript reference SDK is not installed: run `make node` (npm ci)")
    return ROOT / "node_modules"


@pytest.fixture(scope="session")
def agt_core_python() -> Path:
    """Interpreter of the venv holding agent-governance-toolkit-core[server]==5.0.0."""
    return agt_venvs.ensure("core-5.0.0")


@pytest.fixture(scope="session")
def agt_platform_python() -> Path:
    """Interpreter of the venv holding agentmesh-platform[server]==3.7.0."""
    return agt_venvs.ensure("platform-3.7.0")


# -- the real agent hosts (interop/hosts.py; installed by `make servers`) ----------------

import hosts  # noqa: E402


@pytest.fixture(scope="session")
def hermes_python() -> Path:
    """Interpreter of the venv holding hermes-agent[mcp]==0.19.0 (mcp==1.26.0)."""
    return hosts.ensure_hermes()


@pytest.fixture(scope="session")
def hermes_site(hermes_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout pip-installed (offline, no deps) for the Hermes venv: put it on PYTHONPATH."""
    return hosts.install_checkout(tmp_path_factory.mktemp("hermes-site"), python=hermes_python)


@pytest.fixture(scope="session")
def openclaw_bin() -> Path:
    """``openclaw`` 2026.9.6 (runs on the Node 24 of :func:`node24_dir`)."""
    return hosts.ensure_openclaw()


@pytest.fixture(scope="session")
def node24_dir() -> Path:
    return hosts.ensure_node()
