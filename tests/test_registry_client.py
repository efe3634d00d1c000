"""RegistryClient: against the real AGT registries, and against a mock transport.

The real servers are the official ones, started from their own venvs on loopback:

* ``core-5.0.0`` (agent-governance-toolkit-core 5.0.0): proof-of-possession registration,
  ``Ed25519-Timestamp`` auth on PUT /prekeys, heartbeat and DELETE;
* ``platform-3.7.0`` (agentmesh-platform 3.7.0): pre-POP, caller-chosen DID, no auth checks.

Both run once per module (their state is in memory and shared, so every test uses fresh
identities and unique capability names).  Transport behaviour that a real server cannot
produce on demand (5xx, dropped connections, slow answers, broken JSON) uses
``httpx.MockTransport``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from helpers import Drbg, identity

from agt_mesh.core.encoding import b64url_decode, b64url_encode
from agt_mesh.core.frames import iso_timestamp
from agt_mesh.core.identity import Identity
from agt_mesh.core.x3dh import PreKeyStore
from agt_mesh.errors import (
    MeshAuthError,
    MeshConfigError,
    MeshRegistryError,
    PeerNotFoundError,
)
from agt_mesh.shell.registry import (
    AgentRecord,
    Registration,
    RegistrationShape,
    RegistryClient,
)

try:  # the in-process dev registry is tested too when it is in the tree
    from agt_mesh.dev.registry import DevRegistry as _DevRegistry

    DevRegistry: type[_DevRegistry] | None = _DevRegistry
except ImportError:  # pragma: no cover - depends on the tree
    DevRegistry = None

CORE = "core-5.0.0"
PLATFORM = "platform-3.7.0"
DEV = "dev"
REGISTRIES = [CORE, PLATFORM] + ([DEV] if DevRegistry is not None else [])


# --------------------------------------------------------------------------------------
# real registries as loopback subprocesses
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    #: True for registries that want the POP body and enforce Ed25519-Timestamp auth.
    pop: bool


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=0.5) as response:
            return bool(json.loads(response.read()).get("status") == "healthy")
    except (OSError, ValueError):
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def real_registries(
    agt_core_python: Path, agt_platform_python: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Server]]:
    """Start both real registries at once (loopback, random ports) and stop them after."""
    logs = tmp_path_factory.mktemp("registry-logs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTMESH_")}
    specs = [(CORE, agt_core_python, True), (PLATFORM, agt_platform_python, False)]
    procs: list[subprocess.Popen[bytes]] = []
    started: dict[str, tuple[subprocess.Popen[bytes], Server, Path]] = {}
    try:
        for name, python, pop in specs:
            port = _free_port()
            log = logs / f"{name}.log"
            with log.open("wb") as out:
                proc = subprocess.Popen(
                    [
                        str(python),
                        *("-m", "agentmesh.registry", "--host", "127.0.0.1"),
                        *("--port", str(port), "--log-level", "warning"),
                    ],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                )
            procs.append(proc)
            started[name] = (proc, Server(name, f"http://127.0.0.1:{port}", pop), log)
        deadline = time.monotonic() + 30
        for name, (proc, server, log) in started.items():
            while not _healthy(server.url):
                if proc.poll() is not None:
                    pytest.fail(f"{name} registry exited early:\n{log.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    pytest.fail(f"{name} registry did not become healthy:\n{log.read_text()}")
                time.sleep(0.05)
        yield {name: server for name, (_, server, _) in started.items()}
    finally:
        for proc in procs:
            _stop(proc)


@pytest.fixture(params=REGISTRIES)
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[Server]:
    if request.param == DEV:
        assert DevRegistry is not None
        async with DevRegistry() as dev:
            yield Server(DEV, dev.url, pop=True)
    else:
        yield request.getfixturevalue("real_registries")[request.param]


@pytest.fixture
def core(real_registries: dict[str, Server]) -> Server:
    return real_registries[CORE]


@pytest.fixture
def platform(real_registries: dict[str, Server]) -> Server:
    return real_registries[PLATFORM]


@pytest.fixture
def new_identity(request: pytest.FixtureRequest) -> Callable[[], Identity]:
    """Fresh, deterministic identities, unique per test (and per registry parameter)."""
    counter = itertools.count()
    return lambda: identity(f"registry-client/{request.node.nodeid}/{next(counter)}")


def client(server: Server | str, me: Identity, **options: Any) -> RegistryClient:
    url = server.url if isinstance(server, Server) else server
    options.setdefault("retry_base_delay", 0.01)
    options.setdefault("timeout", 5.0)
    return RegistryClient(url, me, **options)


def tag(me: Identity) -> str:
    """A capability-safe suffix unique to an identity."""
    return me.did[-10:]


def expected_shape(server: Server) -> RegistrationShape:
    return "pop" if server.pop else "legacy"


# --------------------------------------------------------------------------------------
# real registries: the happy paths
# --------------------------------------------------------------------------------------


async def test_register_auto_picks_the_shape_and_409_means_already_registered(
    registry: Server, new_identity: Callable[[], Identity]
) -> None:
    me = new_identity()
    shape = expected_shape(registry)
    async with client(registry, me) as reg:
        assert reg.shape is None and reg.registration is None and reg.did == me.did
        first = await reg.register([f"agent-{tag(me)}"], {"display_name": f"agent-{tag(me)}"})
        assert first == Registration(did=me.did, shape=shape, created=True)
        assert reg.shape == shape and reg.registration == first and reg.did == me.did
        again = await reg.register([f"agent-{tag(me)}"], {})
        assert again == Registration(did=me.did, shape=shape, created=False)
    # A restarted agent (a new client, "auto" from scratch) gets the same answer.
    async with client(registry, me) as restarted:
        assert (await restarted.register([], {})).created is False
        assert restarted.shape == shape


async def test_forcing_the_shape_the_registry_does_not_speak_gives_422(
    registry: Server, new_identity: Callable[[], Identity]
) -> None:
    wrong = "legacy" if registry.pop else "pop"
    async with client(registry, new_identity(), registration=wrong) as reg:
        with pytest.raises(MeshRegistryError) as info:
            await reg.register(["x"], {})
    assert type(info.value) is MeshRegistryError and info.value.status == 422
    if registry.name in (CORE, PLATFORM):
        assert ("body.proof: Field required" if registry.pop else "body.did: Field required") in (str(info.value))


async def test_upload_then_fetch_pops_one_time_prekeys_fifo_then_falls_back_to_3dh(
    registry: Server, new_identity: Callable[[], Identity]
) -> None:
    alice_id, bob_id = new_identity(), new_identity()
    rng = Drbg("registry-client/prekeys")
    store = PreKeyStore(alice_id)
    spk = store.generate_signed_pre_key(rng)
    otks = store.generate_one_time_pre_keys(3, rng)
    async with client(registry, alice_id) as alice, client(registry, bob_id) as bob:
        await alice.register([f"alice-{tag(alice_id)}"], {})
        assert await alice.upload_prekeys(spk, otks) == 3
        fetched = []
        for _ in range(3):
            bundle = await bob.fetch_bundle(alice.did)  # bob is not even registered
            bundle.verify()
            assert bundle.identity_key == alice_id.x25519_public
            assert bundle.identity_key_ed == alice_id.ed25519_public
            assert (bundle.signed_pre_key, bundle.signed_pre_key_id) == (spk.public, spk.key_id)
            assert bundle.signed_pre_key_signature == spk.signature
            fetched.append((bundle.one_time_pre_key_id, bundle.one_time_pre_key))
        assert fetched == [(o.key_id, o.public) for o in otks]
        exhausted = await bob.fetch_bundle(alice.did)
        exhausted.verify()
        assert exhausted.one_time_pre_key is None and exhausted.one_time_pre_key_id is None
        # An upload replaces the whole list.
        more = store.generate_one_time_pre_keys(1, rng)
        assert await alice.upload_prekeys(spk, more) == 1
        assert (await bob.fetch_bundle(alice.did)).one_time_pre_key_id == more[0].key_id


async def test_fetch_bundle_of_an_unknown_or_keyless_peer_is_peer_not_found(
    registry: Server, new_identity: Callable[[], Identity]
) -> None:
    stranger, keyless = new_identity(), new_identity()
    async with client(registry, keyless) as reg:
        await reg.register([], {})
        for did in (stranger.did, keyless.did):
            with pytest.raises(PeerNotFoundError) as info:
                await reg.fetch_bundle(did)
            assert info.value.status == 404
            assert did in str(info.value) and "not uploaded pre-keys" in str(info.value)


async def test_get_agent(registry: Server, new_identity: Callable[[], Identity]) -> None:
    me = new_identity()
    name = f"agent-{tag(me)}"
    async with client(registry, me) as reg:
        await reg.register([name, "chat"], {"display_name": name, "team": "blue"})
        record = await reg.get_agent(me.did)
        assert record is not None
        assert record.did == me.did and record.capabilities == (name, "chat")
        assert record.metadata == {"display_name": name, "team": "blue"}
        assert record.display_name == name
        assert record.last_seen is not None
        assert datetime.fromisoformat(record.last_seen).tzinfo is not None
        assert record.reputation_score == 0.5
        assert record.raw["did"] == me.did and "registered_at" in record.raw
        if registry.name == CORE:
            assert record.raw["tier"] == "anonymous"
        assert await reg.get_agent(new_identity().did) is None


async def test_discover_and_find_by_display_name_are_exact_and_freshest_first(
    registry: Server, new_identity: Callable[[], Identity]
) -> None:
    ids = [new_identity() for _ in range(4)]
    name = f"agent-{tag(ids[0])}"
    shared = f"shared-{tag(ids[0])}"
    clients = [client(registry, i) for i in ids]
    try:
        target, similar, other, older = clients
        await target.register([name, shared], {"display_name": name})
        await similar.register([f"{name}-2"], {"display_name": f"{name}-2"})
        await other.register([name.upper()], {"display_name": name.upper()})
        hits = await target.discover(name)
        assert [h.did for h in hits] == [target.did]
        assert hits[0].capabilities == (name, shared)
        assert isinstance(hits[0].last_seen, str) and hits[0].reputation_score == 0.5
        found = await similar.find_by_display_name(name)
        assert found is not None and found.did == target.did
        found2 = await target.find_by_display_name(f"{name}-2")
        assert found2 is not None and found2.did == similar.did
        # Names that only resemble registered ones find nothing — never another agent.
        for near_miss in (name[:-1], f"{name}-3", f" {name}", name.title()):
            assert await target.find_by_display_name(near_miss) is None
        assert await target.discover(f"{name}-3") == []

        # Freshest last_seen first: `older` registers after `target`, so it is fresher
        # until `target` sends a heartbeat.
        await older.register([shared], {})
        assert [h.did for h in await target.discover(shared)] == [older.did, target.did]
        await target.heartbeat()
        assert [h.did for h in await target.discover(shared, limit=2)] == [
            target.did,
            older.did,
        ]
        freshest = await older.find_by_display_name(shared)
        assert freshest is not None and freshest.did == target.did
    finally:
        for c in clients:
            await c.aclose()


async def test_heartbeat_updates_last_seen_and_throttling_is_quiet(
    registry: Server, new_identity: Callable[[], Identity]
) -> None:
    me = new_identity()
    async with client(registry, me) as reg:
        await reg.register([], {})
        before = await reg.get_agent(me.did)
        await reg.heartbeat()  # 200
        after = await reg.get_agent(me.did)
        assert before and after and before.last_seen and after.last_seen
        assert datetime.fromisoformat(after.last_seen) > datetime.fromisoformat(before.last_seen)
        await reg.heartbeat()  # 429 "Heartbeat throttled; retry after 10s": not an error
        again = await reg.get_agent(me.did)
        assert again is not None and again.last_seen == after.last_seen


async def test_upload_prekeys_without_registration_is_a_404_registry_error(
    registry: Server, new_identity: Callable[[], Identity]
) -> None:
    # Both registries look the DID up before checking auth, so the answer is 404.
    me = new_identity()
    store = PreKeyStore(me)
    rng = Drbg("registry-client/unregistered")
    async with client(registry, me) as reg:
        with pytest.raises(MeshRegistryError) as info:
            await reg.upload_prekeys(store.generate_signed_pre_key(rng), [])
    assert type(info.value) is MeshRegistryError and info.value.status == 404
    assert me.did in str(info.value) and "call register() before upload_prekeys()" in str(info.value)


async def test_heartbeat_without_registration(registry: Server, new_identity: Callable[[], Identity]) -> None:
    async with client(registry, new_identity()) as reg:
        if registry.pop:
            # AGT 5.0.0 authenticates first: 401 "Agent not registered".
            with pytest.raises(MeshAuthError, match="register\\(\\) again"):
                await reg.heartbeat()
        else:
            with pytest.raises(MeshRegistryError) as info:
                await reg.heartbeat()
            assert info.value.status == 404 and "register() again" in str(info.value)


async def test_delete_is_idempotent(registry: Server, new_identity: Callable[[], Identity]) -> None:
    me = new_identity()
    async with client(registry, me) as reg:
        await reg.register([f"gone-{tag(me)}"], {})
        assert await reg.get_agent(me.did) is not None
        await reg.delete()
        assert reg.registration is None
        assert await reg.get_agent(me.did) is None
        assert await reg.discover(f"gone-{tag(me)}") == []
        await reg.delete()  # 5.0.0: 401 "Agent not registered"; 3.7.0: 404
        # And registering again works.
        assert (await reg.register([], {})).created is True


# --------------------------------------------------------------------------------------
# real registries: auth and clocks
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("skew", [-600.0, 600.0])
async def test_core_rejects_a_skewed_clock_and_the_error_says_check_the_clock(
    core: Server, new_identity: Callable[[], Identity], skew: float
) -> None:
    def skewed() -> float:
        return time.time() + skew

    me = new_identity()
    async with client(core, me, clock=skewed) as reg:
        with pytest.raises(MeshAuthError) as info:
            await reg.register([], {})
    assert "Proof timestamp outside replay window" in str(info.value)
    assert "check the system clock" in str(info.value)

    rng = Drbg("registry-client/skew")
    spk = PreKeyStore(me).generate_signed_pre_key(rng)
    async with client(core, me) as good, client(core, me, clock=skewed) as bad:
        await good.register([], {})
        with pytest.raises(MeshAuthError) as info:
            await bad.upload_prekeys(spk, [])
        assert "Timestamp outside replay window" in str(info.value)
        assert "check the system clock" in str(info.value)
        assert "Ed25519-Timestamp" not in str(info.value)
        assert await good.upload_prekeys(spk, []) == 0


async def test_platform_ignores_the_auth_header(platform: Server, new_identity: Callable[[], Identity]) -> None:
    me = new_identity()
    spk = PreKeyStore(me).generate_signed_pre_key(Drbg("registry-client/3.7"))
    async with client(platform, me, clock=lambda: time.time() - 3600) as reg:
        assert (await reg.register([], {})).shape == "legacy"
        assert await reg.upload_prekeys(spk, []) == 0
        await reg.heartbeat()


async def test_verify_tier_on_the_real_registries(
    core: Server, platform: Server, new_identity: Callable[[], Identity]
) -> None:
    token = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.c2ln"
    me = new_identity()
    async with client(core, me) as reg:
        await reg.register([], {})
        # Without PyJWT the verify endpoint fails with a plain-text 500 (retried as 5xx).
        with pytest.raises(MeshRegistryError) as info:
            await reg.verify_tier(token)
    assert info.value.status == 500 and "gave up after 3 attempt(s)" in str(info.value)
    assert token not in str(info.value)
    async with client(platform, me) as reg:
        await reg.register([], {})
        with pytest.raises(MeshRegistryError) as info:
            await reg.verify_tier(token)
    assert info.value.status == 404 and "no /v1/registry/verify endpoint" in str(info.value)


async def test_unreachable_registry_is_status_none(new_identity: Callable[[], Identity]) -> None:
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    started = time.monotonic()
    async with client(url, new_identity(), retries=1) as reg:
        with pytest.raises(MeshRegistryError) as info:
            await reg.get_agent("did:mesh:x")
    assert time.monotonic() - started < 2
    assert info.value.status is None
    assert url in str(info.value) and "unreachable" in str(info.value)
    assert "after 2 attempt(s)" in str(info.value)


# --------------------------------------------------------------------------------------
# mock transport
# --------------------------------------------------------------------------------------

MOCK_URL = "http://registry.test"
FIXED_NOW = 1_760_000_000.25
ME = identity("registry-client/mock/me")
PEER = identity("registry-client/mock/peer")


def record_json(did: str, last_seen: str | None = "2026-01-01T00:00:00+00:00", **extra: Any) -> Any:
    return {
        "did": did,
        "capabilities": extra.pop("capabilities", ["x"]),
        "reputation_score": 0.5,
        "last_seen": last_seen,
        **extra,
    }


class Mock:
    """A MockTransport handler that records requests and replays scripted answers."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if callable(answer):
            answer = answer(request)
            if asyncio.iscoroutine(answer):
                answer = await answer
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, httpx.Response)
        return answer

    @property
    def calls(self) -> int:
        return len(self.requests)

    def body(self, index: int) -> Any:
        return json.loads(self.requests[index].content)


