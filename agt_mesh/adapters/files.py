"""File transfer over the encrypted session: reading, chunking, reassembly and safe saving.

Sender side: :func:`read_outgoing` opens the file once, checks it through that descriptor
(regular file, within the size cap) and reads it; :func:`plan_envelopes` cuts it into
envelopes (see :mod:`agt_mesh.adapters.envelopes`).

Receiver side: :class:`FileReceiver` validates ``file_transfer`` / ``file_transfer_chunk``
envelopes, reassembles chunks, checks size and sha256 and saves with :func:`save_incoming`:

* only a sanitised *basename* is used: directories, ``..``, absolute paths, NUL and other
  control characters, leading dots and over-long names are removed;
* the file is written under a hidden temporary name with ``O_CREAT|O_EXCL|O_NOFOLLOW``
  relative to a descriptor of the incoming directory (mode 0600), fsynced, then published
  with ``link()`` — which never replaces an existing name — so an existing file is never
  overwritten (a ``-1``, ``-2`` … suffix is used instead) and no symlink is ever followed.
"""

from __future__ import annotations

import base64
import binascii
import collections
import hashlib
import os
import secrets
import stat
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agt_mesh.adapters import envelopes as envs

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_MAX_FILE_BYTES",
    "FileReceiver",
    "FileTransferError",
    "OutgoingFile",
    "ReceivedFile",
    "plan_envelopes",
    "read_outgoing",
    "sanitize_name",
    "save_incoming",
]

#: Largest file sent or accepted by default (kars and OpenClaw use the same cap).
DEFAULT_MAX_FILE_BYTES = 30 * 1024 * 1024
#: Raw bytes per chunk: ~470 KB per relay frame after base64, JSON and encryption.
DEFAULT_CHUNK_BYTES = 256 * 1024
#: No chunk may carry more than this many raw bytes (whatever the sender's chunk size).
MAX_CHUNK_BYTES = 1024 * 1024
_MAX_NAME_BYTES = 200


