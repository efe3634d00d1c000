"""The Hermes plugin: installed with `hermes-install`, loaded with a recording fake ``ctx``
that checks every registration against Hermes' documented ``register_tool`` signature and
schema format, then driven end to end against a second agent through the dev relay."""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import inspect
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_adapters_support import make_client, optional_problems

from agt_mesh.adapters import AdapterConfig, MeshTools
from agt_mesh.adapters import hermes as hermes_mod
from agt_mesh.adapters.cli import main_hermes_install
from agt_mesh.adapters.hermes import KARS_NAMES, LoopThread
from agt_mesh.adapters.responder import AutoResponder, TaskRequest
from agt_mesh.dev.server import DevMesh

# Hermes' PluginContext.register_tool, as documented (hermes_cli/plugins.py)
DOCUMENTED = [
    ("name", inspect.Parameter.empty),
    ("toolset", inspect.Parameter.empty),
    ("schema", inspect.Parameter.empty),
    ("handler", inspect.Parameter.empty),
    ("check_fn", None),
    ("requires_env", None),
    ("is_async", False),
    ("description", ""),
    ("emoji", ""),
    ("override", False),
]
VALID_HOOKS = {"pre_tool_call", "post_tool_call", "on_session_start", "on_session_end", "pre_llm_call"}


class RecordingCtx:
    """A fake Hermes plugin context that validates and records registrations."""

    def __init__(self) -> None:
        self.tools: dict[str, dict[str, Any]] = {}
        self.hooks: dict[str, list[Callable[..., Any]]] = {}
        self.injected: list[tuple[str, str, str | None]] = []
        self.unload: list[Callable[[], None]] = []

    def register_tool(
        self,
        name: str,
        toolset: str,
        schema: dict[str, Any],
        handler: Callable[..., str],
        check_fn: Callable[[], bool] | None = None,
        requires_env: list[Any] | None = None,
        is_async: bool = False,
        description: str = "",
        emoji: str = "",
        override: bool = False,
    ) -> None:
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name), name
        assert name not in self.tools, f"{name} registered twice"
        assert isinstance(toolset, str) and toolset
        assert set(schema) == {"name", "description", "parameters"}, schema.keys()
        assert schema["name"] == name and isinstance(schema["description"], str) and schema["description"]
        assert schema["parameters"]["type"] == "object"
        canonical = {v: k for k, v in KARS_NAMES.items()}[name]
        assert optional_problems(canonical, schema["parameters"]) == []
        json.dumps(schema)
        sig = inspect.signature(handler)
        params = list(sig.parameters.values())
        assert params[0].kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params), "handler must accept **kwargs"
        assert check_fn is None or (callable(check_fn) and not inspect.signature(check_fn).parameters)
        assert requires_env is None or isinstance(requires_env, list)
        assert is_async is False and inspect.iscoroutinefunction(handler) is False
        assert isinstance(description, str) and isinstance(emoji, str)
        assert override is False, "the plugin must not shadow built-in tools"
        self.tools[name] = {"toolset": toolset, "schema": schema, "handler": handler, "check_fn": check_fn}

    def register_hook(self, name: str, callback: Callable[..., Any]) -> None:
        assert name in VALID_HOOKS, name
        self.hooks.setdefault(name, []).append(callback)

    def inject_message(self, content: str, role: str = "user", *, session_key: str | None = None) -> bool:
        self.injected.append((content, role, session_key))
        return True

    def on_unload(self, callback: Callable[[], None]) -> None:
        self.unload.append(callback)


def test_recording_ctx_matches_the_documented_signature() -> None:
    sig = inspect.signature(RecordingCtx.register_tool)
    got = [(p.name, p.default) for p in list(sig.parameters.values())[1:]]
    assert got == DOCUMENTED