def mock_client(mock: Mock, me: Identity = ME, **options: Any) -> RegistryClient:
    options.setdefault("retry_base_delay", 0.01)
    options.setdefault("clock", lambda: FIXED_NOW)
    return RegistryClient(MOCK_URL, me, transport=httpx.MockTransport(mock), **options)


def ok(body: Any = None, status: int = 200, **kwargs: Any) -> httpx.Response:
    return httpx.Response(status, json=body, **kwargs)


def detail(status: int, text: str, **kwargs: Any) -> httpx.Response:
    return httpx.Response(status, json={"detail": text}, **kwargs)


async def test_5xx_is_retried_with_backoff_then_succeeds() -> None:
    mock = Mock(detail(503, "busy"), httpx.Response(502, text="Bad Gateway"), ok(record_json("d")))
    started = time.monotonic()
    async with mock_client(mock, retry_base_delay=0.05) as reg:
        record = await reg.get_agent("d")
    assert record is not None and record.did == "d"
    assert mock.calls == 3
    assert time.monotonic() - started >= 0.05 + 0.10  # 0.05 * 2**0, then * 2**1


async def test_5xx_exhausted_raises_with_the_status() -> None:
    mock = Mock(detail(503, "maintenance"))
    async with mock_client(mock) as reg:
        with pytest.raises(MeshRegistryError) as info:
            await reg.discover("x")
    assert mock.calls == 3 and info.value.status == 503
    assert "maintenance" in str(info.value) and "gave up after 3 attempt(s)" in str(info.value)
    mock = Mock(detail(500, "boom"))
    async with mock_client(mock, retries=0) as reg:
        with pytest.raises(MeshRegistryError):
            await reg.discover("x")
    assert mock.calls == 1


