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