def test_entry_point_and_manifest() -> None:
    pyproject = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    assert '[project.entry-points."hermes_agent.plugins"]\nagt-mesh = "agt_mesh.adapters.hermes"' in pyproject
    eps = importlib.metadata.entry_points(group="hermes_agent.plugins")
    assert [ep.value for ep in eps if ep.name == "agt-mesh"] in ([], ["agt_mesh.adapters.hermes"])
    manifest = (Path(hermes_mod.__file__).with_name("plugin.yaml")).read_text()
    assert "\nname: agt-mesh\n" in manifest
    for tool in KARS_NAMES.values():
        assert f"  - {tool}\n" in manifest


def test_loop_thread_timeout_cancels_the_coroutine() -> None:
    loop = LoopThread("test-loop")
    state: list[str] = []

    async def slow() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            state.append("cancelled")
            raise

    try:
        with pytest.raises(TimeoutError):
            loop.submit(slow(), 0.2)
        assert state == ["cancelled"]  # kars left the coroutine running on its loop
        assert loop.submit(asyncio.sleep(0, "ok"), 5) == "ok"
    finally:
        loop.stop()


def _load_installed(plugin_dir: Path) -> Any:
    spec = importlib.util.spec_from_file_location("hermes_plugin_agt_mesh", plugin_dir / "__init__.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def _call(ctx: RecordingCtx, tool: str, args: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    handler = ctx.tools[tool]["handler"]
    text = await asyncio.to_thread(handler, args, **kwargs)
    assert isinstance(text, str)
    result: dict[str, Any] = json.loads(text)
    return result


async def test_hermes_plugin_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hermes_home = tmp_path / "hermes-home"
    assert main_hermes_install(["--hermes-home", str(hermes_home)]) == 0
    plugin_dir = hermes_home / "plugins" / "agt-mesh"
    assert (plugin_dir / "plugin.yaml").exists()
    assert main_hermes_install(["--hermes-home", str(hermes_home)]) == 1  # no silent overwrite

    async with DevMesh() as mesh:
        suffix = plugin_dir.stat().st_ino % 100000
        me, peer_name = f"hermes-{suffix}", f"peer-{suffix}"
        incoming = tmp_path / "sandbox-incoming"
        peer = make_client(mesh, peer_name)
        for key, value in {
            "HERMES_HOME": str(hermes_home),
            "AGT_RELAY_URL": mesh.relay_url,
            "AGT_REGISTRY_URL": mesh.registry_url,
            "AGT_MESH_NAME": me,
            "KARS_INCOMING_DIR": str(incoming),
            "KARS_MESH_AUTO_RESPONDER": "1",
            "KARS_MESH_ALLOW": peer.did,
            "KARS_MESH_EAGER": "1",
        }.items():
            monkeypatch.setenv(key, value)

        answered: list[TaskRequest] = []

        async def respond(req: TaskRequest, progress: Any) -> str:
            answered.append(req)
            return f"hermes says hi to {req.sender_name}"

        hermes_mod.set_responder(respond)
        ctx = RecordingCtx()
        module = _load_installed(plugin_dir)
        await asyncio.to_thread(module.register, ctx)
        plugin = hermes_mod.get_plugin()
        assert plugin is not None
        await peer.connect()
        peer_tools = MeshTools(
            peer, AdapterConfig(incoming_dir=tmp_path / "peer-incoming", files_root=tmp_path / "peer-outbox")
        )

        async def peer_answers(req: TaskRequest, progress: Any) -> str:
            return f"peer got: {req.content}"

        AutoResponder(peer_tools, peer_answers, allow=[plugin.tools.client.did]).attach()
        peer_tools.start()
        try:
            assert sorted(ctx.tools) == sorted(KARS_NAMES.values())
            assert {t["toolset"] for t in ctx.tools.values()} == {"kars_mesh"}
            assert all(t["check_fn"]() for t in ctx.tools.values())
            assert "on_session_start" in ctx.hooks and ctx.unload
            for hook in ctx.hooks["on_session_start"]:
                hook(session_key="sess-1", platform="cli")

            status = await _call(ctx, "kars_mesh_status", {}, task_id="t1")
            assert status["connected"] is True and status["display_name"] == me
            assert Path(hermes_home / ".agt" / "identity.json").exists()
            assert status["did"] == plugin.tools.client.did

            # Hermes -> peer, waiting for the peer's auto-responder
            r = await _call(
                ctx,
                "kars_mesh_send",
                {"to": peer_name, "content": "ping", "await_reply": True, "timeout_seconds": 10},
            )
            assert r["status"] == "delivered_and_replied" and r["reply"] == "peer got: ping"

            # peer -> Hermes: Hermes' own auto-responder answers through the callback
            r = await peer_tools.call(
                "mesh_send", {"to": me, "content": "who are you?", "await_reply": True, "timeout_seconds": 10}
            )
            assert r["status"] == "delivered_and_replied" and r["reply"] == f"hermes says hi to {peer_name}"
            assert [q.content for q in answered] == ["who are you?"]

            # a plain message is pushed into the session and waits in the inbox
            await peer.send(me, {"type": "message", "content": "fyi"})
            got = await _call(ctx, "kars_mesh_await", {"from": [peer_name], "timeout_seconds": 10})
            assert got["status"] == "all_received" and got["messages"][0]["content"] == "fyi"
            for _ in range(100):
                if ctx.injected:
                    break
                await asyncio.sleep(0.05)
            injected, role, session = ctx.injected[0]
            assert "fyi" in injected and peer_name in injected and role == "user" and session == "sess-1"
            # framed as untrusted data between markers the peer cannot predict
            assert "UNTRUSTED PEER MESSAGE BEGINS" in injected and "not by the user" in injected
            assert injected.index("BEGINS>>>") < injected.index("fyi") < injected.index("MESSAGE ENDS>>>")

            # files both ways, each from the sender's outbox (Hermes': next to HERMES_HOME)
            outbox = Path(status["outbox_dir"])
            assert outbox == tmp_path / "hermes-home-files" / "outbox"
            (outbox / "notes.txt").write_text("some notes")
            r = await _call(ctx, "kars_mesh_transfer_file", {"to": peer_name, "file_path": "notes.txt"})
            assert (
                r["status"] == "delivered" and (tmp_path / "peer-incoming" / r["saved_as"]).read_text() == "some notes"
            )
            (tmp_path / "peer-outbox" / "notes.txt").write_text("peer notes")
            r = await peer_tools.call("mesh_transfer_file", {"to": me, "file_path": "notes.txt", "timeout_seconds": 10})
            assert r["status"] == "delivered" and (incoming / r["saved_as"]).read_text() == "peer notes"
            inbox = await _call(ctx, "kars_mesh_inbox", {"mode": "consume"})
            assert [m["type"] for m in inbox["messages"]] == ["file_received"]
            # Hermes' own home (identity, config) is never sent
            r = await _call(
                ctx,
                "kars_mesh_transfer_file",
                {"to": peer_name, "file_path": str(hermes_home / ".agt" / "identity.json")},
            )
            assert r["error"]["kind"] == "protected_path"

            found = await _call(ctx, "kars_discover", {"query": peer_name})
            assert found["agents"][0]["did"] == peer.did
            # kars' argument names still work
            r = await _call(ctx, "kars_mesh_send", {"to_agent": peer_name, "content": "alias"})
            assert r["status"] == "delivered_via_agt_relay"
            bad = await _call(ctx, "kars_mesh_send", {"to": "no-such-agent-anywhere", "content": "x"})
            assert bad["error"]["kind"] == "peer_not_found"
        finally:
            await peer_tools.close()
            await peer.disconnect()
            await asyncio.to_thread(plugin.shutdown)
            hermes_mod.set_responder(None)
        assert not plugin.loop.running