@pytest.mark.parametrize("status", [400, 404, 409, 422])
async def test_4xx_is_not_retried(status: int) -> None:
    mock = Mock(detail(status, "nope"))
    async with mock_client(mock) as reg:
        with pytest.raises(MeshRegistryError) as info:
            await reg.discover("x")
    assert mock.calls == 1 and info.value.status == status
    mock = Mock(detail(422, "nope"))
    async with mock_client(mock, registration="pop") as reg:
        with pytest.raises(MeshRegistryError):
            await reg.register([], {})
    assert mock.calls == 1


async def test_404_get_agent_is_none_without_retry() -> None:
    mock = Mock(detail(404, "Agent not found"))
    async with mock_client(mock) as reg:
        assert await reg.get_agent("did:mesh:nobody") is None
    assert mock.calls == 1


async def test_network_errors_are_retried_then_status_none() -> None:
    mock = Mock(httpx.ConnectError("[Errno 111] Connection refused"))
    started = time.monotonic()
    async with mock_client(mock, retry_base_delay=0.02) as reg:
        with pytest.raises(MeshRegistryError) as info:
            await reg.get_agent("d")
    assert time.monotonic() - started < 1.0
    assert mock.calls == 3 and info.value.status is None
    message = str(info.value)
    assert MOCK_URL in message and "unreachable" in message and "Connection refused" in message
    # A network error followed by an answer is a success.
    mock = Mock(httpx.ReadError("reset"), ok(record_json("d")))
    async with mock_client(mock) as reg:
        assert await reg.get_agent("d") is not None
    assert mock.calls == 2


