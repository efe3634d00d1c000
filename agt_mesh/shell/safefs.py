"""Safe local files: the one place that decides whether a state directory and the private
files in it may be used.

The state directory holds private keys, so it is checked *before* anything in it is
created or opened (the writer lock, the store, the identity file):

* it must be a directory owned by us (the effective uid) that group and others cannot
  write — otherwise another user could plant a symbolic link named like one of our files
  and have us truncate, overwrite or read whatever it points to;
* every directory above it, up to the home directory (or ``/``), must belong to us or
  root and be writable by nobody else, unless it has the sticky bit (``/tmp``) — otherwise
  another user could rename the whole state directory away and put their own in its
  place between our check and our use (OpenSSH's ``StrictModes`` applies the same rule).

Files in it are opened with ``O_NOFOLLOW`` (a symbolic link is refused, never followed),
created with ``O_EXCL`` and mode 0600, and must be regular files owned by us that group
and others cannot access.  SQLite opens its files by name, so before it does, the
database and its ``-wal``/``-shm``/``-journal`` side files are checked the same way with
``lstat``; the directory check above ensures nobody else can add or swap them later.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agt_mesh.errors import MeshError, MeshStateError

__all__ = ["SQLITE_SIDE_FILES", "check_private_file", "check_sqlite_files", "check_state_dir", "open_private"]

#: The files SQLite creates next to a database (WAL mode, and the rollback journal it
#: uses while it switches to WAL).
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _uid() -> int:
    return os.geteuid() if hasattr(os, "geteuid") else -1


def _owner_ok(st: os.stat_result, *, root_ok: bool = False) -> bool:
    uid = _uid()
    return uid < 0 or st.st_uid == uid or (root_ok and st.st_uid == 0)


def _home() -> Path | None:
    try:
        return Path.home().resolve()
    except (RuntimeError, OSError, KeyError):
        return None


def _check_ancestors(path: Path) -> None:
    """Every directory above ``path`` (an absolute, resolved path) must be ours or
    root's and writable by nobody else, unless sticky; stop after the home directory."""
    home = _home()
    for parent in path.parents:
        try:
            st = os.stat(parent)
        except FileNotFoundError:
            continue  # created by us (0700) with the state directory
        except OSError as exc:
            raise MeshStateError(f"cannot check {parent} (above the state directory {path}): {exc.strerror}") from None
        sticky = bool(st.st_mode & stat.S_ISVTX)
        if not _owner_ok(st, root_ok=True) or (st.st_mode & 0o022 and not sticky):
            raise MeshStateError(
                f"the state directory {path} is inside {parent}, which "
                + (
                    f"belongs to another user (uid {st.st_uid})"
                    if not _owner_ok(st, root_ok=True)
                    else f"other users can write (mode {stat.S_IMODE(st.st_mode):04o})"
                )
                + ": they could replace the state directory, which holds private keys. "
                "Use a state directory inside a directory that only you (or root) can write"
            )
        if home is not None and parent == home:
            return


def check_state_dir(path: str | os.PathLike[str], *, create: bool = True) -> Path:
    """Check the state directory (creating it 0700 if asked) before anything in it is used.

    Returns the directory's resolved path.

    Raises:
        MeshStateError: it is missing (``create=False``), not a directory, not ours,
            writable by group or others, or inside a directory other users control.
    """
    p = Path(path)
    if not p.exists() and not p.is_symlink():
        if not create:
            raise MeshStateError(f"state directory {p} does not exist")
        _check_ancestors(Path(os.path.abspath(p)))  # before creating anything in them
        try:
            p.mkdir(parents=True, mode=0o700)
        except FileExistsError:
            pass
        except OSError as exc:
            raise MeshStateError(f"cannot create the state directory {p}: {exc.strerror}") from None
    try:
        st = os.stat(p)
    except OSError as exc:
        raise MeshStateError(f"cannot use the state directory {p}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MeshStateError(f"state path {p} is not a directory")
    if not _owner_ok(st):
        raise MeshStateError(
            f"state directory {p} belongs to another user (uid {st.st_uid}); it holds private keys — "
            "use a state directory of your own"
        )
    if st.st_mode & 0o022:
        raise MeshStateError(
            f"state directory {p} is writable by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"it holds private keys. Fix it with: chmod 700 {p}"
        )
    real = p.resolve()
    _check_ancestors(real)
    lexical = Path(os.path.abspath(p))
    if lexical != real:  # a symbolic link on the way: where the link lives matters too
        _check_ancestors(lexical)
    return real


def check_private_file(
    path: Path, st: os.stat_result, what: str = "state file", error: type[MeshError] = MeshStateError
) -> None:
    """Refuse anything but a regular file of ours that group and others cannot access."""
    if stat.S_ISLNK(st.st_mode):
        raise error(f"{what} {path} is a symbolic link; refusing to follow it (remove it)")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{what} {path} is not a regular file")
    if not _owner_ok(st):
        raise error(f"{what} {path} belongs to another user (uid {st.st_uid}); refusing to use it")
    if st.st_mode & 0o077:
        raise error(
            f"{what} {path} is accessible by other users (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"it holds private keys. Fix it with: chmod 600 {path}"
        )


def open_private(
    path: Path,
    flags: int,
    *,
    create: bool = False,
    exclusive: bool = False,
    what: str = "state file",
    error: type[MeshError] = MeshStateError,
) -> int:
    """Open a private file without following a symbolic link; returns the descriptor.

    With ``create`` a missing file is created 0600 (``exclusive``: it must not exist).
    The opened file is checked with ``fstat`` (regular, ours, 0600-ish) before it is used.

    Raises:
        ``error``: the file is a link, not regular, not ours or too open; or cannot be opened.
        FileNotFoundError: it does not exist (without ``create``).
        FileExistsError: it exists (with ``exclusive``).
    """
    flags |= _NOFOLLOW | _CLOEXEC
    if create:
        flags |= os.O_CREAT | (os.O_EXCL if exclusive else 0)
    try:
        fd = os.open(path, flags, 0o600)
    except (FileNotFoundError, FileExistsError):
        raise
    except OSError as exc:
        try:
            link = stat.S_ISLNK(os.lstat(path).st_mode)
        except OSError:
            link = False
        if link:
            raise error(f"{what} {path} is a symbolic link; refusing to follow it (remove it)") from None
        raise error(f"cannot open {what} {path}: {exc.strerror}") from None
    try:
        check_private_file(path, os.fstat(fd), what, error)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_sqlite_files(db: Path) -> bool:
    """Check a database and its side files (``lstat``, never following links) before
    SQLite opens them by name.  Returns whether the database exists.

    Raises:
        MeshStateError: one of them is a link, not a regular file, not ours or too open.
    """
    exists = False
    for suffix in ("", *SQLITE_SIDE_FILES):
        p = Path(str(db) + suffix)
        try:
            st = os.lstat(p)
        except FileNotFoundError:
            continue
        check_private_file(p, st)
        exists = exists or suffix == ""
    return exists
