"""kars-agt-mesh: end-to-end encrypted agent messaging over AgentMesh."""

__version__ = "0.1.0"