async def test_each_attempt_has_its_own_timeout() -> None:
    async def slow(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10)
        return ok({})

    mock = Mock(slow)
    timeout, retries, base = 0.2, 2, 0.05
    started = time.monotonic()
    async with mock_client(mock, timeout=timeout, retries=retries, retry_base_delay=base) as reg:
        with pytest.raises(MeshRegistryError) as info:
            await reg.discover("x")
    elapsed = time.monotonic() - started
    bound = (retries + 1) * timeout + base * (1 + 2)
    assert bound - 0.05 <= elapsed < bound + 0.4
    assert mock.calls == 3 and info.value.status is None
    assert "timed out after 0.2 s" in str(info.value)


async def _register(reg: RegistryClient) -> Any:
    return await reg.register([], {})


async def _upload(reg: RegistryClient) -> Any:
    store = PreKeyStore(ME)
    return await reg.upload_prekeys(store.generate_signed_pre_key(Drbg("m")), [])


@pytest.mark.parametrize(
    ("call", "response"),
    [
        (lambda r: r.get_agent("d"), httpx.Response(200, text="not json {")),
        (lambda r: r.get_agent("d"), httpx.Response(200, text="")),
        (lambda r: r.get_agent("d"), ok(["a", "list"])),
        (lambda r: r.get_agent("d"), ok({"did": 7})),
        (lambda r: r.get_agent("d"), ok(record_json("d", capabilities="x"))),
        (lambda r: r.discover("x"), httpx.Response(200, text="<html>proxy</html>")),
        (lambda r: r.discover("x"), ok([1, 2])),
        (lambda r: r.discover("x"), ok({"results": "nope"})),
        (lambda r: r.discover("x"), ok({"results": [{"capabilities": []}]})),
        (lambda r: r.fetch_bundle("d"), httpx.Response(200, text="\xff garbage")),
        (lambda r: r.fetch_bundle("d"), ok({"identity_key": "AA"})),
        (_register, httpx.Response(201, text="<html>")),
        (_upload, httpx.Response(200, text="nope")),
        (lambda r: r.verify_tier("t"), ok("a string")),
    ],
)
async def test_malformed_success_bodies_are_registry_errors(
    call: Callable[[RegistryClient], Any], response: httpx.Response
) -> None:
    async with mock_client(Mock(response)) as reg:
        with pytest.raises(MeshRegistryError):
            await call(reg)


