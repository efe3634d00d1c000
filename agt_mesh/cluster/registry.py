"""A registry replica whose records live in a JetStream KV bucket.

The HTTP contract is :class:`agt_mesh.dev.registry.RegistryService` (the development
registry's front end: validation, ``Ed25519-Timestamp`` auth, quotas); only storage
differs.  Keys in the bucket ``mesh_registry``:

* ``agent.<token(did)>`` — the record (JSON), changed only by compare-and-set on its
  revision, so concurrent requests on different replicas never lose an update and a
  one-time pre-key popped by one replica is never handed out by another;
* ``cap.<token(capability)>.<token(did)>`` — the capability index ``discover`` reads
  (in the order the entries were written, i.e. registration order).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from functools import partial
from types import TracebackType
from typing import Any, TypeVar

import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js.api import KeyValueConfig
from nats.js.kv import KeyValue

from agt_mesh.cluster.jetstream import REQUEST_TIMEOUT, connect, ensure_kv, file_storage, retrying, token
from agt_mesh.dev.registry import (
    DEFAULT_HEARTBEAT_INTERVAL,
    DEFAULT_MAX_BODY_BYTES,
    AgentRecord,
    DevRegistry,
    RegistryBackend,
    RegistryService,
    record_from_json,
    record_to_json,
)

__all__ = ["DEFAULT_BUCKET", "ClusterRegistry", "KvBackend"]

logger = logging.getLogger("agt_mesh.cluster.registry")

DEFAULT_BUCKET = "mesh_registry"
#: Compare-and-set attempts before giving up on a record that keeps changing under us
#: (only a client hammering its own record concurrently gets near this).
MAX_CAS_ATTEMPTS = 50
#: Largest stored record: the request body limit plus room for the base64 of the keys.
MAX_RECORD_BYTES = 2 * DEFAULT_MAX_BODY_BYTES

T = TypeVar("T")


class KvBackend(RegistryBackend):
    """Registry records in a JetStream KV bucket (see the module docstring)."""

    def __init__(self, kv: KeyValue) -> None:
        self.kv = kv

    @staticmethod
    def _key(did: str) -> str:
        return f"agent.{token(did)}"

    async def _entry(self, did: str) -> tuple[AgentRecord, int] | None:
        try:
            entry = await retrying("registry get", lambda: self.kv.get(self._key(did)))
        except nats.js.errors.KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        record = record_from_json(json.loads(entry.value))
        if record.did != did:  # two DIDs with one 128-bit token: never in practice
            return None
        return record, entry.revision

    async def get(self, did: str) -> AgentRecord | None:
        found = await self._entry(did)
        return found[0] if found is not None else None

    async def create(self, record: AgentRecord) -> bool:
        value = json.dumps(record_to_json(record)).encode()
        try:
            await retrying("registry create", lambda: self.kv.create(self._key(record.did), value))
        except nats.js.errors.KeyWrongLastSequenceError:
            return False
        for cap in dict.fromkeys(record.capabilities):
            key = self._cap_key(cap, record.did)
            await retrying("registry index", partial(self.kv.put, key, b""))
        return True

    @staticmethod
    def _cap_key(capability: str, did: str) -> str:
        return f"cap.{token(capability)}.{token(did)}"

    async def update(self, did: str, change: Callable[[AgentRecord], T]) -> tuple[bool, T | None]:
        for _ in range(MAX_CAS_ATTEMPTS):
            found = await self._entry(did)
            if found is None:
                return False, None
            record, revision = found
            result = change(record)
            value = json.dumps(record_to_json(record)).encode()
            try:
                await retrying(
                    "registry update",
                    partial(self.kv.update, self._key(did), value, last=revision),
                )
            except nats.js.errors.KeyWrongLastSequenceError:
                continue  # changed by another request (on any replica) meanwhile: redo
            return True, result
        raise RuntimeError(f"record of {did} changed {MAX_CAS_ATTEMPTS} times during one update")

    async def delete(self, did: str) -> bool:
        found = await self._entry(did)
        if found is None:
            return False
        record, revision = found
        try:
            await retrying("registry delete", lambda: self.kv.delete(self._key(did), last=revision))
        except nats.js.errors.KeyWrongLastSequenceError:
            return await self.delete(did)
        for cap in dict.fromkeys(record.capabilities):
            key = self._cap_key(cap, did)
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                await retrying("registry unindex", partial(self.kv.delete, key))
        return True

    async def discover(self, capability: str, limit: int) -> list[AgentRecord]:
        prefix = f"cap.{token(capability)}."
        watcher = await retrying(
            "registry discover", lambda: self.kv.watch(prefix + "*", meta_only=True, ignore_deletes=True)
        )
        keys: list[str] = []
        try:
            async for entry in watcher:
                if entry is None:
                    break
                keys.append(entry.key)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]
        out: list[AgentRecord] = []
        wanted = {k[len(prefix) :] for k in keys}
        for key in keys:
            if len(out) >= limit:
                break
            did_tok = key[len(prefix) :]
            try:
                entry = await self.kv.get(f"agent.{did_tok}")
            except nats.js.errors.KeyNotFoundError:
                continue
            if entry.value is None:
                continue
            record = record_from_json(json.loads(entry.value))
            if capability in record.capabilities and token(record.did) in wanted:
                out.append(record)
        return out


class ClusterRegistry(DevRegistry):
    """A stateless registry replica: ``async with ClusterRegistry(["nats://..."]) as r``.

    Args:
        nats_servers: NATS URLs (any node of the cluster).
        host, port: where to listen (port 0: a free one).
        replicas: JetStream replicas of the bucket (3 survives one NATS node).
        bucket: KV bucket name (one per mesh).
        allow_legacy, heartbeat_interval, and the HTTP limits: as :class:`DevRegistry`.
    """

    def __init__(
        self,
        nats_servers: Sequence[str],
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        replicas: int = 3,
        bucket: str = DEFAULT_BUCKET,
        allow_legacy: bool = False,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        **http: Any,
    ) -> None:
        if not nats_servers:
            raise ValueError("at least one NATS server URL is needed")
        self._allow_legacy = allow_legacy
        self._heartbeat_interval = heartbeat_interval
        # The service is set up in start(), once the bucket is reachable.
        super().__init__(host, port, service=RegistryService(_NotStarted()), **http)
        self.nats_servers = list(nats_servers)
        self.replicas = replicas
        self.bucket = bucket
        self._nc: NatsClient | None = None

    async def start(self) -> str:
        if self._nc is None:
            self._nc = await connect(self.nats_servers, f"agt-mesh-registry-{os.urandom(6).hex()}")
            js = self._nc.jetstream(timeout=REQUEST_TIMEOUT)
            kv = await ensure_kv(
                js,
                KeyValueConfig(
                    bucket=self.bucket,
                    history=1,
                    replicas=self.replicas,
                    storage=file_storage(),
                    max_value_size=MAX_RECORD_BYTES,
                ),
            )
            self.service = RegistryService(
                KvBackend(kv), allow_legacy=self._allow_legacy, heartbeat_interval=self._heartbeat_interval
            )
        return await super().start()

    async def stop(self) -> None:
        await super().stop()
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    async def __aenter__(self) -> ClusterRegistry:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


class _NotStarted(RegistryBackend):
    """Placeholder backend until :meth:`ClusterRegistry.start` connects (never called)."""
