"""Connecting to NATS and creating the JetStream stream and buckets the replicas share."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.kv import KeyValue

__all__ = [
    "RETRY_FOR",
    "connect",
    "ensure_kv",
    "ensure_stream",
    "retrying",
    "token",
]

logger = logging.getLogger("agt_mesh.cluster")

#: How long a replica keeps retrying a JetStream operation that failed for a reason that
#: passes (a NATS node restarting, a stream leader being elected: typically 2-10 s).
#: Longer than that the client is better served by an error and its own retry.
RETRY_FOR = 30.0
#: Timeout of one JetStream request.  Elections take seconds; a request that has not
#: been answered in this long is retried (idempotently) rather than waited for.
REQUEST_TIMEOUT = 5.0

T = TypeVar("T")

#: Failures that pass on their own: no server answered, or the request timed out.
TRANSIENT: tuple[type[BaseException], ...] = (
    nats.errors.TimeoutError,
    nats.errors.NoRespondersError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.StaleConnectionError,
    nats.js.errors.ServiceUnavailableError,
    # js.publish's name for "no responders": the stream has no leader right now (a NATS
    # node died and the election is running).
    nats.js.errors.NoStreamResponseError,
    TimeoutError,
)


def token(text: str) -> str:
    """A NATS subject token / KV key for an arbitrary string (a DID, a capability).

    DIDs may contain ``.``, ``*``, ``>`` and spaces (legacy DIDs are caller-chosen), which
    subjects cannot; 128 bits of SHA-256 are unique for any realistic number of agents.
    """
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:32]


async def connect(servers: Sequence[str], name: str) -> NatsClient:
    """Connect to any of ``servers`` and keep reconnecting to whichever is up, forever."""

    async def on_error(exc: Exception) -> None:
        logger.warning("nats: %s", exc)

    async def on_disconnect() -> None:
        logger.warning("nats: disconnected; reconnecting")

    async def on_reconnect() -> None:
        logger.info("nats: reconnected")

    return await nats.connect(
        servers=list(servers),
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.25,
        connect_timeout=2,
        allow_reconnect=True,
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )


async def retrying(what: str, op: Callable[[], Awaitable[T]], *, retry_for: float = RETRY_FOR) -> T:
    """Run ``op`` until it succeeds, retrying transient failures for ``retry_for`` seconds.

    ``op`` must be idempotent (publishes carry a message id, KV writes expect a revision).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_for
    delay = 0.05
    while True:
        try:
            return await op()
        except TRANSIENT as exc:
            if loop.time() + delay > deadline:
                raise
            logger.info("%s: %s; retrying", what, type(exc).__name__)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or bring an existing one to ``config`` (limits may change)."""

    async def make() -> Any:
        try:
            return await js.add_stream(config)
        except nats.js.errors.BadRequestError:
            # Already exists with another configuration: update what may be updated.
            return await js.update_stream(config)

    await retrying(f"create stream {config.name}", make)


async def ensure_kv(js: JetStreamContext, config: KeyValueConfig) -> KeyValue:
    """Create (or open) a KV bucket."""

    async def make() -> KeyValue:
        try:
            return await js.create_key_value(config)
        except nats.js.errors.BadRequestError:
            return await js.key_value(config.bucket)

    return await retrying(f"create bucket {config.bucket}", make)


def file_storage() -> StorageType:
    return StorageType.FILE
