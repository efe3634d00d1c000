"""Settings every front end reads from the environment the same way.

One relay-token variable everywhere — the CLI, ``agt-mesh mcp``, the bridge and the Hermes
plugin: ``AGENTMESH_RELAY_TOKEN``, the name the AGT relay itself uses for its shared secret.
``AGT_RELAY_TOKEN`` (what the MCP server and the Hermes plugin used to read) still works as a
deprecated alias and warns once per process.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping

__all__ = ["DEPRECATED_RELAY_TOKEN_ENV", "RELAY_TOKEN_ENV", "relay_token_from_env"]

#: the relay's shared secret (as on the AGT relay itself)
RELAY_TOKEN_ENV = "AGENTMESH_RELAY_TOKEN"
#: the old name, read only when RELAY_TOKEN_ENV is unset
DEPRECATED_RELAY_TOKEN_ENV = "AGT_RELAY_TOKEN"

log = logging.getLogger("agt_mesh")
_warned = False


def relay_token_from_env(environ: Mapping[str, str] | None = None) -> str | None:
    """The relay token from ``AGENTMESH_RELAY_TOKEN`` (else the deprecated ``AGT_RELAY_TOKEN``,
    with a warning), or None.  The token itself is never logged."""
    global _warned
    env = os.environ if environ is None else environ
    token = env.get(RELAY_TOKEN_ENV)
    if token:
        return token
    old = env.get(DEPRECATED_RELAY_TOKEN_ENV)
    if not old:
        return None
    if not _warned:
        _warned = True
        message = f"{DEPRECATED_RELAY_TOKEN_ENV} is deprecated: set {RELAY_TOKEN_ENV} instead"
        warnings.warn(message, FutureWarning, stacklevel=2)
        log.warning(message)
    return old
