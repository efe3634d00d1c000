"""A tool as the hosts see it, and failures as the model sees them.

A :class:`ToolSpec` is a name, a description, the declared arguments
(:class:`~agt_mesh.adapters.tools.args.Args`) and what runs: ``run(parsed_args) -> dict``.
Its schemas, its parser and its time budget all come from the one declaration.

A tool never raises into the host: :func:`error_for` turns any failure into
``{"error": {"kind": ..., "message": ...}}``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from agt_mesh.adapters.tools.args import Args, strict_schema
from agt_mesh.errors import (
    MeshAuthError,
    MeshConfigError,
    MeshError,
    MeshRegistryError,
    MeshToolError,
    MeshTransportError,
    PeerNotFoundError,
)

__all__ = ["Budget", "Run", "ToolSpec", "error_for", "error_result"]

log = logging.getLogger("agt_mesh.adapters")

#: ``run(parsed) -> result``: the tool's work, given its parsed arguments.
Run = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
#: ``budget(parsed) -> seconds``: how long the tool may run for those arguments.
Budget = Callable[[dict[str, Any]], float]

#: The ``kind`` the model is shown for the SDK's own errors (the first class that matches).
_KINDS: tuple[tuple[type[MeshError], str], ...] = (
    (PeerNotFoundError, "peer_not_found"),
    (MeshConfigError, "invalid_argument"),
    (MeshAuthError, "auth"),
    (MeshTransportError, "transport"),
    (MeshRegistryError, "registry"),
    (MeshError, "mesh"),
)


def error_result(kind: str, message: str) -> dict[str, Any]:
    return {"error": {"kind": kind, "message": message}}


def error_for(exc: Exception, tool: str) -> dict[str, Any]:
    """The result reporting ``exc`` from ``tool``.  An unexpected exception is named by its
    class only: its details (which may name local paths) stay in the local log."""
    if isinstance(exc, MeshToolError):
        return error_result(exc.kind, exc.message)
    for cls, kind in _KINDS:
        if isinstance(exc, cls):
            return error_result(kind, str(exc))
    if isinstance(exc, TimeoutError):
        return error_result("timeout", f"{tool} timed out")
    log.warning("tool %s failed: %s", tool, type(exc).__name__)
    log.debug("tool %s failure", tool, exc_info=exc)
    return error_result("internal", f"{tool} failed with an internal error ({type(exc).__name__})")


def _default_budget(args: dict[str, Any]) -> float:
    return 120.0


@dataclass(frozen=True)
class ToolSpec:
    """One tool: what the model sees (name, description, parameters) and what runs.

    :meth:`max_seconds` bounds how long the tool may run for given arguments, so a
    synchronous host can put a matching timeout around it (and cancel on expiry).
    """

    name: str
    description: str
    args: Args
    run: Run = field(repr=False)
    budget: Budget = field(repr=False, default=_default_budget)

    @property
    def parameters(self) -> dict[str, Any]:
        """The plain JSON Schema of the arguments (optional ones with their defaults)."""
        return self.args.schema()

    @property
    def strict_parameters(self) -> dict[str, Any]:
        """``parameters`` in OpenAI strict form (see :func:`strict_schema`)."""
        return strict_schema(self.parameters)

    def function_schema(self, name: str | None = None, *, strict: bool = False) -> dict[str, Any]:
        """``{"name", "description", "parameters"}`` — Hermes' ``schema`` and OpenAI's ``function``
        (plain optional parameters, or the strict form)."""
        params = self.strict_parameters if strict else self.parameters
        return {"name": name or self.name, "description": self.description, "parameters": params}

    def openai_tool(self, name: str | None = None) -> dict[str, Any]:
        """The Chat Completions tool definition, strict mode on."""
        return {"type": "function", "function": {**self.function_schema(name, strict=True), "strict": True}}

    async def handler(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Parse ``args`` and run the tool.

        Raises:
            MeshToolError: ``invalid_argument`` (or whatever the tool raises).
        """
        return await self.run(self.args.parse(args))

    def max_seconds(self, args: Mapping[str, Any]) -> float:
        """The time budget for ``args`` (never raises: a bad value counts as its default,
        and the call itself reports it)."""
        return self.budget(self.args.parse_leniently(args))
