"""Start and stop relay + registry servers as loopback subprocesses for tests.

Three kinds, one interface (:class:`ServerPair` with ``relay_url``/``registry_url``):

* ``agt-5.0.0``  — the real ``agent-governance-toolkit-core[server]==5.0.0`` (POP enforced)
* ``agt-3.7.0``  — the real ``agentmesh-platform[server]==3.7.0`` (pre-POP)
* ``dev``        — this SDK's embedded relay/registry (``python -m agt_mesh relay``)
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "interop"))

import agt_venvs  # noqa: E402

KINDS = ("agt-5.0.0", "agt-3.7.0", "dev")
_VENV = {"agt-5.0.0": "core-5.0.0", "agt-3.7.0": "platform-3.7.0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=0.5) as resp:
                resp.read()
                return
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server at {url} did not become healthy: {log.read_text()[-2000:]}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class ServerPair:
    kind: str
    relay_url: str = ""
    registry_url: str = ""
    env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    _files: list[IO[bytes]] = field(default_factory=list)

    @property
    def pop_enforced(self) -> bool:
        return self.kind in ("agt-5.0.0", "dev")

    def _spawn(self, argv: list[str], name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = Path(tempfile.mkstemp(prefix=f"agt-{name}-", suffix=".log")[1])
        fh = log.open("wb")
        self._files.append(fh)
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **self.env}, cwd=ROOT)
        self.procs.append(proc)
        self.logs.append(log)
        return proc, log

    def start(self) -> ServerPair:
        if self.kind == "dev":
            rp, gp = free_port(), free_port()
            proc, log = self._spawn(
                [
                    sys.executable,
                    "-m",
                    "agt_mesh",
                    "relay",
                    "--host",
                    "127.0.0.1",
                    "--relay-port",
                    str(rp),
                    "--registry-port",
                    str(gp),
                    *self.extra_args,
                ],
                "dev",
            )
            self.relay_url, self.registry_url = f"http://127.0.0.1:{rp}", f"http://127.0.0.1:{gp}"
            wait_healthy(self.relay_url, proc, log)
            wait_healthy(self.registry_url, proc, log)
            return self
        py = str(agt_venvs.ensure(_VENV[self.kind]))
        for module in ("agentmesh.relay", "agentmesh.registry"):
            port = free_port()
            proc, log = self._spawn(
                [
                    py,
                    "-W",
                    "ignore",
                    "-m",
                    module,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--log-level",
                    "warning",
                ],
                module.split(".")[1],
            )
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, proc, log)
            if module.endswith("relay"):
                self.relay_url = url
            else:
                self.registry_url = url
        return self

    def stop(self) -> None:
        for proc in self.procs:
            stop(proc)
        for fh in self._files:
            with contextlib.suppress(Exception):
                fh.close()
        self.procs.clear()

    def restart_relay(self) -> None:
        """Kill and restart the relay on the same port (its in-memory store is lost)."""
        if self.kind == "dev":
            raise NotImplementedError("restart the dev relay in-process instead")
        port = int(self.relay_url.rsplit(":", 1)[1])
        relay = self.procs[0]
        stop(relay)
        py = str(agt_venvs.ensure(_VENV[self.kind]))
        proc, log = self._spawn(
            [
                py,
                "-W",
                "ignore",
                "-m",
                "agentmesh.relay",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            "relay",
        )
        self.procs[0] = proc
        wait_healthy(self.relay_url, proc, log)

    def relay_health(self) -> dict[str, object]:
        with urllib.request.urlopen(self.relay_url + "/health", timeout=2) as resp:
            return dict(json.loads(resp.read()))
