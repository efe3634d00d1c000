"""One relay-token variable everywhere: ``AGENTMESH_RELAY_TOKEN`` (the AGT relay's own name) for
the CLI, ``agt-mesh mcp`` and the Hermes plugin; ``AGT_RELAY_TOKEN`` is a deprecated alias
that still works and warns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from cli_helpers import clean_env, cli, new_identity
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from servers import ServerPair

from agt_mesh import config_env
from agt_mesh.adapters.hermes import HermesSettings


def test_one_variable_and_a_deprecated_alias(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(config_env, "_warned", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config_env.relay_token_from_env({"AGENTMESH_RELAY_TOKEN": "new"}) == "new"
        assert config_env.relay_token_from_env({"AGENTMESH_RELAY_TOKEN": "new", "AGT_RELAY_TOKEN": "old"}) == "new"
        assert config_env.relay_token_from_env({}) is None
    with pytest.warns(FutureWarning, match="AGT_RELAY_TOKEN is deprecated: set AGENTMESH_RELAY_TOKEN"):
        assert config_env.relay_token_from_env({"AGT_RELAY_TOKEN": "old"}) == "old"
    # the Hermes plugin reads the same variable as the CLI (it used to read only AGT_RELAY_TOKEN)
    home = {"HERMES_HOME": str(tmp_path)}
    assert HermesSettings.from_env({**home, "AGENTMESH_RELAY_TOKEN": "s3cret"}).relay_token == "s3cret"
    with pytest.warns(FutureWarning):
        monkeypatch.setattr(config_env, "_warned", False)
        assert HermesSettings.from_env({**home, "AGT_RELAY_TOKEN": "legacy"}).relay_token == "legacy"


async def _mcp_status(state: Path, pair: ServerPair, env: dict[str, str]) -> tuple[bool, dict[str, object]]:
    args = ["-m", "agt_mesh", "mcp", "--state-dir", str(state), "--relay", pair.relay_url]
    args += ["--registry", pair.registry_url, "--name", f"tok-{os.urandom(3).hex()}"]
    params = StdioServerParameters(command=sys.executable, args=args, env=env)
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        res = await session.call_tool("mesh_status", {})
        is_error = getattr(res, "is_error", None)
        return bool(getattr(res, "isError", False) if is_error is None else is_error), json.loads(res.content[0].text)


async def test_mcp_server_and_cli_use_agentmesh_relay_token(tmp_path: Path) -> None:
    pair = ServerPair("dev", extra_args=["--token", "s3cret-token"]).start()
    try:
        base = {k: v for k, v in os.environ.items() if k not in ("AGENTMESH_RELAY_TOKEN", "AGT_RELAY_TOKEN")}
        # the MCP server reads AGENTMESH_RELAY_TOKEN like the CLI does
        err, status = await _mcp_status(tmp_path / "a", pair, {**base, "AGENTMESH_RELAY_TOKEN": "s3cret-token"})
        assert not err and status["connected"] is True
        # the old name still works for the CLI and the MCP server, with a warning on stderr
        err, status = await _mcp_status(tmp_path / "b", pair, {**base, "AGT_RELAY_TOKEN": "s3cret-token"})
        assert not err and status["connected"] is True
        state = tmp_path / "c"
        new_identity(state)
        common = ["--state-dir", str(state), "--relay", pair.relay_url, "--registry", pair.registry_url]
        res = cli("listen", "--timeout", "1", *common, env=clean_env(AGT_RELAY_TOKEN="s3cret-token"))
        assert res.code == 0, str(res)
        assert "AGT_RELAY_TOKEN is deprecated: set AGENTMESH_RELAY_TOKEN" in res.err
        # without a token the server refuses the MCP server's connection: it exits, clearly
        proc = subprocess.run(
            [sys.executable, "-m", "agt_mesh", "mcp", *common],
            input=b"",
            capture_output=True,
            env=base,
            timeout=60,
        )
        assert proc.returncode == 4 and proc.stdout == b"", proc.stderr
    finally:
        pair.stop()
