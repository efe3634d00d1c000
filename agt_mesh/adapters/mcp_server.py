"""MCP stdio server exposing the canonical mesh tools (``agt-mesh mcp``; extra ``mcp``).

The tools are listed with their canonical names and JSON Schemas; a call returns the tool's
JSON result as text content plus ``structuredContent``, with ``isError`` set when the result
is an ``{"error": ...}``.  Nothing but MCP messages goes to stdout: logs go to stderr.

Works with the ``mcp`` package's low-level server in both API generations: v2 (handlers
passed to ``Server(...)``) and v1 (``@server.list_tools()`` / ``@server.call_tool()``).

Run ``python -m agt_mesh.adapters.mcp_server --help`` (same options as ``agt-mesh mcp``).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import sys
from typing import Any

from agt_mesh import __version__
from agt_mesh.adapters.tools import MeshTools, error_result

__all__ = ["INSTRUCTIONS", "build_server", "call_result", "serve_stdio"]

INSTRUCTIONS = (
    "AgentMesh end-to-end encrypted messaging between AI agents. Use mesh_send to message or delegate "
    "to another agent by its exact name (await_reply=true to wait for its answer), mesh_await to wait "
    "for agents you delegated to, mesh_inbox to look at messages without waiting, mesh_transfer_file "
    "to send a file, mesh_discover to find agents, mesh_status for your own identity. This server "
    "cannot push messages to you: check mesh_inbox or call mesh_await."
)


def _import_mcp() -> tuple[Any, Any, Any]:
    try:
        import mcp.types as types
        from mcp.server.lowlevel import Server
        from mcp.server.stdio import stdio_server
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError("the MCP server needs the 'mcp' package: pip install 'kars-agt-mesh[mcp]'") from exc
    return types, Server, stdio_server


def call_result(types: Any, result: dict[str, Any]) -> Any:
    """A ``CallToolResult`` carrying ``result`` as JSON text and as structured content."""
    return types.CallToolResult.model_validate(
        {
            "content": [{"type": "text", "text": json.dumps(result, ensure_ascii=False, default=str)}],
            "structuredContent": result,
            "isError": "error" in result,
        }
    )


def build_server(tools: MeshTools, name: str = "agt-mesh") -> Any:
    """A low-level MCP ``Server`` serving ``tools`` (v1 or v2 API, whichever is installed)."""
    types, server_cls, _ = _import_mcp()
    listed = [
        types.Tool.model_validate({"name": s.name, "description": s.description, "inputSchema": s.parameters})
        for s in tools.specs()
    ]
    names = {s.name for s in tools.specs()}

    async def run_tool(tool: str, arguments: Any) -> Any:
        if tool not in names:
            return call_result(types, error_result("unknown_tool", f"no tool named {tool!r}"))
        limit = tools.spec(tool).max_seconds(arguments if isinstance(arguments, dict) else {})
        try:
            result = await asyncio.wait_for(tools.call(tool, arguments), limit)
        except TimeoutError:
            result = error_result("timeout", f"{tool} did not finish within {limit:g} s and was cancelled")
        return call_result(types, result)

    if "on_list_tools" in inspect.signature(server_cls.__init__).parameters:  # mcp >= 2

        async def on_list_tools(ctx: Any, params: Any) -> Any:
            return types.ListToolsResult(tools=listed)

        async def on_call_tool(ctx: Any, params: Any) -> Any:
            return await run_tool(params.name, params.arguments)

        return server_cls(
            name,
            version=__version__,
            instructions=INSTRUCTIONS,
            on_list_tools=on_list_tools,
            on_call_tool=on_call_tool,
        )

    server = server_cls(name, version=__version__, instructions=INSTRUCTIONS)  # mcp 1.x

    async def list_tools() -> list[Any]:
        return listed

    async def call_tool(tool: str, arguments: dict[str, Any]) -> Any:
        return await run_tool(tool, arguments)

    server.list_tools()(list_tools)
    try:
        server.call_tool(validate_input=False)(call_tool)
    except TypeError:  # older 1.x without validate_input
        server.call_tool()(call_tool)
    return server


async def serve_stdio(tools: MeshTools, name: str = "agt-mesh") -> None:
    """Serve ``tools`` over stdin/stdout until the client closes the connection."""
    _, _, stdio_server = _import_mcp()
    server = build_server(tools, name)
    async with stdio_server() as (read_stream, write_stream):
        await server.run(read_stream, write_stream, server.create_initialization_options())


if __name__ == "__main__":
    from agt_mesh.adapters.cli import main_mcp

    sys.exit(main_mcp(sys.argv[1:]))
