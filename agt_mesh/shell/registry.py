"""Asynchronous HTTP client for the AgentMesh (AGT) registry.

The transport follows the TypeScript SDK's ``RegistryClient`` (WIRE §6):

* the base URL loses its trailing ``/``; bodies are compact JSON with
  ``content-type: application/json``; header names are lowercase;
* every request carries ``authorization: Ed25519-Timestamp <did> <ts> <sig>`` (the AGT 5.x
  registry requires it on ``PUT /prekeys``, ``DELETE`` and ``heartbeat``; pre-POP registries
  ignore it);
* each attempt has its own deadline (``timeout``); network errors, timeouts and 5xx answers
  are retried ``retries`` times after ``retry_base_delay * 2**attempt`` seconds; any other
  status is handled at once.

Registration comes in two shapes (see :mod:`agt_mesh.core.registry_codec`): ``pop`` for AGT
5.x registries (the registry derives the DID from the Ed25519 key) and ``legacy`` for
pre-POP registries such as agentmesh-platform 3.7.  ``registration="auto"`` tries ``pop``
first and falls back to ``legacy`` once when the registry answers 422 (a pre-POP registry
rejects the POP body because it has no ``did``), then keeps using the shape that worked.

Errors never contain header values, tokens or private key material.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Literal

import httpx

from agt_mesh import __version__
from agt_mesh.core import registry_codec as codec
from agt_mesh.core.frames import iso_timestamp
from agt_mesh.core.identity import Identity
from agt_mesh.core.strict_json import loads_strict
from agt_mesh.core.x3dh import OneTimePreKey, PreKeyBundle, SignedPreKey
from agt_mesh.errors import (
    MalformedJsonError,
    MeshAuthError,
    MeshConfigError,
    MeshRegistryError,
    PeerNotFoundError,
)

__all__ = [
    "AgentRecord",
    "Registration",
    "RegistrationMode",
    "RegistrationShape",
    "RegistryClient",
    "claims_name",
]

logger = logging.getLogger("agt_mesh.registry")

RegistrationShape = Literal["pop", "legacy"]
RegistrationMode = Literal["auto", "pop", "legacy"]

#: The registry's ``limit`` bounds for ``GET /v1/discover``.
DISCOVER_LIMIT_MAX: Final = 200
#: Longest ``verification_token`` the AGT registry accepts.
VERIFICATION_TOKEN_MAX: Final = 8192

#: Largest registry answer read.  The biggest legitimate one is a full discover page: 200
#: records of a few KB each (a post-quantum key in the metadata is about 1.8 KB), well under
#: 2 MiB; a registry (or anything on a plain-http path to it) sending more is cut off, so
#: it cannot make the client buffer without bound.
MAX_RESPONSE_BYTES: Final = 4 * 1024 * 1024

_DETAIL_MAX = 200
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]+")
_RETRY_AFTER_RE = re.compile(r"retry after (\d+(?:\.\d+)?)\s*s", re.IGNORECASE)
_CLOCK_WORDS = ("timestamp", "replay", "window", "clock", "expired")


# --------------------------------------------------------------------------------------
# result types
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Registration:
    """The outcome of :meth:`RegistryClient.register`.

    ``created`` is False when the registry already knew the agent (HTTP 409) — the normal
    case after a restart of the agent (not of the registry).
    """

    did: str
    shape: RegistrationShape
    created: bool


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """An agent as the registry describes it (``GET /v1/agents/{did}`` or a discover hit).

    ``GET /v1/discover`` on the AGT registries returns no metadata, so ``metadata`` is empty
    for discover hits there.  ``raw`` is the record exactly as received.
    """

    did: str
    capabilities: tuple[str, ...]
    metadata: dict[str, Any] = field(hash=False)
    last_seen: str | None
    reputation_score: float | None
    raw: dict[str, Any] = field(repr=False, compare=False, hash=False)

    @property
    def display_name(self) -> str | None:
        """``metadata["display_name"]`` if it is a non-empty string, else None."""
        value = self.metadata.get("display_name")
        return value if isinstance(value, str) and value else None

    @classmethod
    def from_json(cls, obj: Any) -> AgentRecord:
        """Build a record from a registry JSON object.

        Raises:
            MeshRegistryError: if ``obj`` is not an object or a field has the wrong type.
        """
        if not isinstance(obj, Mapping):
            raise MeshRegistryError("registry agent record is not a JSON object")
        did = obj.get("did")
        if not isinstance(did, str) or not did:
            raise MeshRegistryError("registry agent record has no 'did' string")
        caps = obj.get("capabilities")
        if caps is None:
            caps = []
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            raise MeshRegistryError(f"registry record of {did}: 'capabilities' is not a string list")
        meta = obj.get("metadata")
        if meta is None:
            meta = {}
        if not isinstance(meta, Mapping):
            raise MeshRegistryError(f"registry record of {did}: 'metadata' is not an object")
        last_seen = obj.get("last_seen")
        if last_seen is not None and not isinstance(last_seen, str):
            raise MeshRegistryError(f"registry record of {did}: 'last_seen' is not a string")
        score = obj.get("reputation_score")
        if score is not None and (isinstance(score, bool) or not isinstance(score, int | float)):
            raise MeshRegistryError(f"registry record of {did}: 'reputation_score' is not a number")
        return cls(
            did=did,
            capabilities=tuple(caps),
            metadata=dict(meta),
            last_seen=last_seen,
            reputation_score=float(score) if score is not None else None,
            raw=dict(obj),
        )


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------


def _clip(text: str, limit: int = _DETAIL_MAX) -> str:
    text = _CONTROL_RE.sub(" ", text).strip()
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _detail(response: httpx.Response) -> str:
    """A short, safe description of an error body (FastAPI ``detail`` when present).

    Validation errors are summarised as ``loc: msg`` only: FastAPI also echoes the
    offending ``input``, which may be a token, so that is never used.
    """
    try:
        body = loads_strict(response.content, max_bytes=MAX_RESPONSE_BYTES, what="registry answer")
    except MalformedJsonError:
        text = _clip(response.text) if response.content else ""
        return text or response.reason_phrase or "no detail"
    if isinstance(body, Mapping):
        detail = body.get("detail", body.get("error", body.get("message")))
        if isinstance(detail, str):
            return _clip(detail)
        if isinstance(detail, list):
            parts = []
            for item in detail[:4]:
                if isinstance(item, Mapping):
                    loc = item.get("loc")
                    where = ".".join(str(x) for x in loc) if isinstance(loc, list) else "?"
                    parts.append(f"{where}: {item.get('msg', 'invalid')}")
            if parts:
                return _clip("; ".join(parts))
    return response.reason_phrase or "no detail"


def _encode_json(body: Any) -> bytes:
    """Compact UTF-8 JSON like ``JSON.stringify``: non-ASCII as is, lone surrogates escaped."""
    try:
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        return text.encode()
    except UnicodeEncodeError:
        # A lone surrogate cannot be UTF-8; JSON.stringify writes it as a \uXXXX escape.
        return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


def _retry_after(response: httpx.Response, detail: str) -> float | None:
    header = response.headers.get("retry-after")
    if header:
        try:
            value = float(header)
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    match = _RETRY_AFTER_RE.search(detail)
    return float(match.group(1)) if match else None


def _freshness(record: AgentRecord) -> tuple[int, float]:
    """Sort key: records with a parseable ``last_seen`` first, newest first."""
    if record.last_seen:
        try:
            seen = datetime.fromisoformat(record.last_seen)
        except ValueError:
            return (1, 0.0)
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=UTC)
        return (0, -seen.timestamp())
    return (1, 0.0)


def claims_name(record: AgentRecord, name: str) -> bool:
    """Whether ``record`` claims display name ``name``: its ``metadata.display_name`` when it
    has one (the dev registry and ``GET /v1/agents``), else its capabilities (AGT discover
    answers carry no metadata; clients register the display name as a capability)."""
    shown = record.display_name
    return shown == name if shown is not None else name in record.capabilities


def _check_did(did: Any, what: str = "did") -> str:
    if not isinstance(did, str) or not did.strip():
        raise MeshConfigError(f"{what} must be a non-empty string")
    return did


def _check_capabilities(capabilities: Sequence[str]) -> list[str]:
    if isinstance(capabilities, str | bytes) or not isinstance(capabilities, Sequence):
        raise MeshConfigError("capabilities must be a sequence of strings (not a single string)")
    caps = list(capabilities)
    for cap in caps:
        if not isinstance(cap, str) or not cap:
            raise MeshConfigError("every capability must be a non-empty string")
    return caps


def _check_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(metadata, Mapping):
        raise MeshConfigError("metadata must be a mapping of strings to strings")
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise MeshConfigError("metadata keys and values must be strings (the AGT registry rejects others)")
        out[key] = value
    return out


def _auth_hint(detail: str) -> str:
    lowered = detail.lower()
    if "not registered" in lowered:
        return (
            "the registry does not know this DID (never registered, or the registry restarted "
            "and lost its in-memory state): call register() again"
        )
    if any(word in lowered for word in _CLOCK_WORDS):
        return (
            "the signed timestamp is outside the registry's ±5 min window: check the system "
            "clock (it must be within 5 minutes of the registry's)"
        )
    if "mismatch" in lowered or "does not match" in lowered:
        return "the authenticated DID is not the DID this request acts on"
    if "signature" in lowered or "proof" in lowered:
        return (
            "the signature did not verify against the key the registry holds for this DID "
            "(a different identity registered it?); also check the system clock"
        )
    return (
        "likely causes: the system clock is off by more than ±5 min (check the system clock), "
        "or the identity does not match the registered DID"
    )


# --------------------------------------------------------------------------------------
# the client
# --------------------------------------------------------------------------------------


class RegistryClient:
    """Async client for the AgentMesh registry HTTP API.

    Use it as an async context manager, or call :meth:`aclose` when done::

        async with RegistryClient("http://127.0.0.1:8082", identity) as registry:
            await registry.register(["alice"], {"display_name": "alice"})
            await registry.upload_prekeys(spk, otks)
    """

    def __init__(
        self,
        base_url: str,
        identity: Identity,
        *,
        timeout: float = 10.0,
        retries: int = 2,
        retry_base_delay: float = 0.25,
        registration: RegistrationMode = "auto",
        clock: Callable[[], float] = time.time,
        transport: httpx.AsyncBaseTransport | None = None,
        user_agent: str = f"kars-agt-mesh/{__version__}",
    ) -> None:
        """Create the client (no request is made yet).

        Args:
            base_url: ``http(s)://host[:port][/prefix]``; a trailing ``/`` is removed.
            identity: our long-term identity (signs the POP proof and the auth header).
            timeout: seconds allowed for each attempt (connect to last body byte).
            retries: extra attempts after a network error, timeout or 5xx answer.
            retry_base_delay: the delay before retry ``n`` (0-based) is this times ``2**n``.
            registration: ``auto`` (POP, then legacy on 422), ``pop`` or ``legacy``.
            clock: epoch seconds; used for the POP proof and auth timestamps.
            transport: an httpx transport (tests pass ``httpx.MockTransport``).
            user_agent: the ``user-agent`` header.

        Raises:
            MeshConfigError: for an invalid URL or option.
        """
        if not isinstance(base_url, str):
            raise MeshConfigError("the registry URL must be a string")
        base = base_url.strip().rstrip("/")
        try:
            parsed = httpx.URL(base)
        except (httpx.InvalidURL, TypeError, ValueError):
            raise MeshConfigError(f"invalid registry URL {base_url!r}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise MeshConfigError(f"invalid registry URL {base_url!r}: expected http://host[:port] or https://...")
        if parsed.query or parsed.fragment:
            raise MeshConfigError(f"the registry URL {base_url!r} must not have a query or fragment")
        if not isinstance(identity, Identity):
            raise MeshConfigError("identity must be an agt_mesh Identity")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float):
            raise MeshConfigError("timeout must be a number of seconds")
        if not (math.isfinite(timeout) and timeout > 0):
            raise MeshConfigError("timeout must be a positive, finite number of seconds")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise MeshConfigError("retries must be an integer >= 0")
        if isinstance(retry_base_delay, bool) or not isinstance(retry_base_delay, int | float):
            raise MeshConfigError("retry_base_delay must be a number of seconds")
        if not (math.isfinite(retry_base_delay) and retry_base_delay >= 0):
            raise MeshConfigError("retry_base_delay must be a finite number >= 0")
        if registration not in ("auto", "pop", "legacy"):
            raise MeshConfigError("registration must be 'auto', 'pop' or 'legacy'")

        self._base_url = base
        self._identity = identity
        self._did = identity.did
        self._timeout = float(timeout)
        self._retries = retries
        self._retry_base_delay = float(retry_base_delay)
        self._mode: RegistrationMode = registration
        self._shape: RegistrationShape | None = None if registration == "auto" else registration
        self._registration: Registration | None = None
        self._clock = clock
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(self._timeout),
            # Lowercase names, as the TypeScript SDK (fetch) sends them.
            headers={
                "accept": "*/*",
                "accept-encoding": "gzip, deflate",
                "connection": "keep-alive",
                "user-agent": user_agent,
            },
            transport=transport,
            follow_redirects=False,
        )

    # -- properties --------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The registry base URL, without a trailing ``/``."""
        return self._base_url

    @property
    def did(self) -> str:
        """Our DID: ``identity.did``, or the DID the registry returned on registration."""
        return self._did

    @property
    def shape(self) -> RegistrationShape | None:
        """The registration shape in use (``None`` while ``auto`` has not registered yet)."""
        return self._shape

    @property
    def registration(self) -> Registration | None:
        """The last successful :meth:`register` result, if any."""
        return self._registration

    # -- lifecycle ---------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._client.aclose()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- transport ---------------------------------------------------------------------

    def _auth_value(self) -> str:
        return codec.auth_header(self._identity, self._did, iso_timestamp(self._clock()))

    async def _send(self, method: str, path: str, *, body: Any = None, auth: bool = True) -> httpx.Response:
        """Send with per-attempt deadline and retries; return the last response.

        A 5xx answer is returned (after the retries) for the caller to map; 4xx at once.

        Raises:
            MeshRegistryError: (``status=None``) when every attempt failed at the network
                level or timed out.
        """
        url = self._base_url + path
        content = None if body is None else _encode_json(body)
        attempts = self._retries + 1
        reason = ""
        for attempt in range(attempts):
            headers: dict[str, str] = {}
            if content is not None:
                headers["content-type"] = "application/json"
            if auth:
                headers["authorization"] = self._auth_value()
            request = self._client.build_request(method, url, content=content, headers=headers)
            try:
                async with asyncio.timeout(self._timeout):
                    response = await self._read_bounded(request)
            except (TimeoutError, httpx.TimeoutException):
                reason = f"timed out after {self._timeout:g} s"
            except httpx.TransportError as exc:
                text = _clip(str(exc))
                reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
            except httpx.HTTPError as exc:
                raise MeshRegistryError(
                    f"registry request {method} {path} failed: {type(exc).__name__}: {_clip(str(exc))}"
                ) from None
            else:
                if response.status_code < 500 or attempt + 1 == attempts:
                    return response
                reason = f"HTTP {response.status_code}"
            if attempt + 1 < attempts:
                delay = self._retry_base_delay * (2**attempt)
                logger.debug(
                    "registry %s %s: %s; retry %d/%d in %.3f s",
                    method,
                    path,
                    reason,
                    attempt + 1,
                    self._retries,
                    delay,
                )
                await asyncio.sleep(delay)
        raise MeshRegistryError(
            f"registry at {self._base_url} is unreachable: {method} {path} failed after "
            f"{attempts} attempt(s) ({reason}); check the registry URL and that the registry "
            "is running",
            status=None,
        )

    async def _read_bounded(self, request: httpx.Request) -> httpx.Response:
        """Send ``request`` and read at most :data:`MAX_RESPONSE_BYTES` of the answer.

        Raises:
            MeshRegistryError: the answer is larger (nothing of it is used).
        """
        response = await self._client.send(request, stream=True)
        try:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_RESPONSE_BYTES:
                    raise MeshRegistryError(
                        f"registry answer to {request.method} {request.url.raw_path.decode()} exceeds "
                        f"{MAX_RESPONSE_BYTES} bytes; refusing it (is the URL really an AgentMesh registry?)"
                    )
        finally:
            await response.aclose()
        return httpx.Response(response.status_code, headers=response.headers, content=bytes(body), request=request)

    def _error(self, response: httpx.Response, what: str) -> MeshRegistryError | MeshAuthError:
        """Map a non-success response to the exception to raise."""
        status = response.status_code
        detail = _detail(response)
        method, path = response.request.method, response.request.url.raw_path.decode()
        prefix = f"registry {what} ({method} {path}) failed: HTTP {status} ({detail})"
        if status in (401, 403):
            return MeshAuthError(f"{prefix}: {_auth_hint(detail)}")
        if status == 429:
            after = _retry_after(response, detail)
            hint = f"retry after {after:g} s" if after is not None else "retry later"
            return MeshRegistryError(f"{prefix}: rate limited; {hint}", status=429)
        if status >= 500:
            return MeshRegistryError(f"{prefix}; gave up after {self._retries + 1} attempt(s)", status=status)
        return MeshRegistryError(prefix, status=status)

    @staticmethod
    def _json(response: httpx.Response, what: str, *, allow_empty: bool = False) -> Any:
        """The JSON body of a 2xx response.

        Raises:
            MeshRegistryError: if it is not valid JSON (or empty when that is not allowed).
        """
        if not response.content.strip():
            if allow_empty:
                return None
            raise MeshRegistryError(
                f"registry {what}: HTTP {response.status_code} with an empty body",
                status=response.status_code,
            )
        try:
            return loads_strict(response.content, max_bytes=MAX_RESPONSE_BYTES, what="registry answer")
        except MalformedJsonError:
            raise MeshRegistryError(
                f"registry {what}: HTTP {response.status_code} with a body that is not valid "
                "JSON (is the URL really an AgentMesh registry?)",
                status=response.status_code,
            ) from None

    @classmethod
    def _json_object(cls, response: httpx.Response, what: str, *, allow_empty: bool = False) -> dict[str, Any]:
        body = cls._json(response, what, allow_empty=allow_empty)
        if body is None:
            return {}
        if not isinstance(body, dict):
            raise MeshRegistryError(
                f"registry {what}: HTTP {response.status_code} with a JSON body that is not an object",
                status=response.status_code,
            )
        return body

    # -- registration --------------------------------------------------------------------

    def _register_body(self, shape: RegistrationShape, caps: list[str], meta: dict[str, str]) -> dict[str, Any]:
        if shape == "pop":
            stamp = iso_timestamp(self._clock())
            return codec.register_body_pop(self._identity, stamp, caps, meta)
        return codec.register_body_legacy(self._identity.did, self._identity, caps, meta)

    async def register(self, capabilities: Sequence[str], metadata: Mapping[str, str]) -> Registration:
        """Register this agent (``POST /v1/agents``).

        An already registered agent (HTTP 409) is a success with ``created=False``.  With
        ``registration="auto"`` a 422 answer to the POP body (a pre-POP registry) is
        retried once with the legacy body; the shape that worked is kept for later calls.
        On a POP registration the DID the registry returns becomes :attr:`did`.

        Raises:
            MeshConfigError: if ``capabilities`` or ``metadata`` are not strings.
            MeshAuthError: on 401/403 (bad proof, or a clock off by more than ±5 min).
            MeshRegistryError: for any other failure (status in ``.status``; ``None`` when
                the registry is unreachable).
        """
        caps = _check_capabilities(capabilities)
        meta = _check_metadata(metadata)
        shapes: list[RegistrationShape] = [self._shape] if self._shape else ["pop", "legacy"]
        pop_rejection: str | None = None
        for index, shape in enumerate(shapes):
            body = self._register_body(shape, caps, meta)
            response = await self._send("POST", "/v1/agents", body=body)
            status = response.status_code
            if status == 422 and shape == "pop" and index + 1 < len(shapes):
                pop_rejection = _detail(response)
                logger.info(
                    "registry rejected the POP registration body (422: %s); retrying with the legacy (pre-POP) body",
                    pop_rejection,
                )
                continue
            if status in (200, 201):
                reply = self._json_object(response, "register", allow_empty=True)
                did = reply.get("did")
                if not isinstance(did, str) or not did:
                    did = self._identity.did
                if did != self._identity.did:
                    logger.warning(
                        "registry assigned DID %s, not the key-derived %s; using the registry's",
                        did,
                        self._identity.did,
                    )
                return self._registered(did, shape, created=True)
            if status == 409:
                return self._registered(self._identity.did, shape, created=False)
            error = self._error(response, "register")
            if pop_rejection is not None and status == 422:
                raise MeshRegistryError(
                    f"registry rejected both registration shapes: POP body → 422 "
                    f"({pop_rejection}); legacy body → 422 ({_detail(response)})",
                    status=422,
                )
            raise error
        raise AssertionError("unreachable")  # pragma: no cover

    def _registered(self, did: str, shape: RegistrationShape, *, created: bool) -> Registration:
        self._did = did
        self._shape = shape
        self._registration = Registration(did=did, shape=shape, created=created)
        return self._registration

    # -- pre-keys ----------------------------------------------------------------------

    async def upload_prekeys(self, spk: SignedPreKey, otks: Sequence[OneTimePreKey]) -> int | None:
        """Publish our pre-key bundle (``PUT /v1/agents/{did}/prekeys``).

        This **replaces** the stored bundle and the whole one-time pre-key list.

        Returns:
            The registry's one-time pre-key count (``otk_count``), or None if it gave none.

        Raises:
            MeshAuthError: on 401/403 (not registered on an AGT 5.x registry, clock skew).
            MeshRegistryError: 404 when the registry does not know our DID (register
                first); other failures with their status.
        """
        body = codec.prekey_upload_body(self._identity, spk, otks)
        path = codec.prekeys_path(self._did)
        response = await self._send("PUT", path, body=body)
        if response.is_success:
            reply = self._json_object(response, "upload_prekeys", allow_empty=True)
            count = reply.get("otk_count")
            return count if isinstance(count, int) and not isinstance(count, bool) else None
        if response.status_code == 404:
            raise MeshRegistryError(
                f"registry does not know {self._did} ({_detail(response)}): call register() "
                "before upload_prekeys() (a registry restart loses every registration)",
                status=404,
            )
        raise self._error(response, "upload_prekeys")

    async def fetch_bundle(self, did: str) -> PreKeyBundle:
        """Fetch a peer's pre-key bundle (``GET /v1/agents/{did}/prekeys``).

        The registry hands out (and deletes) one one-time pre-key per fetch, oldest first;
        once none are left ``one_time_pre_key`` is None and X3DH runs without it (3-DH).
        The bundle's signature is not checked here: call :meth:`PreKeyBundle.verify`.

        Raises:
            MeshConfigError: if ``did`` is empty.
            PeerNotFoundError: on 404 (the peer is not registered or has no pre-keys).
            MeshRegistryError: for a malformed bundle or any other failure.
        """
        _check_did(did)
        response = await self._send("GET", codec.prekeys_path(did))
        if response.status_code == 404:
            raise PeerNotFoundError(
                f"no pre-key bundle for {did}: the peer is not registered with this registry "
                "or has not uploaded pre-keys yet",
                status=404,
            )
        if not response.is_success:
            raise self._error(response, "fetch_bundle")
        return codec.parse_bundle(self._json(response, "fetch_bundle"), did=did)

    # -- lookups -----------------------------------------------------------------------

    async def get_agent(self, did: str) -> AgentRecord | None:
        """Look an agent up by DID (``GET /v1/agents/{did}``); None if it is unknown.

        Raises:
            MeshConfigError: if ``did`` is empty.
            MeshRegistryError: for a malformed record or a failure other than 404.
        """
        _check_did(did)
        response = await self._send("GET", codec.agent_path(did))
        if response.status_code == 404:
            return None
        if not response.is_success:
            raise self._error(response, "get_agent")
        return AgentRecord.from_json(self._json(response, "get_agent"))

    async def discover(self, capability: str, *, limit: int = 50) -> list[AgentRecord]:
        """Agents registered with exactly this capability, freshest ``last_seen`` first.

        Raises:
            MeshConfigError: if ``capability`` is empty or ``limit`` is not in 1..200.
            MeshRegistryError: for a malformed answer or a failed request.
        """
        if not isinstance(capability, str) or not capability:
            raise MeshConfigError("capability must be a non-empty string")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= DISCOVER_LIMIT_MAX:
            raise MeshConfigError(f"limit must be an integer from 1 to {DISCOVER_LIMIT_MAX}")
        response = await self._send("GET", codec.discover_path(capability, limit))
        if not response.is_success:
            raise self._error(response, "discover")
        body = self._json_object(response, "discover")
        results = body.get("results")
        if not isinstance(results, list):
            raise MeshRegistryError("registry discover answer has no 'results' list", status=response.status_code)
        records = [AgentRecord.from_json(item) for item in results]
        records.sort(key=_freshness)
        return records

    async def find_all_by_display_name(self, name: str) -> list[AgentRecord]:
        """Every agent claiming display name ``name`` exactly, freshest first (one per DID).

        Agents publish their display name as a capability (the TypeScript SDK registers
        ``displayName`` first), so this discovers by ``name`` and keeps exact claims only
        (:func:`claims_name`).  The registry vouches for none of them: a name is a claim
        anyone can make (``MeshClient.resolve`` decides which DID a name means).

        Raises:
            MeshConfigError: if ``name`` is empty.
            MeshRegistryError: if the discover request fails.
        """
        if not isinstance(name, str) or not name:
            raise MeshConfigError("name must be a non-empty string")
        out: dict[str, AgentRecord] = {}
        for record in await self.discover(name, limit=DISCOVER_LIMIT_MAX):
            if claims_name(record, name):
                out.setdefault(record.did, record)
        return list(out.values())

    async def find_by_display_name(self, name: str) -> AgentRecord | None:
        """The freshest agent claiming display name ``name`` exactly, or None.

        A lookup only — it decides nothing about trust: several agents may claim the name
        (:meth:`find_all_by_display_name`); ``MeshClient.resolve`` refuses to guess.

        Raises:
            MeshConfigError: if ``name`` is empty.
            MeshRegistryError: if the discover request fails.
        """
        found = await self.find_all_by_display_name(name)
        return found[0] if found else None

    # -- presence, tier, removal -------------------------------------------------------

    async def heartbeat(self) -> None:
        """Refresh our ``last_seen`` (``POST /v1/agents/{did}/heartbeat``).

        The registry accepts one heartbeat per 10 s; a throttled one (429) is not an error.

        Raises:
            MeshAuthError: on 401/403 (on AGT 5.x also when the DID is not registered).
            MeshRegistryError: 404 when the registry does not know us; other failures.
        """
        path = codec.agent_path(self._did) + "/heartbeat"
        response = await self._send("POST", path)
        if response.is_success:
            return
        if response.status_code == 429:
            logger.debug("registry heartbeat throttled (%s)", _detail(response))
            return
        if response.status_code == 404:
            raise MeshRegistryError(
                f"registry does not know {self._did}: register() again (a registry restart loses every registration)",
                status=404,
            )
        raise self._error(response, "heartbeat")

    async def verify_tier(self, token: str) -> dict[str, Any]:
        """Upgrade to the verified tier with an Entra token (``POST /v1/registry/verify``).

        Sends ``{"amid": did, "verification_token": token}``; the token never appears in
        errors or logs.

        Returns:
            The registry's answer (``did``, ``tier``, ``verified_app_id`` ...).

        Raises:
            MeshConfigError: for an empty or over-long token.
            MeshAuthError: when the registry rejects the token (401/403).
            MeshRegistryError: 404 (not registered, or the registry has no verify endpoint),
                503 (verification not configured), 500 and others.
        """
        if not isinstance(token, str) or not token:
            raise MeshConfigError("the verification token must be a non-empty string")
        if len(token) > VERIFICATION_TOKEN_MAX:
            raise MeshConfigError(f"the verification token is longer than {VERIFICATION_TOKEN_MAX} characters")
        body = {"amid": self._did, "verification_token": token}
        response = await self._send("POST", "/v1/registry/verify", body=body)
        if response.is_success:
            return self._json_object(response, "verify_tier")
        status, detail = response.status_code, _detail(response)
        if status == 404:
            if detail == "Not Found":
                message = "this registry has no /v1/registry/verify endpoint (a pre-5.0 registry?)"
            else:
                message = f"the registry does not know {self._did} ({detail}): register() first"
            raise MeshRegistryError(f"registry verify_tier failed: {message}", status=404)
        if status == 401:
            raise MeshAuthError(
                f"registry verify_tier failed: HTTP 401 ({detail}): the token was rejected "
                "(invalid, expired, wrong audience or tenant), or the system clock is off"
            )
        if status == 503:
            raise MeshRegistryError(
                f"registry verify_tier failed: HTTP 503 ({detail}): identity verification is "
                "not configured on this registry",
                status=503,
            )
        raise self._error(response, "verify_tier")

    async def delete(self) -> None:
        """Deregister this agent (``DELETE /v1/agents/{did}``); idempotent.

        An agent the registry does not know is not an error: 404, and on AGT 5.x the
        401 "Agent not registered" its auth check gives first, both count as deleted.

        Raises:
            MeshAuthError: on any other 401/403 (clock skew, DID mismatch).
            MeshRegistryError: for any other failure.
        """
        response = await self._send("DELETE", codec.agent_path(self._did))
        gone = response.status_code == 404 or (
            response.status_code == 401 and "not registered" in _detail(response).lower()
        )
        if response.is_success or gone:
            self._registration = None
            return
        raise self._error(response, "delete")
