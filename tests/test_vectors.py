"""Known-answer vectors: the committed files verify, tampering is caught, and the
generators (real npm TypeScript SDK 4.0.0, real AGT Python 5.0.0) reproduce them."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agt_mesh.vectors import verify_document

ROOT = Path(__file__).resolve().parent.parent
VECTOR_FILES = sorted((ROOT / "vectors").glob("*.json"))


def test_there_are_vector_files_from_both_implementations() -> None:
    names = {p.name for p in VECTOR_FILES}
    assert "ts-npm-4.0.0.json" in names
    assert "agt-python-5.0.0.json" in names


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.name)
def test_cli_verifies_committed_file(path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agt_mesh", "vectors", "verify", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    doc = json.loads(path.read_text())
    assert len(lines) == len(doc["cases"]) + 1
    assert all(line.startswith("ok ") for line in lines[:-1])
    assert lines[-1] == f"{len(doc['cases'])} passed, 0 failed"


def _expect_leaves(obj: Any, path: tuple[Any, ...] = (), inside: bool = False) -> Iterator[tuple[Any, ...]]:
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from _expect_leaves(value, (*path, key), inside or key == "expect")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from _expect_leaves(value, (*path, i), inside)
    elif inside and isinstance(obj, str):
        yield path


def _flip(value: str) -> str:
    try:
        raw = bytearray(bytes.fromhex(value))
    except ValueError:
        raw = bytearray()
    if raw:
        raw[len(raw) // 2] ^= 0x01
        return raw.hex()
    if value == "":
        return "00"
    i = len(value) // 2
    return value[:i] + chr(ord(value[i]) ^ 0x01) + value[i + 1 :]


def _set(obj: Any, path: tuple[Any, ...], value: Any) -> None:
    for key in path[:-1]:
        obj = obj[key]
    obj[path[-1]] = value


def _get(obj: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        obj = obj[key]
    return obj


@pytest.mark.parametrize("path", VECTOR_FILES, ids=lambda p: p.name)
def test_any_flipped_byte_in_an_expected_value_fails(path: Path) -> None:
    doc = json.loads(path.read_text())
    checked = 0
    for case in doc["cases"]:
        single = {**doc, "cases": [case]}
        assert verify_document(single)[0].ok
        for leaf in _expect_leaves(case):
            tampered = copy.deepcopy(case)
            _set(tampered, leaf, _flip(_get(case, leaf)))
            result = verify_document({**doc, "cases": [tampered]})
            assert not result[0].ok, f"{case['name']}: flipping {leaf} went unnoticed"
            checked += 1
    assert checked > 100


def test_flipped_file_makes_cli_exit_nonzero(tmp_path: Path) -> None:
    doc = json.loads((ROOT / "vectors" / "ts-npm-4.0.0.json").read_text())
    session = next(c for c in doc["cases"] if c["kind"] == "session")
    event = next(e for e in session["events"] if e["op"] == "encrypt")
    event["expect"]["ciphertext"] = _flip(event["expect"]["ciphertext"])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    proc = subprocess.run(
        [sys.executable, "-m", "agt_mesh", "vectors", "verify", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode != 0
    assert f"FAIL {bad}: {session['name']}:" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].endswith("passed, 1 failed")


def test_unknown_kind_fails_and_unknown_fields_are_ignored() -> None:
    doc = json.loads((ROOT / "vectors" / "ts-npm-4.0.0.json").read_text())
    ident = copy.deepcopy(next(c for c in doc["cases"] if c["kind"] == "identity"))
    ident["some_future_field"] = {"x": 1}
    ident["expect"]["also_new"] = "ignored"
    unknown = {"name": "mystery", "kind": "quantum_teleport"}
    results = verify_document({**doc, "new_top_level": True, "cases": [ident, unknown]})
    assert [r.ok for r in results] == [True, False]
    assert "unknown case kind" in results[1].detail


def test_wrong_format_or_kdf_fails() -> None:
    assert not verify_document({"format": "other", "cases": []})[0].ok
    assert not verify_document({"format": "agt-mesh-vectors/1", "x3dh_kdf": "md5", "cases": [{}]})[0].ok


def test_wrong_profile_is_detected() -> None:
    """Legacy vectors checked as spec fail at the shared secret: the KDF really matters."""
    doc = json.loads((ROOT / "vectors" / "ts-npm-4.0.0.json").read_text())
    sessions = [c for c in doc["cases"] if c["kind"] == "session"]
    results = verify_document({**doc, "x3dh_kdf": "spec", "cases": sessions})
    assert results and not any(r.ok for r in results)
    assert all("sk" in r.detail for r in results)


def _without_generator(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "generator"}


def test_npm_generator_reproduces_committed_vectors(tmp_path: Path, node_modules: Path) -> None:
    out = tmp_path / "ts.json"
    subprocess.run(
        ["node", str(ROOT / "vectors" / "generate_ts.js"), "--out", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    committed = json.loads((ROOT / "vectors" / "ts-npm-4.0.0.json").read_text())
    assert _without_generator(json.loads(out.read_text())) == _without_generator(committed)


def test_agt_python_generator_reproduces_committed_vectors(tmp_path: Path, agt_core_python: Path) -> None:
    out = tmp_path / "agt.json"
    subprocess.run(
        [str(agt_core_python), str(ROOT / "vectors" / "generate_agt_python.py"), "--out", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    committed = json.loads((ROOT / "vectors" / "agt-python-5.0.0.json").read_text())
    assert _without_generator(json.loads(out.read_text())) == _without_generator(committed)


def test_independent_checker_agrees() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "vectors" / "check_independent.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1].endswith(" 0 failed")


def test_pq_generator_reproduces_committed_vectors_byte_for_byte(tmp_path: Path) -> None:
    """The post-quantum vectors come from an independent computation (no agt_mesh import):
    the generator must rewrite the committed file exactly."""
    out = tmp_path / "pq.json"
    subprocess.run(
        [sys.executable, str(ROOT / "vectors" / "generate_pq.py"), "--out", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert out.read_bytes() == (ROOT / "vectors" / "pq-hybrid-v1.json").read_bytes()


def test_pq_independent_checks_agree() -> None:
    """The plain-Python ML-KEM agrees with OpenSSL, and every recorded case recomputes with
    OpenSSL doing key generation and decapsulation."""
    for args in (["mlkem_ref.py"], ["generate_pq.py", "--check"]):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "vectors" / args[0]), *args[1:]],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert proc.stdout.strip().splitlines()[-1].endswith(" 0 failed")


def test_pq_session_with_a_tampered_ciphertext_input_fails() -> None:
    doc = json.loads((ROOT / "vectors" / "pq-hybrid-v1.json").read_text())
    session = copy.deepcopy(next(c for c in doc["cases"] if c["kind"] == "pq_session"))
    session["kem_ciphertext"] = _flip(session["kem_ciphertext"])
    result = verify_document({**doc, "cases": [session]})[0]
    assert not result.ok and "knock establishment" in result.detail
