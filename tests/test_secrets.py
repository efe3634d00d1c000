"""Secrets hygiene: no private key material in logs, exceptions, reprs or CLI output.

A full conversation between two durable MeshClients through the dev relay (connect, KNOCK,
20 messages each way, a dropped connection and reconnect, disconnect) runs with the root
logger at DEBUG.  Every private value the run ever held — identity seeds, X25519 identity
privates, signed and one-time pre-key privates, every ratchet root/chain key and ratchet
private key (snapshotted after every message), skipped message keys — is then searched
for in hex (lower/upper), standard base64, base64url (padded or not, at every byte
alignment) and Python ``bytes`` repr form in:

* the captured log records (with tracebacks),
* the text of exceptions from the error paths we can trigger,
* ``repr()``/``str()`` of every public object,
* the JSON output and ``-v`` stderr of ``agt-mesh identity show / session list / session show
  / bundle show / doctor / peer``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import clean_env

from agt_mesh.core import frames as fr
from agt_mesh.core.identity import Identity
from agt_mesh.core.ratchet import DoubleRatchet
from agt_mesh.core.session import PeerSession
from agt_mesh.dev.server import DevMesh
from agt_mesh.errors import MeshError
from agt_mesh.shell.client import MeshClient
from agt_mesh.shell.identity_file import load_identity, save_identity
from agt_mesh.shell.relay import RelayTransport
from agt_mesh.shell.store import StateStore

ROOT = Path(__file__).resolve().parent.parent


class Secrets:
    def __init__(self) -> None:
        self.values: dict[bytes, str] = {}

    def add(self, value: bytes | None, label: str) -> None:
        if value and len(value) >= 16 and value not in self.values:
            self.values[value] = label

    def add_ratchet(self, r: DoubleRatchet | None, label: str) -> None:
        if r is None:
            return
        self.add(r.rk, f"{label}.rk")
        self.add(r.cks, f"{label}.cks")
        self.add(r.ckr, f"{label}.ckr")
        self.add(r.dhs_priv, f"{label}.dhs_priv")
        for key, mk in (r.skipped or {}).items():
            self.add(mk, f"{label}.skipped{key[1]}")

    def add_client(self, c: MeshClient, who: str) -> None:
        ident = c.identity
        self.add(ident.export_seed(), f"{who}.seed")
        self.add(ident.x25519_private, f"{who}.x25519_private")
        store = c.prekeys
        if store.signed_pre_key is not None:
            self.add(store.signed_pre_key.private, f"{who}.spk")
        for spk in getattr(store, "retired_signed_pre_keys", ()) or ():
            self.add(getattr(spk, "private", None), f"{who}.spk-retired")
        for otk in store.one_time_pre_keys:
            self.add(otk.private, f"{who}.otk{otk.key_id}")
        for peer, s in c.protocol.sessions.items():
            self.add_ratchet(s.primary, f"{who}.{peer[-6:]}.primary")
            self.add_ratchet(s.previous, f"{who}.{peer[-6:]}.previous")
            for i, cand in enumerate(s.candidates):
                self.add_ratchet(cand.ratchet, f"{who}.{peer[-6:]}.cand{i}")

    def forms(self, value: bytes) -> Iterable[str]:
        yield value.hex()
        yield value.hex().upper()
        yield repr(value)[2:-1]
        for shift in range(3):
            padded = bytes(shift) + value
            for enc in (base64.b64encode(padded).decode(), base64.urlsafe_b64encode(padded).decode()):
                body = enc.rstrip("=")
                yield body[4:-4] if shift else body[:-4]  # the part made only of key bytes
        yield base64.b64encode(value).decode()
        yield base64.urlsafe_b64encode(value).decode().rstrip("=")

    def find(self, text: str) -> list[str]:
        hits = []
        for value, label in self.values.items():
            for form in self.forms(value):
                if len(form) >= 16 and form in text:
                    hits.append(f"{label} as {form[:12]}…")
                    break
        return hits


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


def _cli(state: Path, mesh: DevMesh, *args: str) -> tuple[str, str, int]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "agt_mesh",
            "-v",
            "--json",
            "--state-dir",
            str(state),
            "--relay",
            mesh.relay_url,
            "--registry",
            mesh.registry_url,
            *args,
        ],
        capture_output=True,
        text=True,
        env=clean_env(),
        timeout=60,
        cwd=ROOT,
    )
    return proc.stdout, proc.stderr, proc.returncode


async def test_no_private_key_material_anywhere(tmp_path: Path) -> None:
    secrets = Secrets()
    texts: dict[str, str] = {}
    cap = Capture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(cap)
    root.setLevel(logging.DEBUG)
    try:
        async with DevMesh() as mesh:
            dirs = {}
            for who in ("alice", "bob"):
                d = tmp_path / who
                d.mkdir(mode=0o700)
                save_identity(d / "identity.json", Identity.generate(os.urandom))
                dirs[who] = d
            a = MeshClient(
                dirs["alice"] / "identity.json",
                relay_url=mesh.relay_url,
                registry_url=mesh.registry_url,
                display_name=f"alice-{os.urandom(3).hex()}",
                receipt_timeout=1.0,
            )
            b = MeshClient(
                dirs["bob"] / "identity.json",
                relay_url=mesh.relay_url,
                registry_url=mesh.registry_url,
                display_name=f"bob-{os.urandom(3).hex()}",
                receipt_timeout=1.0,
            )

            def snap() -> None:
                secrets.add_client(a, "alice")
                secrets.add_client(b, "bob")

            a.on_message(lambda m: snap())
            b.on_message(lambda m: snap())
            await a.connect()
            await b.connect()
            snap()
            inbound: list[Any] = []
            for i in range(20):
                await a.send(b.did, {"i": i, "text": "secret-free payload"})
                snap()
                inbound.append(await b.wait_for(from_=a.did, timeout=10))
                await b.send(a.did, {"j": i})
                snap()
                inbound.append(await a.wait_for(from_=b.did, timeout=10))
            # reconnect
            assert b.transport is not None
            b.transport.backoff_base = 0.1
            await b.transport.drop_connection()
            for _ in range(100):
                await asyncio.sleep(0.05)
                if b.is_connected and b.transport.connect_count >= 2:
                    break
            assert b.is_connected
            await a.send(b.did, {"after": "reconnect"})
            inbound.append(await b.wait_for(from_=a.did, timeout=10))
            snap()

            # repr / str of every public object
            objs: list[Any] = [
                a,
                b,
                a.identity,
                a.prekeys,
                a.prekeys.signed_pre_key,
                *a.prekeys.one_time_pre_keys[:3],
                *inbound[:3],
                a.store,
                a.transport,
                a.registry,
                a.protocol,
            ]
            for s in [*a.protocol.sessions.values(), *b.protocol.sessions.values()]:
                objs += [s, s.primary, s.previous, *s.candidates]
            for n, o in enumerate(objs):
                texts[f"repr {n} {type(o).__name__}"] = repr(o) + "\n" + str(o)
            texts["sessions()"] = json.dumps(a.sessions()) + json.dumps(b.sessions())

            # error paths
            errors: list[BaseException] = []

            def expect(fn: Any, *args: Any) -> None:
                try:
                    fn(*args)
                except Exception as exc:
                    errors.append(exc)

            ident_text = (dirs["alice"] / "identity.json").read_text()
            bad = tmp_path / "bad"
            bad.mkdir(mode=0o700)
            for name, content in (
                ("truncated.json", ident_text[: len(ident_text) // 2]),
                ("extra.json", ident_text.rstrip().rstrip("}") + ', "oops": }'),
                ("wrongtype.json", json.dumps({**json.loads(ident_text), "version": "x"})),
                ("badseed.json", ident_text.replace('"', "'", 4)),
            ):
                (bad / name).write_text(content)
                (bad / name).chmod(0o600)
                expect(load_identity, bad / name)
            seed_only = json.loads(ident_text)
            for k in list(seed_only):
                if "did" in k:
                    seed_only[k] = "did:mesh:" + "0" * 32  # a seed that does not match the DID
            (bad / "mismatch.json").write_text(json.dumps(seed_only))
            (bad / "mismatch.json").chmod(0o600)
            expect(load_identity, bad / "mismatch.json")
            (bad / "loose.json").write_text(ident_text)
            (bad / "loose.json").chmod(0o644)
            expect(load_identity, bad / "loose.json")
            expect(StateStore(dirs["bob"], did=a.did).open)  # another identity's store (bob still holds it)
            for frame in ("{", "[]"):
                expect(fr.decode_frame, frame)
            for frame in ('{"type":"message"}', '{"type":"message","from":"x","id":"1","ciphertext":"%%"}'):
                expect(fr.parse_frame, json.loads(frame))
            sess = b.protocol.sessions[a.did]
            expect(PeerSession.from_bytes, sess.to_bytes()[:-7])
            expect(PeerSession.from_bytes, sess.to_bytes()[:40] + b"\xff" * 40)
            expect(DoubleRatchet.from_bytes, b"\x01" + os.urandom(100))
            for n, e in enumerate(errors):
                texts[f"exception {n} {type(e).__name__}"] = f"{e!s}\n{e!r}\n{e.__cause__!r}\n{e.__context__!r}"
            assert len(errors) >= 8 and all(isinstance(e, (MeshError, ValueError)) for e in errors), errors

            await a.disconnect()
            await b.disconnect()

            # an exception a failing transport raises
            t = RelayTransport("http://127.0.0.1:9", a.identity, on_frame=lambda s: asyncio.sleep(0), connect_timeout=1)
            try:
                await t.connect()
            except MeshError as exc:
                texts["exception transport"] = f"{exc!s}\n{exc!r}"

            # the CLI, -v, --json
            peer = b.did
            for args in (
                ["identity", "show"],
                ["session", "list"],
                ["session", "show", peer],
                ["bundle", "show"],
                ["doctor"],
                ["peer", peer],
            ):
                out, err, code = await asyncio.to_thread(_cli, dirs["alice"], mesh, *args)
                texts[f"cli {' '.join(args[:2])} (exit {code})"] = out + "\n" + err
                if args[0] in ("identity", "session", "bundle"):
                    assert code == 0, (args, out, err)
                    json.loads(out)
            bout, berr, _ = await asyncio.to_thread(_cli, dirs["bob"], mesh, "session", "show", a.did)
            texts["cli bob session show"] = bout + "\n" + berr
    finally:
        root.removeHandler(cap)
        root.setLevel(old_level)
    texts["logs"] = "\n".join(cap.records)

    labels = {label.split(".")[1] for label in secrets.values.values()}
    assert len(secrets.values) > 150, len(secrets.values)
    assert {"seed", "x25519_private", "spk"} <= labels
    assert len(cap.records) > 100  # the run really logged at DEBUG
    if os.environ.get("AGT_SECRETS_VERBOSE"):
        for k, v in texts.items():
            print(k, "|", v[:300].replace("\n", " / "))
    leaks = {where: hits for where, text in texts.items() if (hits := secrets.find(text))}
    assert leaks == {}, leaks
    print(
        f"\nsecrets hygiene: {len(secrets.values)} private values x {len(list(secrets.forms(b'x' * 32)))} encodings "
        f"searched in {len(cap.records)} log records, {sum(1 for k in texts if k.startswith('exception'))} exception "
        f"texts, {sum(1 for k in texts if k.startswith('repr'))} reprs, {sum(1 for k in texts if k.startswith('cli'))} "
        f"CLI outputs ({sum(len(t) for t in texts.values())} chars): 0 hits"
    )


def test_detector_finds_planted_secrets() -> None:
    """The search itself works: every encoding of a planted key is found, at any alignment."""
    s = Secrets()
    key = os.urandom(32)
    s.add(key, "k")
    for text in (
        key.hex(),
        key.hex().upper(),
        base64.b64encode(key).decode(),
        base64.urlsafe_b64encode(key).decode().rstrip("="),
        base64.b64encode(b"prefix" + key + b"suffix").decode(),
        base64.urlsafe_b64encode(b"x" + key).decode(),
        repr(key),
    ):
        assert s.find(f"log line: {text} end") == ["k as " + s.find(text)[0].split(" as ")[1]], text
    assert s.find(base64.b64encode(os.urandom(32)).decode()) == []


@pytest.mark.parametrize("bad", ["{", '{"type":"message","from":"did:mesh:x","id":"1","ciphertext":"@@"}'])
def test_frame_errors_do_not_echo_input(bad: str) -> None:
    from agt_mesh.errors import MeshProtocolError

    with pytest.raises(MeshProtocolError) as info:
        fr.parse_frame(fr.decode_frame(bad))
    assert "@@" not in str(info.value)
