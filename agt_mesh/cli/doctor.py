"""``agt-mesh doctor``: one line per check, with a fix for each problem.

Checks, in order: ``identity`` (file, permissions, keys), ``state`` (directory and store),
``lock`` (who holds it), ``profile``, ``registry`` (reachable), ``clock`` (skew against the
HTTP ``Date`` of the registry and relay answers, versus the ±5 min POP window),
``registration`` (our record), ``display_name`` (resolves to us), ``prekeys`` (one-time
pre-keys left), ``relay`` (reachable, proof of possession accepted).

The relay check connects with a throwaway identity, so a running agent with our identity
is not disturbed and no message waiting for us is fetched (and lost).

JSON: ``{"ok", "did", "checks": [{"name", "status", "detail", "fix"}]}`` where ``status``
is ``ok``, ``warn``, ``fail`` or ``skip``.  The exit code is that of the first failed check
(1 local problem, 3 unreachable, 4 refused credentials, 5 rate limited), else 0.
"""

from __future__ import annotations

import argparse
import email.utils
import os
import stat
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from agt_mesh.cli.common import (
    META_DISPLAY_NAME,
    STORE_NAME,
    ago,
    check_state_dir_perms,
    emit,
    identity_path,
    parse_time,
    profile,
    relay_token,
    run,
    state_dir,
)
from agt_mesh.cli.errors import EXIT_AUTH, EXIT_IO, EXIT_OK, EXIT_USAGE, CliError, exit_code_for

if TYPE_CHECKING:
    from agt_mesh.core.identity import Identity

#: proof-of-possession window of the AGT relays and registries
POP_WINDOW = 300.0
SKEW_WARN = 60.0
#: MeshClient replenishes one-time pre-keys below this
REPLENISH_BELOW = 5


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str | None = None
    code: int = EXIT_OK

    def json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "detail": self.detail, "fix": self.fix}

    def line(self) -> str:
        mark = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}[self.status]
        text = f"[{mark}] {self.name:<13} {self.detail}"
        if self.fix:
            text += f"\n       {'':<13} fix: {self.fix}"
        return text


def _http_base(url: str) -> str:
    """The HTTP base URL of a relay URL (``ws://h:p/ws`` → ``http://h:p``)."""
    parts = urlsplit(url.strip())
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    path = parts.path.rstrip("/")
    if parts.scheme in ("ws", "wss") and path.endswith("/ws"):
        path = path[:-3]
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def _fail(name: str, exc: BaseException, fix: str | None = None) -> Check:
    code = exit_code_for(exc)
    return Check(name, "fail", str(exc), fix, code if code != 2 else EXIT_IO)


