"""The single-writer guard for one identity's state: ``<state dir>/.mesh-prekeys.lock``.

Two processes that upload pre-keys or advance ratchets for the same identity corrupt each
other (one's upload replaces the other's bundle; their ratchets fork).  Before any
registry write a client takes an exclusive, non-blocking ``fcntl.flock`` on the lock
file and writes its PID into it; a second process fails at once with
:class:`LockHeldError` naming the holder.  The lock is released on ``disconnect()`` and on
every failure path of ``connect()``; the kernel releases it if the process dies.

The state directory is checked (:func:`~agt_mesh.shell.safefs.check_state_dir`) before the
lock file is created or opened, and the lock file is opened without following a symbolic
link and checked to be ours before anything is written into it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from agt_mesh.errors import MeshTransportError
from agt_mesh.shell.safefs import check_state_dir, open_private

__all__ = ["LOCK_NAME", "LockHeldError", "WriterLock"]

LOCK_NAME = ".mesh-prekeys.lock"


class LockHeldError(MeshTransportError):
    """Another process holds the writer lock of this identity's state directory."""

    def __init__(self, message: str, *, pid: int | None, path: Path) -> None:
        super().__init__(message)
        self.pid = pid
        self.path = path


class WriterLock:
    """An exclusive ``flock`` on ``<state_dir>/.mesh-prekeys.lock``; re-entrant per instance."""

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.path = Path(state_dir) / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder_pid(self) -> int | None:
        """The PID written by the current holder, if readable."""
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return None
        try:
            text = os.read(fd, 32).decode("ascii", "replace").strip()
        except OSError:
            return None
        finally:
            os.close(fd)
        return int(text) if text.isdigit() else None

    def acquire(self) -> None:
        """Take the lock or fail at once.

        Raises:
            LockHeldError: if another process holds it (the message names its PID).
            MeshStateError: the state directory or the lock file is unsafe (see
                :mod:`agt_mesh.shell.safefs`); nothing was created or written.
        """
        if self._fd is not None:
            return
        check_state_dir(self.path.parent)
        fd = open_private(self.path, os.O_RDWR, create=True, what="lock file")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = self.holder_pid()
            who = f"process {pid}" if pid else "another process"
            raise LockHeldError(
                f"the state directory {self.path.parent} is in use by {who} (lock {self.path}); "
                "only one process may use an identity at a time — stop the other process, or use "
                "a separate identity and --state-dir for this one",
                pid=pid,
                path=self.path,
            ) from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - best effort
        self.release()
