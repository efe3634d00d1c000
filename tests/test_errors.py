"""One exception tree: every exception class the package defines is a ``MeshError``, and the
tool errors reach the model as ``{"error": {"kind", "message"}}``."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import agt_mesh
from agt_mesh.adapters.tools.spec import error_for
from agt_mesh.cli.errors import EXIT_IO, CliError, exit_code_for
from agt_mesh.errors import (
    FileTransferError,
    HermesAPIError,
    MeshConfigError,
    MeshError,
    MeshToolError,
    MeshTransportError,
    PathRefused,
    PeerNotFoundError,
)


def _exception_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(agt_mesh.__path__, "agt_mesh."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == module.__name__:
                found[f"{module.__name__}.{name}"] = obj
    return found


def test_every_exception_class_of_the_package_is_a_mesh_error() -> None:
    classes = _exception_classes()
    # the walk saw the modules that define exceptions outside agt_mesh.errors
    assert {"agt_mesh.cli.errors.CliError", "agt_mesh.vectors.Mismatch", "agt_mesh.dev.registry._HttpError"} <= set(
        classes
    )
    assert [name for name, cls in classes.items() if not issubclass(cls, MeshError)] == []


def test_tool_errors_are_shown_to_the_model_as_kind_and_message() -> None:
    cases: list[tuple[Exception, dict[str, str]]] = [
        (
            MeshToolError("invalid_argument", "'to' is required"),
            {"kind": "invalid_argument", "message": "'to' is required"},
        ),
        (FileTransferError("too_large", "f is 9 bytes"), {"kind": "too_large", "message": "f is 9 bytes"}),
        (PathRefused("protected_path", "never sent"), {"kind": "protected_path", "message": "never sent"}),
        (PeerNotFoundError("no agent x"), {"kind": "peer_not_found", "message": "no agent x"}),
        (MeshConfigError("bad"), {"kind": "invalid_argument", "message": "bad"}),
        (MeshTransportError("closed"), {"kind": "transport", "message": "closed"}),
        (MeshError("other"), {"kind": "mesh", "message": "other"}),
        (TimeoutError(), {"kind": "timeout", "message": "mesh_send timed out"}),
    ]
    for exc, shown in cases:
        assert error_for(exc, "mesh_send") == {"error": shown}, exc
    # anything else is named by its class only: its text may hold local paths
    leaked = error_for(OSError("/home/me/.agt-mesh/identity.json: denied"), "mesh_send")
    assert leaked == {"error": {"kind": "internal", "message": "mesh_send failed with an internal error (OSError)"}}


def test_subclasses_keep_their_own_fields() -> None:
    quota = FileTransferError("quota_exceeded", "peer used 256 MiB of /srv/incoming")
    assert "/srv" not in quota.peer_message and quota.message == str(quota)
    own = FileTransferError("sha256_mismatch", "does not match", peer_message="the data does not match")
    assert own.peer_message == "the data does not match"
    with pytest.raises(FileTransferError):  # a refused path is a transfer that cannot proceed
        raise PathRefused("not_found", "no file")
    api = HermesAPIError("http_error", "HTTP 500", body="upstream text")
    assert (api.kind, api.body) == ("http_error", "upstream text") and isinstance(api, MeshToolError)
    # the command's own failures keep their exit code ahead of the tree's mapping
    assert exit_code_for(CliError("cannot connect", EXIT_IO)) == EXIT_IO
    assert not isinstance(CliError("x"), ValueError | MeshToolError)