class Doctor:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.checks: list[Check] = []
        self.identity: Identity | None = None
        self.store_ok = False
        self.lock_pid: int | None = None
        self.display_name: str | None = None
        self.otks: int | None = None
        self.skews: list[tuple[str, float]] = []

    def add(self, check: Check) -> None:
        self.checks.append(check)

    # -- local --------------------------------------------------------------------------

    def check_identity(self) -> None:
        from agt_mesh.shell.identity_file import load_identity

        path = identity_path(self.args)
        try:
            self.identity = load_identity(path)
        except Exception as exc:
            fix = None
            if not path.exists():
                fix = f"agt-mesh identity new --state-dir {path.parent}"
            elif path.exists() and stat.S_IMODE(path.stat().st_mode) & 0o077:
                fix = f"chmod 600 {path}"
            self.add(_fail("identity", exc, fix))
            return
        mode = stat.S_IMODE(path.stat().st_mode)
        self.add(Check("identity", "ok", f"{self.identity.did} ({path}, mode {mode:04o})"))

    def check_state(self) -> None:
        from agt_mesh.shell.store import StateStore

        sdir = state_dir(self.args)
        try:
            check_state_dir_perms(sdir)
        except CliError as exc:
            detail, _, fix = str(exc).partition(" Fix it with: ")
            self.add(Check("state", "fail", detail, fix or None, EXIT_USAGE))
            return
        if not sdir.exists():
            self.add(Check("state", "warn", f"{sdir} does not exist", f"agt-mesh identity new --state-dir {sdir}"))
            return
        if self.identity is None:
            self.add(Check("state", "skip", "needs a usable identity"))
            return
        if not (sdir / STORE_NAME).exists():
            self.add(Check("state", "ok", f"{sdir} (no state.db yet: created by the first listen or send)"))
            self.store_ok = True
            return
        try:
            store = StateStore(sdir, did=self.identity.did).open()
        except Exception as exc:
            self.add(_fail("state", exc, "move the state.db away to start over (sessions are re-established)"))
            return
        try:
            stats = store.stats()
            self.display_name = store.get_meta(META_DISPLAY_NAME)
            self.otks = int(stats["one_time_prekeys"])
        finally:
            store.close()
        self.store_ok = True
        self.add(
            Check(
                "state",
                "ok",
                f"{sdir / STORE_NAME}: {stats['sessions']} session(s), {stats['peers']} peer(s), "
                f"{stats['inbox']} unread, schema v{stats['schema_version']}, {stats['bytes']} bytes",
            )
        )

    def check_lock(self) -> None:
        from agt_mesh.shell.lock import LockHeldError, WriterLock

        lock = WriterLock(state_dir(self.args))
        if not lock.path.parent.exists():
            self.add(Check("lock", "skip", "no state directory"))
            return
        try:
            lock.acquire()
        except LockHeldError as exc:
            self.lock_pid = exc.pid
            who = f"process {exc.pid}" if exc.pid else "another process"
            alive = ""
            if exc.pid:
                try:
                    os.kill(exc.pid, 0)
                except ProcessLookupError:
                    alive = " (not running here: another host or PID namespace?)"
                except PermissionError:
                    pass
            self.add(
                Check(
                    "lock",
                    "warn",
                    f"held by {who}{alive}: that process uses this identity (e.g. a running listen); "
                    "send/listen/inbox fail until it stops",
                    f"stop process {exc.pid}" if exc.pid else "stop the other agt-mesh process",
                )
            )
            return
        except OSError as exc:
            self.add(_fail("lock", exc))
            return
        lock.release()
        self.add(Check("lock", "ok", f"free ({lock.path})"))

    def check_profile(self) -> None:
        prof = profile(self.args)
        source = "--profile/AGT_PROFILE" if self.args.profile else "default"
        kdf = "spec KDF (AGT Python, TS 5.x)" if prof == "current" else "legacy KDF (npm 4.0.0 peers)"
        self.add(
            Check(
                "profile",
                "ok",
                f"{prof} ({source}): {kdf} for sessions we initiate; as responder both KDFs are accepted",
            )
        )

    # -- network ------------------------------------------------------------------------

    async def _get_date(self, client: Any, url: str, label: str) -> int:
        """GET ``url``: the status; records the clock skew from the ``Date`` header."""
        t0 = time.time()
        response = await client.get(url)
        t1 = time.time()
        date = response.headers.get("date")
        if date:
            try:
                stamp = email.utils.parsedate_to_datetime(date).timestamp()
            except (TypeError, ValueError):
                stamp = None
            if stamp is not None:
                self.skews.append((label, (t0 + t1) / 2 - stamp))
        return int(response.status_code)

    async def check_network(self, timeout: float) -> None:
        import httpx

        args = self.args
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            registry_ok = False
            if not args.registry:
                self.add(Check("registry", "skip", "no registry URL", "pass --registry URL or set AGT_REGISTRY_URL"))
            else:
                base = args.registry.rstrip("/")
                try:
                    status = await self._get_date(client, base + "/health", "registry")
                except httpx.HTTPError as exc:
                    self.add(
                        Check(
                            "registry",
                            "fail",
                            f"{base} unreachable: {type(exc).__name__}: {exc}",
                            "check the URL and that the registry runs",
                            EXIT_IO,
                        )
                    )
                else:
                    registry_ok = True
                    self.add(Check("registry", "ok" if status < 400 else "warn", f"{base} answers (/health: {status})"))
            relay_http_ok = False
            if args.relay:
                try:
                    await self._get_date(client, _http_base(args.relay) + "/health", "relay")
                    relay_http_ok = True
                except httpx.HTTPError:
                    pass
        self.check_clock()
        if registry_ok and self.identity is not None:
            await self.check_registration(timeout)
        elif args.registry:
            self.add(Check("registration", "skip", "needs a reachable registry and a usable identity"))
        self.check_prekeys()
        if not args.relay:
            self.add(Check("relay", "skip", "no relay URL", "pass --relay URL or set AGT_RELAY_URL"))
        else:
            await self.check_relay(timeout, relay_http_ok)

    def check_clock(self) -> None:
        if not self.skews:
            self.add(Check("clock", "skip", "no server answered with a Date header"))
            return
        worst_label, worst = max(self.skews, key=lambda s: abs(s[1]))
        parts = ", ".join(f"{label} {skew:+.0f} s" for label, skew in self.skews)
        if abs(worst) > POP_WINDOW:
            self.add(
                Check(
                    "clock",
                    "fail",
                    f"local clock is {abs(worst):.0f} s {'behind' if worst < 0 else 'ahead of'} the {worst_label} "
                    f"({parts}): outside the "
                    "±5 min proof-of-possession window — registration and relay connects are refused",
                    "synchronise the system clock (e.g. enable NTP: timedatectl set-ntp true)",
                    EXIT_AUTH,
                )
            )
        elif abs(worst) > SKEW_WARN:
            self.add(Check("clock", "warn", f"skew {parts} (POP window ±5 min)", "synchronise the system clock"))
        else:
            self.add(
                Check(
                    "clock",
                    "ok",
                    f"within ±{max(2, abs(worst)):.0f} s of the servers ({parts}; Date has 1 s resolution)",
                )
            )

    async def check_registration(self, timeout: float) -> None:
        from agt_mesh.shell.registry import RegistryClient

        assert self.identity is not None
        did = self.identity.did
        try:
            async with RegistryClient(self.args.registry, self.identity, timeout=timeout, retries=0) as registry:
                record = await registry.get_agent(did)
                if record is None:
                    self.add(
                        Check(
                            "registration",
                            "warn",
                            f"{did} is not registered (or the registry restarted and forgot it): peers cannot "
                            "fetch our pre-keys",
                            "agt-mesh listen (registers and stays online) or agt-mesh bundle upload",
                        )
                    )
                else:
                    caps = ", ".join(record.capabilities) or "none"
                    seen = ago(parse_time(record.last_seen))
                    self.add(Check("registration", "ok", f"registered (capabilities: {caps}; last seen {seen})"))
                name = self.display_name
                if name is None:
                    self.add(
                        Check(
                            "display_name",
                            "warn",
                            "none chosen: peers can reach us by DID only",
                            "agt-mesh listen --display-name NAME",
                        )
                    )
                    return
                claimants = [r.did for r in await registry.find_all_by_display_name(name)]
                others = [d for d in claimants if d != did]
                if did not in claimants:
                    self.add(
                        Check(
                            "display_name",
                            "warn",
                            f"{name!r} is not claimed by us in this registry"
                            + (f" (but by {', '.join(others)})" if others else ""),
                            f"agt-mesh bundle upload --display-name {name}",
                        )
                    )
                elif others:
                    self.add(
                        Check(
                            "display_name",
                            "warn",
                            f"{name!r} is also claimed by {', '.join(others)}: a peer that has not bound the "
                            "name yet gets an ambiguity error (names are claims) and must choose by DID",
                            f"give peers our DID ({did}), or choose another --display-name",
                        )
                    )
                else:
                    self.add(Check("display_name", "ok", f"{name!r} is claimed by us only"))
        except Exception as exc:
            self.add(_fail("registration", exc))

    def check_prekeys(self) -> None:
        if self.otks is None:
            self.add(Check("prekeys", "skip", "no pre-keys stored yet" if self.store_ok else "needs a readable state"))
            return
        note = (
            "we can only know what we uploaded minus what KNOCKs consumed: bundle fetches without a "
            "KNOCK use them up on the registry too, so it may hold fewer"
        )
        if self.otks == 0:
            self.add(
                Check(
                    "prekeys",
                    "warn",
                    f"no one-time pre-keys left ({note}); sessions still start, with 3-DH only",
                    "agt-mesh bundle upload (or keep listen running: it replenishes)",
                )
            )
        elif self.otks < REPLENISH_BELOW:
            self.add(
                Check(
                    "prekeys",
                    "warn",
                    f"at most {self.otks} one-time pre-key(s) left on the registry ({note})",
                    "agt-mesh bundle upload",
                )
            )
        else:
            self.add(Check("prekeys", "ok", f"at most {self.otks} one-time pre-keys left on the registry ({note})"))

    async def check_relay(self, timeout: float, http_ok: bool) -> None:
        from agt_mesh.core.identity import Identity
        from agt_mesh.shell.relay import RelayTransport

        async def ignore(_text: str) -> None:
            return None

        throwaway = Identity.generate(os.urandom)
        token = relay_token()
        transport = RelayTransport(
            self.args.relay,
            throwaway,
            on_frame=ignore,
            token=(lambda: token) if token else None,
            connect_timeout=timeout,
            heartbeat_interval=None,
            reconnect=False,
            verdict_quiet=1.0,
        )
        try:
            await transport.connect()
        except Exception as exc:
            fix = None
            code = exit_code_for(exc)
            if code == EXIT_AUTH:
                fix = "check the system clock; set AGENTMESH_RELAY_TOKEN if the relay wants a token"
            elif not http_ok:
                fix = "check the relay URL and that the relay runs"
            self.add(_fail("relay", exc, fix))
            return
        finally:
            await transport.close()
        self.add(
            Check(
                "relay",
                "ok",
                f"{transport.url} accepted a proof-of-possession connect (checked with a throwaway "
                "identity, so a running agent is not disturbed)",
            )
        )


def doctor(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        raise CliError("--timeout must be positive")
    doc = Doctor(args)
    doc.check_identity()
    doc.check_state()
    doc.check_lock()
    doc.check_profile()

    async def network() -> None:
        await doc.check_network(args.timeout)

    run(network, timeout=args.timeout * 4 + 10, what="doctor")
    failed = [c for c in doc.checks if c.status == "fail"]
    data = {
        "ok": not failed,
        "did": doc.identity.did if doc.identity else None,
        "checks": [c.json() for c in doc.checks],
    }
    text = "\n".join(c.line() for c in doc.checks)
    text += "\n" + ("all checks passed" if not failed else f"{len(failed)} problem(s) found")
    emit(args, data, text)
    return failed[0].code if failed else EXIT_OK


__all__ = ["Doctor", "doctor"]
