"""The canonical mesh tool set that every adapter (Hermes, MCP, OpenClaw) is generated from.

Six tools — ``mesh_send``, ``mesh_inbox``, ``mesh_await``, ``mesh_transfer_file``,
``mesh_discover``, ``mesh_status`` — served by :class:`MeshTools` for one connected
:class:`~agt_mesh.shell.client.MeshClient`.  One concept per module:

==================  =========================================================================
:mod:`.args`        each argument declared once (:class:`Arg`): the plain JSON Schema hosts
                    get, the OpenAI strict form, the parser, the defaults and the bounds
:mod:`.spec`        a tool as hosts see it (:class:`ToolSpec`); failures as the model sees
                    them (``{"error": {"kind", "message"}}``)
:mod:`.handlers`    the six tools: descriptions, arguments, time budgets, handlers
:mod:`.routing`     where each inbound message goes: replies and progress ticks to waiting
                    sends, acks to waiting transfers, roster updates, interceptors
:mod:`.receipt`     the fair queue of inbound file envelopes, acks and notices
:mod:`.views`       names, message and agent views, the peer roster text
:mod:`.hooks`       listeners of arriving messages and of local events
:mod:`.config`      :class:`AdapterConfig`
:mod:`.toolset`     :class:`MeshTools`, which composes them
==================  =========================================================================

Every tool argument is treated as attacker-controlled: a peer's message reaches the model,
and the model may pass on whatever the message asks for (prompt injection).  So the file
tool reads only below the files root and never the agent's state (see
:mod:`agt_mesh.adapters.paths`), results name files relative to the roots, and inbound file
transfers are processed fairly — one envelope per peer in turn, each peer's backlog and
disk usage bounded — so one peer cannot delay another's files.  Handlers never raise into
the host: failures come back as ``{"error": {"kind": ..., "message": ...}}``.
"""

from __future__ import annotations

from agt_mesh.adapters.tools.args import Arg, Args, strict_schema
from agt_mesh.adapters.tools.config import AdapterConfig
from agt_mesh.adapters.tools.hooks import EventListener, Listener
from agt_mesh.adapters.tools.receipt import (
    FAILURE_ACKS_PER_MINUTE,
    FAILURE_NOTICES_PER_MINUTE,
    MAX_QUEUED_FILE_BYTES_PER_PEER,
    MAX_QUEUED_FILE_BYTES_TOTAL,
)
from agt_mesh.adapters.tools.routing import Interceptor
from agt_mesh.adapters.tools.spec import ToolSpec, error_result
from agt_mesh.adapters.tools.toolset import MeshTools
from agt_mesh.adapters.tools.views import MAX_LABEL_CHARS, is_did, peer_label
from agt_mesh.errors import MeshToolError

#: The name the tool error had before it joined the :class:`~agt_mesh.errors.MeshError` tree.
ToolError = MeshToolError

__all__ = [
    "FAILURE_ACKS_PER_MINUTE",
    "FAILURE_NOTICES_PER_MINUTE",
    "MAX_LABEL_CHARS",
    "MAX_QUEUED_FILE_BYTES_PER_PEER",
    "MAX_QUEUED_FILE_BYTES_TOTAL",
    "AdapterConfig",
    "Arg",
    "Args",
    "EventListener",
    "Interceptor",
    "Listener",
    "MeshTools",
    "ToolError",
    "ToolSpec",
    "error_result",
    "is_did",
    "peer_label",
    "strict_schema",
]
