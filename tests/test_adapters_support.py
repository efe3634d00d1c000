"""Helpers shared by the adapter tests (no tests here): agents on the dev relay, and a check
that a JSON Schema is valid in OpenAI strict mode."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agt_mesh.adapters import AdapterConfig, MeshTools
from agt_mesh.core.identity import Identity
from agt_mesh.dev.server import DevMesh
from agt_mesh.shell.client import MeshClient

# keywords OpenAI's strict mode does not accept (validation belongs in the handler)
_STRICT_UNSUPPORTED = {
    "minLength",
    "maxLength",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "multipleOf",
    "minItems",
    "maxItems",
    "uniqueItems",
    "default",
    "oneOf",
    "allOf",
    "not",
    "if",
    "then",
    "else",
    "patternProperties",
}


def strict_problems(schema: Any, path: str = "$") -> list[str]:
    """What makes ``schema`` invalid for OpenAI strict mode (empty if valid)."""
    problems: list[str] = []
    if not isinstance(schema, dict):
        return [f"{path}: not an object"]
    for key in schema:
        if key in _STRICT_UNSUPPORTED:
            problems.append(f"{path}: unsupported keyword {key!r}")
    types = schema.get("type")
    type_list = types if isinstance(types, list) else [types]
    if not all(t in ("object", "string", "number", "integer", "boolean", "array", "null") for t in type_list):
        problems.append(f"{path}: bad type {types!r}")
    if "object" in type_list:
        props = schema.get("properties")
        if not isinstance(props, dict):
            problems.append(f"{path}: object without properties")
            props = {}
        if schema.get("additionalProperties") is not False:
            problems.append(f"{path}: additionalProperties must be false")
        if sorted(schema.get("required", [])) != sorted(props):
            problems.append(f"{path}: every property must be required")
        for name, sub in props.items():
            problems += strict_problems(sub, f"{path}.{name}")
    if "array" in type_list:
        problems += strict_problems(schema.get("items"), f"{path}[]")
    if "enum" in schema and "null" in type_list and None not in schema["enum"]:
        problems.append(f"{path}: a nullable enum must list null")
    return problems


#: the arguments each tool cannot do without; every other one is optional with a default
REQUIRED_ARGS = {
    "mesh_send": ["to", "content"],
    "mesh_inbox": [],
    "mesh_await": [],
    "mesh_transfer_file": ["to", "file_path"],
    "mesh_discover": [],
    "mesh_status": [],
}


def optional_problems(tool: str, schema: Any) -> list[str]:
    """What makes ``schema`` present an optional argument as mandatory (empty if fine): the
    plain form MCP clients, Hermes and OpenClaw get — only the real requirements listed, no
    nullable types, no null in enums, and each default of the declared type."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return [f"{tool}: parameters are not an object schema"]
    problems: list[str] = []
    props = schema.get("properties") or {}
    if sorted(schema.get("required") or []) != sorted(REQUIRED_ARGS[tool]):
        problems.append(f"{tool}: required {schema.get('required')} != {REQUIRED_ARGS[tool]}")
    py_types = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list}
    for name, sub in props.items():
        kind = sub.get("type")
        if isinstance(kind, list) or kind == "null" or sub.get("nullable"):
            problems.append(f"{tool}.{name}: nullable type {kind!r}")
        if None in (sub.get("enum") or []):
            problems.append(f"{tool}.{name}: enum lists null")
        if "default" in sub and not isinstance(sub["default"], py_types.get(kind, object)):
            problems.append(f"{tool}.{name}: default {sub['default']!r} is not a {kind}")
        if name not in REQUIRED_ARGS[tool] and "default" not in sub and "default" not in sub.get("description", ""):
            problems.append(f"{tool}.{name}: optional without a documented default")
    return problems


@dataclass
class Agent:
    client: MeshClient
    tools: MeshTools
    incoming: Path
    outbox: Path

    @property
    def name(self) -> str:
        assert self.client.display_name is not None
        return self.client.display_name


def make_client(mesh: DevMesh, name: str, **kw: Any) -> MeshClient:
    return MeshClient(
        Identity.generate(os.urandom),
        relay_url=mesh.relay_url,
        registry_url=mesh.registry_url,
        display_name=name,
        connect_timeout=5,
        **kw,
    )


@contextlib.asynccontextmanager
async def agents(tmp: Path, *names: str, **config: Any) -> AsyncIterator[tuple[DevMesh, list[Agent]]]:
    """A dev relay and one connected, tool-equipped agent per name (unique names)."""
    suffix = os.urandom(3).hex()
    async with DevMesh() as mesh:
        out: list[Agent] = []
        try:
            for name in names:
                client = make_client(mesh, f"{name}-{suffix}")
                await client.connect()
                incoming = tmp / f"incoming-{name}"
                outbox = tmp / f"outbox-{name}"
                tools = MeshTools(client, AdapterConfig(incoming_dir=incoming, files_root=outbox, **config))
                tools.start()
                out.append(Agent(client, tools, incoming, outbox))
            yield mesh, out
        finally:
            for agent in out:
                await agent.tools.close()
                await agent.client.disconnect()
