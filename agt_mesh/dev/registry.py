"""A small development registry that speaks the AgentMesh registry HTTP API.

It implements the endpoints clients use, with the status codes, error bodies and
checks of the official AgentMesh (AGT) registry, core 5.0.0 (``servers.md`` §7,
``wire.md`` §6): proof-of-possession registration, ``Ed25519-Timestamp`` request
authentication, pre-key bundles with one-time pre-keys handed out FIFO, discovery,
presence and a throttled heartbeat.  It is for development and tests; production uses
the AgentMesh registry.

The logic lives in :class:`RegistryState` (``handle(method, target, headers, body)`` →
:class:`HttpResult`, no I/O).  :class:`DevRegistry` is a minimal HTTP/1.1 server on
``asyncio.start_server`` around it (``Content-Length`` bodies, keep-alive), so the SDK
needs no web framework.

Binary values are base64url without padding; error bodies are ``{"detail": "..."}``,
and request-validation errors use FastAPI's 422 list shape
(``{"detail": [{"type", "loc", "msg", "input"}]}``).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as _dt
import email.utils
import json
import logging
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from types import TracebackType
from typing import Any, NoReturn, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

from agt_mesh.core.encoding import b64url_decode, b64url_encode
from agt_mesh.core.identity import did_from_ed25519
from agt_mesh.core.primitives import ed25519_verify
from agt_mesh.errors import MeshRegistryError

__all__ = [
    "AUTH_SCHEME",
    "DEFAULT_HEARTBEAT_INTERVAL",
    "DEFAULT_MAX_BODY_BYTES",
    "MAX_CAPABILITIES",
    "MAX_CAPABILITY_CHARS",
    "MAX_DID_CHARS",
    "MAX_METADATA_ENTRIES",
    "MAX_ONE_TIME_PRE_KEYS",
    "MAX_PRE_KEY_BYTES",
    "MAX_PROFILE_BYTES",
    "ONLINE_WINDOW",
    "REPLAY_WINDOW",
    "AgentRecord",
    "DevRegistry",
    "HttpResult",
    "MemoryBackend",
    "RegistryBackend",
    "RegistryService",
    "RegistryState",
    "record_from_json",
    "record_to_json",
]

logger = logging.getLogger("agt_mesh.dev.registry")

AUTH_SCHEME = "Ed25519-Timestamp"
#: Replay window for registration proofs and ``Ed25519-Timestamp`` headers (AGT: ±5 min).
REPLAY_WINDOW = 300.0
#: Minimum spacing of ``POST /heartbeat`` calls per agent (AGT: 10 s, its only rate
#: limit), so nobody can keep an offline agent looking online cheaply.
DEFAULT_HEARTBEAT_INTERVAL = 10.0
#: Presence counts an agent as online if it was seen this recently (AGT: 90 s).
ONLINE_WINDOW = 90.0
#: Largest request body (1 MiB): a bundle with hundreds of one-time pre-keys is ~30 KiB,
#: so this is generous while keeping a misbehaving client from filling memory.
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
#: Largest request head (request line plus headers), as common servers allow.
DEFAULT_MAX_HEADER_BYTES = 64 * 1024
#: How long an idle keep-alive connection is kept open.  Longer than the keep-alive
#: expiry of httpx (5 s) and undici/Node ``fetch`` (4 s), so the client always closes
#: first and never reuses a connection the server is closing.
DEFAULT_KEEP_ALIVE_TIMEOUT = 30.0
#: Time allowed to receive a request body once its head has arrived.
DEFAULT_REQUEST_TIMEOUT = 10.0
_MAX_LIMIT = 200

# Record quotas.  AGT has none; these keep one client from making its record (which every
# discover and pre-key fetch reads) or its pre-key list arbitrarily large.  The SDK and
# the TypeScript SDK stay far below them (a handful of capabilities, 20-100 pre-keys).
#: Capabilities per agent.
MAX_CAPABILITIES = 64
#: Characters of one capability (they are matched exactly by discover).
MAX_CAPABILITY_CHARS = 256
#: Metadata entries per agent.
MAX_METADATA_ENTRIES = 64
#: Bytes of the capabilities and metadata together, as compact JSON (16 KiB).
MAX_PROFILE_BYTES = 16 * 1024
#: Characters of a caller-chosen (legacy) DID; POP DIDs are 41 characters.
MAX_DID_CHARS = 512
#: One-time pre-keys in one uploaded bundle (the SDK uploads 20-100 at a time).
MAX_ONE_TIME_PRE_KEYS = 500
#: Bytes of one one-time pre-key entry as compact JSON: a classic entry is under 100, a
#: hybrid one carrying an ML-KEM-768 key (docs/pq.md) about 1.9 KB, an ML-KEM-1024 one ~2.5 KB.
MAX_PRE_KEY_BYTES = 4096

T = TypeVar("T")


def _utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


@dataclass(frozen=True, slots=True)
class HttpResult:
    """An HTTP response: status and JSON body (``None`` for no body, e.g. 204)."""

    status: int
    body: Any = None


class _HttpError(MeshRegistryError):
    """An error answer: ``status`` and FastAPI's ``detail`` (a string or a list of problems)."""

    status: int

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}", status=status)
        self.detail = detail


