"""Thin tool adapters over :class:`~agt_mesh.shell.client.MeshClient`.

One canonical tool set (:mod:`agt_mesh.adapters.tools`) — ``mesh_send``, ``mesh_inbox``,
``mesh_await``, ``mesh_transfer_file``, ``mesh_discover``, ``mesh_status`` — from which the
adapters are generated:

* :mod:`agt_mesh.adapters.hermes` — a Hermes Agent plugin (kars tool names);
* :mod:`agt_mesh.adapters.mcp_server` — an MCP stdio server (optional extra ``mcp``);
* :mod:`agt_mesh.adapters.openclaw` — an OpenClaw bundle (skill + ``.mcp.json``);
* :mod:`agt_mesh.adapters.responder` — the opt-in auto-responder and its Hermes HTTP API backend.

Payload envelopes are kars-compatible (:mod:`agt_mesh.adapters.envelopes`).
"""

from __future__ import annotations

from agt_mesh.adapters.tools import AdapterConfig, MeshTools, ToolError, ToolSpec, error_result

__all__ = ["AdapterConfig", "MeshTools", "ToolError", "ToolSpec", "error_result"]
