"""The line-based JSON control protocol shared by the Python peers (standard library only).

Each stdin line is ``{"id": .., "cmd": "name", ...}``; the peer object's ``cmd_<name>``
coroutine handles it and the reply ``{"id": .., "ok": true, ...}`` (or ``"ok": false`` with
``"error"``) goes to stdout as one line.  Commands run concurrently; a command raising
``SystemExit`` (``quit``) ends the loop, after which ``cmd_quit_client`` is awaited.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import traceback
from typing import Any

log = logging.getLogger("interop.control")


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":"), ensure_ascii=False) + "\n")
    sys.stdout.flush()


async def handle(peer: Any, line: str) -> None:
    try:
        msg = json.loads(line)
    except ValueError as exc:
        emit({"id": None, "ok": False, "error": f"bad JSON: {exc}"})
        return
    mid, cmd = msg.get("id"), msg.get("cmd")
    fn = getattr(peer, f"cmd_{cmd}", None) if isinstance(cmd, str) else None
    if fn is None:
        emit({"id": mid, "ok": False, "error": f"unknown command {cmd}"})
        return
    try:
        out = await fn(msg)
    except SystemExit:
        emit({"id": mid, "ok": True})
        raise
    except Exception as exc:
        log.debug("command %s failed:\n%s", cmd, traceback.format_exc())
        reply: dict[str, Any] = {
            "id": mid,
            "ok": False,
            "error": f"{type(exc).__name__}: {exc.args[0] if exc.args else exc}",
        }
        if isinstance(exc, TimeoutError) and len(exc.args) > 1:
            reply["got"] = exc.args[1]
        emit(reply)
        return
    emit({"id": mid, "ok": True, **out})


async def serve(peer: Any) -> int:
    """Read commands from stdin until EOF or ``quit``; then close the peer's client."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks: set[asyncio.Task[None]] = set()
    stop = asyncio.Event()

    async def run(line: str) -> None:
        try:
            await handle(peer, line)
        except SystemExit:
            stop.set()

    async def read() -> None:
        while True:
            line = await reader.readline()
            if not line:
                break
            if line.strip():
                t = asyncio.create_task(run(line.decode()))
                tasks.add(t)
                t.add_done_callback(tasks.discard)
        stop.set()

    reader_task = asyncio.create_task(read())
    await stop.wait()
    reader_task.cancel()
    await peer.cmd_quit_client({})
    return 0
