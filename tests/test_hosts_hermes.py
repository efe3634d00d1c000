"""Inside a real Hermes Agent (hermes-agent[mcp]==0.19.0, installed by `make servers` into its own
venv, with this checkout pip-installed into it): the plugin installed and enabled with Hermes'
own commands, loaded by Hermes' plugin loader (entry point and folder install), its tools
dispatched by Hermes' own dispatch between two Hermes homes, and `agt-mesh mcp` driven by
Hermes' own MCP client (mcp==1.26.0).  No model is involved: the tools are called the way
Hermes calls them for a model."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hosts_support import ROOT, HermesDriver, hermes, hermes_env
from test_adapters_support import make_client, optional_problems

from agt_mesh.adapters.hermes import KARS_NAMES
from agt_mesh.adapters.responder import API_SERVER_HINT, MIN_API_SERVER_KEY_CHARS
from agt_mesh.dev.server import DevMesh

pytestmark = pytest.mark.slow

CANONICAL = {v: k for k, v in KARS_NAMES.items()}


def _install_and_enable(python: Path, home: Path, env: dict[str, str]) -> None:
    """`agt-mesh hermes-install` then Hermes' own enable command, exactly as a user runs them."""
    res = hermes(python, "--version", env=env)
    assert res.returncode == 0 and "0.19.0" in res.stdout + res.stderr, res
    install = subprocess.run(
        [str(python), "-m", "agt_mesh", "hermes-install", "--hermes-home", str(home)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert install.returncode == 0, install.stderr
    assert install.stdout.strip() == str(home / "plugins" / "agt-mesh")
    assert "hermes plugins enable agt-mesh" in install.stderr
    enable = hermes(python, "plugins", "enable", "agt-mesh", "--no-allow-tool-override", env=env)
    assert enable.returncode == 0, enable
    assert "agt-mesh" in (home / "config.yaml").read_text()


def _check_loaded(ready: dict[str, Any], source: str) -> None:
    (plugin,) = ready["plugins"]
    assert plugin["enabled"] is True and not plugin.get("error"), plugin
    assert plugin["source"] == source, plugin
    assert plugin["tools"] == len(KARS_NAMES) and plugin["hooks"] >= 1, plugin
    tools = ready["tools"]
    assert sorted(tools) == sorted(KARS_NAMES.values())
    for name, schema in tools.items():
        # what the model gets after Hermes' schema sanitizer: optional arguments stay optional
        assert optional_problems(CANONICAL[name], schema["parameters"]) == [], (name, schema)


@pytest.mark.parametrize("how", ["entrypoint", "folder"])
async def test_plugin_installs_enables_and_loads_through_hermes(
    how: str, tmp_path: Path, hermes_python: Path, hermes_site: Path
) -> None:
    async with DevMesh() as mesh:
        home = tmp_path / "hermes-home"
        name = f"hermes-{how}-{os.urandom(3).hex()}"
        # entry point: the package installed into Hermes' environment; folder: only the
        # plugin folder, with the code importable from the checkout (no entry point)
        pythonpath = hermes_site if how == "entrypoint" else ROOT
        env = hermes_env(
            home,
            pythonpath,
            relay_url=mesh.relay_url,
            registry_url=mesh.registry_url,
            name=name,
            incoming=tmp_path / "incoming",
        )
        _install_and_enable(hermes_python, home, env)
        listed = hermes(hermes_python, "plugins", "list", "--plain", "--no-bundled", env=env)
        assert listed.returncode == 0 and "agt-mesh" in listed.stdout, listed
        async with HermesDriver(hermes_python, env) as h:
            _check_loaded(h.ready, "entrypoint" if how == "entrypoint" else "user")
            status = await h.call("kars_mesh_status")
            assert status["display_name"] == name and status["connected"] is True, status
            assert status["did"].startswith("did:mesh:")
            # the identity lives in the Hermes home, 0600
            identity = home / ".agt" / "identity.json"
            assert identity.stat().st_mode & 0o777 == 0o600


async def test_two_hermes_homes_exchange_messages_replies_and_files(
    tmp_path: Path, hermes_python: Path, hermes_site: Path
) -> None:
    suffix = os.urandom(3).hex()
    names = {"a": f"hermes-a-{suffix}", "b": f"hermes-b-{suffix}"}
    async with DevMesh() as mesh:
        envs: dict[str, dict[str, str]] = {}
        # b's auto-responder answers only allow-listed DIDs: give a its identity first
        (tmp_path / "a" / "hermes-home").mkdir(parents=True)
        a_state = tmp_path / "a" / "hermes-home" / ".agt"
        made = subprocess.run(
            [sys.executable, "-m", "agt_mesh", "identity", "new", "--json", "--state-dir", str(a_state)],
            capture_output=True,
            text=True,
            check=True,
        )
        a_did = json.loads(made.stdout)["did"]
        for key in ("a", "b"):
            home = tmp_path / key / "hermes-home"
            home.mkdir(parents=True, exist_ok=True)
            (tmp_path / key / "outbox").mkdir()
            envs[key] = hermes_env(
                home,
                hermes_site,
                relay_url=mesh.relay_url,
                registry_url=mesh.registry_url,
                name=names[key],
                incoming=tmp_path / key / "incoming",
                files_root=tmp_path / key / "outbox",
                KARS_MESH_AUTO_RESPONDER="1" if key == "b" else "0",
                **({"KARS_MESH_ALLOW": a_did} if key == "b" else {}),
            )
            _install_and_enable(hermes_python, home, envs[key])
        async with (
            HermesDriver(hermes_python, envs["a"]) as a,
            HermesDriver(hermes_python, envs["b"], "--echo-responder", names["b"]) as b,
        ):
            # b answers task requests through its auto-responder (the callback stands in for
            # the model): a waits for the reply
            asked = await a.call(
                "kars_mesh_send",
                {"to": names["b"], "content": "what is 6 x 7?", "await_reply": True, "timeout_seconds": 30},
            )
            assert asked["status"] == "delivered_and_replied", asked
            assert asked["reply"] == f"{names['b']} answers: what is 6 x 7?"
            # b writes to a; a awaits it with Hermes dispatching kars_mesh_await
            sent = await b.call("kars_mesh_send", {"to": names["a"], "content": "news from b"})
            assert sent["status"] == "delivered_via_agt_relay", sent
            got = await a.call("kars_mesh_await", {"from": [names["b"]], "timeout_seconds": 30})
            assert got["status"] == "all_received", got
            assert [m["content"] for m in got["messages"]] == ["news from b"]
            assert got["messages"][0]["from_name"] == names["b"]
            # a file from a's outbox to b, acknowledged with the name b saved it under
            payload = os.urandom(300_000)
            (tmp_path / "a" / "outbox" / "report.bin").write_bytes(payload)
            moved = await a.call(
                "kars_mesh_transfer_file",
                {"to": names["b"], "file_path": "report.bin", "description": "test data"},
            )
            assert moved["status"] == "delivered", moved
            saved = tmp_path / "b" / "incoming" / moved["saved_as"]
            assert saved.read_bytes() == payload
            inbox = await b.call("kars_mesh_inbox", {})
            (notice,) = [m for m in inbox["messages"] if m["type"] == "file_received"]
            assert notice["file"]["sha256"] == hashlib.sha256(payload).hexdigest()


@pytest.mark.parametrize("server_mcp", ["mcp1", "mcp2"])
async def test_hermes_mcp_client_lists_and_calls_agt_mesh_mcp(
    server_mcp: str, tmp_path: Path, hermes_python: Path, hermes_site: Path
) -> None:
    """Hermes' MCP client (its pinned mcp==1.26.0) against `agt-mesh mcp` running under the same
    mcp 1.26.0 (Hermes' venv) or under mcp 2.x (this venv)."""
    suffix = os.urandom(3).hex()
    me, peer_name = f"hermes-mcp-{suffix}", f"peer-{suffix}"
    async with DevMesh() as mesh:
        peer = make_client(mesh, peer_name)
        await peer.connect()
        try:
            home = tmp_path / "hermes-home"
            home.mkdir()
            server_args = ["--state-dir", str(tmp_path / "mcp-state"), "--relay", mesh.relay_url]
            server_args += ["--registry", mesh.registry_url, "--name", me]
            if server_mcp == "mcp1":
                server = {
                    "command": str(hermes_python),
                    "args": ["-m", "agt_mesh", "mcp", *server_args],
                    "env": {"PYTHONPATH": str(hermes_site)},
                }
            else:
                server = {"command": str(Path(sys.executable).parent / "agt-mesh"), "args": ["mcp", *server_args]}
            # JSON is YAML: Hermes' mcp_servers entry, as `hermes mcp add` writes it
            (home / "config.yaml").write_text(json.dumps({"mcp_servers": {"agt-mesh": server}}))
            env = hermes_env(
                home,
                hermes_site,
                relay_url=mesh.relay_url,
                registry_url=mesh.registry_url,
                name="unused",
                incoming=tmp_path / "incoming",
            )
            async with HermesDriver(hermes_python, env, "--mcp") as h:
                tools = h.ready["tools"]
                expected = {f"mcp__agt_mesh__{t}": t for t in KARS_NAMES}
                assert sorted(tools) == sorted(expected), h.chatter[-20:]
                for name, schema in tools.items():
                    assert optional_problems(expected[name], schema["parameters"]) == [], (name, schema)
                status = await h.call("mcp__agt_mesh__mesh_status")
                text = json.dumps(status)
                assert me in text and '"connected": true' in text, status
                sent = await h.call("mcp__agt_mesh__mesh_send", {"to": peer_name, "content": "via Hermes MCP"})
                assert "delivered_via_agt_relay" in json.dumps(sent), sent
                msg = await asyncio.wait_for(peer.inbox.get(), 30)
                assert msg.sender_name == me or msg.payload.get("from_agent") == me
                assert msg.payload["content"] == "via Hermes MCP"
        finally:
            await peer.disconnect()


def test_bridge_hints_match_real_hermes(tmp_path: Path, hermes_python: Path) -> None:
    """The commands and requirements our hints name are Hermes' own."""
    env = hermes_env(tmp_path / "home", ROOT, relay_url="", registry_url="", name="x", incoming=tmp_path / "in")
    for sub in ("run", "start"):
        assert f"`hermes gateway {sub}`" in API_SERVER_HINT
        res = hermes(hermes_python, "gateway", sub, "--help", env=env)
        assert res.returncode == 0 and f"hermes gateway {sub}" in res.stdout, res
    code = (
        "import json, secrets, sys\n"
        "from hermes_cli.auth import has_usable_secret\n"
        "import gateway.platforms.api_server as api\n"
        "n = int(sys.argv[1])\n"
        "print(json.dumps({'short': has_usable_secret(secrets.token_hex(n)[: n - 1], min_length=n),\n"
        "                  'ok': has_usable_secret(secrets.token_hex(n)[:n], min_length=n),\n"
        "                  'aiohttp_guard': 'aiohttp not installed' in open(api.__file__).read()}))\n"
    )
    out = subprocess.run(
        [str(hermes_python), "-c", code, str(MIN_API_SERVER_KEY_CHARS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    facts = json.loads(out.stdout.strip().splitlines()[-1])
    assert facts == {"short": False, "ok": True, "aiohttp_guard": True}
    source = subprocess.run(
        [str(hermes_python), "-c", "import gateway.platforms.api_server as a; print(a.__file__)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()
    text = Path(source).read_text()
    assert f"min_length={MIN_API_SERVER_KEY_CHARS}" in text and "API_SERVER_KEY" in text
