"""The adapters' settings (the SDK's ``MeshClient`` options stay on the client)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agt_mesh.adapters.files import DEFAULT_CHUNK_BYTES, DEFAULT_MAX_FILE_BYTES, TransferLimits

__all__ = ["AdapterConfig"]


@dataclass
class AdapterConfig:
    """Adapter settings (the SDK's ``MeshClient`` options stay on the client).

    Args:
        incoming_dir: where received files are saved (default: ``incoming`` next to the
            client's state directory, see :func:`~agt_mesh.adapters.paths.default_file_dirs`).
        files_root: ``mesh_transfer_file`` reads only below it; relative paths resolve
            against it (default: ``outbox`` next to the client's state directory; on kars
            hosts the sandbox workspace).
        protected_paths: more paths no file tool may touch (the client's state directory is
            always protected; add the identity file if it lives elsewhere, the host's home).
        allow_hidden_files: allow sending hidden files below the files root (off).
        max_file_bytes: the largest file sent or accepted (30 MiB).
        transfer_limits: inbound quotas and slots (:class:`~agt_mesh.adapters.files.TransferLimits`).
        chunk_bytes: raw bytes per file chunk (256 KiB).
        roster: sibling name → role (``""`` for none); prepended to outbound content when it
            names two or more siblings.
        roster_sources: DIDs whose ``peers_update`` messages may replace the roster (names
            are claims and are refused; a plaintext update is never accepted).
        reply_timeout: default idle wait of ``mesh_send`` with ``await_reply``.
        max_reply_wait: hard ceiling of a ``mesh_send`` wait (idle resets never exceed it).
        await_timeout / max_await: default and ceiling of ``mesh_await``.
        ack_timeout: default wait for a ``file_transfer_ack``.
        max_content_chars: message text longer than this is cut in tool results.
    """

    incoming_dir: Path | None = None
    files_root: Path | None = None
    protected_paths: tuple[Path, ...] = ()
    allow_hidden_files: bool = False
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    transfer_limits: TransferLimits | None = None
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    roster: dict[str, str] = field(default_factory=dict)
    roster_sources: frozenset[str] = frozenset()
    reply_timeout: float = 120.0
    max_reply_wait: float = 600.0
    await_timeout: float = 30.0
    max_await: float = 600.0
    ack_timeout: float = 30.0
    max_content_chars: int = 16_000
