"""Development servers: a small AgentMesh relay and registry ("the embedded default").

They follow the wire behaviour of the official AgentMesh relay and registry so that code
developed against them works against the real ones.  They keep everything in memory,
listen on loopback by default and have no TLS: use them for development and tests only.

* :class:`~agt_mesh.dev.relay.DevRelay` — WebSocket relay (``/ws``) plus ``GET /health``.
* :class:`~agt_mesh.dev.registry.DevRegistry` — registry HTTP API (``/v1/...``).
* :class:`~agt_mesh.dev.server.DevMesh` — both together.
"""

from agt_mesh.dev.registry import DevRegistry, RegistryState
from agt_mesh.dev.relay import DevRelay, RelayState
from agt_mesh.dev.server import DevMesh, serve

__all__ = ["DevMesh", "DevRegistry", "DevRelay", "RegistryState", "RelayState", "serve"]
