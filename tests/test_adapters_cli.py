"""`agt-mesh openclaw-bundle` and `agt-mesh hermes-install` (the adapters' CLI functions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from agt_mesh.adapters.cli import main_hermes_install, main_openclaw_bundle


def test_openclaw_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # as from a venv that is not on PATH: the command must still be absolute (a bare
    # `agt-mesh` made OpenClaw's server fail to start while the skill showed ready)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "bundle"
    code = main_openclaw_bundle(
        ["bundle", "--relay", "http://relay:8083", "--registry", "http://reg:8082", "--name", "claw"]
    )
    assert code == 0
    captured = capsys.readouterr()
    # the exact command OpenClaw 2026.9.6 accepts (the real one runs it in test_hosts_openclaw)
    assert captured.err.strip() == f"install with: openclaw plugins install {out} --force --accept-capabilities"
    printed = captured.out.split()
    assert sorted(printed) == sorted(
        str(p) for p in (out / ".claude-plugin/plugin.json", out / ".mcp.json", out / "skills/agt-mesh/SKILL.md")
    )
    server = json.loads((out / ".mcp.json").read_text())["mcpServers"]["agt-mesh"]
    assert server["command"] == str(Path(sys.executable).parent / "agt-mesh") and server["args"][0] == "mcp"
    assert Path(server["command"]).is_absolute()
    args = server["args"]
    assert args[args.index("--relay") + 1] == "http://relay:8083" and args[args.index("--name") + 1] == "claw"
    assert Path(args[args.index("--state-dir") + 1]).is_absolute()
    assert json.loads((out / ".claude-plugin/plugin.json").read_text())["name"] == "agt-mesh"
    skill = (out / "skills/agt-mesh/SKILL.md").read_text()
    front, body = skill.split("---\n")[1:3]
    assert front.startswith("name: agt-mesh\n") and "description: >-" in front
    (meta,) = [line for line in front.splitlines() if line.startswith("metadata: ")]
    gating = json.loads(meta.removeprefix("metadata: "))["openclaw"]
    assert gating["requires"] == {"config": ["plugins.entries.agt-mesh.enabled"]}
    for word in ("agt-mesh__mesh_send", "agt-mesh__mesh_await", "agt-mesh__mesh_discover", "Peer roster:"):
        assert word in skill
    assert "await_reply" in body and "timeout_seconds" in body
    # no silent overwrite; --force replaces; --python-module runs the module with this interpreter
    assert main_openclaw_bundle([str(out)]) == 1
    assert main_openclaw_bundle([str(out), "--force", "--python-module"]) == 0
    server = json.loads((out / ".mcp.json").read_text())["mcpServers"]["agt-mesh"]
    assert server["command"] == sys.executable and server["args"][:2] == ["-m", "agt_mesh.adapters.mcp_server"]
    capsys.readouterr()
    assert main_openclaw_bundle([str(out), "--force", "--command", "no-such-agt-mesh-binary"]) == 1
    assert "not an executable" in capsys.readouterr().err


def test_hermes_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HERMES_HOME", str(tmp_path / "h"))
    assert main_hermes_install([]) == 0
    plugin = tmp_path / "h" / "plugins" / "agt-mesh"
    assert "from agt_mesh.adapters.hermes import register" in (plugin / "__init__.py").read_text()
    assert "name: agt-mesh" in (plugin / "plugin.yaml").read_text()
    assert main_hermes_install([]) == 1
    assert main_hermes_install(["--force"]) == 0
    assert main_hermes_install(["--hermes-home", str(tmp_path / "other")]) == 0
    assert (tmp_path / "other" / "plugins" / "agt-mesh" / "plugin.yaml").exists()
