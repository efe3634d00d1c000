"""File transfer over the encrypted session: reading, chunking, reassembly and safe saving.

Sender side: :func:`read_outgoing` opens a file below the files root under the rules of
:mod:`agt_mesh.adapters.paths` (no protected path, no symlink out of the root, no special
file, race-free) and reads it through that descriptor; :func:`plan_envelopes` cuts it into
envelopes (see :mod:`agt_mesh.adapters.envelopes`).

Receiver side: :class:`FileReceiver` validates ``file_transfer`` / ``file_transfer_chunk``
envelopes, reassembles chunks, checks size and sha256 and saves:

* only a sanitised *basename* is used: directories, ``..``, absolute paths, NUL and other
  control characters, leading dots and over-long names are removed;
* data is written under a hidden temporary name with ``O_CREAT|O_EXCL|O_NOFOLLOW``
  relative to a descriptor of the incoming directory (mode 0600), fsynced, then published
  with ``link()`` — which never replaces an existing name — so an existing file is never
  overwritten (a ``-1``, ``-2`` … suffix is used instead) and no symlink is ever followed;
* chunks are written straight into that temporary file at their offset, so memory holds
  one chunk at a time whatever the file size;
* every sender gets a fair share (see :class:`TransferLimits`): bytes on disk per peer and
  in total, transfers in progress per peer, and reassembly slots that a busy peer gives up
  to a peer holding fewer (fair eviction) — so a stranger cannot fill the disk or block
  everyone else's transfers.

Acknowledgements and errors that go back to the sender name the saved file relative to the
incoming directory and never carry local details (paths, OS errors, usage figures).
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import hashlib
import os
import re
import secrets
import stat
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agt_mesh.adapters import envelopes as envs
from agt_mesh.adapters.paths import FileRoots, fd_path, make_private_dirs, open_below_root
from agt_mesh.errors import FileTransferError

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_FILE_BYTES",
    "MAX_TRANSFERS_PER_PEER",
    "MAX_TRANSFERS_TOTAL",
    "PEER_DISK_QUOTA",
    "TOTAL_DISK_QUOTA",
    "TRANSFER_IDLE_TIMEOUT",
    "DroppedTransfer",
    "FileReceiver",
    "FileTransferError",
    "OutgoingFile",
    "ReceivedFile",
    "TransferLimits",
    "plan_envelopes",
    "read_outgoing",
    "sanitize_name",
    "save_incoming",
]

MiB = 1024 * 1024

#: Largest file sent or accepted by default (kars and OpenClaw use the same cap).
DEFAULT_MAX_FILE_BYTES = 30 * MiB
#: Raw bytes per chunk: ~470 KB per relay frame after base64, JSON and encryption.
DEFAULT_CHUNK_BYTES = 256 * 1024
#: No chunk may carry more than this many raw bytes (whatever the sender's chunk size).
MAX_CHUNK_BYTES = 1 * MiB
#: Bytes one peer may occupy in the incoming directory: the files it sent that are still
#: there plus its transfers in progress (counted at their announced size).  Eight files at
#: the size cap; past it the sender is told to retry later, and the local user gets an event
#: (moving or deleting received files frees the quota).
PEER_DISK_QUOTA = 256 * MiB
#: Bytes the incoming directory may hold in total — measured on disk, whoever put the files
#: there — plus every transfer in progress: four peers at their quota.
TOTAL_DISK_QUOTA = 1024 * MiB
#: Chunked transfers one peer may have in progress at once (a 30 MiB file needs one).
MAX_TRANSFERS_PER_PEER = 4
#: Reassembly slots in total.  When all are taken, a peer holding at least two fewer slots
#: than the busiest peer takes over that peer's most idle slot (fair eviction); the evicted
#: sender is told to retry.  One stranger can hold at most MAX_TRANSFERS_PER_PEER of them.
MAX_TRANSFERS_TOTAL = 32
#: A transfer that received no new chunk for this long is dropped (its slot and its reserved
#: bytes are freed).  Honest senders send chunks back to back; 2 minutes covers a reconnect.
TRANSFER_IDLE_TIMEOUT = 120.0
#: The incoming directory is measured again when its last measurement is this old (files
#: written or removed by others are noticed) ...
MEASURE_INTERVAL = 30.0
#: ... or when a quota check fails, but not more often than this (a flood past the quota
#: cannot make us rescan the directory for every envelope).
RESCAN_INTERVAL = 2.0
#: Finished transfers remembered per receiver, to acknowledge duplicates with the same result.
_DONE_MEMORY = 256
_MAX_NAME_BYTES = 200
#: Hidden names of our temporary files in the incoming directory (never a sanitised name:
#: those never start with a dot).
_SPOOL_RE = re.compile(r"^\.agt-mesh-[0-9a-f]{16}\.partial$")

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)


@dataclass(frozen=True)
class TransferLimits:
    """The receiver's limits (each module constant documents its default)."""

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    peer_disk_quota: int = PEER_DISK_QUOTA
    total_disk_quota: int = TOTAL_DISK_QUOTA
    max_transfers_per_peer: int = MAX_TRANSFERS_PER_PEER
    max_transfers_total: int = MAX_TRANSFERS_TOTAL
    idle_timeout: float = TRANSFER_IDLE_TIMEOUT


