"""The canonical tool set end to end through the dev relay: schemas, send/inbox/await,
replies and progress, roster, discovery, status and error results."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

from test_adapters_support import agents, optional_problems, strict_problems

from agt_mesh.adapters import envelopes as envs
from agt_mesh.adapters.responder import AutoResponder, TaskRequest

TOOL_NAMES = ["mesh_send", "mesh_inbox", "mesh_await", "mesh_transfer_file", "mesh_discover", "mesh_status"]


async def test_schemas_plain_optional_and_openai_strict(tmp_path: Path) -> None:
    async with agents(tmp_path, "a") as (_, [a]):
        specs = a.tools.specs()
        assert [s.name for s in specs] == TOOL_NAMES
        for spec in specs:
            # one definition, two forms: plain optional arguments with defaults for MCP, Hermes
            # and OpenClaw; the derived strict form for OpenAI-style consumers
            assert optional_problems(spec.name, spec.parameters) == [], spec.name
            assert optional_problems(spec.name, spec.function_schema()["parameters"]) == []
            assert strict_problems(spec.strict_parameters) == [], spec.name
            tool = spec.openai_tool()
            assert tool["type"] == "function" and tool["function"]["strict"] is True
            assert strict_problems(tool["function"]["parameters"]) == [], spec.name
            assert set(spec.function_schema()) == {"name", "description", "parameters"}
            for arg, prop in spec.parameters["properties"].items():
                strict = spec.strict_parameters["properties"][arg]
                assert strict["description"] == prop["description"]
                assert ("null" in strict["type"]) == (arg not in spec.parameters["required"])
            assert 40 < len(spec.description) < 1024
            json.dumps(tool)  # plain JSON


async def test_declared_defaults_are_the_handlers_defaults(tmp_path: Path) -> None:
    """Leaving an optional argument out, passing null and passing its declared default agree."""
    async with agents(tmp_path, "alice", "bob") as (_, [a, b]):
        inbox = a.tools.spec("mesh_inbox").parameters["properties"]
        assert inbox["mode"]["default"] == "peek" and inbox["mode"]["enum"] == ["peek", "consume"]
        for i in range(3):
            await b.tools.call("mesh_send", {"to": a.name, "content": f"m{i}"})
        got = await a.tools.call("mesh_await", {"from": [b.name], "timeout_seconds": 10})
        assert got["status"] == "all_received"
        for i in range(3, 6):
            await b.tools.call("mesh_send", {"to": a.name, "content": f"m{i}"})
        for _ in range(100):
            if len((await a.tools.call("mesh_inbox", {}))["messages"]) == 3:
                break
            await asyncio.sleep(0.05)
        views = [
            await a.tools.call("mesh_inbox", args)
            for args in ({}, {"mode": None, "limit": None}, {"mode": inbox["mode"]["default"], "limit": 20})
        ]
        assert [[m["content"] for m in v["messages"]] for v in views] == [["m3", "m4", "m5"]] * 3


async def test_send_inbox_peek_consume_and_await_by_name(tmp_path: Path) -> None:
    async with agents(tmp_path, "alice", "bob") as (_, [a, b]):
        r = await a.tools.call("mesh_send", {"to": b.name, "content": "hello bob", "await_reply": None})
        assert r["status"] == "delivered_via_agt_relay" and r["to"] == b.name and r["to_did"] == b.client.did
        # await by display name (kars' kars_mesh_await never matched names)
        got = await b.tools.call("mesh_await", {"from": [a.name], "timeout_seconds": 10})
        assert got["status"] == "all_received" and got["missing"] == []
        (m,) = got["messages"]
        assert (m["from"], m["from_name"], m["type"], m["content"]) == (
            a.client.did,
            a.name,
            "task_request",
            "hello bob",
        )
        assert m["request_id"] == r["request_id"]
        # consumed by the await: the inbox is empty now
        assert (await b.tools.call("mesh_inbox", {}))["count"] == 0

        await a.tools.call("mesh_send", {"to": b.client.did, "content": "second"})
        await a.tools.call("mesh_send", {"to": b.name, "content": "third"})
        for _ in range(100):
            if len(b.client.inbox) == 2:
                break
            await asyncio.sleep(0.05)
        peek = await b.tools.call("mesh_inbox", {"mode": "peek", "limit": 1})
        assert peek["count"] == 1 and peek["more"] == 1 and peek["messages"][0]["new"] is True
        again = await b.tools.call("mesh_inbox", {"mode": None, "limit": None, "from": a.name})
        assert [x["content"] for x in again["messages"]] == ["second", "third"]
        assert [x["new"] for x in again["messages"]] == [False, True]
        eaten = await b.tools.call("mesh_inbox", {"mode": "consume"})
        assert eaten["count"] == 2
        assert (await b.tools.call("mesh_inbox", {}))["count"] == 0


async def test_await_barrier_partial_timeout_and_any(tmp_path: Path) -> None:
    async with agents(tmp_path, "lead", "w1", "w2") as (_, [lead, w1, w2]):
        await w1.tools.call("mesh_send", {"to": lead.name, "content": "w1 done"})
        part = await lead.tools.call("mesh_await", {"from": [w1.name, w2.name], "timeout_seconds": 1})
        assert part["status"] == "partial_timeout" and part["missing"] == [w2.name]
        assert [m["content"] for m in part["messages"]] == ["w1 done"]
        # a waiting await wakes up when the message arrives
        waiter = asyncio.create_task(lead.tools.call("mesh_await", {"from": None, "timeout_seconds": 10}))
        await asyncio.sleep(0.2)
        await w2.tools.call("mesh_send", {"to": lead.name, "content": "w2 done"})
        got = await waiter
        assert got["status"] == "received" and [m["content"] for m in got["messages"]] == ["w2 done"]
        none = await lead.tools.call("mesh_await", {"from": ["nobody-registered-this"], "timeout_seconds": 0.3})
        assert none["status"] == "timeout" and none["unknown_names"] == ["nobody-registered-this"]


async def test_cancelled_await_loses_nothing(tmp_path: Path) -> None:
    async with agents(tmp_path, "a", "b") as (_, [a, b]):
        task = asyncio.create_task(
            b.tools.call("mesh_await", {"from": [a.name, "someone-else"], "timeout_seconds": 30})
        )
        await a.tools.call("mesh_send", {"to": b.name, "content": "keep me"})
        await asyncio.sleep(0.3)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        inbox = await b.tools.call("mesh_inbox", {})
        assert [m["content"] for m in inbox["messages"]] == ["keep me"]


async def test_send_await_reply_with_progress_resetting_idle_timeout(tmp_path: Path) -> None:
    async with agents(tmp_path, "asker", "worker") as (_, [a, w]):

        async def slow(req: TaskRequest, progress: Any) -> str:
            for i in range(6):  # 1.5 s of work, longer than the asker's 0.6 s idle timeout
                await asyncio.sleep(0.25)
                await progress("streaming", f"step {i}")
            return f"done: {req.content} (for {req.sender_name})"

        responder = AutoResponder(w.tools, slow, allow=[a.client.did], progress_interval=0.1, heartbeat=0.2)
        responder.attach()
        r = await a.tools.call(
            "mesh_send", {"to": w.name, "content": "work", "await_reply": True, "timeout_seconds": 0.6}
        )
        assert r["status"] == "delivered_and_replied", r
        assert r["reply"] == f"done: work (for {a.name})" and r["ok"] is True
        assert r["progress_updates"] >= 3 and r["waited_seconds"] > 1.0
        # nothing internal (progress ticks, the reply) is left in either inbox
        assert (await a.tools.call("mesh_inbox", {}))["count"] == 0
        assert (await w.tools.call("mesh_inbox", {}))["count"] == 0

        # without progress the idle timeout wins: delivered, not replied, and the late reply shows up later
        async def silent(req: TaskRequest, progress: Any) -> str:
            await asyncio.sleep(1.0)
            return "late answer"

        responder.respond = silent
        responder.heartbeat = 60
        r2 = await a.tools.call(
            "mesh_send", {"to": w.name, "content": "again", "await_reply": True, "timeout_seconds": 0.3}
        )
        assert r2["status"] == "delivered_via_agt_relay" and "no reply" in r2["note"]
        late = await a.tools.call("mesh_await", {"from": [w.name], "timeout_seconds": 10})
        (m,) = late["messages"]
        assert (m["type"], m["content"], m["request_id"], m["ok"]) == (
            "task_response",
            "late answer",
            r2["request_id"],
            True,
        )


async def test_responder_loop_guard_rate_limit_and_busy(tmp_path: Path) -> None:
    async with agents(tmp_path, "x", "y") as (_, [x, y]):
        calls: list[str] = []

        async def answer(req: TaskRequest, progress: Any) -> str:
            calls.append(req.content)
            await asyncio.sleep(0.05)
            return "ok " + req.content

        # both sides auto-respond: answers are task_responses and are never answered again
        AutoResponder(x.tools, answer, allow=[y.client.did]).attach()
        ry = AutoResponder(y.tools, answer, allow=[x.client.did], max_per_peer=2, window=60)
        ry.attach()
        r = await x.tools.call("mesh_send", {"to": y.name, "content": "1", "await_reply": True, "timeout_seconds": 5})
        assert r["reply"] == "ok 1"
        # a reply-shaped request (in_reply_to set) is not auto-answered
        await x.client.send(
            y.client.did, {**envs.task_request("not me", "rid-x", from_agent=x.name), "in_reply_to": "z"}
        )
        await asyncio.sleep(0.3)
        assert calls == ["1"]
        assert ry.stats["ignored_reply"] == 1
        # rate limit: 2 per minute per peer; the third gets one RATE_LIMITED answer
        r = await x.tools.call("mesh_send", {"to": y.name, "content": "2", "await_reply": True, "timeout_seconds": 5})
        assert r["reply"] == "ok 2"
        r = await x.tools.call("mesh_send", {"to": y.name, "content": "3", "await_reply": True, "timeout_seconds": 5})
        assert r["ok"] is False and r["reply"].startswith("RATE_LIMITED")
        assert calls == ["1", "2"]
        assert ry.stats["rate_limited"] == 1
        await asyncio.sleep(0.2)
        assert (await x.tools.call("mesh_inbox", {}))["count"] == 0  # no ping-pong left behind
        # y saw the reply-shaped request as an ordinary message
        assert [m["content"] for m in (await y.tools.call("mesh_inbox", {}))["messages"]] == ["not me"]


async def test_roster_block_prepended_for_two_or_more_siblings(tmp_path: Path) -> None:
    async with agents(tmp_path, "boss", "analyst") as (_, [boss, analyst]):
        boss.tools.config.roster = {analyst.name: "analyst", "writer-x": "writer", "viz-x": ""}
        await boss.tools.call("mesh_send", {"to": analyst.name, "content": "go"})
        got = await analyst.tools.call("mesh_await", {"from": [boss.name], "timeout_seconds": 10})
        text = got["messages"][0]["content"]
        assert text.startswith("Peer roster:")
        assert "\n  - viz-x\n  - writer-x — writer\n---\n" in text and analyst.name not in text
        assert text.endswith("---\ngo")
        # one sibling only: no block
        boss.tools.config.roster = {analyst.name: "analyst"}
        await boss.tools.call("mesh_send", {"to": analyst.name, "content": "plain"})
        got = await analyst.tools.call("mesh_await", {"from": [boss.name], "timeout_seconds": 10})
        assert got["messages"][0]["content"] == "plain"


async def test_peers_update_only_from_roster_sources(tmp_path: Path) -> None:
    async with agents(tmp_path, "ctl", "kid") as (_, [ctl, kid]):
        update = {"type": "peers_update", "peers": [{"name": "p1", "role": "r1"}, {"name": "p2"}]}
        await ctl.client.send(kid.client.did, update)
        got = await kid.tools.call("mesh_await", {"from": [ctl.name], "timeout_seconds": 10})
        assert got["messages"][0]["type"] == "peers_update" and kid.tools.config.roster == {}
        kid.tools.config.roster_sources = frozenset({ctl.client.did})  # a DID, never a name
        await ctl.client.send(kid.client.did, update)
        for _ in range(100):
            if kid.tools.config.roster:
                break
            await asyncio.sleep(0.05)
        assert kid.tools.config.roster == {"p1": "r1", "p2": ""}


async def test_discover_status_and_kars_string_payloads(tmp_path: Path) -> None:
    async with agents(tmp_path, "me", "you") as (_, [me, you]):
        found = await me.tools.call("mesh_discover", {"query": you.name, "limit": None})
        assert [(x["did"], x["name"]) for x in found["agents"]] == [(you.client.did, you.name)]
        by_did = await me.tools.call("mesh_discover", {"query": you.client.did})
        assert by_did["agents"][0]["did"] == you.client.did
        assert (await me.tools.call("mesh_discover", {"query": "no-such-capability-xyz"}))["count"] == 0
        # a kars Python peer sends JSON envelopes as JSON strings
        await you.client.send(me.client.did, json.dumps(envs.task_request("as a string", "r1", from_agent="you")))
        got = await me.tools.call("mesh_await", {"from": [you.client.did], "timeout_seconds": 10})
        assert got["messages"][0]["type"] == "task_request" and got["messages"][0]["content"] == "as a string"
        status = await me.tools.call("mesh_status", {})
        assert status["did"] == me.client.did and status["connected"] is True
        assert [s["name"] for s in status["sessions"]] == [you.name]
        known = await me.tools.call("mesh_discover", {"query": None})
        assert [x["name"] for x in known["agents"]] == [you.name]


async def test_errors_are_results_never_exceptions(tmp_path: Path) -> None:
    async with agents(tmp_path, "e") as (_, [e]):
        cases: list[tuple[str, Any, str]] = [
            ("mesh_send", {"to": "nobody-at-all-here", "content": "x"}, "peer_not_found"),
            ("mesh_send", {"to": "", "content": "x"}, "invalid_argument"),
            ("mesh_send", {"to": e.name, "content": "x"}, "invalid_argument"),  # ourselves
            ("mesh_send", {"to": "x", "content": "y", "timeout_seconds": "soon"}, "invalid_argument"),
            ("mesh_inbox", {"mode": "eat"}, "invalid_argument"),
            ("mesh_await", {"from": 7}, "invalid_argument"),
            ("mesh_transfer_file", {"to": "x"}, "invalid_argument"),
            ("nope", {}, "unknown_tool"),
            ("mesh_status", [1, 2], "invalid_argument"),
        ]
        for name, args, kind in cases:
            result = await e.tools.call(name, args)
            assert result["error"]["kind"] == kind, (name, args, result)
            assert result["error"]["message"]
        # kars argument aliases are accepted by the handlers
        r = await e.tools.call("mesh_send", {"to_agent": "nobody-at-all-here", "payload": "x"})
        assert r["error"]["kind"] == "peer_not_found"
