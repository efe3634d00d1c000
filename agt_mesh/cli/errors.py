"""The CLI's exit codes and the mapping from exceptions to them.

Kept import-light (only :mod:`agt_mesh.errors`, which is pure Python) so that
``agt-mesh --help`` stays fast.

====  =====================================================================
0     success
1     usage or user error: bad arguments, bad or unsafe files, unknown peer
2     unexpected error (a bug: please report it, with the traceback)
3     network or I/O error: relay/registry unreachable, timeouts, lock held
4     authentication or trust failure: POP or token refused, bad signature, a key that
      is not the peer's or differs from the pinned one, a name several agents claim
5     rate limited by the registry or relay
====  =====================================================================
"""

from __future__ import annotations

from agt_mesh.errors import (
    AmbiguousNameError,
    MeshAuthError,
    MeshConfigError,
    MeshCryptoError,
    MeshError,
    MeshProtocolError,
    MeshRegistryError,
    MeshStateError,
    MeshTransportError,
    PeerNotFoundError,
)

__all__ = [
    "EXIT_AUTH",
    "EXIT_IO",
    "EXIT_OK",
    "EXIT_RATE_LIMITED",
    "EXIT_UNEXPECTED",
    "EXIT_USAGE",
    "CliError",
    "exit_code_for",
]

EXIT_OK = 0
EXIT_USAGE = 1
EXIT_UNEXPECTED = 2
EXIT_IO = 3
EXIT_AUTH = 4
EXIT_RATE_LIMITED = 5


class CliError(MeshError):
    """A failure with a chosen exit code; the message goes to stderr."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


def exit_code_for(exc: BaseException) -> int:
    """The documented exit code for an exception that reached the top of a command."""
    if isinstance(exc, CliError):
        return exc.code
    if getattr(exc, "status", None) == 429:  # MeshRegistryError(status=429), or any HTTP-ish error
        return EXIT_RATE_LIMITED
    if isinstance(exc, AmbiguousNameError):
        return EXIT_AUTH  # a trust decision the user must make (bind the name, or use the DID)
    if isinstance(exc, PeerNotFoundError):
        return EXIT_USAGE  # a DID or name nobody registered: the user has to fix the input
    if isinstance(exc, MeshAuthError | MeshCryptoError):
        return EXIT_AUTH
    if isinstance(exc, MeshConfigError):
        return EXIT_USAGE
    if isinstance(exc, MeshTransportError | MeshRegistryError | MeshStateError | MeshProtocolError):
        return EXIT_IO
    if isinstance(exc, OSError | TimeoutError):
        return EXIT_IO
    return EXIT_UNEXPECTED