# -- names -------------------------------------------------------------------------------


def sanitize_name(name: object) -> str:
    """A safe file name for ``name``: its last path component, without control characters,
    leading dots or surrounding spaces, at most 200 UTF-8 bytes (the extension is kept);
    ``"file"`` if nothing usable remains."""
    text = name if isinstance(name, str) else ""
    text = text.replace("\\", "/")
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C")  # Cc, Cf, Cs, Co, Cn
    parts = [p for p in text.split("/") if p.strip() not in ("", ".", "..")]
    base = parts[-1] if parts else ""
    base = base.strip().lstrip(".").strip()
    if not base:
        return "file"
    if len(base.encode()) > _MAX_NAME_BYTES:
        stem, dot, ext = base.rpartition(".")
        if not dot or len(ext.encode()) > 16 or not stem:
            stem, ext = base, ""
        keep = _MAX_NAME_BYTES - (len(ext.encode()) + 1 if ext else 0)
        stem = stem.encode()[:keep].decode(errors="ignore").rstrip()
        base = f"{stem}.{ext}" if ext else stem
    return base or "file"


def _candidates(name: str) -> Iterator[str]:
    yield name
    stem, dot, ext = name.rpartition(".")
    if not dot or not stem:
        stem, ext = name, ""
    for i in range(1, 1000):
        yield f"{stem}-{i}.{ext}" if ext else f"{stem}-{i}"
    while True:
        token = secrets.token_hex(4)
        yield f"{stem}-{token}.{ext}" if ext else f"{stem}-{token}"


def _spool_name() -> str:
    return f".agt-mesh-{secrets.token_hex(8)}.partial"


def _open_dir(path: Path, roots: FileRoots | None = None) -> int:
    """A descriptor of the incoming directory (created 0700 if missing; its last component
    is never a symlink), refused if it really lies inside a protected path."""
    make_private_dirs(path)
    dfd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC | _O_NOFOLLOW)
    if roots is not None:
        real = fd_path(dfd) or os.path.realpath(path)
        if roots.is_protected(real):
            os.close(dfd)
            raise OSError(f"the incoming directory resolves into a protected path ({real})")
    return dfd


