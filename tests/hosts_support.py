"""Helpers for the real-host tests (no tests here): environments for Hermes and OpenClaw that
cannot reach the internet, and a driver for a Hermes process that dispatches tools without a
model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent

#: every outbound HTTP(S) request of a host goes to a closed local port unless it is for the
#: loopback servers the test started: the hosts must never reach the internet from a test
NO_INTERNET = {
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "https_proxy": "http://127.0.0.1:9",
    "ALL_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost,::1",
    "no_proxy": "127.0.0.1,localhost,::1",
    "NODE_USE_ENV_PROXY": "1",
}

#: variables of the developer's shell that would leak into a host under test
_SCRUB = (
    "AGT_MESH_HOME",
    "AGT_RELAY_URL",
    "AGT_REGISTRY_URL",
    "AGT_MESH_NAME",
    "AGT_PROFILE",
    "AGENTMESH_RELAY_TOKEN",
    "AGT_RELAY_TOKEN",
    "HERMES_HOME",
    "PYTHONPATH",
    "VIRTUAL_ENV",
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "OPENROUTER_API_KEY",
)


def base_env(home: Path, **extra: str) -> dict[str, str]:
    """A clean environment with ``HOME=home`` and no way out to the internet."""
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    env.update(NO_INTERNET)
    env["HOME"] = str(home)
    env["PATH"] = "/usr/local/bin:/usr/bin:/bin"
    env.update(extra)
    return env


def hermes_env(
    home: Path,
    pythonpath: Path,
    *,
    relay_url: str,
    registry_url: str,
    name: str,
    incoming: Path,
    files_root: Path | None = None,
    **extra: str,
) -> dict[str, str]:
    """The environment of a Hermes process with the mesh plugin configured."""
    env = base_env(
        home.parent,
        HERMES_HOME=str(home),
        PYTHONPATH=str(pythonpath),
        AGT_RELAY_URL=relay_url,
        AGT_REGISTRY_URL=registry_url,
        AGT_MESH_NAME=name,
        KARS_INCOMING_DIR=str(incoming),
        PYTHONUNBUFFERED="1",
        **extra,
    )
    if files_root is not None:
        env["KARS_MESH_FILES_ROOT"] = str(files_root)
    return env


def hermes(python: Path, *args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the ``hermes`` command of the Hermes venv."""
    return subprocess.run(
        [str(python.parent / "hermes"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


class HermesDriver:
    """A Hermes process running ``tests/hermes_driver.py``: ``ready`` describes what Hermes
    loaded; :meth:`call` dispatches one tool through Hermes and returns its JSON result."""

    def __init__(self, python: Path, env: dict[str, str], *options: str) -> None:
        self.python = python
        self.env = env
        self.options = options
        self.proc: asyncio.subprocess.Process | None = None
        self.ready: dict[str, Any] = {}
        self.chatter: list[str] = []

    async def __aenter__(self) -> HermesDriver:
        self.proc = await asyncio.create_subprocess_exec(
            str(self.python),
            str(HERE / "hermes_driver.py"),
            *self.options,
            env=self.env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            limit=16 * 1024 * 1024,
        )
        self.ready = await self._next(180)
        assert self.ready.get("ready") is True, self.ready
        return self

    async def _next(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None

        async def read() -> dict[str, Any]:
            assert self.proc is not None and self.proc.stdout is not None
            while True:
                line = await self.proc.stdout.readline()
                if not line:
                    raise AssertionError("Hermes exited:\n" + "\n".join(self.chatter[-40:]))
                text = line.decode(errors="replace").rstrip("\n")
                if text.startswith("@@"):
                    data: dict[str, Any] = json.loads(text[2:])
                    return data
                self.chatter.append(text)

        return await asyncio.wait_for(read(), timeout)

    async def call(self, tool: str, args: dict[str, Any] | None = None, timeout: float = 120) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write((json.dumps({"tool": tool, "args": args or {}}) + "\n").encode())
        await self.proc.stdin.drain()
        result: dict[str, Any] = (await self._next(timeout))["result"]
        return result

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        if self.proc.stdin is not None:
            with contextlib.suppress(Exception):
                self.proc.stdin.close()
        try:
            assert self.proc.stdout is not None
            rest = await asyncio.wait_for(self.proc.stdout.read(), 30)
            self.chatter += rest.decode(errors="replace").splitlines()
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
