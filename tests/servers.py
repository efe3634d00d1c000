"""Start and stop relay + registry servers as loopback subprocesses for tests.

Four kinds, one interface (:class:`ServerPair` with ``relay_url``/``registry_url``):

* ``agt-5.0.0``  — the real ``agent-governance-toolkit-core[server]==5.0.0`` (POP enforced)
* ``agt-3.7.0``  — the real ``agentmesh-platform[server]==3.7.0`` (pre-POP)
* ``dev``        — this SDK's embedded relay/registry (``python -m agt_mesh relay``)
* ``cluster``    — this SDK's cluster relay/registry: a 3-node NATS JetStream cluster
  (:class:`NatsCluster`) and two relay plus two registry replicas
  (``python -m agt_mesh relay --nats ... --serve relay|registry``).  ``relay_urls`` /
  ``registry_urls`` list the replicas; :meth:`ServerPair.urls` hands consecutive clients
  alternate replicas, so the two sides of a conversation sit on different ones.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
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

KINDS = ("agt-5.0.0", "agt-3.7.0", "dev", "cluster")
#: Relay and registry replicas of the ``cluster`` kind.
CLUSTER_REPLICAS = 2
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


def _wait_http_ok(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=0.5) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not become ready: {log.read_text()[-2000:]}")


class NatsCluster:
    """A JetStream cluster of ``size`` ``nats-server`` processes on 127.0.0.1.

    Random free ports, store directories under a temp dir, the pinned server binary
    (``interop/agt_venvs.py``).  ``max_payload`` is raised to 17 MiB so that frames up to
    AGT's 16 MiB limit fit in one NATS message.
    """

    def __init__(self, size: int = 3) -> None:
        self.size = size
        self.root = Path(tempfile.mkdtemp(prefix="agt-nats-"))
        self.client_ports = [free_port() for _ in range(size)]
        self.cluster_ports = [free_port() for _ in range(size)]
        self.http_ports = [free_port() for _ in range(size)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size
        self.logs: list[Path] = [self.root / f"n{i}.log" for i in range(size)]

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{p}" for p in self.client_ports]

    def _config(self, i: int) -> Path:
        routes = ", ".join(f"nats-route://127.0.0.1:{p}" for j, p in enumerate(self.cluster_ports) if j != i)
        conf = self.root / f"n{i}.conf"
        conf.write_text(
            f"""server_name: n{i}
listen: 127.0.0.1:{self.client_ports[i]}
http: 127.0.0.1:{self.http_ports[i]}
max_payload: 17825792
jetstream {{
  store_dir: "{self.root / f"store{i}"}"
  max_memory_store: 268435456
  max_file_store: 4294967296
}}
cluster {{
  name: agt-mesh-test
  listen: 127.0.0.1:{self.cluster_ports[i]}
  routes: [{routes}]
}}
"""
        )
        return conf

    def start_node(self, i: int) -> None:
        binary = agt_venvs.nats_server()
        fh = self.logs[i].open("ab")
        self.procs[i] = subprocess.Popen([str(binary), "-c", str(self._config(i))], stdout=fh, stderr=subprocess.STDOUT)
        fh.close()

    def wait_ready(self, i: int, timeout: float = 30.0) -> None:
        proc = self.procs[i]
        assert proc is not None
        _wait_http_ok(f"http://127.0.0.1:{self.http_ports[i]}/healthz", proc, self.logs[i], timeout)

    def start(self) -> NatsCluster:
        for i in range(self.size):
            self.start_node(i)
        for i in range(self.size):
            self.wait_ready(i)
        return self

    def kill_node(self, i: int) -> None:
        """SIGKILL node ``i`` (its store directory stays, as after a crash)."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def restart_node(self, i: int) -> None:
        self.kill_node(i)
        self.start_node(i)
        self.wait_ready(i)

    def stop(self) -> None:
        for proc in self.procs:
            if proc is not None:
                stop(proc)
        shutil.rmtree(self.root, ignore_errors=True)


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
    relay_urls: list[str] = field(default_factory=list)
    registry_urls: list[str] = field(default_factory=list)
    nats: NatsCluster | None = None
    #: cluster kind: the replica processes, in the order of ``relay_urls``/``registry_urls``
    relay_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    registry_procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    #: cluster kind: relay and registry replicas to start
    replicas: int = CLUSTER_REPLICAS
    _next: int = 0

    @property
    def pop_enforced(self) -> bool:
        return self.kind in ("agt-5.0.0", "dev", "cluster")

    def urls(self, index: int | None = None) -> tuple[str, str]:
        """``(relay_url, registry_url)`` for a client: replica ``index``, or else the next
        replica in turn (the cluster kind has two of each; other kinds have one)."""
        if not self.relay_urls:
            return self.relay_url, self.registry_url
        if index is None:
            index, self._next = self._next, self._next + 1
        return self.relay_urls[index % len(self.relay_urls)], self.registry_urls[index % len(self.registry_urls)]

    def _spawn_replica(self, role: str, port: int) -> tuple[subprocess.Popen[bytes], Path]:
        assert self.nats is not None
        flag = "--relay-port" if role == "relay" else "--registry-port"
        return self._spawn(
            [
                sys.executable,
                "-m",
                "agt_mesh",
                "relay",
                "--nats",
                ",".join(self.nats.urls),
                "--serve",
                role,
                "--host",
                "127.0.0.1",
                flag,
                str(port),
                "--log-level",
                "warning",
                *self.extra_args,
            ],
            f"cluster-{role}",
        )

    def _start_cluster(self) -> ServerPair:
        self.nats = NatsCluster().start()
        started: list[tuple[str, subprocess.Popen[bytes], Path]] = []
        for role in ("registry", "relay"):
            for _ in range(self.replicas):
                port = free_port()
                proc, log = self._spawn_replica(role, port)
                url = f"http://127.0.0.1:{port}"
                started.append((url, proc, log))
                (self.relay_urls if role == "relay" else self.registry_urls).append(url)
                (self.relay_procs if role == "relay" else self.registry_procs).append(proc)
        for url, proc, log in started:
            wait_healthy(url, proc, log, timeout=60.0)
        self.relay_url, self.registry_url = self.relay_urls[0], self.registry_urls[0]
        return self

    def kill_relay_replica(self, index: int) -> None:
        """SIGKILL relay replica ``index`` (nothing is flushed)."""
        proc = self.relay_procs[index]
        proc.kill()
        proc.wait()

    def restart_relay_replica(self, index: int) -> None:
        """Start relay replica ``index`` again on its port (after :meth:`kill_relay_replica`)."""
        url = self.relay_urls[index]
        proc, log = self._spawn_replica("relay", int(url.rsplit(":", 1)[1]))
        self.relay_procs[index] = proc
        wait_healthy(url, proc, log, timeout=60.0)

    def _spawn(self, argv: list[str], name: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = Path(tempfile.mkstemp(prefix=f"agt-{name}-", suffix=".log")[1])
        fh = log.open("wb")
        self._files.append(fh)
        proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **self.env}, cwd=ROOT)
        self.procs.append(proc)
        self.logs.append(log)
        return proc, log

    def start(self) -> ServerPair:
        if self.kind == "cluster":
            return self._start_cluster()
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
        if self.nats is not None:
            self.nats.stop()
            self.nats = None

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