class FileTransferError(Exception):
    """A transfer that cannot proceed; ``kind`` is a short stable label."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


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


def _open_dir(path: Path) -> int:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags | getattr(os, "O_NOFOLLOW", 0))


def save_incoming(directory: str | os.PathLike[str], requested_name: object, data: bytes) -> tuple[str, Path]:
    """Save ``data`` in ``directory`` under a sanitised, unused name; returns (name, path).

    Never overwrites, never follows a symlink, never leaves the directory.  The directory
    is created (0700) if missing.

    Raises:
        FileTransferError: ``save_failed`` if the directory or the file cannot be written.
    """
    root = Path(directory)
    try:
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        dfd = _open_dir(root)
    except OSError as exc:
        raise FileTransferError("save_failed", f"incoming directory {root} is not usable: {exc}") from None
    name = sanitize_name(requested_name)
    tmp = f".{secrets.token_hex(8)}.partial"
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(tmp, flags, 0o600, dir_fd=dfd)
        try:
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            for candidate in _candidates(name):
                try:
                    os.link(tmp, candidate, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
                except FileExistsError:
                    continue
                return candidate, root.resolve() / candidate
            raise AssertionError("unreachable")  # pragma: no cover - _candidates is endless
        finally:
            os.unlink(tmp, dir_fd=dfd)
    except OSError as exc:
        raise FileTransferError("save_failed", f"cannot save {name!r} in {root}: {exc}") from None
    finally:
        os.close(dfd)


# -- sending ------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutgoingFile:
    """A file read for sending."""

    name: str
    path: Path
    data: bytes = field(repr=False)
    sha256: str

    @property
    def size(self) -> int:
        return len(self.data)


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def read_outgoing(
    file_path: str,
    *,
    root: str | os.PathLike[str] | None = None,
    max_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> OutgoingFile:
    """Open, check and read a file to send.

    A relative ``file_path`` is taken relative to ``root`` (else the working directory).
    With ``root`` set, the resolved file must lie inside it.  The file is opened once and
    checked through that descriptor (no check-then-open race).

    Raises:
        FileTransferError: ``not_found``, ``path_outside_root``, ``not_a_file``, ``too_large``
            (before anything is read), ``read_failed``.
    """
    if not isinstance(file_path, str) or not file_path or "\x00" in file_path:
        raise FileTransferError("invalid_argument", "file_path must be a non-empty path")
    base = Path(root).expanduser() if root is not None else Path.cwd()
    candidate = Path(file_path).expanduser()
    if not candidate.is_absolute():
        candidate = base / candidate
    try:
        resolved = candidate.resolve(strict=True)
    except FileNotFoundError:
        raise FileTransferError("not_found", f"no such file: {file_path}") from None
    except (OSError, RuntimeError) as exc:
        raise FileTransferError("read_failed", f"cannot resolve {file_path}: {exc}") from None
    if root is not None and not _inside(resolved, base.resolve()):
        raise FileTransferError("path_outside_root", f"{file_path} is outside the allowed directory {base}")
    try:
        fd = os.open(resolved, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise FileTransferError("read_failed", f"cannot open {file_path}: {exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileTransferError("not_a_file", f"{file_path} is not a regular file")
        if st.st_size > max_bytes:
            raise FileTransferError(
                "too_large", f"{file_path} is {st.st_size} bytes; the limit is {max_bytes} bytes — nothing was sent"
            )
        chunks = []
        remaining = max_bytes + 1
        while remaining > 0:
            block = os.read(fd, min(remaining, 1 << 20))
            if not block:
                break
            chunks.append(block)
            remaining -= len(block)
        data = b"".join(chunks)
    except OSError as exc:
        raise FileTransferError("read_failed", f"cannot read {file_path}: {exc}") from None
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise FileTransferError("too_large", f"{file_path} grew beyond the limit of {max_bytes} bytes while read")
    return OutgoingFile(resolved.name, resolved, data, hashlib.sha256(data).hexdigest())


def plan_envelopes(
    file: OutgoingFile,
    *,
    transfer_id: str,
    description: str,
    from_agent: str | None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> list[dict[str, Any]]:
    """The envelopes carrying ``file``: one ``file_transfer`` if it fits one chunk, else
    ``file_transfer_chunk`` s."""
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
    """A file received, checked and saved."""

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
        return {
            "file_name": self.file_name,
            "saved_as": self.saved_as,
            "saved_to": str(self.path),
            "size_bytes": self.size,
            "sha256": self.sha256,
            "description": self.description,
        }


@dataclass
class _Partial:
    file_name: str
    count: int
    size: int
    sha256: str
    description: str
    from_agent: str | None
    chunks: dict[int, bytes] = field(default_factory=dict)
    received: int = 0
    touched: float = 0.0


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


class FileReceiver:
    """Validates, reassembles and saves inbound files (no I/O besides the final save).

    Args:
        incoming_dir: where files are saved.
        max_bytes: the largest file accepted.
        max_pending: transfers reassembled at the same time (more are refused).
        stale_after: seconds after which an incomplete transfer is dropped.
    """

    def __init__(
        self,
        incoming_dir: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_FILE_BYTES,
        max_pending: int = 16,
        stale_after: float = 600.0,
        clock: Any = time.monotonic,
    ) -> None:
        self.incoming_dir = Path(incoming_dir)
        self.max_bytes = max_bytes
        self.max_pending = max_pending
        self.stale_after = stale_after
        self._clock = clock
        self._partial: dict[tuple[str, str], _Partial] = {}
        self._done: collections.OrderedDict[tuple[str, str], ReceivedFile] = collections.OrderedDict()

    @property
    def pending(self) -> int:
        return len(self._partial)

    def completed(self, sender: str, transfer_id: str | None) -> ReceivedFile | None:
        """The result of a transfer already saved (for re-acknowledging duplicates)."""
        return self._done.get((sender, transfer_id)) if transfer_id else None

    def _check_size(self, size: int) -> None:
        if size < 0:
            raise FileTransferError("malformed", "size_bytes must not be negative")
        if size > self.max_bytes:
            raise FileTransferError(
                "too_large", f"file of {size} bytes exceeds the receiver's limit of {self.max_bytes}"
            )

    def _finish(self, sender: str, transfer_id: str | None, data: bytes, p: _Partial) -> ReceivedFile:
        if len(data) != p.size:
            raise FileTransferError("size_mismatch", f"received {len(data)} bytes, the sender announced {p.size}")
        digest = hashlib.sha256(data).hexdigest()
        if p.sha256 and digest != p.sha256:
            raise FileTransferError("sha256_mismatch", "the received data does not match the announced sha256")
        saved_as, path = save_incoming(self.incoming_dir, p.file_name, data)
        result = ReceivedFile(
            sender, transfer_id, p.file_name, saved_as, path, len(data), digest, p.description, p.from_agent
        )
        if transfer_id:
            self._done[(sender, transfer_id)] = result
            while len(self._done) > 256:
                self._done.popitem(last=False)
        return result

    def accept_single(self, sender: str, env: dict[str, Any]) -> ReceivedFile:
        """Check and save a one-message ``file_transfer``.

        Raises:
            FileTransferError: the transfer is refused (nothing is saved).
        """
        transfer_id = env.get("transfer_id") if isinstance(env.get("transfer_id"), str) else None
        done = self.completed(sender, transfer_id)
        if done is not None:
            return done
        name = env.get("file_name")
        if not isinstance(name, str) or not name:
            raise FileTransferError("malformed", "file_name is missing")
        raw = env.get("file_data")
        if isinstance(raw, str) and len(raw) > (self.max_bytes // 3 + 1) * 4 + 4:
            raise FileTransferError("too_large", f"file exceeds the receiver's limit of {self.max_bytes} bytes")
        data = _b64(raw, "file_data")
        declared = env.get("size_bytes")
        size = _int(declared, "size_bytes") if declared is not None else len(data)
        self._check_size(max(size, len(data)))
        description = env.get("description")
        from_agent = env.get("from_agent")
        p = _Partial(
            name,
            1,
            size,
            _hex_sha(env.get("sha256")) or "",
            description if isinstance(description, str) else "",
            from_agent if isinstance(from_agent, str) else None,
        )
        return self._finish(sender, transfer_id, data, p)

    def accept_chunk(self, sender: str, env: dict[str, Any]) -> ReceivedFile | None:
        """Take one ``file_transfer_chunk``; returns the saved file when it completes one.

        Duplicate chunks are ignored; a duplicate after completion returns the saved result.

        Raises:
            FileTransferError: the transfer is refused (its partial data is dropped).
        """
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
            partial = self._partial.get(key)
            if partial is None:
                if len(self._partial) >= self.max_pending:
                    raise FileTransferError("busy", "too many file transfers in progress; retry later")
                name = env.get("file_name")
                if not isinstance(name, str) or not name:
                    raise FileTransferError("malformed", "file_name is missing")
                description = env.get("description")
                from_agent = env.get("from_agent")
                partial = _Partial(
                    name,
                    count,
                    size,
                    sha,
                    description if isinstance(description, str) else "",
                    from_agent if isinstance(from_agent, str) else None,
                )
                self._partial[key] = partial
            elif (partial.count, partial.size, partial.sha256) != (count, size, sha):
                raise FileTransferError("malformed", "chunks of one transfer disagree on count, size or sha256")
            partial.touched = self._clock()
            if index in partial.chunks:
                return None
            raw = env.get("data")
            if isinstance(raw, str) and len(raw) > (MAX_CHUNK_BYTES // 3 + 1) * 4 + 4:
                raise FileTransferError("malformed", "chunk too large")
            data = _b64(raw, "data")
            if partial.received + len(data) > partial.size:
                raise FileTransferError("size_mismatch", "more data than the announced size")
            partial.chunks[index] = data
            partial.received += len(data)
            if len(partial.chunks) < partial.count:
                return None
            del self._partial[key]
            whole = b"".join(partial.chunks[i] for i in range(partial.count))
            return self._finish(sender, transfer_id, whole, partial)
        except FileTransferError:
            self._partial.pop(key, None)
            raise

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, p in self._partial.items() if now - p.touched > self.stale_after]:
            del self._partial[key]