async def test_empty_success_bodies_are_fine_where_nothing_is_needed() -> None:
    async with mock_client(Mock(httpx.Response(204))) as reg:
        assert await _upload(reg) is None
        await reg.heartbeat()
        await reg.delete()
    async with mock_client(Mock(httpx.Response(201))) as reg:
        assert await _register(reg) == Registration(ME.did, "pop", created=True)


@pytest.mark.parametrize(
    ("response", "hint"),
    [
        (detail(429, "Heartbeat throttled; retry after 10s"), "retry after 10 s"),
        (detail(429, "slow down", headers={"retry-after": "7"}), "retry after 7 s"),
        (httpx.Response(429, text="Too Many Requests"), "retry later"),
    ],
)
async def test_429_is_a_rate_limit_error(response: httpx.Response, hint: str) -> None:
    mock = Mock(response)
    async with mock_client(mock) as reg:
        with pytest.raises(MeshRegistryError) as info:
            await reg.discover("x")
    assert info.value.status == 429 and "rate limited" in str(info.value)
    assert hint in str(info.value)
    assert mock.calls == 1


async def test_heartbeat_status_mapping() -> None:
    mock = Mock(detail(429, "Heartbeat throttled; retry after 10s"))
    async with mock_client(mock) as reg:
        await reg.heartbeat()
    assert mock.calls == 1
    async with mock_client(Mock(detail(404, "Agent not found"))) as reg:
        with pytest.raises(MeshRegistryError) as info:
            await reg.heartbeat()
    assert info.value.status == 404
    async with mock_client(Mock(detail(403, "DID mismatch"))) as reg:
        with pytest.raises(MeshAuthError, match="DID mismatch"):
            await reg.heartbeat()


async def test_delete_status_mapping() -> None:
    for response in (httpx.Response(204), detail(404, "x"), detail(401, "Agent not registered")):
        async with mock_client(Mock(response)) as reg:
            await reg.delete()
    async with mock_client(Mock(detail(401, "Timestamp outside replay window"))) as reg:
        with pytest.raises(MeshAuthError, match="check the system clock"):
            await reg.delete()


