"""Reading and writing identity files (JSON, format ``agt-mesh-identity`` version 1).

Files are created with ``O_CREAT | O_EXCL`` and mode 0600, never overwritten unless asked
(then atomically, through a new 0600 file and ``rename``).  Loading refuses a file that
group or others can read or write, as OpenSSH does for private keys.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import tempfile
from pathlib import Path

from agt_mesh.core.identity import Identity
from agt_mesh.errors import IdentityFileError
from agt_mesh.shell import safefs

__all__ = ["check_private_file", "load_identity", "save_identity"]


def check_private_file(path: Path, st: os.stat_result, what: str = "identity file") -> None:
    """Refuse anything but a regular file of ours that group and others cannot access."""
    safefs.check_private_file(path, st, what, IdentityFileError)


def load_identity(path: str | os.PathLike[str]) -> Identity:
    """Load and check an identity file.

    Raises:
        IdentityFileError: if the file is missing, readable by others, not valid JSON, of
            an unknown version, or its public key does not match its seed.
    """
    p = Path(path)
    try:
        fd = safefs.open_private(p, os.O_RDONLY, what="identity file", error=IdentityFileError)
    except FileNotFoundError:
        raise IdentityFileError(f"no identity file at {p}; create one with: agt-mesh identity new --path {p}") from None
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            raw = fh.read(1 << 16)
    finally:
        os.close(fd)
    try:
        data = json.loads(raw)
    except ValueError:
        raise IdentityFileError(f"identity file {p} is not valid JSON (corrupted or truncated)") from None
    return Identity.from_file_dict(data, source=f"identity file {p}")


def save_identity(
    path: str | os.PathLike[str],
    identity: Identity,
    *,
    force: bool = False,
    created_at: _dt.datetime | None = None,
) -> Path:
    """Write ``identity`` to a new 0600 file.

    Raises:
        IdentityFileError: if the file exists and ``force`` is false, or it cannot be written.
    """
    p = Path(path)
    when = (created_at or _dt.datetime.now(_dt.UTC)).isoformat().replace("+00:00", "Z")
    data = (json.dumps(identity.to_file_dict(created_at=when), indent=2) + "\n").encode()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    target = p
    try:
        if force:  # a fresh, unpredictable 0600 name, renamed over the target at the end
            fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
            target = Path(tmp)
        else:
            fd = os.open(target, flags, 0o600)
    except FileExistsError:
        raise IdentityFileError(
            f"{target} already exists; refusing to overwrite an identity (use --force to replace it)"
        ) from None
    except OSError as exc:
        raise IdentityFileError(f"cannot create identity file {target}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        target.unlink(missing_ok=True)
        raise IdentityFileError(f"cannot write identity file {target}: {exc.strerror}") from None
    os.close(fd)
    if target != p:
        os.replace(target, p)
        with contextlib.suppress(OSError):  # make the rename itself durable
            dfd = os.open(p.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
    return p