def _fail(status: int, detail: Any) -> NoReturn:
    raise _HttpError(status, detail)


def _problem(kind: str, loc: list[Any], msg: str, value: Any = None) -> dict[str, Any]:
    """One FastAPI/pydantic validation-error entry."""
    return {"type": kind, "loc": loc, "msg": msg, "input": value}


def _missing(loc: list[Any], value: Any = None) -> dict[str, Any]:
    return _problem("missing", loc, "Field required", value)


@dataclass(eq=False, slots=True)
class AgentRecord:
    """A registered agent and its pre-key bundle."""

    did: str
    #: The key request signatures are verified with (Ed25519) — or, for a legacy
    #: registration, whatever 32-byte key the client sent (npm 4.0.0 sends X25519).
    public_key: bytes
    capabilities: list[str]
    metadata: dict[str, str]
    registered_at: _dt.datetime
    last_seen: _dt.datetime
    #: Registered through the legacy (no proof) shape: requests about it are not
    #: authenticated, as on agentmesh-platform 3.7.0.
    legacy: bool = False
    identity_key: bytes | None = None
    identity_key_ed: bytes | None = None
    signed_pre_key: bytes | None = None
    signed_pre_key_signature: bytes | None = None
    signed_pre_key_id: int | None = None
    one_time_pre_keys: deque[dict[str, Any]] = field(default_factory=deque)
    last_heartbeat: _dt.datetime | None = None
    reputation_score: float = 0.5