def _answer_everything(request: httpx.Request) -> httpx.Response:
    path = request.url.path
    if request.method == "POST" and path == "/v1/agents":
        return ok({"did": ME.did, "status": "registered"}, 201)
    if path.endswith("/prekeys") and request.method == "PUT":
        return ok({"did": ME.did, "otk_count": 0})
    if path.endswith("/prekeys"):
        store = PreKeyStore(PEER)
        spk = store.generate_signed_pre_key(Drbg("peer"))
        return ok(
            {
                "identity_key": b64url_encode(PEER.x25519_public),
                "identity_key_ed": b64url_encode(PEER.ed25519_public),
                "signed_pre_key": {
                    "key_id": spk.key_id,
                    "public_key": b64url_encode(spk.public),
                    "signature": b64url_encode(spk.signature),
                },
                "one_time_pre_key": None,
            }
        )
    if path == "/v1/discover":
        return ok({"results": [], "total": 0})
    if path.endswith("/heartbeat"):
        return ok({"did": ME.did, "last_seen": "2026-01-01T00:00:00+00:00"})
    if path == "/v1/registry/verify":
        return ok({"did": ME.did, "tier": "verified"})
    if request.method == "DELETE":
        return httpx.Response(204)
    return ok(record_json(PEER.did))


async def test_every_request_carries_a_valid_ed25519_timestamp_header() -> None:
    mock = Mock(_answer_everything)
    async with mock_client(mock) as reg:
        await reg.register(["a"], {"k": "v"})
        await _upload(reg)
        bundle = await reg.fetch_bundle(PEER.did)
        bundle.verify()
        await reg.get_agent(PEER.did)
        await reg.discover("a b&c/d")
        await reg.find_by_display_name("a")
        await reg.heartbeat()
        await reg.verify_tier("tok")
        await reg.delete()
    assert mock.calls == 9
    stamp = iso_timestamp(FIXED_NOW)
    assert stamp == "2025-10-09T08:53:20.250Z"
    public = Ed25519PublicKey.from_public_bytes(ME.ed25519_public)
    for request in mock.requests:
        names = [name for name, _ in request.headers.raw]
        assert all(n == n.lower() for n in names if n not in (b"Host", b"Content-Length")), names
        scheme, did, ts, sig = request.headers["authorization"].split(" ")
        assert (scheme, did, ts) == ("Ed25519-Timestamp", ME.did, stamp)
        public.verify(b64url_decode(sig), ts.encode())  # raises if invalid
        assert request.headers["user-agent"].startswith("kars-agt-mesh/")
        has_body = request.method in ("POST", "PUT") and bool(request.content)
        assert ("content-type" in request.headers) == has_body
        if has_body:
            assert request.headers["content-type"] == "application/json"
    paths = [(r.method, r.url.raw_path.decode()) for r in mock.requests]
    enc_me = ME.did.replace(":", "%3A")
    enc_peer = PEER.did.replace(":", "%3A")
    assert paths == [
        ("POST", "/v1/agents"),
        ("PUT", f"/v1/agents/{enc_me}/prekeys"),
        ("GET", f"/v1/agents/{enc_peer}/prekeys"),
        ("GET", f"/v1/agents/{enc_peer}"),
        ("GET", "/v1/discover?capability=a%20b%26c%2Fd&limit=50"),
        ("GET", "/v1/discover?capability=a&limit=200"),
        ("POST", f"/v1/agents/{enc_me}/heartbeat"),
        ("POST", "/v1/registry/verify"),
        ("DELETE", f"/v1/agents/{enc_me}"),
    ]


async def test_base_url_trailing_slash_and_path_prefix() -> None:
    mock = Mock(detail(404, "x"))
    transport = httpx.MockTransport(mock)
    async with RegistryClient("http://router:8443/agt/registry/", ME, transport=transport) as reg:
        assert reg.base_url == "http://router:8443/agt/registry"
        await reg.get_agent("did:mesh:ab")
    assert str(mock.requests[0].url) == "http://router:8443/agt/registry/v1/agents/did%3Amesh%3Aab"


async def test_auto_registration_falls_back_to_legacy_on_422_and_remembers_it() -> None:
    missing_did = {"detail": [{"type": "missing", "loc": ["body", "did"], "msg": "Field required", "input": {}}]}
    mock = Mock(
        httpx.Response(422, json=missing_did),
        ok({"did": ME.did, "status": "registered"}, 201),
        detail(409, "Agent already registered"),
    )
    async with mock_client(mock) as reg:
        first = await reg.register(["alice"], {"display_name": "alice"})
        assert first == Registration(ME.did, "legacy", created=True)
        assert reg.shape == "legacy"
        assert (await reg.register(["alice"], {})).created is False
    pop, legacy, remembered = (mock.body(i) for i in range(3))
    assert set(pop) == {"public_key", "proof", "proof_timestamp", "capabilities", "metadata"}
    assert pop["public_key"] == b64url_encode(ME.ed25519_public)
    assert pop["proof_timestamp"] == iso_timestamp(FIXED_NOW)
    Ed25519PublicKey.from_public_bytes(ME.ed25519_public).verify(
        b64url_decode(pop["proof"]), (pop["public_key"] + pop["proof_timestamp"]).encode()
    )
    assert pop["capabilities"] == ["alice"] and pop["metadata"] == {"display_name": "alice"}
    assert legacy == {
        "did": ME.did,
        "public_key": b64url_encode(ME.x25519_public),
        "capabilities": ["alice"],
        "metadata": {"display_name": "alice"},
    }
    assert "did" in remembered and "proof" not in remembered  # no second POP attempt
    assert mock.requests[0].content == json.dumps(pop, separators=(",", ":")).encode()


