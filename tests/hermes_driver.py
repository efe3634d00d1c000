"""Drive a real Hermes Agent process without a model: run by the Hermes venv's Python.

It imports Hermes' ``model_tools`` (which discovers the built-in tools and loads the enabled
plugins through Hermes' own plugin loader), optionally connects Hermes' MCP client to the
servers in ``$HERMES_HOME/config.yaml``, prints one ``@@{json}`` line describing what Hermes
loaded, then reads JSON commands ``{"tool", "args"}`` from stdin and answers each with the
result of Hermes' own dispatch (``model_tools.handle_function_call``), one ``@@{json}`` line
each.  Lines without the ``@@`` prefix are Hermes' own chatter.

Options: ``--echo-responder NAME`` answers peers' task requests through the plugin's
auto-responder with a fixed callback (the part a model would play); ``--mcp`` runs Hermes'
MCP discovery.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def emit(data: Any) -> None:
    sys.stdout.write("@@" + json.dumps(data, default=str) + "\n")
    sys.stdout.flush()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--echo-responder", metavar="NAME")
    p.add_argument("--mcp", action="store_true")
    args = p.parse_args()
    if args.echo_responder:
        from agt_mesh.adapters import hermes as plugin

        async def echo(request: Any, progress: Any) -> str:
            await progress("working", "reading the request")
            return f"{args.echo_responder} answers: {request.content}"

        plugin.set_responder(echo)

    import model_tools
    from hermes_cli.plugins import get_plugin_manager

    mcp_tools: list[str] = []
    if args.mcp:
        from tools.mcp_tool import discover_mcp_tools

        mcp_tools = discover_mcp_tools()
    plugins = [p for p in get_plugin_manager().list_plugins() if p.get("name") == "agt-mesh"]
    definitions = model_tools.get_tool_definitions(quiet_mode=True, skip_tool_search_assembly=True)
    ours = {
        d["function"]["name"]: d["function"]
        for d in definitions
        if d["function"]["name"].startswith(("kars_", "mcp__agt_mesh__"))
    }
    emit({"ready": True, "plugins": plugins, "tools": ours, "mcp_tools": mcp_tools})
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        raw = model_tools.handle_function_call(cmd["tool"], cmd.get("args") or {})
        try:
            result = json.loads(raw)
        except ValueError:
            result = {"raw": raw}
        emit({"result": result})
    if args.mcp:
        from tools.mcp_tool import shutdown_mcp_servers

        shutdown_mcp_servers()
    plugin_module = sys.modules.get("agt_mesh.adapters.hermes")
    instance = plugin_module.get_plugin() if plugin_module is not None else None
    if instance is not None:
        instance.shutdown()


if __name__ == "__main__":
    main()