def record_to_json(record: AgentRecord) -> dict[str, Any]:
    """A record as JSON-safe values (bytes as base64url), for stores outside the process."""

    def b(value: bytes | None) -> str | None:
        return None if value is None else b64url_encode(value)

    def t(value: _dt.datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    return {
        "did": record.did,
        "public_key": b(record.public_key),
        "capabilities": list(record.capabilities),
        "metadata": dict(record.metadata),
        "registered_at": t(record.registered_at),
        "last_seen": t(record.last_seen),
        "legacy": record.legacy,
        "identity_key": b(record.identity_key),
        "identity_key_ed": b(record.identity_key_ed),
        "signed_pre_key": b(record.signed_pre_key),
        "signed_pre_key_signature": b(record.signed_pre_key_signature),
        "signed_pre_key_id": record.signed_pre_key_id,
        "one_time_pre_keys": list(record.one_time_pre_keys),
        "last_heartbeat": t(record.last_heartbeat),
        "reputation_score": record.reputation_score,
    }


def record_from_json(obj: dict[str, Any]) -> AgentRecord:
    """The inverse of :func:`record_to_json`."""

    def b(value: Any) -> bytes | None:
        return None if value is None else b64url_decode(value)

    def t(value: Any) -> _dt.datetime | None:
        return None if value is None else _dt.datetime.fromisoformat(value)

    public_key, registered_at, last_seen = b(obj["public_key"]), t(obj["registered_at"]), t(obj["last_seen"])
    assert public_key is not None and registered_at is not None and last_seen is not None
    return AgentRecord(
        did=obj["did"],
        public_key=public_key,
        capabilities=list(obj["capabilities"]),
        metadata=dict(obj["metadata"]),
        registered_at=registered_at,
        last_seen=last_seen,
        legacy=bool(obj["legacy"]),
        identity_key=b(obj["identity_key"]),
        identity_key_ed=b(obj["identity_key_ed"]),
        signed_pre_key=b(obj["signed_pre_key"]),
        signed_pre_key_signature=b(obj["signed_pre_key_signature"]),
        signed_pre_key_id=obj["signed_pre_key_id"],
        one_time_pre_keys=deque(obj["one_time_pre_keys"]),
        last_heartbeat=t(obj["last_heartbeat"]),
        reputation_score=float(obj["reputation_score"]),
    )


def _parse_ts(text: str) -> _dt.datetime | None:
    """An ISO-8601 timestamp with an explicit offset (``Z`` accepted), else ``None``."""
    if len(text) > 64:
        return None
    try:
        ts = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return ts if ts.tzinfo is not None else None


class RegistryBackend:
    """Where a registry keeps its agent records (the storage half of :class:`RegistryService`).

    Every method is a coroutine so that a networked store (JetStream KV in
    ``agt_mesh.cluster``) and the in-memory one share the front end.  ``update`` applies
    ``change`` to the current record and stores the result atomically (compare-and-set
    where the store is shared): ``change`` may run more than once and may raise to
    abandon the update.
    """

    async def get(self, did: str) -> AgentRecord | None:
        raise NotImplementedError

    async def create(self, record: AgentRecord) -> bool:
        """Store a new record; ``False`` if the DID is already registered."""
        raise NotImplementedError

    async def update(self, did: str, change: Callable[[AgentRecord], T]) -> tuple[bool, T | None]:
        """``(found, change(record))``; the changed record is stored only when found."""
        raise NotImplementedError

    async def delete(self, did: str) -> bool:
        raise NotImplementedError

    async def discover(self, capability: str, limit: int) -> list[AgentRecord]:
        """Up to ``limit`` records with ``capability``, in registration order."""
        raise NotImplementedError


class MemoryBackend(RegistryBackend):
    """Records in a dict (registration order), for the development registry."""

    def __init__(self) -> None:
        self.agents: dict[str, AgentRecord] = {}

    async def get(self, did: str) -> AgentRecord | None:
        return self.agents.get(did)

    async def create(self, record: AgentRecord) -> bool:
        if record.did in self.agents:
            return False
        self.agents[record.did] = record
        return True

    async def update(self, did: str, change: Callable[[AgentRecord], T]) -> tuple[bool, T | None]:
        record = self.agents.get(did)
        if record is None:
            return False, None
        # Change a copy: a change that raises must leave the stored record as it was.
        draft = copy.deepcopy(record)
        result = change(draft)
        self.agents[did] = draft
        return True, result

    async def delete(self, did: str) -> bool:
        return self.agents.pop(did, None) is not None

    async def discover(self, capability: str, limit: int) -> list[AgentRecord]:
        out = []
        for record in self.agents.values():
            if capability in record.capabilities:
                out.append(record)
                if len(out) >= limit:
                    break
        return out


class RegistryService:
    """The registry's HTTP contract over a :class:`RegistryBackend`.

    It validates and authenticates requests exactly as AGT core 5.0.0 does and enforces
    the record quotas (capabilities, metadata, one-time pre-keys); the backend only
    stores.  ``handle(method, target, headers, body)`` → :class:`HttpResult`.

    Args:
        backend: where records live.
        allow_legacy: also accept the pre-POP registration body
            ``{did, public_key, capabilities, metadata}`` (agentmesh-platform 3.7.0 and
            npm 4.0.0 clients).  The DID is then caller-chosen and requests about that
            agent need no authentication, exactly as on 3.7.0 — so anyone can replace
            its pre-keys.  Off by default, as on AGT core 5.0.0.
        heartbeat_interval: minimum seconds between two heartbeats of one agent.
        now: clock returning an aware UTC ``datetime``.
    """

    def __init__(
        self,
        backend: RegistryBackend,
        *,
        allow_legacy: bool = False,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        replay_window: float = REPLAY_WINDOW,
        now: Callable[[], _dt.datetime] = _utcnow,
    ) -> None:
        self.backend = backend
        self.allow_legacy = allow_legacy
        self.heartbeat_interval = heartbeat_interval
        self.replay_window = replay_window
        self._now = now

    # -- dispatch --------------------------------------------------------------------

    async def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> HttpResult:
        """Answer one request.  ``headers`` must have lower-case names."""
        try:
            return await self._dispatch(method.upper(), target, headers, body)
        except _HttpError as exc:
            return HttpResult(exc.status, {"detail": exc.detail})

    async def _dispatch(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> HttpResult:
        parts = urlsplit(target)
        try:
            segs = [unquote(s, errors="strict") for s in parts.path.split("/")]
        except UnicodeDecodeError:
            _fail(404, "Not Found")
        auth = headers.get("authorization")
        # "", "v1", "agents", "<did>", ...
        if segs == ["", "health"]:
            self._allow(method, "GET")
            return HttpResult(
                200,
                {
                    "status": "healthy",
                    "service": "agentmesh-registry",
                    "entra_verify_enabled": False,
                },
            )
        if segs == ["", "v1", "discover"]:
            self._allow(method, "GET")
            return await self._discover(parts.query)
        if segs == ["", "v1", "agents"]:
            self._allow(method, "POST")
            return await self._register(body)
        if len(segs) >= 4 and segs[:3] == ["", "v1", "agents"] and segs[3]:
            did = segs[3]
            rest = segs[4:]
            if not rest:
                self._allow(method, "GET", "DELETE")
                if method == "GET":
                    return await self._get_agent(did)
                return await self._delete(did, auth)
            if rest == ["prekeys"]:
                self._allow(method, "GET", "PUT")
                if method == "GET":
                    return await self._fetch_prekeys(did)
                return await self._upload_prekeys(did, auth, body)
            if rest == ["presence"]:
                self._allow(method, "GET")
                return await self._presence(did)
            if rest == ["heartbeat"]:
                self._allow(method, "POST")
                return await self._heartbeat(did, auth)
        _fail(404, "Not Found")

    @staticmethod
    def _allow(method: str, *allowed: str) -> None:
        if method not in allowed:
            _fail(405, "Method Not Allowed")

    # -- helpers ---------------------------------------------------------------------

    @staticmethod
    def _json_object(body: bytes) -> dict[str, Any]:
        try:
            obj = json.loads(body)
        except RecursionError:
            _fail(422, [_problem("json_invalid", ["body"], "JSON nested too deeply")])
        except (ValueError, UnicodeDecodeError):
            _fail(422, [_problem("json_invalid", ["body"], "JSON decode error")])
        if not isinstance(obj, dict):
            _fail(
                422,
                [
                    _problem(
                        "model_attributes_type",
                        ["body"],
                        "Input should be a valid dictionary or object to extract fields from",
                        obj,
                    )
                ],
            )
        return obj

    @staticmethod
    def _check_str_fields(obj: dict[str, Any], names: tuple[str, ...], problems: list[dict[str, Any]]) -> None:
        for name in names:
            if name not in obj:
                problems.append(_missing(["body", name], obj))
            elif not isinstance(obj[name], str):
                problems.append(_problem("string_type", ["body", name], "Input should be a valid string", obj[name]))

    @staticmethod
    def _check_caps_meta(obj: dict[str, Any], problems: list[dict[str, Any]]) -> None:
        caps = obj.get("capabilities", [])
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            problems.append(
                _problem(
                    "list_type",
                    ["body", "capabilities"],
                    "Input should be a valid list of strings",
                    caps,
                )
            )
        elif len(caps) > MAX_CAPABILITIES or any(len(c) > MAX_CAPABILITY_CHARS for c in caps):
            problems.append(
                _problem(
                    "too_long",
                    ["body", "capabilities"],
                    f"at most {MAX_CAPABILITIES} capabilities of at most {MAX_CAPABILITY_CHARS} characters",
                    None,
                )
            )
        meta = obj.get("metadata", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            problems.append(
                _problem(
                    "dict_type",
                    ["body", "metadata"],
                    "Input should be a valid dictionary of strings",
                    meta,
                )
            )
        elif len(meta) > MAX_METADATA_ENTRIES:
            problems.append(
                _problem("too_long", ["body", "metadata"], f"at most {MAX_METADATA_ENTRIES} metadata entries", None)
            )
        if not problems:
            size = len(json.dumps([caps, meta], separators=(",", ":"), ensure_ascii=False).encode())
            if size > MAX_PROFILE_BYTES:
                problems.append(
                    _problem(
                        "too_long",
                        ["body"],
                        f"capabilities and metadata together are at most {MAX_PROFILE_BYTES} bytes of JSON",
                        size,
                    )
                )

    async def _authenticate(self, header: str | None) -> str:
        """Verify an ``Ed25519-Timestamp`` header; return the authenticated DID (AGT's checks)."""
        if not header or not header.startswith(AUTH_SCHEME + " "):
            _fail(401, "Missing or invalid Authorization header")
        parts = header.split(" ", 3)
        if len(parts) != 4:
            _fail(401, "Malformed Ed25519-Timestamp header")
        _, did, ts_text, sig_text = parts
        try:
            ts = _dt.datetime.fromisoformat(ts_text.replace("Z", "+00:00"))
        except ValueError:
            _fail(401, "Invalid timestamp format")
        if ts.tzinfo is None:
            _fail(401, "Timestamp must include timezone offset")
        if abs((self._now() - ts).total_seconds()) > self.replay_window:
            _fail(401, "Timestamp outside replay window")
        record = await self.backend.get(did)
        if record is None:
            _fail(401, "Agent not registered")
        try:
            sig = b64url_decode(sig_text)
        except ValueError:
            _fail(401, "Invalid signature")
        if not ed25519_verify(record.public_key, sig, ts_text.encode()):
            _fail(401, "Invalid signature")
        return did

    async def _require_owner(self, did: str, header: str | None, mismatch: str) -> None:
        authed = await self._authenticate(header)
        if authed != did:
            _fail(403, mismatch)

    # -- registration ----------------------------------------------------------------

    async def _register(self, body: bytes) -> HttpResult:
        obj = self._json_object(body)
        if self.allow_legacy and "did" in obj and "proof" not in obj and "proof_timestamp" not in obj:
            return await self._register_legacy(obj)
        problems: list[dict[str, Any]] = []
        self._check_str_fields(obj, ("public_key", "proof", "proof_timestamp"), problems)
        self._check_caps_meta(obj, problems)
        if problems:
            _fail(422, problems)
        pk_text: str = obj["public_key"]
        try:
            public_key = b64url_decode(pk_text)
        except ValueError:
            _fail(400, "Invalid public_key encoding")
        if len(public_key) != 32:
            _fail(400, "public_key must be 32 bytes")
        ts_text: str = obj["proof_timestamp"]
        ts = _parse_ts(ts_text)
        if ts is None:
            _fail(400, "Invalid proof_timestamp")
        if abs((self._now() - ts).total_seconds()) > self.replay_window:
            _fail(401, "Proof timestamp outside replay window")
        try:
            proof = b64url_decode(obj["proof"])
        except ValueError:
            _fail(400, "Malformed proof")
        if len(proof) != 64:
            _fail(400, "Malformed proof")
        if not ed25519_verify(public_key, proof, (pk_text + ts_text).encode()):
            _fail(401, "Invalid proof-of-possession")
        did = did_from_ed25519(public_key)
        await self._add(did, public_key, obj, legacy=False)
        return HttpResult(201, {"did": did, "status": "registered"})

    async def _register_legacy(self, obj: dict[str, Any]) -> HttpResult:
        problems: list[dict[str, Any]] = []
        self._check_str_fields(obj, ("did", "public_key"), problems)
        self._check_caps_meta(obj, problems)
        if problems:
            _fail(422, problems)
        did: str = obj["did"]
        if await self.backend.get(did) is not None:
            _fail(409, "Agent already registered")
        try:
            public_key = b64url_decode(obj["public_key"])
        except ValueError:
            _fail(400, "Invalid public_key encoding")
        if len(public_key) != 32:
            _fail(400, "public_key must be 32 bytes")
        await self._add(did, public_key, obj, legacy=True)
        return HttpResult(201, {"did": did, "status": "registered"})

    async def _add(self, did: str, public_key: bytes, obj: dict[str, Any], *, legacy: bool) -> None:
        now = self._now()
        record = AgentRecord(
            did=did,
            public_key=public_key,
            capabilities=list(obj.get("capabilities", [])),
            metadata=dict(obj.get("metadata", {})),
            registered_at=now,
            last_seen=now,
            legacy=legacy,
        )
        if len(did) > MAX_DID_CHARS:
            _fail(422, [_problem("string_too_long", ["body", "did"], f"at most {MAX_DID_CHARS} characters", did)])
        if not await self.backend.create(record):
            _fail(409, "Agent already registered")
        logger.info("registered %s%s", did, " (legacy, unauthenticated)" if legacy else "")

    async def _get_agent(self, did: str) -> HttpResult:
        record = await self.backend.get(did)
        if record is None:
            _fail(404, "Agent not found")
        return HttpResult(
            200,
            {
                "did": record.did,
                "capabilities": list(record.capabilities),
                "metadata": dict(record.metadata),
                "registered_at": record.registered_at.isoformat(),
                "last_seen": record.last_seen.isoformat(),
                "reputation_score": record.reputation_score,
                "total_sessions": 0,
                "successful_sessions": 0,
                "failed_sessions": 0,
                "timeout_sessions": 0,
                "last_session_at": None,
                "completion_rate": None,
                "tier": "anonymous",
                "verified_app_id": None,
                "verified_tenant_id": None,
                "verified_at": None,
            },
        )

    async def _delete(self, did: str, auth: str | None) -> HttpResult:
        record = await self.backend.get(did)
        if record is None or not record.legacy:
            if auth is None:
                _fail(422, [_missing(["header", "Authorization"])])
            await self._require_owner(did, auth, "DID mismatch")
        if not await self.backend.delete(did):
            _fail(404, "Agent not found")
        logger.info("deregistered %s", did)
        return HttpResult(204)

    # -- pre-keys --------------------------------------------------------------------

    async def _upload_prekeys(self, did: str, auth: str | None, body: bytes) -> HttpResult:
        record = await self.backend.get(did)
        legacy = record is not None and record.legacy
        problems: list[dict[str, Any]] = []
        if auth is None and not legacy:
            problems.append(_missing(["header", "Authorization"]))
        try:
            obj: dict[str, Any] | None = self._json_object(body)
        except _HttpError as exc:
            problems.extend(exc.detail)
            obj = None
        if obj is not None:
            self._check_str_fields(obj, ("identity_key",), problems)
            ik_ed = obj.get("identity_key_ed")
            if ik_ed is not None and not isinstance(ik_ed, str):
                problems.append(
                    _problem("string_type", ["body", "identity_key_ed"], "Input should be a valid string", ik_ed)
                )
            if "signed_pre_key" not in obj:
                problems.append(_missing(["body", "signed_pre_key"], obj))
            elif not isinstance(obj["signed_pre_key"], dict):
                problems.append(
                    _problem(
                        "dict_type",
                        ["body", "signed_pre_key"],
                        "Input should be a valid dictionary",
                        obj["signed_pre_key"],
                    )
                )
            otks = obj.get("one_time_pre_keys", [])
            if not isinstance(otks, list):
                problems.append(
                    _problem("list_type", ["body", "one_time_pre_keys"], "Input should be a valid list", otks)
                )
            else:
                for i, otk in enumerate(otks):
                    if not isinstance(otk, dict):
                        problems.append(
                            _problem(
                                "dict_type", ["body", "one_time_pre_keys", i], "Input should be a valid dictionary", otk
                            )
                        )
        if problems:
            _fail(422, problems)
        assert obj is not None
        if record is None:
            _fail(404, "Agent not found")
        if not legacy:
            await self._require_owner(did, auth, "DID mismatch")
        try:
            identity_key = b64url_decode(obj["identity_key"])
            identity_key_ed = b64url_decode(obj["identity_key_ed"]) if obj.get("identity_key_ed") else None
            spk = obj["signed_pre_key"]
            spk_public = b64url_decode(spk["public_key"])
            spk_signature = b64url_decode(spk["signature"])
            spk_id = spk["key_id"]
        except (KeyError, TypeError, ValueError) as exc:
            _fail(400, f"Invalid pre-key bundle: {type(exc).__name__}: {exc}")
        if identity_key_ed is not None and len(identity_key_ed) != 32:
            _fail(400, "identity_key_ed must be exactly 32 bytes (Ed25519 public key)")
        if not isinstance(spk_id, int) or isinstance(spk_id, bool) or spk_id < 0:
            _fail(400, "Invalid pre-key bundle: signed_pre_key.key_id must be an integer >= 0")
        otks = obj.get("one_time_pre_keys", [])
        self._check_prekey_quota(otks)

        def replace_bundle(record: AgentRecord) -> int:
            record.identity_key = identity_key
            if identity_key_ed is not None:
                record.identity_key_ed = identity_key_ed
            record.signed_pre_key = spk_public
            record.signed_pre_key_signature = spk_signature
            record.signed_pre_key_id = spk_id
            record.one_time_pre_keys = deque(otks)
            return len(record.one_time_pre_keys)

        found, count = await self.backend.update(did, replace_bundle)
        if not found:
            _fail(404, "Agent not found")
        return HttpResult(200, {"did": did, "otk_count": count})

    @staticmethod
    def _check_prekey_quota(otks: list[Any]) -> None:
        if len(otks) > MAX_ONE_TIME_PRE_KEYS:
            _fail(
                422,
                [
                    _problem(
                        "too_long",
                        ["body", "one_time_pre_keys"],
                        f"at most {MAX_ONE_TIME_PRE_KEYS} one-time pre-keys per bundle",
                        len(otks),
                    )
                ],
            )
        for i, otk in enumerate(otks):
            if len(json.dumps(otk, separators=(",", ":"))) > MAX_PRE_KEY_BYTES:
                _fail(
                    422,
                    [
                        _problem(
                            "too_long",
                            ["body", "one_time_pre_keys", i],
                            f"a one-time pre-key entry is at most {MAX_PRE_KEY_BYTES} bytes of JSON",
                            None,
                        )
                    ],
                )

    async def _fetch_prekeys(self, did: str) -> HttpResult:
        def take_one(record: AgentRecord) -> tuple[AgentRecord, dict[str, Any] | None]:
            if record.signed_pre_key is None:
                _fail(404, "Pre-key bundle not found")
            # Each one-time pre-key is handed out once: the pop is part of the atomic
            # update (compare-and-set on a shared store), so two replicas never hand
            # out the same key.
            otk = record.one_time_pre_keys.popleft() if record.one_time_pre_keys else None
            return record, otk

        found, taken = await self.backend.update(did, take_one)
        if not found or taken is None:
            _fail(404, "Pre-key bundle not found")
        record, otk = taken
        assert record.signed_pre_key is not None
        return HttpResult(
            200,
            {
                "identity_key": b64url_encode(record.identity_key or b""),
                "identity_key_ed": (b64url_encode(record.identity_key_ed) if record.identity_key_ed else None),
                "signed_pre_key": {
                    "key_id": record.signed_pre_key_id,
                    "public_key": b64url_encode(record.signed_pre_key),
                    "signature": b64url_encode(record.signed_pre_key_signature or b""),
                },
                "one_time_pre_key": otk,
            },
        )

    # -- discovery and presence ------------------------------------------------------

    async def _discover(self, query: str) -> HttpResult:
        params = parse_qs(query, keep_blank_values=True)
        problems: list[dict[str, Any]] = []
        capability = params.get("capability", [None])[0]
        if capability is None:
            problems.append(_missing(["query", "capability"]))
        limit = 50
        raw_limit = params.get("limit", [None])[0]
        if raw_limit is not None:
            try:
                limit = int(raw_limit)
            except ValueError:
                problems.append(
                    _problem(
                        "int_parsing",
                        ["query", "limit"],
                        "Input should be a valid integer, unable to parse string as an integer",
                        raw_limit,
                    )
                )
            else:
                if limit < 1:
                    problems.append(
                        _problem(
                            "greater_than_equal",
                            ["query", "limit"],
                            "Input should be greater than or equal to 1",
                            raw_limit,
                        )
                    )
                elif limit > _MAX_LIMIT:
                    problems.append(
                        _problem(
                            "less_than_equal",
                            ["query", "limit"],
                            f"Input should be less than or equal to {_MAX_LIMIT}",
                            raw_limit,
                        )
                    )
        if problems:
            _fail(422, problems)
        assert capability is not None
        results = [
            {
                "did": record.did,
                "capabilities": list(record.capabilities),
                "reputation_score": record.reputation_score,
                "last_seen": record.last_seen.isoformat(),
            }
            for record in await self.backend.discover(capability, limit)
        ]
        return HttpResult(200, {"results": results, "total": len(results)})

    async def _presence(self, did: str) -> HttpResult:
        record = await self.backend.get(did)
        if record is None:
            _fail(404, "Agent not found")
        age = (self._now() - record.last_seen).total_seconds()
        return HttpResult(
            200,
            {
                "did": record.did,
                "last_seen": record.last_seen.isoformat(),
                "online": age < ONLINE_WINDOW,
            },
        )

    async def _heartbeat(self, did: str, auth: str | None) -> HttpResult:
        record = await self.backend.get(did)
        if record is None or not record.legacy:
            await self._require_owner(did, auth, "Authenticated DID does not match heartbeat target")
        now = self._now()

        def beat(record: AgentRecord) -> None:
            if (
                record.last_heartbeat is not None
                and (now - record.last_heartbeat).total_seconds() < self.heartbeat_interval
            ):
                _fail(429, f"Heartbeat throttled; retry after {self.heartbeat_interval:g}s")
            record.last_heartbeat = now
            record.last_seen = now

        found, _ = await self.backend.update(did, beat)
        if not found:
            _fail(404, "Agent not found")
        return HttpResult(200, {"did": did, "last_seen": now.isoformat()})


class RegistryState(RegistryService):
    """The development registry: :class:`RegistryService` over a :class:`MemoryBackend`.

    Same arguments as :class:`RegistryService` minus ``backend``.
    """

    def __init__(
        self,
        *,
        allow_legacy: bool = False,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        replay_window: float = REPLAY_WINDOW,
        now: Callable[[], _dt.datetime] = _utcnow,
    ) -> None:
        self.memory = MemoryBackend()
        super().__init__(
            self.memory,
            allow_legacy=allow_legacy,
            heartbeat_interval=heartbeat_interval,
            replay_window=replay_window,
            now=now,
        )

    def agent(self, did: str) -> AgentRecord | None:
        return self.memory.agents.get(did)

    @property
    def dids(self) -> list[str]:
        """Registered DIDs in registration order."""
        return list(self.memory.agents)

    def otk_count(self, did: str) -> int:
        """One-time pre-keys left for ``did`` (0 if unknown)."""
        record = self.memory.agents.get(did)
        return len(record.one_time_pre_keys) if record is not None else 0


# --------------------------------------------------------------------------------------
# HTTP/1.1 shell
# --------------------------------------------------------------------------------------


class _BadRequest(_HttpError):
    """A request the HTTP shell cannot take (answered before the service sees it)."""


@dataclass(slots=True)
class _Request:
    method: str
    target: str
    version: str
    headers: dict[str, str]


def _parse_head(head: bytes) -> _Request:
    text = head.decode("latin-1")
    lines = text.split("\r\n")
    while lines and lines[0] == "":
        lines.pop(0)  # stray CRLFs before the request line (RFC 9112 §2.2)
    if not lines:
        raise _BadRequest(400, "Empty request")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1]:
        raise _BadRequest(400, "Malformed request line")
    method, target, version = parts
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise _BadRequest(505, "HTTP Version Not Supported")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name or "\t" in name:
            raise _BadRequest(400, "Malformed header line")
        key = name.lower()
        value = value.strip(" \t")
        if key in headers:
            if key == "content-length" and headers[key] != value:
                raise _BadRequest(400, "Conflicting Content-Length headers")
            if key != "content-length":
                headers[key] = f"{headers[key]}, {value}"
            continue
        headers[key] = value
    return _Request(method, target, version, headers)


def _response_bytes(status: int, body: Any, *, keep_alive: bool, head_only: bool) -> bytes:
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    payload = b""
    if status != 204 and status >= 200:
        payload = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
        lines.append("content-type: application/json")
        lines.append(f"content-length: {len(payload)}")
    lines.append(f"date: {email.utils.formatdate(usegmt=True)}")
    lines.append("server: agt-mesh-dev-registry")
    if not keep_alive:
        lines.append("connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + payload


class DevRegistry:
    """The development registry server: ``async with DevRegistry() as registry: ...``.

    Args:
        host: interface to bind (loopback by default; there is no TLS).
        port: TCP port; 0 picks a free one.
        allow_legacy: accept the pre-POP registration shape (see :class:`RegistryState`).
        heartbeat_interval: minimum spacing of heartbeats per agent (AGT: 10 s).
        max_body_bytes: larger request bodies are refused with 413 (default 1 MiB).
        keep_alive_timeout: idle keep-alive connections are closed after this long.
        request_timeout: time allowed to send a request body.
        service: serve this :class:`RegistryService` (another storage backend) instead
            of an in-memory :class:`RegistryState`; ``allow_legacy`` and
            ``heartbeat_interval`` are then the service's own.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        service: RegistryService | None = None,
        allow_legacy: bool = False,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        keep_alive_timeout: float = DEFAULT_KEEP_ALIVE_TIMEOUT,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> None:
        if max_body_bytes < 0 or max_header_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 0 and max_header_bytes >= 1024")
        if keep_alive_timeout <= 0 or request_timeout <= 0:
            raise ValueError("keep_alive_timeout and request_timeout must be positive")
        self.service = (
            service
            if service is not None
            else RegistryState(allow_legacy=allow_legacy, heartbeat_interval=heartbeat_interval)
        )
        self._host = host
        self._requested_port = port
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.keep_alive_timeout = keep_alive_timeout
        self.request_timeout = request_timeout
        self._server: asyncio.Server | None = None
        self._port: int | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._connections_accepted = 0

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> str:
        """Start listening; return the base URL (``http://host:port``)."""
        if self._server is not None:
            return self.url
        self._server = await asyncio.start_server(
            self._connection, self._host, self._requested_port, limit=self.max_header_bytes
        )
        self._port = int(self._server.sockets[0].getsockname()[1])
        logger.info("development registry listening on %s", self.url)
        return self.url

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.close()
        # Python 3.11's wait_closed() does not wait for connection handlers; wait for
        # them here so none is left running (and later cancelled) when the loop ends.
        handlers = list(self._handlers)
        if handlers:
            _, stuck = await asyncio.wait(handlers, timeout=5.0)
            for task in stuck:
                task.cancel()
            if stuck:
                await asyncio.wait(stuck)
        await server.wait_closed()

    async def __aenter__(self) -> DevRegistry:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the registry is not started")
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    @property
    def state(self) -> RegistryState:
        """The in-memory state (only when no other ``service`` was given)."""
        if not isinstance(self.service, RegistryState):
            raise TypeError("this registry does not keep its records in memory")
        return self.service

    def otk_count(self, did: str) -> int:
        return self.state.otk_count(did)

    @property
    def connections_accepted(self) -> int:
        """TCP connections accepted so far (tests use it to check keep-alive reuse)."""
        return self._connections_accepted

    # -- HTTP ------------------------------------------------------------------------

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        self._writers.add(writer)
        self._connections_accepted += 1
        try:
            while await self._exchange(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except Exception:  # a bug must not kill the server; log it and drop the connection
            logger.exception("registry connection failed")
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._handlers.discard(task)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; return whether the connection stays open."""
        try:
            async with asyncio.timeout(self.keep_alive_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            await self._send(writer, 431, {"detail": "Request header fields too large"}, False)
            return False
        except asyncio.IncompleteReadError:
            return False  # the client closed the connection (between requests, normally)
        try:
            request = _parse_head(head)
            length = self._body_length(request)
        except _BadRequest as exc:
            await self._send(writer, exc.status, {"detail": exc.detail}, False)
            return False
        if length > self.max_body_bytes:
            # The body is not read, so the connection cannot be reused.
            await self._send(writer, 413, {"detail": f"Request body larger than {self.max_body_bytes} bytes"}, False)
            return False
        if length and request.headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        body = b""
        if length:
            async with asyncio.timeout(self.request_timeout):
                body = await reader.readexactly(length)
        connection = {t.strip().lower() for t in request.headers.get("connection", "").split(",")}
        keep_alive = request.version == "HTTP/1.1" and "close" not in connection
        try:
            result = await self.service.handle(request.method, request.target, request.headers, body)
        except Exception:  # a bug: answer 500 like a framework would, keep serving
            logger.exception("registry request %s %s failed", request.method, request.target)
            result = HttpResult(500, {"detail": "Internal Server Error"})
        await self._send(writer, result.status, result.body, keep_alive, head_only=request.method == "HEAD")
        return keep_alive

    @staticmethod
    def _body_length(request: _Request) -> int:
        if "transfer-encoding" in request.headers:
            raise _BadRequest(501, "Transfer-Encoding is not supported; send Content-Length")
        raw = request.headers.get("content-length")
        if raw is None:
            return 0
        if not raw.isdigit() or len(raw) > 18:
            raise _BadRequest(400, "Invalid Content-Length")
        return int(raw)

    @staticmethod
    async def _send(
        writer: asyncio.StreamWriter,
        status: int,
        body: Any,
        keep_alive: bool,
        *,
        head_only: bool = False,
    ) -> None:
        writer.write(_response_bytes(status, body, keep_alive=keep_alive, head_only=head_only))
        await writer.drain()
