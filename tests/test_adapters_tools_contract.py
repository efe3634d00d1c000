"""The tool surface as hosts and models see it, pinned: every schema (plain, strict, OpenAI),
every time budget, and how each argument is read for a battery of inputs — values, aliases,
nulls, wrong types, strings for numbers and booleans, out-of-range numbers, and pairs of them
(which error wins).

``tests/fixtures/tool_contract.json`` was recorded from the tools as they were before the
argument declarations (``agt_mesh.adapters.tools.args``) replaced the per-handler checks, so
this test is what says the declarations changed nothing.  A deliberate change to the surface
is re-recorded with ``AGT_RECORD_RESULTS=1`` (then review the diff: it is what every host
registers and every model reads).  Nothing here touches the network: the client is never
connected.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from agt_mesh.adapters import AdapterConfig, MeshTools
from agt_mesh.core.identity import Identity
from agt_mesh.errors import MeshToolError
from agt_mesh.shell.client import MeshClient

FIXTURE = Path(__file__).parent / "fixtures" / "tool_contract.json"
RECORD = os.environ.get("AGT_RECORD_RESULTS") == "1"


def _tools(tmp: Path, **config: Any) -> MeshTools:
    client = MeshClient(
        Identity.generate(os.urandom),
        relay_url="http://127.0.0.1:9",
        registry_url="http://127.0.0.1:9",
        display_name="me",
    )
    return MeshTools(client, AdapterConfig(files_root=tmp / "OUTBOX", incoming_dir=tmp / "INCOMING", **config))


def _placeholders(value: Any, tools: MeshTools) -> Any:
    """``value`` with the file directories (they live in a temporary directory) as placeholders."""
    text = json.dumps(value, ensure_ascii=False)
    for path, mark in ((tools.roots.outbox, "<OUTBOX>"), (tools.roots.incoming, "<INCOMING>")):
        text = text.replace(json.dumps(str(path), ensure_ascii=False)[1:-1], mark)
    return json.loads(text)


def _parse(tools: MeshTools, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    try:
        return tools.spec(tool).args.parse(args)
    except MeshToolError as exc:
        return {"error": {"kind": exc.kind, "message": exc.message}}


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON, types included (``90`` is not ``90.0`` on the wire)."""
    return json.dumps(a, ensure_ascii=False) == json.dumps(b, ensure_ascii=False)


def _write(contract: dict[str, Any]) -> None:
    parsing = contract.pop("parsing")
    text = json.dumps({**contract, "parsing": []}, indent=1, ensure_ascii=False)
    lines = ",\n".join(json.dumps(case, ensure_ascii=False) for case in parsing)
    FIXTURE.write_text(text.replace('"parsing": []', '"parsing": [\n' + lines + "\n ]") + "\n")


def test_tool_surface_matches_the_recorded_contract(tmp_path: Path) -> None:
    want = json.loads(FIXTURE.read_text())
    tools = _tools(tmp_path / "default")
    default_specs = _placeholders(
        [
            {"name": s.name, "description": s.description, "parameters": s.parameters, "openai_tool": s.openai_tool()}
            for s in tools.specs()
        ],
        tools,
    )
    tools = _tools(tmp_path / "custom", **want["config"])
    specs = _placeholders(
        [
            {
                "name": s.name,
                "description": s.description,
                "parameters": s.parameters,
                "strict_parameters": s.strict_parameters,
                "function_schema": s.function_schema(),
                "function_schema_strict": s.function_schema("x_" + s.name, strict=True),
                "openai_tool": s.openai_tool(),
            }
            for s in tools.specs()
        ],
        tools,
    )
    budgets = [{**b, "seconds": tools.spec(b["tool"]).max_seconds(b["args"])} for b in want["budgets"]]
    parsing = [[tool, args, _parse(tools, tool, args)] for tool, args, _ in want["parsing"]]
    got = {**want, "default_specs": default_specs, "specs": specs, "budgets": budgets, "parsing": parsing}
    if RECORD:
        _write(got)
        return
    for key in ("default_specs", "specs", "budgets"):
        assert _same(got[key], want[key]), f"{key} differ from {FIXTURE.name}"
    differ = [(w[0], w[1], w[2], g[2]) for w, g in zip(want["parsing"], parsing, strict=True) if not _same(w, g)]
    assert differ == [], f"{len(differ)} of {len(parsing)} argument cases differ, e.g. {differ[:3]}"
    assert len(parsing) > 1000 and sum("error" in case[2] for case in parsing) > 500


def test_time_budgets_never_raise_on_bad_arguments(tmp_path: Path) -> None:
    """Hosts ask for the budget before the call: a bad value counts as its default there, and
    the call reports it."""
    for spec in _tools(tmp_path).specs():
        for bad in ({"timeout_seconds": "soon"}, {"await_reply": "maybe"}, {"limit": [1]}, {"from": 7}):
            seconds = spec.max_seconds(bad)
            assert 0 < seconds <= 3600 and seconds == spec.max_seconds({}), (spec.name, bad)


def test_descriptions_state_the_declared_defaults_and_bounds(tmp_path: Path) -> None:
    tools = _tools(tmp_path / "{odd} {default} dir", await_timeout=12.5, max_await=99)
    prop = tools.spec("mesh_await").parameters["properties"]["timeout_seconds"]
    assert prop["default"] == 12.5 and "(default 12.5, at most 99)" in prop["description"]
    assert tools.spec("mesh_await").args.parse({"timeout_seconds": 1e6})["timeout_seconds"] == 99.0
    # braces in a directory name are text, not format fields
    path = tools.spec("mesh_transfer_file").parameters["properties"]["file_path"]["description"]
    assert "{odd} {default} dir" in path