def _publish(dfd: int, tmp: str, name: str) -> str:
    """Give the temporary file ``tmp`` its first free name among ``name``'s candidates."""
    for candidate in _candidates(name):
        try:
            os.link(tmp, candidate, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
        except FileExistsError:
            continue
        return candidate
    raise AssertionError("unreachable")  # pragma: no cover - _candidates is endless


def _write_all(fd: int, data: bytes | memoryview, offset: int | None = None) -> None:
    view = memoryview(data)
    pos = offset
    while view:
        written = os.write(fd, view) if pos is None else os.pwrite(fd, view, pos)
        view = view[written:]
        if pos is not None:
            pos += written


def save_incoming(
    directory: str | os.PathLike[str],
    requested_name: object,
    data: bytes,
    *,
    roots: FileRoots | None = None,
) -> tuple[str, Path]:
    """Save ``data`` in ``directory`` under a sanitised, unused name; returns (name, path).

    Never overwrites, never follows a symlink, never leaves the directory.  The directory
    is created (0700) if missing.

    Raises:
        FileTransferError: ``save_failed`` if the directory or the file cannot be written
            (the local details are in the message; the sender only learns that it failed).
    """
    root = Path(directory)
    try:
        dfd = _open_dir(root, roots)
    except OSError as exc:
        raise FileTransferError("save_failed", f"incoming directory {root} is not usable: {exc}") from None
    name = sanitize_name(requested_name)
    tmp = _spool_name()
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
        fd = os.open(tmp, flags, 0o600, dir_fd=dfd)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            saved = _publish(dfd, tmp, name)
            return saved, root.resolve() / saved
        finally:
            os.unlink(tmp, dir_fd=dfd)
    except OSError as exc:
        raise FileTransferError("save_failed", f"cannot save {name!r} in {root}: {exc}") from None
    finally:
        os.close(dfd)


# -- sending ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutgoingFile:
    """A file read for sending: ``name`` is its base name, ``relative`` its path below the root."""

    name: str
    relative: str
    data: bytes = field(repr=False)
    sha256: str

    @property
    def size(self) -> int:
        return len(self.data)


def read_outgoing(file_path: object, roots: FileRoots, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> OutgoingFile:
    """Open, check and read a file to send (see :func:`~agt_mesh.adapters.paths.open_below_root`).

    A relative ``file_path`` is taken relative to the files root; an absolute one must
    resolve below it.  The file is opened once and checked through that descriptor.

    Raises:
        FileTransferError: ``too_large`` (before anything is read), ``read_failed``; or its
            subclass :class:`~agt_mesh.errors.PathRefused` for a path that is never read
            (``invalid_argument``, ``not_found``, ``path_outside_root``, ``protected_path``,
            ``not_a_file``, ``read_failed``).
    """
    fd, st, relative = open_below_root(file_path, roots)
    try:
        if st.st_size > max_bytes:
            raise FileTransferError(
                "too_large", f"{relative} is {st.st_size} bytes; the limit is {max_bytes} bytes — nothing was sent"
            )
        chunks = []
        remaining = max_bytes + 1
        while remaining > 0:
            block = os.read(fd, min(remaining, MiB))
            if not block:
                break
            chunks.append(block)
            remaining -= len(block)
        data = b"".join(chunks)
    except OSError as exc:
        raise FileTransferError("read_failed", f"cannot read {relative}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise FileTransferError("too_large", f"{relative} grew beyond the limit of {max_bytes} bytes while read")
    return OutgoingFile(os.path.basename(relative), relative, data, hashlib.sha256(data).hexdigest())


def plan_envelopes(
    file: OutgoingFile,
    *,
    transfer_id: str,
    description: str,
    from_agent: str | None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> list[dict[str, Any]]:
    """The envelopes carrying ``file``: one ``file_transfer`` if it fits one chunk, else
    ``file_transfer_chunk`` s (all of ``chunk_bytes`` but the last)."""
    if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk size must be 1..{MAX_CHUNK_BYTES} bytes")
    data = file.data
    if len(data) <= chunk_bytes:
        return [
            envs.file_transfer(
                transfer_id=transfer_id,
                file_name=file.name,
                data_b64=base64.b64encode(data).decode(),
                size_bytes=len(data),
                sha256=file.sha256,
                description=description,
                from_agent=from_agent,
            )
        ]
    count = -(-len(data) // chunk_bytes)
    return [
        envs.file_chunk(
            transfer_id=transfer_id,
            file_name=file.name,
            index=i,
            count=count,
            size_bytes=len(data),
            sha256=file.sha256,
            data_b64=base64.b64encode(data[i * chunk_bytes : (i + 1) * chunk_bytes]).decode(),
            description=description,
            from_agent=from_agent,
        )
        for i in range(count)
    ]


# -- receiving ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedFile:
    """A file received, checked and saved (``saved_as``: its name in the incoming directory)."""

    sender: str
    transfer_id: str | None
    file_name: str
    saved_as: str
    path: Path
    size: int
    sha256: str
    description: str
    from_agent: str | None

    def summary(self) -> dict[str, Any]:
        """What the local model is shown: names relative to the incoming directory."""
        return {
            "file_name": self.file_name,
            "saved_as": self.saved_as,
            "size_bytes": self.size,
            "sha256": self.sha256,
            "description": self.description,
        }


@dataclass(frozen=True)
class DroppedTransfer:
    """A transfer in progress that the receiver gave up (``reason``: ``evicted``/``expired``)."""

    sender: str
    transfer_id: str
    file_name: str
    reason: str


@dataclass
class _Partial:
    sender: str
    transfer_id: str
    file_name: str
    count: int
    size: int
    sha256: str
    description: str
    from_agent: str | None
    spool: str
    fd: int
    chunk_len: int | None = None
    have: bytearray = field(default_factory=bytearray)
    chunks: int = 0
    touched: float = 0.0

    def got(self, index: int) -> bool:
        return bool(self.have[index >> 3] & (1 << (index & 7)))

    def mark(self, index: int) -> None:
        self.have[index >> 3] |= 1 << (index & 7)
        self.chunks += 1


def _b64(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise FileTransferError("malformed", f"{what} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        try:  # tolerate the URL-safe alphabet and missing padding
            return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        except (binascii.Error, ValueError):
            raise FileTransferError("malformed", f"{what} is not base64") from None


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FileTransferError("malformed", f"{what} must be an integer")
    return value


def _hex_sha(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) != 64:
        raise FileTransferError("malformed", "sha256 must be 64 hex characters")
    try:
        bytes.fromhex(value)
    except ValueError:
        raise FileTransferError("malformed", "sha256 must be 64 hex characters") from None
    return value.lower()


def _str_or(value: object, default: str) -> str:
    return value if isinstance(value, str) else default


class FileReceiver:
    """Validates, reassembles and saves inbound files within fair limits.

    The tools call it from a worker thread, one envelope after another; a lock keeps a
    :meth:`close` from another thread out of a transfer in progress.

    Args:
        incoming_dir: where files are saved.
        max_bytes: the largest file accepted (overrides ``limits.max_file_bytes``).
        limits: quotas and slots (see :class:`TransferLimits` and the module constants).
        roots: if given, the incoming directory is refused when it resolves into one of
            its protected paths.
        clock: monotonic seconds (tests inject one).
    """

    def __init__(
        self,
        incoming_dir: str | os.PathLike[str],
        *,
        max_bytes: int | None = None,
        limits: TransferLimits | None = None,
        roots: FileRoots | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.incoming_dir = Path(incoming_dir)
        self.limits = limits or TransferLimits()
        self.max_bytes = max_bytes if max_bytes is not None else self.limits.max_file_bytes
        self.roots = roots
        self._clock = clock
        self._partial: dict[tuple[str, str], _Partial] = {}
        self._done: collections.OrderedDict[tuple[str, str], ReceivedFile] = collections.OrderedDict()
        #: files saved per peer since start: name -> (device, inode, size)
        self._saved: dict[str, dict[str, tuple[int, int, int]]] = {}
        self._dir_bytes: int | None = None
        self._last_scan = -1e18
        self._dropped: list[DroppedTransfer] = []
        self._cleaned = False
        self._lock = threading.RLock()

    # -- introspection ---------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Transfers in progress."""
        return len(self._partial)

    def pending_for(self, sender: str) -> int:
        return sum(1 for p in self._partial.values() if p.sender == sender)

    def completed(self, sender: str, transfer_id: str | None) -> ReceivedFile | None:
        """The result of a transfer already saved (for re-acknowledging duplicates)."""
        return self._done.get((sender, transfer_id)) if transfer_id else None

    def take_dropped(self) -> list[DroppedTransfer]:
        """Transfers given up since the last call (evicted for a fairer share, or idle)."""
        out, self._dropped = self._dropped, []
        return out

    def usage(self, sender: str | None = None) -> int:
        """Bytes counted against ``sender`` 's quota (None: the total), as last measured."""
        if sender is None:
            return (self._dir_bytes or 0) + self._reserved()
        return sum(size for _d, _i, size in self._saved.get(sender, {}).values()) + self._reserved(sender)

    def close(self) -> None:
        """Give up every transfer in progress and remove its temporary file."""
        with self._lock:
            for key in list(self._partial):
                self._discard(key)

    # -- accounting ------------------------------------------------------------------------

    def _reserved(self, sender: str | None = None) -> int:
        return sum(p.size for p in self._partial.values() if sender is None or p.sender == sender)

    def _dir(self) -> int:
        try:
            dfd = _open_dir(self.incoming_dir, self.roots)
        except OSError as exc:
            raise FileTransferError(
                "save_failed", f"incoming directory {self.incoming_dir} is not usable: {exc}"
            ) from None
        if not self._cleaned:
            self._cleaned = True
            self._remove_stale_spools(dfd)
        return dfd

    def _remove_stale_spools(self, dfd: int) -> None:
        """Temporary files left by a crash are removed once (they count against nothing)."""
        live = {p.spool for p in self._partial.values()}
        try:
            names = os.listdir(dfd)
        except OSError:
            return
        for name in names:
            if _SPOOL_RE.match(name) and name not in live:
                try:
                    if stat.S_ISREG(os.stat(name, dir_fd=dfd, follow_symlinks=False).st_mode):
                        os.unlink(name, dir_fd=dfd)
                except OSError:
                    continue

    def _measure(self, dfd: int, *, force: bool = False) -> int:
        """Bytes of the regular files directly in the incoming directory (temporary files
        excluded: transfers in progress are counted at their announced size instead)."""
        now = self._clock()
        age = now - self._last_scan
        if self._dir_bytes is not None and age < MEASURE_INTERVAL and not (force and age >= RESCAN_INTERVAL):
            return self._dir_bytes
        self._last_scan = now
        total = 0
        try:
            with os.scandir(dfd) as entries:
                for entry in entries:
                    if _SPOOL_RE.match(entry.name):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISREG(st.st_mode):
                        total += st.st_size
        except OSError:
            total = self._dir_bytes or 0
        self._dir_bytes = total
        return total

    def _refresh_peer(self, sender: str, dfd: int) -> None:
        """Forget files of ``sender`` that were moved, deleted or replaced since we saved them."""
        files = self._saved.get(sender)
        if not files:
            return
        for name, (dev, ino, _size) in list(files.items()):
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except OSError:
                del files[name]
                continue
            if (st.st_dev, st.st_ino) != (dev, ino):
                del files[name]

    def _admit(self, sender: str, size: int, dfd: int, *, new_slot: bool) -> None:
        """Reserve room for a new transfer of ``size`` bytes from ``sender``, evicting a
        busier peer's transfer when that is what makes the share fair.

        Raises:
            FileTransferError: ``too_large``, ``quota_exceeded`` or ``busy``.
        """
        lim = self.limits
        self._check_size(size)
        if self.usage(sender) + size > lim.peer_disk_quota:
            self._refresh_peer(sender, dfd)
            if self.usage(sender) + size > lim.peer_disk_quota:
                raise FileTransferError(
                    "quota_exceeded",
                    f"{sender} has used its quota of {lim.peer_disk_quota} bytes in the incoming directory",
                )
        if new_slot:
            if self.pending_for(sender) >= lim.max_transfers_per_peer:
                raise FileTransferError(
                    "busy", f"{sender} already has {lim.max_transfers_per_peer} transfers in progress"
                )
            while len(self._partial) >= lim.max_transfers_total:
                if not self._evict_for(sender, by_slots=True, size=size):
                    raise FileTransferError("busy", f"all {lim.max_transfers_total} reassembly slots are taken")
        if self._measure(dfd) + self._reserved() + size > lim.total_disk_quota:
            self._measure(dfd, force=True)
            while self._measure(dfd) + self._reserved() + size > lim.total_disk_quota:
                if not self._evict_for(sender, by_slots=False, size=size):
                    raise FileTransferError(
                        "quota_exceeded", f"the incoming directory holds its quota of {lim.total_disk_quota} bytes"
                    )

    def _evict_for(self, sender: str, *, by_slots: bool, size: int) -> bool:
        """Drop the most idle transfer of the busiest other peer if it holds clearly more
        than ``sender`` would after this transfer; returns whether one was dropped."""
        holders: dict[str, list[_Partial]] = {}
        for p in self._partial.values():
            if p.sender != sender:
                holders.setdefault(p.sender, []).append(p)
        if not holders:
            return False
        if by_slots:
            mine = self.pending_for(sender)
            victim_peer = max(holders, key=lambda peer: (len(holders[peer]), -min(p.touched for p in holders[peer])))
            # equal shares stay: moving a slot from one peer to another would gain nothing
            if len(holders[victim_peer]) < mine + 2:
                return False
        else:
            mine_bytes = self._reserved(sender) + size
            victim_peer = max(holders, key=lambda peer: sum(p.size for p in holders[peer]))
            if sum(p.size for p in holders[victim_peer]) <= mine_bytes:
                return False
        victim = min(holders[victim_peer], key=lambda p: p.touched)
        self._discard((victim.sender, victim.transfer_id), reason="evicted")
        return True

    def _discard(self, key: tuple[str, str], reason: str | None = None) -> None:
        p = self._partial.pop(key, None)
        if p is None:
            return
        if reason is not None:
            self._dropped.append(DroppedTransfer(p.sender, p.transfer_id, p.file_name, reason))
        with contextlib.suppress(OSError):
            os.close(p.fd)
        try:
            dfd = _open_dir(self.incoming_dir, self.roots)
        except OSError:
            return
        try:
            with contextlib.suppress(OSError):
                os.unlink(p.spool, dir_fd=dfd)
        finally:
            os.close(dfd)

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, p in self._partial.items() if now - p.touched > self.limits.idle_timeout]:
            self._discard(key, reason="expired")

    def _check_size(self, size: int) -> None:
        if size < 0:
            raise FileTransferError("malformed", "size_bytes must not be negative")
        if size > self.max_bytes:
            raise FileTransferError(
                "too_large",
                f"file of {size} bytes exceeds the receiver's size limit of {self.max_bytes} bytes",
                peer_message=f"the file of {size} bytes exceeds the receiver's size limit of {self.max_bytes} bytes",
            )

    def _remember(self, result: ReceivedFile, dev: int, ino: int) -> None:
        self._saved.setdefault(result.sender, {})[result.saved_as] = (dev, ino, result.size)
        if self._dir_bytes is not None:
            self._dir_bytes += result.size
        if result.transfer_id:
            self._done[(result.sender, result.transfer_id)] = result
            while len(self._done) > _DONE_MEMORY:
                self._done.popitem(last=False)

    # -- single-message transfers ------------------------------------------------------------

    def accept_single(self, sender: str, env: dict[str, Any]) -> ReceivedFile:
        """Check and save a one-message ``file_transfer``.

        Raises:
            FileTransferError: the transfer is refused (nothing is saved).
        """
        with self._lock:
            return self._accept_single(sender, env)

    def _accept_single(self, sender: str, env: dict[str, Any]) -> ReceivedFile:
        self._expire()
        transfer_id = env.get("transfer_id") if isinstance(env.get("transfer_id"), str) else None
        done = self.completed(sender, transfer_id)
        if done is not None:
            return done
        name = env.get("file_name")
        if not isinstance(name, str) or not name:
            raise FileTransferError("malformed", "file_name is missing")
        raw = env.get("file_data")
        if isinstance(raw, str) and len(raw) > (self.max_bytes // 3 + 1) * 4 + 4:
            self._check_size(len(raw) // 4 * 3)
        data = _b64(raw, "file_data")
        declared = env.get("size_bytes")
        size = _int(declared, "size_bytes") if declared is not None else len(data)
        self._check_size(max(size, len(data)))
        if len(data) != size:
            raise FileTransferError("size_mismatch", f"received {len(data)} bytes, the sender announced {size}")
        digest = hashlib.sha256(data).hexdigest()
        sha = _hex_sha(env.get("sha256"))
        if sha and digest != sha:
            raise FileTransferError("sha256_mismatch", "the received data does not match the announced sha256")
        dfd = self._dir()
        try:
            self._admit(sender, len(data), dfd, new_slot=False)
            saved_as, dev, ino = self._save(dfd, name, data)
        finally:
            os.close(dfd)
        result = ReceivedFile(
            sender,
            transfer_id,
            name,
            saved_as,
            self.incoming_dir.resolve() / saved_as,
            len(data),
            digest,
            _str_or(env.get("description"), ""),
            _str_or(env.get("from_agent"), "") or None,
        )
        self._remember(result, dev, ino)
        return result

    def _save(self, dfd: int, requested: str, data: bytes) -> tuple[str, int, int]:
        tmp = _spool_name()
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600, dir_fd=dfd)
            try:
                _write_all(fd, data)
                os.fsync(fd)
                st = os.fstat(fd)
            finally:
                os.close(fd)
            try:
                return _publish(dfd, tmp, sanitize_name(requested)), st.st_dev, st.st_ino
            finally:
                os.unlink(tmp, dir_fd=dfd)
        except OSError as exc:
            raise FileTransferError("save_failed", f"cannot save {requested!r} in {self.incoming_dir}: {exc}") from None

    # -- chunked transfers -------------------------------------------------------------------

    def accept_chunk(self, sender: str, env: dict[str, Any]) -> ReceivedFile | None:
        """Take one ``file_transfer_chunk``; returns the saved file when it completes one.

        Every chunk but the last has the same length (the sender's chunk size), so each is
        written at ``index × length`` straight into the transfer's temporary file.
        Duplicate chunks are ignored; a duplicate after completion returns the saved result.

        Raises:
            FileTransferError: the transfer is refused (its partial data is dropped).
        """
        with self._lock:
            return self._accept_chunk(sender, env)

    def _accept_chunk(self, sender: str, env: dict[str, Any]) -> ReceivedFile | None:
        self._expire()
        transfer_id = env.get("transfer_id")
        if not isinstance(transfer_id, str) or not transfer_id or len(transfer_id) > 128:
            raise FileTransferError("malformed", "transfer_id is missing")
        done = self.completed(sender, transfer_id)
        if done is not None:
            return done
        key = (sender, transfer_id)
        try:
            index = _int(env.get("index"), "index")
            count = _int(env.get("count"), "count")
            size = _int(env.get("size_bytes"), "size_bytes")
            self._check_size(size)
            sha = _hex_sha(env.get("sha256"))
            if sha is None:
                raise FileTransferError("malformed", "sha256 is missing")
            if not 1 <= count <= max(1, -(-size // 1024)) or count > 100_000:
                raise FileTransferError("malformed", f"implausible chunk count {count} for {size} bytes")
            if not 0 <= index < count:
                raise FileTransferError("malformed", f"chunk index {index} is out of range 0..{count - 1}")
            raw = env.get("data")
            if isinstance(raw, str) and len(raw) > (MAX_CHUNK_BYTES // 3 + 1) * 4 + 4:
                raise FileTransferError("malformed", "chunk too large")
            partial = self._partial.get(key)
            if partial is None:
                name = env.get("file_name")
                if not isinstance(name, str) or not name:
                    raise FileTransferError("malformed", "file_name is missing")
                partial = self._start(sender, transfer_id, name, count, size, sha, env)
            elif (partial.count, partial.size, partial.sha256) != (count, size, sha):
                raise FileTransferError("malformed", "chunks of one transfer disagree on count, size or sha256")
            if partial.got(index):
                return None  # a duplicate: no progress, so it does not keep the slot alive
            data = _b64(raw, "data")
            self._place(partial, index, data)
            partial.touched = self._clock()
            if partial.chunks < partial.count:
                return None
            return self._finish(partial)
        except FileTransferError:
            self._discard(key)
            raise

    def _start(
        self, sender: str, transfer_id: str, name: str, count: int, size: int, sha: str, env: dict[str, Any]
    ) -> _Partial:
        dfd = self._dir()
        try:
            self._admit(sender, size, dfd, new_slot=True)
            spool = _spool_name()
            try:
                fd = os.open(spool, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600, dir_fd=dfd)
            except OSError as exc:
                raise FileTransferError("save_failed", f"cannot create a temporary file: {exc}") from None
        finally:
            os.close(dfd)
        partial = _Partial(
            sender,
            transfer_id,
            name,
            count,
            size,
            sha,
            _str_or(env.get("description"), ""),
            _str_or(env.get("from_agent"), "") or None,
            spool,
            fd,
            have=bytearray((count + 7) // 8),
            touched=self._clock(),
        )
        self._partial[(sender, transfer_id)] = partial
        return partial

    @staticmethod
    def _chunk_len(p: _Partial, index: int, got: int) -> int:
        """The common length of the non-final chunks, learnt from the first chunk seen."""
        if p.count == 1:
            return p.size
        if index < p.count - 1:
            length = got
        else:  # the last chunk: size = (count - 1) × length + its own length
            rest = p.size - got
            if rest <= 0 or rest % (p.count - 1):
                raise FileTransferError("malformed", "chunk sizes do not add up to the announced size")
            length = rest // (p.count - 1)
        if length < 1 or not (p.count - 1) * length < p.size <= p.count * length:
            raise FileTransferError("malformed", "chunk sizes do not add up to the announced size")
        return length

    def _place(self, p: _Partial, index: int, data: bytes) -> None:
        if p.chunk_len is None:
            p.chunk_len = self._chunk_len(p, index, len(data))
        expected = p.chunk_len if index < p.count - 1 else p.size - (p.count - 1) * p.chunk_len
        if len(data) != expected:
            raise FileTransferError("size_mismatch", f"chunk {index} has {len(data)} bytes, expected {expected}")
        try:
            _write_all(p.fd, data, index * p.chunk_len)
        except OSError as exc:
            raise FileTransferError("save_failed", f"cannot write a chunk of {p.file_name!r}: {exc}") from None
        p.mark(index)

    def _finish(self, p: _Partial) -> ReceivedFile:
        key = (p.sender, p.transfer_id)
        digest = hashlib.sha256()
        try:
            os.fsync(p.fd)
            offset = 0
            while offset < p.size:
                block = os.pread(p.fd, min(MiB, p.size - offset), offset)
                if not block:
                    break
                digest.update(block)
                offset += len(block)
            st = os.fstat(p.fd)
        except OSError as exc:
            raise FileTransferError("save_failed", f"cannot read back {p.file_name!r}: {exc}") from None
        if offset != p.size:
            raise FileTransferError("size_mismatch", f"received {offset} bytes, the sender announced {p.size}")
        if digest.hexdigest() != p.sha256:
            raise FileTransferError("sha256_mismatch", "the received data does not match the announced sha256")
        dfd = self._dir()
        try:
            try:
                saved_as = _publish(dfd, p.spool, sanitize_name(p.file_name))
            except OSError as exc:
                raise FileTransferError("save_failed", f"cannot save {p.file_name!r}: {exc}") from None
        finally:
            os.close(dfd)
        self._discard(key)  # closes and unlinks the temporary name; the saved name stays
        result = ReceivedFile(
            p.sender,
            p.transfer_id,
            p.file_name,
            saved_as,
            self.incoming_dir.resolve() / saved_as,
            p.size,
            p.sha256,
            p.description,
            p.from_agent,
        )
        self._remember(result, st.st_dev, st.st_ino)
        return result
