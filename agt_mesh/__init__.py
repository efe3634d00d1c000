"""kars-agt-mesh: end-to-end encrypted agent messaging over AgentMesh.

The public API is imported lazily (``from agt_mesh import MeshClient``), so importing the
package — and starting the CLI — stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Identity", "InboundMessage", "KdfProfile", "MeshClient", "__version__"]

_LAZY = {
    "MeshClient": "agt_mesh.shell.client",
    "InboundMessage": "agt_mesh.shell.inbox",
    "Identity": "agt_mesh.core.identity",
    "KdfProfile": "agt_mesh.core.x3dh",
}

if TYPE_CHECKING:
    from agt_mesh.core.identity import Identity
    from agt_mesh.core.x3dh import KdfProfile
    from agt_mesh.shell.client import MeshClient
    from agt_mesh.shell.inbox import InboundMessage


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'agt_mesh' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
