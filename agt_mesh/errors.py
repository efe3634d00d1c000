"""The exception hierarchy of ``agt_mesh``.

Every error the SDK raises on purpose is a :class:`MeshError`.  The tree is small and
flat on purpose, so callers can catch what they can act on::

    MeshError
    ├── MeshConfigError          bad argument, bad configuration, unusable file
    │   └── IdentityFileError    identity file missing, unsafe permissions, inconsistent
    ├── MeshCryptoError          a cryptographic check failed
    │   ├── BundleVerificationError   a peer's pre-key bundle is invalid or badly signed
    │   ├── IdentityBindingError      a key does not belong to the DID that presents it
    │   ├── IdentityChangedError      a pinned peer presents another identity key
    │   ├── PreKeyNotFoundError       a KNOCK names a one-time pre-key we do not hold
    │   ├── DowngradeError            a peer pinned as post-quantum would be set up without it
    │   └── DecryptError              an inbound message could not be decrypted
    │       ├── MessageAuthError          AEAD tag check failed (forged, tampered, wrong key)
    │       ├── DuplicateMessageError     the message key was already used (replay/duplicate)
    │       ├── TooManySkippedError       the gap exceeds the skipped-key limit
    │       └── MalformedMessageError     header or ciphertext has the wrong shape
    ├── MeshProtocolError        a frame or state-machine rule was violated
    │   └── MalformedJsonError   inbound JSON text is not strict JSON or exceeds a limit
    ├── MeshStateError           the durable state could not be read or written
    ├── MeshTransportError       relay connection problems (timeouts, closes, the writer lock)
    ├── MeshAuthError            the relay or registry refused our credentials
    ├── MeshToolError            a tool call failed; ``kind`` is the label the model is shown
    │   ├── FileTransferError    a file cannot be sent or received (``peer_message`` for the peer)
    │   │   └── PathRefused      a path the file tools never use
    │   └── HermesAPIError       the auto-responder's Hermes API server could not answer
    └── MeshRegistryError        the registry answered with an error
        ├── PeerNotFoundError    no such agent / no pre-key bundle
        └── AmbiguousNameError   several agents claim a display name nobody bound yet

Three classes defined next to the code that raises them join the tree too:
``agt_mesh.cli.errors.CliError`` (a :class:`MeshError` carrying the command's exit code),
``agt_mesh.vectors.Mismatch`` (a :class:`MeshError`: a test vector did not reproduce) and the
development registry's error answers (:class:`MeshRegistryError` with the HTTP status).

Messages never contain private key material.  Where the user can fix the problem, the
message says how.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "AmbiguousNameError",
    "BundleVerificationError",
    "DecryptError",
    "DowngradeError",
    "DuplicateMessageError",
    "FileTransferError",
    "HermesAPIError",
    "IdentityBindingError",
    "IdentityChangedError",
    "IdentityFileError",
    "MalformedJsonError",
    "MalformedMessageError",
    "MeshAuthError",
    "MeshConfigError",
    "MeshCryptoError",
    "MeshError",
    "MeshProtocolError",
    "MeshRegistryError",
    "MeshStateError",
    "MeshToolError",
    "MeshTransportError",
    "MessageAuthError",
    "NameClaim",
    "PathRefused",
    "PeerNotFoundError",
    "PreKeyNotFoundError",
    "TooManySkippedError",
]


class MeshError(Exception):
    """Base class of every error raised by ``agt_mesh``."""


class MeshConfigError(MeshError, ValueError):
    """A bad argument or configuration value; fix the input and retry."""


class IdentityFileError(MeshConfigError):
    """The identity file cannot be used (missing, unsafe permissions, inconsistent keys)."""


class MeshCryptoError(MeshError):
    """A cryptographic verification failed."""


class BundleVerificationError(MeshCryptoError):
    """A peer's pre-key bundle failed validation (sizes or signed pre-key signature)."""


