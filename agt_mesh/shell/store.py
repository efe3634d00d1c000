"""Durable client state in one SQLite file: ``<state dir>/state.db``.

What it holds: pre-key private keys (signed, retired and one-time) and their id counters;
every session's state (``PeerSession.to_bytes()``, msgpack); per-peer metadata (KDF
profile, display name, E2E-verified latch); the identity key pinned for each peer DID and
the last other key it offered (schema v3); display names bound to DIDs (schema v3); the
ids of processed messages (bounded, for de-duplication of relay redeliveries); and the
application inbox (decrypted messages not yet consumed).  The identity itself stays in
``identity.json``; the store records its DID and refuses to be used with another identity.

Durability rules (what makes restarts lose nothing):

* receive: decrypt → **one transaction** stores the new session state, the plaintext in
  the inbox and the message id → only then is the frame acknowledged to the relay.  A
  crash before the commit means the relay redelivers; after it, the id de-duplicates.
* send: the advanced sending chain is committed before the frame leaves.
* pre-keys: private keys are committed before the public keys are uploaded.

SQLite runs in WAL mode with ``synchronous=NORMAL`` (durable against process crashes;
use ``synchronous="FULL"`` to also survive power loss).  Files are created 0600 in a
directory that group and others cannot write.  The schema is versioned
(``PRAGMA user_version``) with forward migrations; a store written by a newer version is
refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agt_mesh.core.encoding import compact_json
from agt_mesh.core.session import PeerSession
from agt_mesh.core.trust import KeyPin, NameBinding, key_binds
from agt_mesh.core.x3dh import KdfProfile, OneTimePreKey, PreKeyStore, SignedPreKey
from agt_mesh.errors import MeshStateError
from agt_mesh.shell.inbox import InboundMessage
from agt_mesh.shell.safefs import check_sqlite_files, check_state_dir, open_private

__all__ = ["SCHEMA_VERSION", "STORE_NAME", "PeerMeta", "StateStore", "check_state_dir"]

STORE_NAME = "state.db"
SCHEMA_VERSION = 3
#: processed message ids kept for de-duplication
SEEN_WINDOW = 20_000

_MIGRATIONS: dict[int, str] = {
    1: """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE signed_prekeys (
        key_id INTEGER PRIMARY KEY, private BLOB NOT NULL, public BLOB NOT NULL,
        signature BLOB NOT NULL, created_at REAL, current INTEGER NOT NULL);
    CREATE TABLE one_time_prekeys (key_id INTEGER PRIMARY KEY, private BLOB NOT NULL, public BLOB NOT NULL);
    CREATE TABLE sessions (peer TEXT PRIMARY KEY, state BLOB NOT NULL, updated_at REAL NOT NULL);
    CREATE TABLE peers (
        did TEXT PRIMARY KEY, profile TEXT, display_name TEXT, e2e_verified INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE seen_ids (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE);
    CREATE TABLE inbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, sender TEXT NOT NULL,
        payload TEXT NOT NULL, received_at REAL NOT NULL, plaintext INTEGER NOT NULL, sender_name TEXT);
    """,
    2: """
    CREATE TABLE unconfirmed (
        id TEXT PRIMARY KEY, peer TEXT NOT NULL, frame TEXT NOT NULL, sent_at REAL NOT NULL);
    ALTER TABLE peers ADD COLUMN receipts INTEGER NOT NULL DEFAULT 0;
    """,
    # key continuity and names are claims (idempotent: safe to re-run after a crash)
    3: """
    CREATE TABLE IF NOT EXISTS identities (
        did TEXT PRIMARY KEY, identity_key BLOB NOT NULL, since REAL NOT NULL, source TEXT NOT NULL,
        offered_key BLOB, offered_since REAL, offered_source TEXT);
    CREATE TABLE IF NOT EXISTS names (
        name TEXT PRIMARY KEY, did TEXT NOT NULL, since REAL NOT NULL, source TEXT NOT NULL);
    """,
}


def _backfill_v3(db: sqlite3.Connection) -> None:
    """Pin the key of every stored session, and bind the display names a v2 store used.

    A v2 store already trusted these keys (each session is bound to one); pinning them
    keeps that trust across the upgrade instead of re-learning it from the next KNOCK.  A
    session whose key does not belong to its canonical DID is not pinned.  Display names
    carried by exactly one DID become bindings (``send NAME`` keeps its old meaning); a
    name carried by several is left unbound.
    """
    for peer, state, updated in db.execute("SELECT peer, state, updated_at FROM sessions").fetchall():
        try:
            key = PeerSession.from_bytes(bytes(state)).peer_identity_key()
        except MeshStateError:
            continue  # reported when the sessions are loaded
        if key is not None and key_binds(str(peer), key):
            db.execute(
                "INSERT OR IGNORE INTO identities(did, identity_key, since, source) VALUES (?, ?, ?, 'session')",
                (peer, key, updated),
            )
    db.execute(
        "INSERT OR IGNORE INTO names(name, did, since, source) "
        "SELECT display_name, min(did), ?, 'migrated' FROM peers WHERE display_name IS NOT NULL "
        "GROUP BY display_name HAVING count(*) = 1",
        (time.time(),),
    )


#: migrations that need Python after their SQL (run in one transaction with the version bump)
_BACKFILLS: dict[int, Callable[[sqlite3.Connection], None]] = {3: _backfill_v3}


@dataclass(slots=True)
class PeerMeta:
    did: str
    profile: KdfProfile | None = None
    display_name: str | None = None
    e2e_verified: bool = False
    #: the peer confirms our messages with end-to-end receipts
    receipts: bool = False


class StateStore:
    """The SQLite state of one identity (single writer: hold the ``WriterLock``)."""

    def __init__(self, state_dir: str | os.PathLike[str], *, did: str, synchronous: str = "NORMAL") -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError("synchronous must be NORMAL or FULL")
        self.dir = Path(state_dir)
        self.path = self.dir / STORE_NAME
        self.did = did
        self._sync = synchronous
        self._db: sqlite3.Connection | None = None
        self._prekey_version = -1

    # -- open / close ---------------------------------------------------------------------

    def open(self) -> StateStore:
        """Open (creating if needed) and migrate the store.

        Raises:
            MeshStateError: unsafe permissions, a corrupted or truncated file, a store
                from a newer version, or a store that belongs to another identity.
        """
        if self._db is not None:
            return self
        # the directory first (nobody else can add or swap files in it afterwards), then
        # the database and its side files, which SQLite opens by name
        check_state_dir(self.dir)
        created = False
        if not check_sqlite_files(self.path):
            os.close(open_private(self.path, os.O_RDWR, create=True, exclusive=True))
            created = True
        try:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=5)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self._sync}")
            db.execute("PRAGMA foreign_keys=ON")
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if not created and version == 0 and db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise MeshStateError(f"{self.path} is not an agt-mesh state store")
            if version > SCHEMA_VERSION:
                raise MeshStateError(
                    f"state store {self.path} has schema version {version}, newer than this SDK "
                    f"supports ({SCHEMA_VERSION}); upgrade kars-agt-mesh (refusing to touch it)"
                )
            for v in range(version + 1, SCHEMA_VERSION + 1):
                db.execute("BEGIN IMMEDIATE")
                db.executescript(_MIGRATIONS[v].replace("\n    ", "\n"))  # executescript commits
                db.execute("BEGIN IMMEDIATE")
                backfill = _BACKFILLS.get(v)
                if backfill is not None and not created:
                    backfill(db)
                db.execute(f"PRAGMA user_version={v}")
                db.execute("COMMIT")
            db.execute("PRAGMA quick_check").fetchone()
        except sqlite3.DatabaseError as exc:
            raise MeshStateError(
                f"state store {self.path} is corrupted or truncated ({exc}); restore it from a "
                "backup, or move it away to start over (sessions with peers will be re-established)"
            ) from None
        self._db = db
        owner = self._meta("did")
        if owner is None:
            self._set_meta("did", did_value := self.did)
            del did_value
        elif owner != self.did:
            self.close()
            raise MeshStateError(
                f"state store {self.path} belongs to {owner}, not to {self.did}; "
                "use the matching identity or another --state-dir"
            )
        try:
            check_sqlite_files(self.path)  # SQLite creates its side files with the database's mode
        except MeshStateError:
            self.close()
            raise
        return self

    def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    @property
    def db_open(self) -> bool:
        return self._db is not None

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise MeshStateError("state store is not open")
        return self._db

    def __enter__(self) -> StateStore:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- meta -------------------------------------------------------------------------------

    def _meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        return self._meta(key)

    def set_meta(self, key: str, value: str) -> None:
        with self.transaction():
            self._set_meta(key, value)

    # -- transactions -------------------------------------------------------------------

    def transaction(self) -> _Tx:
        return _Tx(self.db)

    # -- pre-keys ---------------------------------------------------------------------------

    def load_prekeys(self, prekeys: PreKeyStore) -> bool:
        """Fill ``prekeys`` from the store; returns whether a signed pre-key was found."""
        rows = self.db.execute(
            "SELECT key_id, private, public, signature, created_at, current FROM signed_prekeys ORDER BY key_id"
        ).fetchall()
        current = None
        for key_id, priv, pub, sig, created, is_current in rows:
            spk = SignedPreKey(int(key_id), bytes(priv), bytes(pub), bytes(sig), created)
            if is_current:
                current = spk
            else:
                prekeys.add_signed_pre_key(spk, current=False)
        if current is not None:
            prekeys.add_signed_pre_key(current, current=True)
        for key_id, priv, pub in self.db.execute(
            "SELECT key_id, private, public FROM one_time_prekeys ORDER BY key_id"
        ):
            prekeys.add_one_time_pre_key(OneTimePreKey(int(key_id), bytes(priv), bytes(pub)))
        for name in ("next_spk_id", "next_otk_id"):
            value = self._meta(name)
            if value is not None:
                setattr(prekeys, name, max(getattr(prekeys, name), int(value)))
        self._prekey_version = prekeys.version
        return current is not None

    def _write_prekeys(self, prekeys: PreKeyStore) -> None:
        db = self.db
        db.execute("DELETE FROM signed_prekeys")
        spks = [(s, 0) for s in prekeys.retired_signed_pre_keys]
        if prekeys.signed_pre_key is not None:
            spks.append((prekeys.signed_pre_key, 1))
        db.executemany(
            "INSERT INTO signed_prekeys VALUES (?, ?, ?, ?, ?, ?)",
            [(s.key_id, s.private, s.public, s.signature, s.created_at, cur) for s, cur in spks],
        )
        db.execute("DELETE FROM one_time_prekeys")
        db.executemany(
            "INSERT INTO one_time_prekeys VALUES (?, ?, ?)",
            [(o.key_id, o.private, o.public) for o in prekeys.one_time_pre_keys],
        )
        self._set_meta("next_spk_id", str(prekeys.next_spk_id))
        self._set_meta("next_otk_id", str(prekeys.next_otk_id))
        self._prekey_version = prekeys.version

    def save_prekeys(self, prekeys: PreKeyStore) -> None:
        with self.transaction():
            self._write_prekeys(prekeys)

    # -- sessions and peers -------------------------------------------------------------

    def load_sessions(self) -> list[PeerSession]:
        out = []
        for peer, state in self.db.execute("SELECT peer, state FROM sessions"):
            try:
                out.append(PeerSession.from_bytes(bytes(state)))
            except MeshStateError as exc:
                raise MeshStateError(f"state store {self.path}: session with {peer} is corrupted: {exc}") from None
        return out

    def load_peers(self) -> list[PeerMeta]:
        return [
            PeerMeta(did, KdfProfile(p) if p else None, name, bool(v), bool(r))
            for did, p, name, v, r in self.db.execute(
                "SELECT did, profile, display_name, e2e_verified, receipts FROM peers"
            )
        ]

    def load_pins(self) -> list[tuple[KeyPin, KeyPin | None]]:
        """Every pinned identity key, with the last other key offered for it (or None)."""
        out = []
        for did, key, since, source, okey, osince, osource in self.db.execute(
            "SELECT did, identity_key, since, source, offered_key, offered_since, offered_source FROM identities"
        ):
            offered = KeyPin(did, bytes(okey), float(osince or 0), str(osource)) if okey is not None else None
            out.append((KeyPin(did, bytes(key), float(since), str(source)), offered))
        return out

    def load_names(self) -> list[NameBinding]:
        return [
            NameBinding(name, did, float(since), str(source))
            for name, did, since, source in self.db.execute("SELECT name, did, since, source FROM names")
        ]

    def bind_name(self, binding: NameBinding) -> None:
        """Bind ``binding.name`` to ``binding.did`` (replacing an earlier binding of the name)."""
        with self.transaction():
            self.db.execute(
                "INSERT OR REPLACE INTO names(name, did, since, source) VALUES (?, ?, ?, ?)",
                (binding.name, binding.did, binding.since, binding.source),
            )

    def unbind_name(self, name: str) -> bool:
        """Forget the binding of ``name``; whether there was one."""
        with self.transaction():
            before = self.db.total_changes
            self.db.execute("DELETE FROM names WHERE name=?", (name,))
            return self.db.total_changes > before

    def _write_pins(self, identities: Iterable[tuple[str, KeyPin | None, KeyPin | None]]) -> None:
        for did, pin, offered in identities:
            if pin is None:
                self.db.execute("DELETE FROM identities WHERE did=?", (did,))
                continue
            self.db.execute(
                "INSERT OR REPLACE INTO identities(did, identity_key, since, source, offered_key, offered_since, "
                "offered_source) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    did,
                    pin.identity_key,
                    pin.since,
                    pin.source,
                    offered.identity_key if offered else None,
                    offered.since if offered else None,
                    offered.source if offered else None,
                ),
            )

    def save_pins(self, identities: Iterable[tuple[str, KeyPin | None, KeyPin | None]]) -> None:
        """Write ``(did, pin, offered)`` rows (``pin`` None deletes the DID's row)."""
        with self.transaction():
            self._write_pins(identities)

    def load_unconfirmed(self) -> list[tuple[str, str, dict[str, Any], float]]:
        """``(peer, id, frame, sent_at)`` of sent messages awaiting a receipt, oldest first."""
        return [
            (peer, mid, json.loads(frame), sent_at)
            for mid, peer, frame, sent_at in self.db.execute(
                "SELECT id, peer, frame, sent_at FROM unconfirmed ORDER BY rowid"
            )
        ]

    def load_seen_ids(self) -> list[str]:
        return [r[0] for r in self.db.execute("SELECT id FROM seen_ids ORDER BY seq")]

    def load_inbox(self) -> list[InboundMessage]:
        return [
            InboundMessage(sender, json.loads(payload), mid, received, bool(pt), name)
            for mid, sender, payload, received, pt, name in self.db.execute(
                "SELECT id, sender, payload, received_at, plaintext, sender_name FROM inbox ORDER BY seq"
            )
        ]

    def commit(
        self,
        *,
        sessions: dict[str, PeerSession | None] | None = None,
        peers: Iterable[PeerMeta] = (),
        inbox: Sequence[InboundMessage] = (),
        inbox_json: Sequence[str] | None = None,
        seen: Sequence[str] = (),
        prekeys: PreKeyStore | None = None,
        sent: Sequence[tuple[str, str, dict[str, Any]]] = (),
        confirmed: Sequence[str] = (),
        identities: Sequence[tuple[str, KeyPin | None, KeyPin | None]] = (),
    ) -> None:
        """Write everything one protocol step changed, atomically.

        ``inbox_json`` is each inbox message's payload as JSON text, when the caller has
        it (the text as received, already checked): then no value is serialised again.
        """
        now = time.time()
        with self.transaction():
            db = self.db
            for peer, session in (sessions or {}).items():
                if session is None:
                    db.execute("DELETE FROM sessions WHERE peer=?", (peer,))
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO sessions(peer, state, updated_at) VALUES (?, ?, ?)",
                        (peer, session.to_bytes(), now),
                    )
            for meta in peers:
                db.execute(
                    "INSERT INTO peers(did, profile, display_name, e2e_verified, receipts) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT(did) DO UPDATE SET profile=coalesce(excluded.profile, profile), "
                    "display_name=coalesce(excluded.display_name, display_name), "
                    "e2e_verified=max(e2e_verified, excluded.e2e_verified), "
                    "receipts=max(receipts, excluded.receipts)",
                    (
                        meta.did,
                        meta.profile.value if meta.profile else None,
                        meta.display_name,
                        int(meta.e2e_verified),
                        int(meta.receipts),
                    ),
                )
            if sent:
                db.executemany(
                    "INSERT OR REPLACE INTO unconfirmed(id, peer, frame, sent_at) VALUES (?, ?, ?, ?)",
                    [(mid, peer, compact_json(frame), now) for peer, mid, frame in sent],
                )
            if confirmed:
                db.executemany("DELETE FROM unconfirmed WHERE id=?", [(i,) for i in confirmed])
            if inbox:
                texts = inbox_json if inbox_json is not None else [compact_json(m.payload) for m in inbox]
                self._insert_inbox(list(zip(inbox, texts, strict=True)))
            if seen:
                db.executemany("INSERT OR IGNORE INTO seen_ids(id) VALUES (?)", [(i,) for i in seen])
                last = db.execute("SELECT max(seq) FROM seen_ids").fetchone()[0] or 0
                if last % 1000 < len(seen):  # trim now and then, not on every commit
                    db.execute("DELETE FROM seen_ids WHERE seq <= ?", (last - SEEN_WINDOW,))
            if prekeys is not None and prekeys.version != self._prekey_version:
                self._write_prekeys(prekeys)
            if identities:
                self._write_pins(identities)

    def _insert_inbox(self, rows: Sequence[tuple[InboundMessage, str]]) -> None:
        """Add messages (each with its payload as JSON text) to the durable inbox, once."""
        self.db.executemany(
            "INSERT OR IGNORE INTO inbox(id, sender, payload, received_at, plaintext, sender_name) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(m.message_id, m.sender, payload, m.received_at, int(m.plaintext), m.sender_name) for m, payload in rows],
        )

    def consume(self, message_ids: Iterable[str]) -> int:
        """Delete consumed messages from the durable inbox; returns how many were removed."""
        ids = [(i,) for i in message_ids]
        if not ids:
            return 0
        with self.transaction():
            before = self.db.total_changes
            self.db.executemany("DELETE FROM inbox WHERE id=?", ids)
            return self.db.total_changes - before

    def delete_session(self, peer: str) -> int:
        """Delete the session with ``peer``; messages it held back (waiting for an earlier
        one) move to the inbox first.  Returns how many were moved."""
        with self.transaction():
            db = self.db
            row = db.execute("SELECT state FROM sessions WHERE peer=?", (peer,)).fetchone()
            held = []
            if row is not None:
                with contextlib.suppress(MeshStateError):  # unreadable: nothing to keep
                    held = PeerSession.from_bytes(bytes(row[0])).held
            row = db.execute("SELECT display_name FROM peers WHERE did=?", (peer,)).fetchone()
            name, now = (row[0] if row else None), time.time()
            moved = [
                (InboundMessage(peer, None, h.message_id, now, False, name), h.payload)
                for h in held
                if h.payload is not None
            ]
            self._insert_inbox(moved)
            db.execute("DELETE FROM sessions WHERE peer=?", (peer,))
            return len(moved)

    def stats(self) -> dict[str, Any]:
        db = self.db

        def count(table: str) -> int:
            return int(db.execute(f"SELECT count(*) FROM {table}").fetchone()[0])

        return {
            "path": str(self.path),
            "schema_version": SCHEMA_VERSION,
            "sessions": count("sessions"),
            "peers": count("peers"),
            "inbox": count("inbox"),
            "pinned_keys": count("identities"),
            "names": count("names"),
            "one_time_prekeys": count("one_time_prekeys"),
            "seen_ids": count("seen_ids"),
            "bytes": self.path.stat().st_size,
        }


class _Tx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (or ``ROLLBACK`` on error); nests as a no-op."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.outer = False

    def __enter__(self) -> sqlite3.Connection:
        if not self.db.in_transaction:
            self.db.execute("BEGIN IMMEDIATE")
            self.outer = True
        return self.db

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self.outer:
            return
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")
