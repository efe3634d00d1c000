"""Where the file tools may read and write: the files root, the incoming directory, and the
paths no tool may ever touch.

Every argument a model passes to a tool may come from a hostile peer's message (prompt
injection), so ``mesh_transfer_file`` is confined the way a least-privilege service is:

* it reads only **below the files root** (an outbox directory by default; the sandbox
  workspace on kars-style hosts) — relative paths are taken from the root, absolute paths
  must resolve inside it;
* never a **protected path** — the agent's state directory (identity, ``state.db`` and its
  WAL/SHM, the writer lock) and anything else the host adds — nor a file that *is* one of
  the state files under another name (same device and inode: a hard link or bind mount);
* never a **hidden** file or a file inside a hidden directory below the root (``.env``,
  ``.ssh``, ``.hermes``, ``.agt``: where hosts keep configuration and credentials), unless
  the host allows it explicitly;
* never a **special file** (FIFO, socket, device): only regular files.

The open is free of check-then-use races: after the path has been resolved and checked,
the file is opened again component by component from a descriptor of the root with
``O_NOFOLLOW`` on every component (a symlink swapped in after the check makes the open
fail instead of being followed), the final component is ``lstat``-ed first so a special
file is never even opened, and the opened descriptor is checked once more (``fstat``: a
regular file with the inode that was checked; on Linux, ``/proc/self/fd``: its real path
is still below the root and outside every protected path).

Default directories: the outbox and the incoming directory live *next to* the state
directory, never inside it — for ``~/.agt-mesh`` they are ``~/.agt-mesh-files/outbox`` and
``~/.agt-mesh-files/incoming`` (created 0700).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from agt_mesh.errors import MeshConfigError, PathRefused

__all__ = [
    "FileRoots",
    "PathRefused",
    "default_file_dirs",
    "fd_path",
    "is_below",
    "make_private_dirs",
    "open_below_root",
]

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_O_NOCTTY = getattr(os, "O_NOCTTY", 0)

#: Suffix of the files-home directory created next to a state directory.
FILES_HOME_SUFFIX = "-files"


def default_file_dirs(state_dir: str | os.PathLike[str] | None) -> tuple[Path, Path]:
    """The default (outbox, incoming) directories for a state directory.

    They are siblings of the state directory (``<state_dir>-files/outbox`` and
    ``<state_dir>-files/incoming``), so nothing a peer sends can land among the agent's
    keys and no file the model may send lives there.  Without a state directory (an
    in-memory identity) ``~/.agt-mesh-files`` is used.
    """
    if state_dir is None:
        home = Path.home() / (".agt-mesh" + FILES_HOME_SUFFIX)
    else:
        p = Path(os.path.abspath(Path(state_dir).expanduser()))
        home = p.parent / (p.name + FILES_HOME_SUFFIX)
    return home / "outbox", home / "incoming"


def is_below(path: str, parent: str) -> bool:
    """Whether ``path`` is ``parent`` or lies inside it (both absolute and normalised)."""
    if path == parent:
        return True
    prefix = parent if parent.endswith(os.sep) else parent + os.sep
    return path.startswith(prefix)


def fd_path(fd: int) -> str | None:
    """The real path of an open descriptor, where the platform tells (Linux ``/proc``)."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    # "(deleted)" or a pseudo path ("pipe:[123]"): not a usable answer
    return target if target.startswith("/") and not target.endswith(" (deleted)") else None


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and its missing parents with mode 0700 (``Path.mkdir(parents=True)``
    would create the parents with the umask's mode: the files home holds received files)."""
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            continue


def _real(path: Path) -> str:
    return os.path.realpath(os.path.abspath(path))


@dataclass
class FileRoots:
    """The directories the file tools use and the paths they never touch.

    Args:
        outbox: the files root: ``mesh_transfer_file`` reads only below it.
        incoming: where received files are saved.
        protected: directories and files no tool may read or write (the state directory,
            the identity file, the host's home); a protected directory covers everything
            below it.
        allow_hidden: allow sending hidden files / files in hidden directories below the
            root (off: ``.env``, ``.ssh`` and the like are where secrets live).

    Raises:
        MeshConfigError: the outbox or the incoming directory is (or resolves to) a
            protected path or lies inside one.
    """

    outbox: Path
    incoming: Path
    protected: tuple[Path, ...] = ()
    allow_hidden: bool = False
    _protected_real: tuple[str, ...] = field(init=False, repr=False, default=())

    def __post_init__(self) -> None:
        self.outbox = Path(os.path.abspath(Path(self.outbox).expanduser()))
        self.incoming = Path(os.path.abspath(Path(self.incoming).expanduser()))
        self.protected = tuple(Path(os.path.abspath(Path(p).expanduser())) for p in self.protected)
        self._protected_real = tuple(dict.fromkeys(s for p in self.protected for s in (str(p), _real(p))))
        for what, path in (("files root", self.outbox), ("incoming directory", self.incoming)):
            for candidate in (str(path), _real(path)):
                for prot in self._protected_real:
                    if is_below(candidate, prot):
                        raise MeshConfigError(
                            f"the {what} {path} is inside the protected path {prot} (the agent's state "
                            "directory holds its private keys): choose a directory outside it"
                        )

    def prepare(self) -> None:
        """Create the outbox and the incoming directory (0700) if they are missing, and
        check again that neither resolves into a protected path.

        Raises:
            MeshConfigError: a directory cannot be created, is not a directory, or resolves
                into a protected path.
        """
        for what, path in (("files root", self.outbox), ("incoming directory", self.incoming)):
            try:
                make_private_dirs(path)
            except OSError as exc:
                raise MeshConfigError(f"cannot create the {what} {path}: {exc.strerror or exc}") from None
            if not path.is_dir():
                raise MeshConfigError(f"the {what} {path} is not a directory")
            real = _real(path)
            if self.is_protected(real):
                raise MeshConfigError(f"the {what} {path} resolves into a protected path ({real})")

    def is_protected(self, real_path: str) -> bool:
        """Whether a resolved path is, or lies inside, a protected path."""
        return any(is_below(real_path, prot) for prot in self._protected_real)

    def protected_inodes(self) -> set[tuple[int, int]]:
        """(device, inode) of every protected file and of every entry directly inside a
        protected directory (the state files), read now: a hard link to the identity file
        or the state database has another name but the same inode."""
        out: set[tuple[int, int]] = set()
        for prot in self._protected_real:
            try:
                st = os.stat(prot, follow_symlinks=False)
            except OSError:
                continue
            out.add((st.st_dev, st.st_ino))
            if stat.S_ISDIR(st.st_mode):
                try:
                    with os.scandir(prot) as entries:
                        for entry in entries:
                            try:
                                est = entry.stat(follow_symlinks=False)
                            except OSError:
                                continue
                            out.add((est.st_dev, est.st_ino))
                except OSError:
                    continue
        return out

    def relative_name(self, real_path: str) -> str:
        """``real_path`` relative to the outbox (what the model is shown)."""
        return os.path.relpath(real_path, _real(self.outbox))


def _hidden(parts: Iterable[str]) -> bool:
    return any(part.startswith(".") for part in parts)


def open_below_root(file_path: object, roots: FileRoots) -> tuple[int, os.stat_result, str]:
    """Open a file the model asked to send, under the rules of the module docstring.

    Returns:
        (descriptor opened read-only, its ``fstat``, the path relative to the root).  The
        caller closes the descriptor.

    Raises:
        PathRefused: the path is refused (nothing has been read).
    """
    if not isinstance(file_path, str) or not file_path.strip() or "\x00" in file_path:
        raise PathRefused("invalid_argument", "file_path must be a non-empty path")
    root_real = _real(roots.outbox)
    where = f"the files root {roots.outbox}"
    candidate = Path(file_path).expanduser()
    if not candidate.is_absolute():
        candidate = Path(root_real) / candidate
    try:
        real = os.path.realpath(candidate, strict=True)
    except FileNotFoundError:
        # say nothing about what exists outside the root
        lexical = os.path.normpath(str(candidate))
        if roots.is_protected(lexical):
            raise PathRefused("protected_path", f"{file_path!r} is inside a protected path: it is never sent") from None
        if not is_below(lexical, root_real):
            raise PathRefused("path_outside_root", f"{file_path!r} is not below {where}") from None
        raise PathRefused("not_found", f"no file {file_path!r} below {where}") from None
    except (OSError, RuntimeError):
        raise PathRefused("read_failed", f"cannot resolve {file_path!r} (a symlink loop?)") from None
    if roots.is_protected(real) or roots.is_protected(os.path.normpath(str(candidate))):
        raise PathRefused(
            "protected_path",
            f"{file_path!r} is (or leads to) a protected path such as the agent's own state directory: "
            "it is never sent",
        )
    if not is_below(real, root_real) or real == root_real:
        if real == root_real:
            raise PathRefused("not_a_file", f"{file_path!r} is the files root itself, not a file")
        raise PathRefused(
            "path_outside_root",
            f"{file_path!r} is not below {where} (symlinks that leave it are not followed); put the file there first",
        )
    rel = os.path.relpath(real, root_real)
    parts = Path(rel).parts
    if not roots.allow_hidden and _hidden(parts):
        raise PathRefused(
            "protected_path",
            f"{file_path!r} is a hidden file or inside a hidden directory (where configuration and "
            "credentials live): it is never sent",
        )
    fd, st = _open_walk(root_real, parts, file_path, roots)
    return fd, st, rel


def _open_walk(root_real: str, parts: tuple[str, ...], shown: str, roots: FileRoots) -> tuple[int, os.stat_result]:
    """Open ``root_real/parts...`` with ``O_NOFOLLOW`` on every component."""
    changed = PathRefused("read_failed", f"{shown!r} changed while it was opened (a symlink was swapped in?)")
    try:
        dfd = os.open(root_real, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC)
    except OSError:
        raise changed from None
    try:
        for part in parts[:-1]:
            try:
                nfd = os.open(part, os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=dfd)
            except OSError:
                raise changed from None
            os.close(dfd)
            dfd = nfd
        name = parts[-1]
        try:
            before = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except OSError:
            raise changed from None
        if not stat.S_ISREG(before.st_mode):
            # FIFOs, sockets and devices are refused before they are opened (opening a FIFO
            # blocks, opening a device may have side effects)
            raise PathRefused("not_a_file", f"{shown!r} is not a regular file (a FIFO, socket, device or directory)")
        try:
            fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_NOCTTY | _O_CLOEXEC, dir_fd=dfd)
        except OSError as exc:
            if stat.S_ISLNK(before.st_mode):
                raise changed from None
            raise PathRefused("read_failed", f"cannot open {shown!r}: {exc.strerror or exc}") from None
    finally:
        os.close(dfd)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PathRefused("not_a_file", f"{shown!r} is not a regular file")
        if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            raise changed
        if (st.st_dev, st.st_ino) in roots.protected_inodes():
            raise PathRefused(
                "protected_path", f"{shown!r} is another name (a hard link) for one of the agent's state files"
            )
        real = fd_path(fd)
        if real is not None and (not is_below(real, root_real) or roots.is_protected(real)):
            raise changed
    except BaseException:
        os.close(fd)
        raise
    return fd, st
