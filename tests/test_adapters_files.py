"""File transfer: chunked and sha256-checked end to end, the size cap, and safe saving of
hostile names (no traversal, no absolute paths, no overwrite, no symlink following)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from test_adapters_support import agents

from agt_mesh.adapters import envelopes as envs
from agt_mesh.adapters.files import (
    DEFAULT_CHUNK_BYTES,
    FileReceiver,
    FileTransferError,
    plan_envelopes,
    read_outgoing,
    sanitize_name,
    save_incoming,
)
from agt_mesh.adapters.paths import FileRoots
from agt_mesh.shell.inbox import InboundMessage

MiB = 1024 * 1024


async def _acks(seen: list[InboundMessage], n: int) -> list[dict[str, Any]]:
    """The first ``n`` file_transfer_acks among ``seen`` (filled by an on_message hook)."""
    for _ in range(400):
        acks = [m.payload for m in seen if isinstance(m.payload, dict) and m.payload.get("type") == envs.FILE_ACK]
        if len(acks) >= n:
            return acks[:n]
        await asyncio.sleep(0.025)
    raise AssertionError(f"only {len(acks)} of {n} acks arrived")


async def test_5_mib_random_file_arrives_byte_identical(tmp_path: Path) -> None:
    data = os.urandom(5 * MiB)
    async with agents(tmp_path, "tx", "rx") as (_, [tx, rx]):
        src = tx.outbox / "payload.bin"
        src.write_bytes(data)
        r = await tx.tools.call(
            "mesh_transfer_file",
            {"to": rx.name, "file_path": "payload.bin", "description": "random bytes", "timeout_seconds": 60},
        )
        assert r["status"] == "delivered", r
        assert r["chunks"] == 20 and r["size_bytes"] == 5 * MiB and r["file_path"] == "payload.bin"
        assert r["sha256"] == hashlib.sha256(data).hexdigest()
        # the ack names the saved file relative to the receiver's incoming directory
        assert r["saved_to"] == r["saved_as"] == "payload.bin"
        saved = rx.incoming / r["saved_as"]
        assert hashlib.sha256(saved.read_bytes()).hexdigest() == r["sha256"]
        assert saved.stat().st_mode & 0o777 == 0o600
        # the receiving model sees a short notice, never the data nor an absolute path
        inbox = await rx.tools.call("mesh_inbox", {})
        (notice,) = inbox["messages"]
        assert notice["type"] == "file_received" and notice["from_name"] == tx.name
        assert notice["file"]["sha256"] == r["sha256"] and notice["file"]["saved_as"] == "payload.bin"
        assert notice["file"]["description"] == "random bytes"
        assert str(tmp_path) not in json.dumps(inbox)
        assert len(str(inbox)) < 2000
        # sending the same name again (an absolute path inside the outbox) never overwrites
        r2 = await tx.tools.call("mesh_transfer_file", {"to": rx.name, "file_path": str(src), "timeout_seconds": 60})
        assert r2["status"] == "delivered" and r2["saved_as"] == "payload-1.bin"
        assert sorted(p.name for p in rx.incoming.iterdir()) == ["payload-1.bin", "payload.bin"]


async def test_size_cap_refused_before_sending(tmp_path: Path) -> None:
    async with agents(tmp_path, "tx", "rx") as (_, [tx, rx]):
        big = tx.outbox / "big.bin"
        with big.open("wb") as f:
            f.truncate(30 * MiB + 1)
        exact = tx.outbox / "exact.bin"
        with exact.open("wb") as f:
            f.truncate(30 * MiB)
        sent: list[object] = []
        assert tx.client.transport is not None
        tx.client.transport.on_send = sent.append
        r = await tx.tools.call("mesh_transfer_file", {"to": rx.name, "file_path": str(big)})
        assert r["error"]["kind"] == "too_large" and "nothing was sent" in r["error"]["message"]
        assert tx.client.sessions() == [] and sent == []  # not even a KNOCK went out
        with pytest.raises(FileTransferError) as exc:
            read_outgoing("big.bin", tx.tools.roots)
        assert exc.value.kind == "too_large"
        assert read_outgoing("exact.bin", tx.tools.roots).size == 30 * MiB  # the cap itself is allowed
        # a configurable cap
        tx.tools.config.max_file_bytes = 1000
        small = tx.outbox / "small.bin"
        small.write_bytes(b"x" * 1001)
        r = await tx.tools.call("mesh_transfer_file", {"to": rx.name, "file_path": str(small)})
        assert r["error"]["kind"] == "too_large"


async def test_receiver_refuses_oversized_and_corrupt_transfers(tmp_path: Path) -> None:
    async with agents(tmp_path, "tx", "rx") as (_, [tx, rx]):
        rx.tools.receiver.max_bytes = 100_000
        (tx.outbox / "f.bin").write_bytes(os.urandom(200_000))
        r = await tx.tools.call("mesh_transfer_file", {"to": rx.name, "file_path": "f.bin", "timeout_seconds": 10})
        assert r["status"] == "rejected" and "limit" in r["error"]
        # a chunk whose data does not match the announced sha256
        data = os.urandom(1000)
        env = envs.file_chunk(
            transfer_id="t-bad",
            file_name="bad.bin",
            index=0,
            count=1,
            size_bytes=1000,
            sha256=hashlib.sha256(b"other").hexdigest(),
            data_b64=base64.b64encode(data).decode(),
            description="",
            from_agent="tx",
        )
        seen: list[InboundMessage] = []
        tx.client.on_message(seen.append)
        await tx.client.send(rx.client.did, env)
        (ack,) = await _acks(seen, 1)
        assert ack["success"] is False and ack["transfer_id"] == "t-bad" and "sha256" in ack["error"]
        await asyncio.sleep(0.1)
        kinds = [m["type"] for m in (await rx.tools.call("mesh_inbox", {}))["messages"]]
        assert kinds == ["file_transfer_failed", "file_transfer_failed"]
        assert not rx.incoming.exists() or list(rx.incoming.iterdir()) == []


async def test_hostile_names_saved_safely_inside_incoming(tmp_path: Path) -> None:
    incoming = tmp_path / "incoming"
    outside = tmp_path / "outside"
    outside.mkdir()
    incoming.mkdir()
    (incoming / "existing.txt").write_bytes(b"keep")
    # a planted symlink: writing through it would escape the directory
    (incoming / "passwd").symlink_to(outside / "target")
    hostile = [
        "../../etc/passwd",
        "/abs",
        "a/../../b",
        "evil\x00name.txt",
        "bell\x07\x1b[31mred\n.txt",
        "existing.txt",
        "..",
        ".",
        "",
        "....hidden",
        "C:\\windows\\system32\\x.dll",
        "é" * 300 + ".txt",
    ]
    async with agents(tmp_path, "tx", "rx") as (_, [tx, rx]):
        rx.tools.receiver.incoming_dir = incoming
        seen: list[InboundMessage] = []
        tx.client.on_message(seen.append)
        for i, name in enumerate(hostile):
            env = envs.file_transfer(
                transfer_id=f"t{i}",
                file_name=name,
                data_b64=base64.b64encode(f"data {i}".encode()).decode(),
                size_bytes=len(f"data {i}"),
                sha256=hashlib.sha256(f"data {i}".encode()).hexdigest(),
                description="",
                from_agent="tx",
            )
            await tx.client.send(rx.client.did, env)
        acks = await _acks(seen, len(hostile))
    saved: dict[str, str] = {}
    for p in acks:
        if p["file_name"] == "":
            assert p["success"] is False and "file_name" in p["error"]  # refused, nothing saved
            continue
        assert p["success"] is True, p
        assert p["saved_to"] == p["saved_as"] and "/" not in p["saved_as"], p
        path = incoming / p["saved_as"]
        assert path.is_file() and not path.is_symlink()
        saved[p["file_name"]] = p["saved_as"]
    assert saved["../../etc/passwd"] == "passwd-1"  # the planted symlink was neither followed nor replaced
    assert saved["/abs"] == "abs"
    assert saved["a/../../b"] == "b"
    assert saved["evil\x00name.txt"] == "evilname.txt"
    assert saved["bell\x07\x1b[31mred\n.txt"] == "bell[31mred.txt"
    assert saved["existing.txt"] == "existing-1.txt"
    assert saved["....hidden"] == "hidden"
    assert saved["C:\\windows\\system32\\x.dll"] == "x.dll"
    assert len(saved["é" * 300 + ".txt"].encode()) <= 200 and saved["é" * 300 + ".txt"].endswith(".txt")
    assert (incoming / "existing.txt").read_bytes() == b"keep"
    assert not (outside / "target").exists()
    assert {saved[n] for n in ("..", ".")} == {"file", "file-1"}
    for entry in incoming.iterdir():
        assert all(ord(c) >= 32 for c in entry.name) and not entry.name.startswith(".")


def test_sanitize_name_unit() -> None:
    assert sanitize_name("../../etc/passwd") == "passwd"
    assert sanitize_name("/abs") == "abs"
    assert sanitize_name("a/../../b") == "b"
    assert sanitize_name("x\x00y") == "xy"
    assert sanitize_name("..") == "file"
    assert sanitize_name(None) == "file"
    assert sanitize_name("dir/") == "dir"
    assert sanitize_name(" .env ") == "env"
    assert sanitize_name("a\u202eb.txt") == "ab.txt"  # bidi override is a format character


def test_save_incoming_never_follows_a_symlinked_directory_entry(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"secret")
    d = tmp_path / "in"
    d.mkdir()
    (d / "report.txt").symlink_to(target)
    name, path = save_incoming(d, "report.txt", b"new")
    assert name == "report-1.txt" and path.read_bytes() == b"new"
    assert target.read_bytes() == b"secret"


def test_chunks_reassemble_in_any_order_with_duplicates(tmp_path: Path) -> None:
    data = os.urandom(3 * DEFAULT_CHUNK_BYTES + 123)
    src = tmp_path / "f.bin"
    src.write_bytes(data)
    out = read_outgoing("f.bin", FileRoots(tmp_path, tmp_path / "in"))
    chunks = plan_envelopes(out, transfer_id="t1", description="d", from_agent="a")
    assert [c["type"] for c in chunks] == [envs.FILE_CHUNK] * 4
    assert all(len(c["data"]) <= DEFAULT_CHUNK_BYTES * 4 // 3 + 4 for c in chunks)
    rx = FileReceiver(tmp_path / "in")
    order = [chunks[2], chunks[0], chunks[2], chunks[3]]
    assert all(rx.accept_chunk("did:mesh:a", c) is None for c in order)
    done = rx.accept_chunk("did:mesh:a", chunks[1])
    assert done is not None and done.path.read_bytes() == data and done.sha256 == out.sha256
    assert rx.accept_chunk("did:mesh:a", chunks[1]) == done  # duplicate after completion
    assert rx.pending == 0
    # another sender's chunks with the same transfer id are a separate transfer
    assert rx.accept_chunk("did:mesh:b", chunks[0]) is None and rx.pending == 1


def test_read_outgoing_root_confinement(tmp_path: Path) -> None:
    root = tmp_path / "sandbox"
    root.mkdir()
    (root / "ok.txt").write_text("ok")
    (root / "sub").mkdir()
    (root / "sub" / "deep.txt").write_text("deep")
    (root / "inner-link").symlink_to(root / "sub" / "deep.txt")  # stays inside: allowed
    secret = tmp_path / "secret.txt"
    secret.write_text("no")
    (root / "link").symlink_to(secret)
    roots = FileRoots(root, tmp_path / "in")
    assert read_outgoing("ok.txt", roots).data == b"ok"
    assert read_outgoing("sub/deep.txt", roots).relative == "sub/deep.txt"
    assert read_outgoing(str(root / "inner-link"), roots).data == b"deep"
    for bad in ("../secret.txt", str(secret), "link", "/etc/passwd"):
        with pytest.raises(FileTransferError) as exc:
            read_outgoing(bad, roots)
        assert exc.value.kind == "path_outside_root"
    with pytest.raises(FileTransferError) as exc:
        read_outgoing(str(root), roots)
    assert exc.value.kind == "not_a_file"
    with pytest.raises(FileTransferError) as exc:
        read_outgoing("missing.txt", roots)
    assert exc.value.kind == "not_found"