async def test_registration_rejected_in_both_shapes() -> None:
    mock = Mock(
        httpx.Response(422, json={"detail": [{"loc": ["body", "did"], "msg": "Field required"}]}),
        httpx.Response(422, json={"detail": [{"loc": ["body", "x"], "msg": "bad"}]}),
    )
    async with mock_client(mock) as reg:
        with pytest.raises(MeshRegistryError) as info:
            await reg.register([], {})
    assert info.value.status == 422 and mock.calls == 2
    assert "both registration shapes" in str(info.value)
    assert "body.did" in str(info.value) and "body.x" in str(info.value)
    assert reg.shape is None


async def test_pop_registration_adopts_the_did_the_registry_returns() -> None:
    assigned = "did:mesh:" + "f" * 32
    mock = Mock(ok({"did": assigned, "status": "registered"}, 201), ok({"otk_count": 0}))
    async with mock_client(mock) as reg:
        assert (await reg.register([], {})).did == assigned
        assert reg.did == assigned
        await _upload(reg)
    assert mock.requests[1].url.raw_path.decode() == "/v1/agents/did%3Amesh%3A" + "f" * 32 + ("/prekeys")
    assert mock.requests[1].headers["authorization"].split(" ")[1] == assigned


@pytest.mark.parametrize(
    ("status", "text", "expected"),
    [
        (401, "Proof timestamp outside replay window", "check the system clock"),
        (401, "Invalid proof-of-possession", "signature did not verify"),
        (403, "Forbidden", "check the system clock"),
    ],
)
async def test_registration_auth_failures(status: int, text: str, expected: str) -> None:
    async with mock_client(Mock(detail(status, text))) as reg:
        with pytest.raises(MeshAuthError) as info:
            await reg.register([], {})
    assert text in str(info.value) and expected in str(info.value)
    assert "Ed25519-Timestamp" not in str(info.value)


async def test_discover_sorts_freshest_first_and_validates_arguments() -> None:
    results = [
        record_json("old", "2026-01-01T00:00:00+00:00"),
        record_json("none", None),
        record_json("new", "2026-01-01T00:00:01.5+00:00"),
        record_json("mid", "2026-01-01T00:00:01Z"),
    ]
    mock = Mock(ok({"results": results, "total": 4}))
    async with mock_client(mock) as reg:
        assert [r.did for r in await reg.discover("x")] == ["new", "mid", "old", "none"]
        for bad_limit in (0, 201, True, 1.5):
            with pytest.raises(MeshConfigError):
                await reg.discover("x", limit=bad_limit)  # type: ignore[arg-type]
        with pytest.raises(MeshConfigError):
            await reg.discover("")
        assert len(await reg.discover("x", limit=200)) == 4
    assert mock.calls == 2


async def test_find_by_display_name_never_falls_back_to_another_record() -> None:
    fuzzy = {
        "results": [
            record_json("alice-bot", capabilities=["alice-bot"]),
            record_json("alice2", capabilities=["alice2", "Alice"]),
            record_json("impostor", capabilities=["alice"], metadata={"display_name": "mallory"}),
        ]
    }
    async with mock_client(Mock(ok(fuzzy))) as reg:
        assert await reg.find_by_display_name("alice") is None
    exact = {
        "results": [
            record_json("stale", "2026-01-01T00:00:00+00:00", capabilities=["alice"]),
            record_json("other", "2026-01-03T00:00:00+00:00", capabilities=["bob"]),
            record_json("fresh", "2026-01-02T00:00:00+00:00", capabilities=["x", "alice"]),
            record_json("named", "2025-01-01T00:00:00+00:00", metadata={"display_name": "alice"}),
        ]
    }
    async with mock_client(Mock(ok(exact))) as reg:
        found = await reg.find_by_display_name("alice")
        assert found is not None and found.did == "fresh"
        with pytest.raises(MeshConfigError):
            await reg.find_by_display_name("")


async def test_verify_tier_request_shape_and_errors() -> None:
    token = "header.payload.signature"
    mock = Mock(ok({"did": ME.did, "tier": "verified", "verified_app_id": "app"}))
    async with mock_client(mock) as reg:
        assert (await reg.verify_tier(token))["tier"] == "verified"
    request = mock.requests[0]
    assert (request.method, request.url.raw_path) == ("POST", b"/v1/registry/verify")
    assert mock.body(0) == {"amid": ME.did, "verification_token": token}
    assert request.headers["content-type"] == "application/json"

    cases: list[tuple[httpx.Response, type[Exception], int | None, str]] = [
        (detail(401, "Token verification failed"), MeshAuthError, None, "token was rejected"),
        (detail(404, "Agent not registered"), MeshRegistryError, 404, "register() first"),
        (detail(404, "Not Found"), MeshRegistryError, 404, "no /v1/registry/verify"),
        (detail(503, "not configured"), MeshRegistryError, 503, "not configured"),
        (httpx.Response(500, text="Internal Server Error"), MeshRegistryError, 500, "HTTP 500"),
    ]
    for response, kind, status, words in cases:
        async with mock_client(Mock(response)) as reg:
            with pytest.raises(kind) as info:
                await reg.verify_tier(token)
        assert type(info.value) is kind and words in str(info.value)
        assert getattr(info.value, "status", None) == status
        assert token not in str(info.value)
    async with mock_client(Mock(ok({}))) as reg:
        for bad in ("", "x" * 8193):
            with pytest.raises(MeshConfigError):
                await reg.verify_tier(bad)