class IdentityBindingError(MeshCryptoError):
    """A key was presented for a DID it does not belong to.

    A canonical ``did:mesh:`` DID is the hash of its Ed25519 key, so a bundle, record or
    KNOCK whose key hashes to another DID is refused: the server or peer that offered it
    is lying.  ``did`` is the DID that was claimed, ``key_dids`` the DID(s) the presented
    key actually belongs to (two for an X25519 key, whose sign bit is lost).
    """

    def __init__(self, message: str, *, did: str, key_dids: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.did = did
        self.key_dids = tuple(key_dids)


class IdentityChangedError(MeshCryptoError):
    """A peer whose identity key is pinned presented a different one.

    Refused by default (as SSH's ``StrictHostKeyChecking`` does): accept the new key only
    after comparing fingerprints out of band, with ``MeshClient.trust_identity`` or
    ``agt-mesh peer trust DID --key FINGERPRINT``.  ``pinned`` and ``offered`` are the two
    keys' fingerprints.
    """

    def __init__(self, message: str, *, did: str, pinned: str, offered: str) -> None:
        super().__init__(message)
        self.did = did
        self.pinned = pinned
        self.offered = offered


class PreKeyNotFoundError(MeshCryptoError):
    """An establishment referenced a one-time pre-key that is unknown or already consumed."""


class DowngradeError(MeshCryptoError):
    """A session with a peer known to be post-quantum capable would be set up without it.

    Raised when the registry offers no (or a stripped) ML-KEM pre-key for a peer pinned as
    PQ-capable, or when such a peer's KNOCK carries a classic establishment.  Never a
    fallback: only resetting trust in the peer clears the pin.
    """


class DecryptError(MeshCryptoError):
    """An inbound ratchet message could not be decrypted.

    The session state is left exactly as it was before the attempt, so later valid
    messages still decrypt.  ``kind`` is a short stable label (``auth``, ``duplicate``,
    ``too_many_skipped``, ``malformed``).
    """

    kind = "decrypt"


class MessageAuthError(DecryptError):
    """The AEAD tag did not verify: the message was forged, tampered with or keyed wrongly."""

    kind = "auth"


class DuplicateMessageError(DecryptError):
    """The message's key was already used: a duplicate or replayed message."""

    kind = "duplicate"


class TooManySkippedError(DecryptError):
    """The message is further ahead than the skipped-key limit allows."""

    kind = "too_many_skipped"


class MalformedMessageError(DecryptError):
    """The header or ciphertext does not have a valid shape."""

    kind = "malformed"


class MeshProtocolError(MeshError):
    """A frame could not be decoded, or a protocol rule was violated."""


class MalformedJsonError(MeshProtocolError):
    """Inbound JSON text (a frame or a payload) is not strict JSON or exceeds a limit.

    ``reason`` is a short stable label: ``size``, ``utf8``, ``syntax``, ``depth``,
    ``non_finite`` (NaN, Infinity) or ``range`` (a number too large to represent).
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class MeshStateError(MeshError):
    """The durable state could not be read or written."""


class MeshTransportError(MeshError):
    """A relay transport problem: unreachable, closed, timed out, or the writer lock is held."""


class MeshAuthError(MeshError):
    """The relay or registry refused our credentials (proof of possession, token, signature)."""


class MeshToolError(MeshError):
    """A tool call failed; the model is shown ``{"error": {"kind": kind, "message": message}}``.

    ``kind`` is a short stable label (``invalid_argument``, ``peer_not_found``,
    ``not_found`` ...); ``message`` says what went wrong in words the model can act on.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


#: What the sender of a file is told when a transfer fails for a reason that concerns the
#: receiver, not the sender's data (its paths, disk and quotas stay private).
_FILE_PEER_MESSAGES = {
    "quota_exceeded": "the receiver's storage quota for files from you is used up; retry later",
    "busy": "the receiver has too many file transfers in progress; retry later",
    "evicted": "the transfer was dropped to make room for other senders' transfers; send it again",
    "expired": "the transfer was dropped after a pause in its chunks; send it again",
    "save_failed": "the receiver could not save the file",
}


class FileTransferError(MeshToolError):
    """A file transfer that cannot proceed; ``kind`` is a short stable label.

    ``peer_message`` is what the sender may be told: the message itself when it is about the
    sender's data, a generic text when it is about the receiver (paths, disk, quotas).
    """

    def __init__(self, kind: str, message: str, *, peer_message: str | None = None) -> None:
        super().__init__(kind, message)
        self.peer_message = peer_message if peer_message is not None else _FILE_PEER_MESSAGES.get(kind, message)


class PathRefused(FileTransferError):
    """A path the file tools must not use; ``kind`` is ``invalid_argument``, ``not_found``,
    ``path_outside_root``, ``protected_path``, ``not_a_file`` or ``read_failed``."""


class HermesAPIError(MeshToolError):
    """The Hermes API server could not answer; ``kind`` is ``connection_refused``,
    ``unauthorized``, ``timeout``, ``http_error`` or ``bad_response``.  ``body`` holds the
    start of the server's error body, if any (it may echo the request: log it at DEBUG
    only, never send it to a peer)."""

    def __init__(self, kind: str, message: str, *, body: str = "") -> None:
        super().__init__(kind, message)
        self.body = body


class MeshRegistryError(MeshError):
    """The registry returned an error response."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class PeerNotFoundError(MeshRegistryError):
    """The registry has no such agent, or the agent published no pre-key bundle."""


@dataclass(frozen=True, slots=True)
class NameClaim:
    """One agent claiming a display name (see :class:`AmbiguousNameError`)."""

    did: str
    #: the fingerprint of the identity key we pinned for it, None if we never saw its key
    fingerprint: str | None
    registered_at: str | None
    last_seen: str | None


class AmbiguousNameError(MeshRegistryError):
    """More than one agent claims a display name, and none is bound to it locally.

    Display names are claims anyone can make: address the peer by DID, or bind the name
    to one DID (``MeshClient.bind_name``, ``agt-mesh peer bind NAME DID``).  ``claims``
    lists the candidates.
    """

    def __init__(self, message: str, *, name: str, claims: Sequence[NameClaim]) -> None:
        super().__init__(message)
        self.name = name
        self.claims = tuple(claims)
