"""``agt-mesh``: start-up, identity commands, argument handling, decode, exit codes.

Subprocess tests (``python -m agt_mesh``); the few that need servers use the dev relay or
tiny loopback stand-ins (a 429-only registry, a socket that never answers).  The
end-to-end flows are in ``test_cli_flows.py`` and ``test_cli_ts.py``.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_helpers import (
    PY,
    ROOT,
    blackhole,
    clean_env,
    cli,
    free_port,
    new_identity,
    ok,
    rate_limited_registry,
    skewed_registry,
)
from servers import ServerPair

from agt_mesh.cli.errors import EXIT_AUTH, EXIT_IO, EXIT_RATE_LIMITED, EXIT_UNEXPECTED, EXIT_USAGE, exit_code_for
from agt_mesh.core import frames as fr
from agt_mesh.core.identity import Identity
from agt_mesh.errors import (
    BundleVerificationError,
    IdentityFileError,
    MeshAuthError,
    MeshConfigError,
    MeshRegistryError,
    MeshStateError,
    MeshTransportError,
    MessageAuthError,
    PeerNotFoundError,
)
from agt_mesh.shell.lock import LockHeldError, WriterLock

HEAVY = ("agt_mesh.shell.client", "httpx", "websockets", "nacl", "cryptography", "msgpack")


@pytest.fixture(scope="module")
def dev() -> Iterator[ServerPair]:
    pair = ServerPair("dev").start()
    yield pair
    pair.stop()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    return d


# -- start-up -----------------------------------------------------------------------------


def test_importing_the_cli_loads_no_heavy_module() -> None:
    code = f"import sys, agt_mesh.cli.main; print([m for m in {HEAVY!r} if m in sys.modules])"
    out = subprocess.run([PY, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_starts_fast() -> None:
    times = []
    for _ in range(5):
        res = cli("--help")
        assert res.code == 0
        times.append(res.seconds)
    assert "send" in res.out and "doctor" in res.out and "exit codes" in res.out
    # the budget is 0.3 s; the slack is for loaded CI machines (see benchmarks/cli_startup.py)
    assert statistics.median(times) < 0.5, times


@pytest.mark.parametrize(
    "command",
    [
        ["identity", "new"],
        ["identity", "show"],
        ["identity", "did"],
        ["identity", "export-public"],
        ["send"],
        ["listen"],
        ["inbox"],
        ["discover"],
        ["peer"],
        ["bundle", "show"],
        ["bundle", "upload"],
        ["session", "list"],
        ["session", "show"],
        ["session", "reset"],
        ["decode"],
        ["doctor"],
        ["vectors", "verify"],
        ["demo"],
        ["relay"],
    ],
)
def test_every_command_has_help(command: list[str]) -> None:
    res = cli(*command, "--help")
    assert res.code == 0, str(res)
    assert "usage:" in res.out


def test_usage_errors_exit_1() -> None:
    assert cli("frobnicate").code == EXIT_USAGE
    res = cli("send", "hello")  # no --to
    assert res.code == EXIT_USAGE and "--to" in res.err
    assert cli().code == EXIT_USAGE


# -- identity -----------------------------------------------------------------------------


def test_identity_new_in_existing_empty_0700_dir(state: Path) -> None:
    res = ok("identity", "new", "--state-dir", str(state), "--json")
    data = res.json()
    assert data["did"].startswith("did:mesh:") and len(data["did"]) == 41
    assert set(data) == {"did", "ed25519_public", "x25519_public", "path"}
    path = state / "identity.json"
    assert (path.stat().st_mode & 0o777) == 0o600
    assert "ed25519_seed" not in res.out
    text = ok("identity", "did", "--state-dir", str(state)).out.strip()
    assert text == data["did"]


def test_identity_new_text_and_refusal_to_overwrite(state: Path) -> None:
    res = ok("identity", "new", "--state-dir", str(state))
    did = res.out.splitlines()[0]
    assert did.startswith("did:mesh:") and "x25519 public key" in res.out
    again = cli("identity", "new", "--state-dir", str(state))
    assert again.code == EXIT_USAGE and "--force" in again.err
    assert ok("identity", "did", "--state-dir", str(state)).out.strip() == did
    forced = ok("identity", "new", "--state-dir", str(state), "--force", "--json").json()
    assert forced["did"] != did
    assert (state / "identity.json").stat().st_mode & 0o777 == 0o600


def test_identity_new_creates_missing_dir_0700(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "home"
    ok("identity", "new", "--state-dir", str(target))
    assert target.stat().st_mode & 0o777 == 0o700


def test_identity_new_custom_path(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "agent.json"
    data = ok("identity", "new", "--path", str(path), "--json").json()
    assert data["path"] == str(path)
    assert ok("identity", "did", "--path", str(path)).out.strip() == data["did"]


def test_identity_show_did_export_public(state: Path) -> None:
    did = new_identity(state)
    show = ok("identity", "show", "--state-dir", str(state), "--json").json()
    assert show["did"] == did
    assert set(show) == {"did", "ed25519_public", "x25519_public", "path", "created_at", "display_name"}
    assert show["display_name"] is None and show["created_at"].endswith("Z")
    text = ok("identity", "show", "--state-dir", str(state)).out
    assert did in text and "mode 0600" in text
    assert ok("identity", "did", "--state-dir", str(state), "--json").json() == {"did": did}
    pub = json.loads(ok("identity", "export-public", "--state-dir", str(state)).out)
    assert pub == {k: show[k] for k in ("did", "ed25519_public", "x25519_public")}
    compact = ok("identity", "export-public", "--state-dir", str(state), "--json").out
    assert json.loads(compact) == pub and compact.count("\n") == 1
    seed = json.loads((state / "identity.json").read_text())["ed25519_seed"]
    for res in (show, text, pub, compact):
        assert seed not in json.dumps(res)


def test_missing_identity_says_how_to_create_one(state: Path) -> None:
    res = cli("identity", "show", "--state-dir", str(state))
    assert res.code == EXIT_USAGE and "agt-mesh identity new" in res.err


@pytest.mark.parametrize(
    "command", [["identity", "show"], ["identity", "did"], ["session", "list"], ["bundle", "show"]]
)
def test_unsafe_identity_file_exits_1_with_the_fix(state: Path, command: list[str]) -> None:
    new_identity(state)
    path = state / "identity.json"
    path.chmod(0o644)
    res = cli(*command, "--state-dir", str(state))
    assert res.code == EXIT_USAGE, str(res)
    assert f"chmod 600 {path}" in res.err


def test_unsafe_state_dir_and_store_exit_1_with_the_fix(state: Path) -> None:
    new_identity(state)
    state.chmod(0o777)
    try:
        res = cli("session", "list", "--state-dir", str(state))
        assert res.code == EXIT_USAGE and f"chmod 700 {state}" in res.err
        res = cli("identity", "new", "--state-dir", str(state), "--force")
        assert res.code == EXIT_USAGE and f"chmod 700 {state}" in res.err
    finally:
        state.chmod(0o700)
    db = state / "state.db"
    db.write_bytes(b"")
    db.chmod(0o644)
    res = cli("session", "list", "--state-dir", str(state))
    assert res.code == EXIT_USAGE and f"chmod 600 {db}" in res.err


# -- global options -----------------------------------------------------------------------


def test_global_options_before_and_after_the_command_and_env(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    did_a, did_b = new_identity(a), new_identity(b)
    assert ok("--state-dir", str(a), "identity", "did").out.strip() == did_a
    assert ok("identity", "did", "--state-dir", str(a)).out.strip() == did_a
    assert ok("--json", "identity", "did", "--state-dir", str(b)).json() == {"did": did_b}
    env = clean_env(AGT_MESH_HOME=str(b))
    assert ok("identity", "did", env=env).out.strip() == did_b
    # the command line beats the environment
    assert ok("identity", "did", "--state-dir", str(a), env=env).out.strip() == did_a
    res = cli("identity", "did", env=clean_env(AGT_MESH_HOME=str(a), AGT_PROFILE="ts-sdk-5"))
    assert res.code == EXIT_USAGE and "AGT_PROFILE" in res.err
    res = cli("send", "--profile", "bogus", "--to", "x", "hi")
    assert res.code == EXIT_USAGE


def test_send_needs_relay_and_registry_urls(state: Path) -> None:
    new_identity(state)
    res = cli("send", "--state-dir", str(state), "--to", "bob", "hi")
    assert res.code == EXIT_USAGE and "AGT_RELAY_URL" in res.err
    res = cli("send", "--state-dir", str(state), "--relay", "http://127.0.0.1:9", "--to", "bob", "hi")
    assert res.code == EXIT_USAGE and "AGT_REGISTRY_URL" in res.err


@pytest.mark.parametrize(
    "command",
    [
        ["send", "--to", "did:mesh:xyz", "hi"],
        ["send", "--to", "did:web:example.com", "hi"],
        ["peer", "did:mesh:0123"],
        ["session", "show", "did:mesh:ZZ"],
        ["listen", "--from", "did:bogus", "--count", "1"],
    ],
)
def test_bad_did_exits_1(state: Path, command: list[str]) -> None:
    new_identity(state)
    res = cli(*command, "--state-dir", str(state), "--relay", "http://127.0.0.1:9", "--registry", "http://127.0.0.1:9")
    assert res.code == EXIT_USAGE, str(res)
    assert "not a valid did:mesh DID" in res.err


def test_send_payload_arguments(state: Path) -> None:
    new_identity(state)
    base = ["send", "--state-dir", str(state), "--relay", "http://127.0.0.1:9", "--registry", "http://127.0.0.1:9"]
    res = cli(*base, "--to", "bob")
    assert res.code == EXIT_USAGE and "exactly one of" in res.err
    res = cli(*base, "--to", "bob", "hi", "--json-payload", "{}")
    assert res.code == EXIT_USAGE
    res = cli(*base, "--to", "bob", "--json-payload", "{nope")
    assert res.code == EXIT_USAGE and "not valid JSON" in res.err
    res = cli(*base, "--to", "bob", "--file", str(state / "missing.txt"))
    assert res.code == EXIT_USAGE and "cannot read" in res.err
    binary = state / "blob.bin"
    binary.write_bytes(b"\xff\xfe\x00")
    res = cli(*base, "--to", "bob", "--file", str(binary))
    assert res.code == EXIT_USAGE and "not UTF-8" in res.err


def test_session_commands_without_sessions(state: Path) -> None:
    new_identity(state)
    assert ok("session", "list", "--state-dir", str(state), "--json").json() == {"sessions": []}
    res = ok("session", "list", "--state-dir", str(state))
    assert res.out == "" and "no sessions" in res.err
    res = cli("session", "show", "did:mesh:" + "0" * 32, "--state-dir", str(state))
    assert res.code == EXIT_USAGE and "no session" in res.err
    res = cli("session", "reset", "bob", "--state-dir", str(state))
    assert res.code == EXIT_USAGE and "no session" in res.err
    bundle = ok("bundle", "show", "--state-dir", str(state), "--json").json()
    assert bundle["signed_pre_key"] is None and bundle["one_time_pre_keys"] == 0


# -- decode -------------------------------------------------------------------------------

A = Identity.from_seed(bytes(range(32)))
B = Identity.from_seed(bytes(range(1, 33)))
TS = "2026-01-01T00:00:00.000Z"


def _decode(frame: dict[str, object] | str, *extra: str) -> tuple[int, dict[str, object], str]:
    text = frame if isinstance(frame, str) else json.dumps(frame)
    res = cli("decode", text, "--json", *extra)
    data = res.json_lines()[0] if res.out.strip() else {}
    return res.code, data, cli("decode", text, *extra).out


def test_decode_knock() -> None:
    from agt_mesh.core.x3dh import Establishment

    est = Establishment(A.x25519_public, bytes(range(32)), 7)
    code, d, text = _decode(fr.knock_frame(A.did, B.did, "k-1", TS, est))
    assert code == 0
    assert d["type"] == "knock" and d["valid"] and d["from"] == A.did and d["to"] == B.did
    assert d["establishment"]["otk"] == 7 and d["intent"] == {"action": "establish_session"}
    assert "one-time pre-key #7" in text and "KNOCK" in text
    for key in ("type", "valid", "error", "size", "from", "to", "id", "ts", "summary", "notes"):
        assert key in d


def test_decode_knock_reply_names_the_knock() -> None:
    code, d, text = _decode(fr.knock_accept_frame(B.did, A.did, "r-1", "k-1", TS))
    assert code == 0 and d["type"] == "knock_accept" and d["knock_id"] == "k-1"
    assert "answers knock: k-1" in text
    code, d, _ = _decode(fr.knock_reject_frame(B.did, A.did, "r-2", "k-1", TS))
    assert d["reason"] == "policy_denied" and "rejects" in str(d["summary"])


def test_decode_message_sizes_and_header() -> None:
    header = bytes(range(32)) + (3).to_bytes(4, "big") + (5).to_bytes(4, "big")
    blob = bytes(12 + 20 + 16)
    code, d, text = _decode(fr.message_frame(A.did, B.did, "m-1", TS, header, blob))
    assert code == 0
    assert d["header"]["pn"] == 3 and d["header"]["n"] == 5
    assert d["ciphertext_bytes"] == 48 and d["plaintext_bytes"] == 20
    assert "12 nonce + 20 plaintext + 16 tag" in text


def test_decode_plaintext_message_shows_the_payload() -> None:
    code, d, _ = _decode(fr.plaintext_message_frame(A.did, B.did, "p-1", TS, {"hi": 1}))
    assert code == 0 and d["header"] is None and d["plaintext_flag"] is True
    assert any('{"hi":1}' in n for n in d["notes"])


def test_decode_connect_checks_the_proof_of_possession() -> None:
    stamp = fr.iso_timestamp(time.time())
    good = fr.connect_frame(A.did, identity=A, timestamp=stamp, token="secret-token")
    code, d, text = _decode(good)
    assert code == 0 and d["pop"]["did_matches_key"] is True and d["pop"]["signature_valid"] is True
    assert abs(d["pop"]["skew_seconds"]) < 60
    assert "secret-token" not in text and "secret-token" not in json.dumps(d)
    forged = dict(good, **{"from": B.did})
    _, d, _ = _decode(forged)
    assert d["pop"]["did_matches_key"] is False
    old = fr.connect_frame(A.did, identity=A, timestamp="2020-01-01T00:00:00.000Z")
    _, d, _ = _decode(old)
    assert any("outside the ±5 min" in n for n in d["notes"])


def test_decode_other_frames() -> None:
    for frame, word in (
        (fr.ack_frame("m-1"), "ack"),
        (fr.heartbeat_frame(A.did, TS), "heartbeat"),
        ({"type": "error", "detail": "DID proof failed: expired"}, "POP refusal"),
        ({"v": 1, "type": "teleport"}, "unknown frame type"),
    ):
        code, d, text = _decode(frame)
        assert code == 0 and d["valid"], d
        assert word in text


def test_decode_pending_messages_explains_each_entry() -> None:
    inner = [fr.knock_accept_frame(B.did, A.did, "r-1", "k-1", TS), {"type": "message", "from": B.did}]
    code, d, text = _decode({"type": "pending_messages", "messages": inner})
    assert code == 0
    entries = d["entries"]
    assert isinstance(entries, list) and len(entries) == 2
    assert entries[0]["valid"] and not entries[1]["valid"]
    assert "entry 1:" in text


def test_decode_rejects_what_is_not_a_frame() -> None:
    code, d, _ = _decode("not json")
    assert code == EXIT_USAGE and d["valid"] is False and "not valid JSON" in str(d["error"])
    code, d, text = _decode({"type": "message", "id": "x"})  # no from, no ciphertext
    assert code == EXIT_USAGE and d["valid"] is False and "malformed" in text


def test_decode_reads_frames_from_stdin() -> None:
    lines = "\n".join(json.dumps(f) for f in (fr.ack_frame("1"), fr.ack_frame("2"), fr.ack_frame("3")))
    res = ok("decode", "-", "--json", input=lines + "\n")
    assert [d["id"] for d in res.json_lines()] == ["1", "2", "3"]
    res = ok("decode", "-", input=json.dumps(fr.ack_frame("9"), indent=2))
    assert "ack of frame 9" in res.out


# -- exit codes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (MeshRegistryError("slow down", status=429), EXIT_RATE_LIMITED),
        (MeshRegistryError("gone", status=500), EXIT_IO),
        (MeshRegistryError("unreachable", status=None), EXIT_IO),
        (PeerNotFoundError("who?", status=404), EXIT_USAGE),
        (MeshAuthError("pop refused"), EXIT_AUTH),
        (BundleVerificationError("bad signature"), EXIT_AUTH),
        (MessageAuthError("tag"), EXIT_AUTH),
        (IdentityFileError("chmod 600"), EXIT_USAGE),
        (MeshConfigError("bad"), EXIT_USAGE),
        (LockHeldError("held", pid=1, path=Path("/x")), EXIT_IO),
        (MeshTransportError("down"), EXIT_IO),
        (MeshStateError("corrupt"), EXIT_IO),
        (TimeoutError(), EXIT_IO),
        (OSError("disk"), EXIT_IO),
        (RuntimeError("bug"), EXIT_UNEXPECTED),
    ],
)
def test_exit_code_mapping(exc: BaseException, code: int) -> None:
    assert exit_code_for(exc) == code


def test_rate_limited_registry_exits_5(state: Path) -> None:
    new_identity(state)
    with rate_limited_registry() as url:
        common = ["--state-dir", str(state), "--registry", url]
        res = cli("discover", "anything", *common)
        assert res.code == EXIT_RATE_LIMITED, str(res)
        assert "rate limited" in res.err and "retry after 7 s" in res.err
        res = cli("send", "--to", "bob", "hi", "--relay", "http://127.0.0.1:9", *common)
        assert res.code == EXIT_RATE_LIMITED, str(res)
        res = cli("bundle", "upload", *common)
        assert res.code == EXIT_RATE_LIMITED, str(res)


def test_unreachable_registry_exits_3(state: Path) -> None:
    new_identity(state)
    url = f"http://127.0.0.1:{free_port()}"
    res = cli("discover", "x", "--state-dir", str(state), "--registry", url)
    assert res.code == EXIT_IO and "unreachable" in res.err
    res = cli(
        "send", "--to", "bob", "hi", "--state-dir", str(state), "--registry", url, "--relay", url, "--timeout", "5"
    )
    assert res.code == EXIT_IO and res.seconds < 10, str(res)


def test_unreachable_relay_exits_3_within_the_timeout(dev: ServerPair, state: Path) -> None:
    new_identity(state)
    common = ["--state-dir", str(state), "--registry", dev.registry_url]
    closed = f"http://127.0.0.1:{free_port()}"
    res = cli("send", "--to", "bob", "hi", "--relay", closed, *common, "--timeout", "5")
    assert res.code == EXIT_IO and "cannot reach relay" in res.err and res.seconds < 5, str(res)
    with blackhole() as silent:
        res = cli("send", "--to", "bob", "hi", "--relay", silent, *common, "--timeout", "3")
        assert res.code == EXIT_IO, str(res)
        assert 2.5 < res.seconds < 6, str(res)
        res = cli("listen", "--count", "1", "--relay", silent, *common, "--timeout", "2")
        assert res.code == EXIT_IO and res.seconds < 6, str(res)


def test_lock_held_exits_3_naming_the_pid(dev: ServerPair, state: Path) -> None:
    new_identity(state)
    urls = ["--relay", dev.relay_url, "--registry", dev.registry_url, "--state-dir", str(state)]
    with WriterLock(state):
        for command in (
            ["send", "--to", "bob", "hi"],
            ["listen", "--count", "1"],
            ["inbox"],
            ["inbox", "--local"],
            ["bundle", "upload"],
        ):
            res = cli(*command, *urls)
            assert res.code == EXIT_IO, (command, str(res))
            assert f"process {os.getpid()}" in res.err
        # reading works while another process holds the lock
        ok("session", "list", *urls)
        ok("bundle", "show", *urls)
        doctor = cli("doctor", *urls, "--json").json()
        lock = next(c for c in doctor["checks"] if c["name"] == "lock")
        assert lock["status"] == "warn" and str(os.getpid()) in lock["detail"]


def test_relay_refusing_our_credentials_exits_4(state: Path) -> None:
    pair = ServerPair("dev", extra_args=["--token", "s3cret"]).start()
    try:
        new_identity(state)
        common = ["--state-dir", str(state), "--relay", pair.relay_url, "--registry", pair.registry_url]
        res = cli("listen", "--count", "1", "--timeout", "10", *common)
        assert res.code == EXIT_AUTH, str(res)
        assert "4003" in res.err
        doctor = cli("doctor", *common)
        assert doctor.code == EXIT_AUTH and "AGENTMESH_RELAY_TOKEN" in doctor.out
        env = clean_env(AGENTMESH_RELAY_TOKEN="s3cret")
        res = cli("listen", "--timeout", "1", *common, env=env)
        assert res.code == 0, str(res)
        assert cli("doctor", *common, env=env).code == 0
    finally:
        pair.stop()


# -- tools --------------------------------------------------------------------------------


def test_vectors_verify() -> None:
    files = sorted(str(p) for p in (ROOT / "vectors").glob("*.json"))
    assert files
    assert "0 failed" in ok("vectors", "verify", *files).out
    data = ok("vectors", "verify", "--json", *files).json()
    assert data["failed"] == 0 and data["passed"] == len(data["cases"]) > 0
    assert cli("vectors", "verify", str(ROOT / "README.md")).code == EXIT_USAGE


def test_relay_and_bench_pass_their_arguments_through() -> None:
    res = ok("relay", "--help")
    assert "--relay-port" in res.out
    res = ok("--json", "relay", "--help")
    assert "--relay-port" in res.out
    res = ok("bench", "--help")
    assert "--rounds" in res.out
    for command in (["mcp"], ["hermes-install"], ["openclaw-bundle"], ["bridge", "hermes"]):
        res = ok(*command, "--help")
        assert f"agt-mesh {' '.join(command)}" in res.out
    assert cli("bridge", "nonsense").code == EXIT_USAGE


def test_bench_without_a_source_checkout_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from agt_mesh.cli import main as cli_main
    from agt_mesh.cli import tools

    monkeypatch.setattr(tools, "benchmarks_dir", lambda: None)
    assert cli_main.main(["bench"]) == EXIT_USAGE
    assert "source checkout" in capsys.readouterr().err


def test_demo_text_and_json() -> None:
    assert "every message was read by its recipient" in ok("demo").out
    data = ok("demo", "--json").json()
    assert data["transcript"]


def test_doctor_finds_clock_skew_and_unsafe_files(state: Path) -> None:
    new_identity(state)
    with skewed_registry(+600) as url:
        res = cli("doctor", "--state-dir", str(state), "--registry", url, "--json")
        assert res.code == EXIT_AUTH, str(res)
        checks = {c["name"]: c for c in res.json()["checks"]}
        assert checks["clock"]["status"] == "fail" and "±5 min" in checks["clock"]["detail"]
        assert re.match(r"local clock is (599|600|601) s behind the registry", checks["clock"]["detail"])
        assert checks["registration"]["status"] == "warn"  # the stand-in knows nobody
        assert checks["relay"]["status"] == "skip"
    with skewed_registry(-90) as url:
        checks = {
            c["name"]: c for c in cli("doctor", "--state-dir", str(state), "--registry", url, "--json").json()["checks"]
        }
        assert checks["clock"]["status"] == "warn"
    (state / "identity.json").chmod(0o640)
    res = cli("doctor", "--state-dir", str(state))
    assert res.code == EXIT_USAGE
    assert f"fix: chmod 600 {state / 'identity.json'}" in res.out
