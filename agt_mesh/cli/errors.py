"""Map exceptions to the CLI's documented exit codes."""

from __future__ import annotations

from agt_mesh.errors import (
    MeshAuthError,
    MeshConfigError,
    MeshCryptoError,
    MeshRegistryError,
    MeshStateError,
    MeshTransportError,
)

EXIT_USAGE = 1
EXIT_UNEXPECTED = 2
EXIT_IO = 3
EXIT_AUTH = 4
EXIT_RATE_LIMITED = 5


def exit_code_for(exc: BaseException) -> int:
    """The exit code for an exception that reached the top of a command."""
    if isinstance(exc, MeshRegistryError) and getattr(exc, "status", None) == 429:
        return EXIT_RATE_LIMITED
    if isinstance(exc, MeshAuthError | MeshCryptoError):
        return EXIT_AUTH
    if isinstance(exc, MeshConfigError):
        return EXIT_USAGE
    if isinstance(exc, MeshTransportError | MeshRegistryError | MeshStateError | OSError):
        return EXIT_IO
    return EXIT_UNEXPECTED
