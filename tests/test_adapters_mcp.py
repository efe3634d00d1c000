"""The MCP server as a subprocess — `python -m agt_mesh mcp` (`agt-mesh mcp`) once the main CLI
routes it, else `python -m agt_mesh.adapters.mcp_server` (the same code) — driven with the `mcp`
package's own client session over stdio."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from test_adapters_support import make_client, optional_problems

from agt_mesh.adapters import AdapterConfig, MeshTools
from agt_mesh.adapters.responder import AutoResponder, TaskRequest
from agt_mesh.dev.server import DevMesh

TOOLS = ["mesh_await", "mesh_discover", "mesh_inbox", "mesh_send", "mesh_status", "mesh_transfer_file"]


def _entry() -> list[str]:
    """``python -m agt_mesh mcp`` once the main CLI routes ``mcp`` to ``main_mcp``, else the module."""
    probe = subprocess.run(
        [sys.executable, "-m", "agt_mesh", "mcp", "--help"], capture_output=True, text=True, timeout=60
    )
    if probe.returncode == 0 and "--state-dir" in probe.stdout and "--registry" in probe.stdout:
        return ["-m", "agt_mesh", "mcp"]
    return ["-m", "agt_mesh.adapters.mcp_server"]


def _server_args(state_dir: Path, mesh: DevMesh, name: str) -> list[str]:
    return [
        *_entry(),
        "--state-dir",
        str(state_dir),
        "--relay",
        mesh.relay_url,
        "--registry",
        mesh.registry_url,
        "--name",
        name,
    ]


def _result(res: Any) -> tuple[bool, dict[str, Any]]:
    is_error = getattr(res, "is_error", None)
    if is_error is None:
        is_error = getattr(res, "isError", False)
    (content,) = res.content
    return bool(is_error), json.loads(content.text)


def _server_python(kind: str, request: pytest.FixtureRequest) -> tuple[str, dict[str, str]]:
    """The interpreter (and extra environment) the server runs under: this venv (mcp 2.x) or
    the real Hermes venv (its pinned mcp==1.26.0) with this checkout installed into it."""
    if kind == "mcp2":
        return sys.executable, {}
    python = request.getfixturevalue("hermes_python")
    site = request.getfixturevalue("hermes_site")
    return str(python), {"PYTHONPATH": str(site)}


def _mcp_version(python: str, env: dict[str, str]) -> str:
    code = "import importlib.metadata as m; print(m.version('mcp'))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, env={**os.environ, **env}, check=True)
    return out.stdout.strip()


@pytest.mark.parametrize("server_mcp", ["mcp2", "mcp1"])
async def test_mcp_server_over_stdio(tmp_path: Path, server_mcp: str, request: pytest.FixtureRequest) -> None:
    python, extra_env = _server_python(server_mcp, request)
    assert _mcp_version(python, extra_env).startswith("2." if server_mcp == "mcp2" else "1.26.")
    suffix = os.urandom(3).hex()
    me, other = f"mcp-agent-{suffix}", f"bob-{suffix}"
    async with DevMesh() as mesh:
        bob = make_client(mesh, other)
        await bob.connect()
        bob_tools = MeshTools(bob, AdapterConfig(incoming_dir=tmp_path / "bob-in", files_root=tmp_path / "bob-out"))

        async def answer(req: TaskRequest, progress: Any) -> str:
            await asyncio.sleep(0.2)
            return f"bob read {req.content!r} from {req.sender_name}"

        AutoResponder(bob_tools, answer, allow=lambda did: True).attach()  # the MCP agent's DID is made later
        bob_tools.start()
        state = tmp_path / "mcp-state"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra_env}
        params = StdioServerParameters(command=python, args=_server_args(state, mesh, me), env=env)
        try:
            async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
                await session.initialize()
                listed = await session.list_tools()
                assert sorted(t.name for t in listed.tools) == TOOLS
                for tool in listed.tools:
                    schema = getattr(tool, "input_schema", None) or getattr(tool, "inputSchema", None)
                    assert optional_problems(tool.name, schema) == [], tool.name
                    assert tool.description

                err, status = _result(await session.call_tool("mesh_status", {}))
                assert not err and status["display_name"] == me and status["connected"] is True

                # send to the second agent and await its reply
                err, sent = _result(
                    await session.call_tool(
                        "mesh_send", {"to": other, "content": "hi bob", "await_reply": True, "timeout_seconds": 15}
                    )
                )
                assert not err and sent["status"] == "delivered_and_replied"
                assert sent["reply"] == f"bob read 'hi bob' from {me}"

                # the other direction: bob writes, the MCP agent awaits it
                await bob_tools.call("mesh_send", {"to": me, "content": "news for you"})
                err, got = _result(await session.call_tool("mesh_await", {"from": [other], "timeout_seconds": 15}))
                assert not err and got["status"] == "all_received"
                assert [m["content"] for m in got["messages"]] == ["news for you"]

                err, bad = _result(await session.call_tool("mesh_send", {"to": "nobody-xyz", "content": "?"}))
                assert err and bad["error"]["kind"] == "peer_not_found"

                # a second server for the same identity fails at once, clearly, naming the holder
                proc = await asyncio.create_subprocess_exec(
                    python,
                    *_server_args(state, mesh, me),
                    env=env,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                out, errtext = await asyncio.wait_for(proc.communicate(b""), 30)
                assert proc.returncode == 3
                assert out == b""  # nothing but MCP messages may ever go to stdout
                message = errtext.decode()
                assert "in use by process" in message and str(state) in message

                # the first server is unaffected
                err, status = _result(await session.call_tool("mesh_status", {}))
                assert not err and status["connected"] is True
        finally:
            await bob_tools.close()
            await bob.disconnect()