async def test_validation_error_details_never_echo_the_input() -> None:
    secret = "super-secret-token-value"
    body = {"detail": [{"loc": ["body", "verification_token"], "msg": "too long", "input": secret}]}
    async with mock_client(Mock(httpx.Response(422, json=body))) as reg:
        with pytest.raises(MeshRegistryError) as info:
            await reg.verify_tier(secret)
    assert "body.verification_token: too long" in str(info.value)
    assert secret not in str(info.value)


@pytest.mark.parametrize(
    ("args", "options"),
    [
        (("ftp://registry", ME), {}),
        (("registry.example:8082", ME), {}),
        (("http://", ME), {}),
        (("http://registry/?x=1", ME), {}),
        (("http://registry", "not an identity"), {}),
        (("http://registry", ME), {"timeout": 0}),
        (("http://registry", ME), {"timeout": float("inf")}),
        (("http://registry", ME), {"retries": -1}),
        (("http://registry", ME), {"retries": 1.5}),
        (("http://registry", ME), {"retry_base_delay": -1}),
        (("http://registry", ME), {"registration": "v2"}),
    ],
)
def test_constructor_validates(args: tuple[Any, ...], options: dict[str, Any]) -> None:
    with pytest.raises(MeshConfigError):
        RegistryClient(*args, **options)


async def test_register_validates_capabilities_and_metadata() -> None:
    mock = Mock(ok({}, 201))
    async with mock_client(mock) as reg:
        for caps, meta in (("alice", {}), ([1], {}), ([""], {}), ([], {"n": 1}), ([], [])):
            with pytest.raises(MeshConfigError):
                await reg.register(caps, meta)  # type: ignore[arg-type]
        for bad_did in ("", None):
            with pytest.raises(MeshConfigError):
                await reg.get_agent(bad_did)  # type: ignore[arg-type]
            with pytest.raises(MeshConfigError):
                await reg.fetch_bundle(bad_did)  # type: ignore[arg-type]
    assert mock.calls == 0


async def test_bodies_are_compact_utf8_json_like_json_stringify() -> None:
    mock = Mock(ok({}, 201))
    async with mock_client(mock, registration="legacy") as reg:
        await reg.register(["écrire"], {"n": "日本"})
        await reg.register(["lone\ud800"], {})
    assert mock.requests[0].content == json.dumps(
        {
            "did": ME.did,
            "public_key": b64url_encode(ME.x25519_public),
            "capabilities": ["écrire"],
            "metadata": {"n": "日本"},
        },
        separators=(",", ":"),
        ensure_ascii=False,
    ).encode("utf-8")
    assert b'"capabilities":["lone\\ud800"]' in mock.requests[1].content
    assert mock.body(1)["capabilities"] == ["lone\ud800"]


def test_agent_record() -> None:
    raw = record_json("d", metadata={"display_name": "alice", "n": "1"}, extra=[1])
    record = AgentRecord.from_json(raw)
    assert record.display_name == "alice" and record.raw == raw and record.raw is not raw
    assert hash(record) == hash(AgentRecord.from_json(raw))
    assert AgentRecord.from_json({"did": "d"}).display_name is None
    assert AgentRecord.from_json({"did": "d", "metadata": {"display_name": ""}}).display_name is None
    bads: list[Any] = [{"did": "d", "reputation_score": True}, {"did": "d", "last_seen": 5}, []]
    for bad in bads:
        with pytest.raises(MeshRegistryError):
            AgentRecord.from_json(bad)


# ----------------------------------------------------------------------------------
# a hostile registry: answers that are not strict JSON, or never end
# ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [b'{"did": NaN}', b'{"did": 1e400}', b"[" * 5000 + b"]" * 5000, b'{"did": "\xff"}'],
    ids=["nan", "overflow", "deep", "not-utf8"],
)
async def test_a_registry_answer_that_is_not_strict_json_is_a_registry_error(body: bytes) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=body, headers={"content-type": "application/json"})

    async with RegistryClient(MOCK_URL, ME, transport=httpx.MockTransport(answer), retries=0) as reg:
        with pytest.raises(MeshRegistryError, match="not valid JSON"):
            await reg.get_agent("did:mesh:" + "ab" * 16)


async def test_an_endless_registry_answer_is_cut_off_at_the_byte_limit() -> None:
    """A "registry" streaming a body without end: the client stops reading at the limit."""
    from agt_mesh.shell.registry import MAX_RESPONSE_BYTES

    sent = 0

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        chunk = b"[" * 65536
        try:
            while sent < 64 * MAX_RESPONSE_BYTES:
                writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await writer.drain()
                sent += len(chunk)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with RegistryClient(f"http://127.0.0.1:{port}", ME, retries=0, timeout=30) as reg:
            with pytest.raises(MeshRegistryError, match="exceeds"):
                await reg.get_agent("did:mesh:" + "ab" * 16)
    finally:
        server.close()
        await server.wait_closed()
    # the client hung up soon after the limit (socket buffers hold a little more)
    assert sent < 4 * MAX_RESPONSE_BYTES, sent
