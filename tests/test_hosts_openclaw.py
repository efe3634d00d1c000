"""Inside a real OpenClaw (npm openclaw@2026.9.6 on Node 24 from npm, installed by `make servers`):
`agt-mesh openclaw-bundle`, then exactly the install command it prints; OpenClaw shows the
bundle enabled and the skill ready; OpenClaw's bundle-MCP runtime (what an agent turn uses)
starts the server from the generated `.mcp.json` with a PATH that does not contain this venv,
lists the six tools and sends a message that a peer on the dev relay receives."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hosts_support import HERE, base_env
from test_adapters_support import make_client, optional_problems

from agt_mesh.dev.server import DevMesh

pytestmark = pytest.mark.slow

TOOLS = ["mesh_await", "mesh_discover", "mesh_inbox", "mesh_send", "mesh_status", "mesh_transfer_file"]


def _openclaw(openclaw: Path, args: list[str], env: dict[str, str], timeout: float = 180) -> str:
    res = subprocess.run(
        [str(openclaw), *args], env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    assert res.returncode == 0, f"openclaw {' '.join(args)} -> {res.returncode}\n{res.stdout}\n{res.stderr}"
    return res.stdout + res.stderr


def _json_out(text: str) -> Any:
    """The JSON document in a command's output (OpenClaw prints a banner line first)."""
    start = min(i for i in (text.find("{"), text.find("[")) if i >= 0)
    return json.JSONDecoder().raw_decode(text[start:])[0]


async def test_bundle_installs_and_openclaw_runs_the_tools(
    tmp_path: Path, openclaw_bin: Path, node24_dir: Path
) -> None:
    suffix = os.urandom(3).hex()
    me, peer_name = f"openclaw-{suffix}", f"peer-{suffix}"
    venv_bin = str(Path(sys.executable).parent)
    # OpenClaw's PATH: Node 24 and the system, never this venv
    env = base_env(tmp_path / "home", PATH=f"{node24_dir}:/usr/bin:/bin")
    # OpenClaw's state in this test's HOME; its log file too (not the shared /tmp/openclaw)
    (tmp_path / "home" / ".openclaw").mkdir(parents=True)
    config = {"logging": {"file": str(tmp_path / "openclaw.log")}}
    (tmp_path / "home" / ".openclaw" / "openclaw.json").write_text(json.dumps(config))
    assert venv_bin not in env["PATH"].split(":")
    async with DevMesh() as mesh:
        peer = make_client(mesh, peer_name)
        await peer.connect()
        try:
            bundle = tmp_path / "bundle"
            made = subprocess.run(
                [
                    f"{venv_bin}/agt-mesh",
                    "openclaw-bundle",
                    str(bundle),
                    "--relay",
                    mesh.relay_url,
                    "--registry",
                    mesh.registry_url,
                    "--name",
                    me,
                    "--state-dir",
                    str(tmp_path / "mesh-state"),
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            (line,) = [x for x in made.stderr.splitlines() if x.startswith("install with: ")]
            argv = shlex.split(line.removeprefix("install with: "))
            assert argv[:3] == ["openclaw", "plugins", "install"]
            out = _openclaw(openclaw_bin, argv[1:], env)  # exactly the printed command
            assert "Installed plugin: agt-mesh" in out, out

            inspect = _json_out(_openclaw(openclaw_bin, ["plugins", "inspect", "agt-mesh", "--json"], env))
            text = json.dumps(inspect)
            assert '"enabled"' in text and "claude" in text and "mcpServers" in text, text[:2000]
            skills = _json_out(_openclaw(openclaw_bin, ["skills", "list", "--eligible", "--json"], env))
            assert "agt-mesh" in json.dumps(skills), "the agt-mesh skill is not eligible (ready)"

            async def run_driver(*calls: str) -> list[dict[str, Any]]:
                proc = await asyncio.create_subprocess_exec(
                    str(node24_dir / "node"),
                    str(HERE / "openclaw_driver.mjs"),
                    str(openclaw_bin.parent.parent / "openclaw"),
                    str(tmp_path / "workspace"),
                    *calls,
                    env=env,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                )
                stdout, stderr = await asyncio.wait_for(proc.communicate(), 180)
                assert proc.returncode == 0, stderr.decode()[-3000:]
                return [json.loads(x) for x in stdout.decode().splitlines() if x.startswith("{")]

            (tmp_path / "workspace").mkdir()
            steps = await run_driver(
                "agt-mesh__mesh_status",
                "{}",
                "agt-mesh__mesh_send",
                json.dumps({"to": peer_name, "content": "hello from OpenClaw"}),
            )
            tools = steps[0]["tools"]
            assert sorted(tools) == [f"agt-mesh__{t}" for t in TOOLS]
            for name, params in tools.items():
                # what OpenClaw offers its model: optional arguments are optional
                assert optional_problems(name.removeprefix("agt-mesh__"), params) == [], (name, params)
            status, sent = (json.dumps(step["result"]) for step in steps[1:])
            assert me in status and '\\"connected\\": true' in status, status
            assert "delivered_via_agt_relay" in sent, sent
            msg = await asyncio.wait_for(peer.inbox.get(), 30)
            assert msg.payload["content"] == "hello from OpenClaw"
            assert msg.sender_name == me or msg.payload.get("from_agent") == me
        finally:
            await peer.disconnect()
