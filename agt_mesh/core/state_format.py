"""Saved state as named, versioned msgpack maps, and the migrations that read older versions.

A saved format (the ratchet state, the session state) is a msgpack map from short, stable key
names to values, with its version under ``"v"``.  The format lists its fields once — each a
:class:`Field`: the key, the attribute it holds, the check that turns a stored value into the
attribute (refusing anything malformed) and, where needed, the conversion back.  Writing and
reading both follow that list, so a new field is one line in it plus one migration step;
nothing is addressed by position.  A field may have a default: a value equal to it is not
written, and an absent key loads as it (most sessions have no candidates, no held messages,
no pending KNOCK ... and their states stay as small as the old positional arrays).

Reading accepts every earlier version.  ``migrations[n]`` turns a version-``n`` state into a
version-``n + 1`` state, and they run one after the other up to the current version.  The
first versions of both formats were positional msgpack arrays ``[version, ...]``; the
migrations out of them name the slots.  A version newer than the current one, an unknown
layout, a missing or unexpected key and a value that fails its check all raise
:class:`~agt_mesh.errors.MeshStateError`.

No error raised here carries the exception that revealed the problem, not even as
``__context__``: msgpack's errors (and a failed check's) can hold the unpacked state, which
holds secret keys.  That is why every ``MeshStateError`` below is raised after the ``except``
block has ended, never inside it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from agt_mesh.errors import MeshStateError

__all__ = [
    "REQUIRED",
    "VERSION_KEY",
    "Field",
    "Record",
    "StateFormat",
    "binary",
    "count",
    "flag",
    "number",
    "one_of",
    "optional",
    "text",
    "unpack",
]

#: The key of the version number in every versioned state map.
VERSION_KEY = "v"

#: What a check or a migration raises for malformed input (anything else is a bug and is
#: left alone).  RecursionError: JSON text nested too deep.
_BAD_INPUT = (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError)

Check = Callable[[Any], Any]
Migration = Callable[[Any], Any]


def unpack(data: bytes, what: str) -> Any:
    """msgpack ``data`` as Python values (``bin`` as bytes, ``str`` as str, arrays as lists).

    Raises:
        MeshStateError: not one complete msgpack value (truncated, trailing bytes, invalid
            UTF-8, non-string map keys, ...).
    """
    failure: str | None = None
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        failure = type(exc).__name__
    if failure is not None:
        raise MeshStateError(f"{what} is not valid msgpack: {failure}")
    return obj


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: The default of a field that every state must hold.
REQUIRED: Any = _Required()


@dataclass(frozen=True, slots=True)
class Field:
    """One named value of a saved state."""

    #: the key in the saved map: short (it is stored once per state) and never reused
    key: str
    #: the attribute (and constructor keyword) of the object it is saved from and loaded into
    attr: str
    #: stored value -> attribute value; raises ValueError/TypeError for a malformed value
    load: Check
    #: attribute value -> stored value (``None``: stored as it is)
    dump: Callable[[Any], Any] | None = None
    #: the stored value the key stands for when it is absent; a value equal to it (and of
    #: the same type) is not written, which keeps typical states small
    default: Any = REQUIRED


class Record:
    """A map with exactly the keys of ``fields`` (no version of its own: a record lives
    inside a versioned state, like a candidate inside a session)."""

    __slots__ = ("_plan", "fields", "keys", "required", "what")

    def __init__(self, what: str, fields: Sequence[Field]) -> None:
        keys = [f.key for f in fields]
        if len(set(keys)) != len(keys) or VERSION_KEY in keys:
            raise ValueError(f"{what}: field keys must be unique and not {VERSION_KEY!r}")
        self.what = what
        self.fields = tuple(fields)
        self.keys = frozenset(keys)
        self.required = frozenset(f.key for f in fields if f.default is REQUIRED)
        # plain tuples: saving runs on every commit, and attribute lookups add up
        self._plan = tuple((f.key, f.attr, f.dump, f.default) for f in fields)

    def dump(self, obj: Any) -> dict[str, Any]:
        """The saved map of ``obj``: keys in field order (so the bytes are stable), defaults left out."""
        out: dict[str, Any] = {}
        self._dump_into(out, obj)
        return out

    def _dump_into(self, out: dict[str, Any], obj: Any) -> None:
        for key, attr, dump, default in self._plan:
            value = getattr(obj, attr)
            if dump is not None:
                value = dump(value)
            if default is REQUIRED or value != default or type(value) is not type(default):
                out[key] = value

    def load(self, state: Any) -> dict[str, Any]:
        """The checked attribute values of a saved map, by attribute name.

        Raises:
            MeshStateError: not a map, missing or unexpected keys, or a malformed value.
        """
        if type(state) is not dict:
            raise MeshStateError(f"{self.what} is not a map")
        self._check_keys(state)
        out: dict[str, Any] = {}
        get = state.get
        for f in self.fields:
            failed = False
            try:
                out[f.attr] = f.load(get(f.key, f.default))
            except _BAD_INPUT:
                failed = True
            if failed:
                raise MeshStateError(f"{self.what} field {f.key!r} ({f.attr}) is invalid")
        return out

    def _check_keys(self, state: dict[Any, Any]) -> None:
        keys = state.keys()
        if not (keys <= self.keys and self.required <= keys):
            problems = [f"missing {k}" for k in sorted(self.required - keys)]
            # unexpected keys are named only when short text: a key could be anything
            extra = [k for k in state if k not in self.keys]
            problems += [f"unexpected {k}" if type(k) is str and len(k) <= 16 else "unexpected key" for k in extra]
            raise MeshStateError(f"{self.what} has the wrong fields ({', '.join(problems[:8])})")


class StateFormat(Record):
    """A top-level saved state: a :class:`Record` plus its version under ``"v"``, readable
    from every earlier version through one migration function per version step."""

    __slots__ = ("migrations", "version")

    def __init__(self, what: str, version: int, fields: Sequence[Field], migrations: Mapping[int, Migration]) -> None:
        super().__init__(what, fields)
        if sorted(migrations) != list(range(1, version)):
            raise ValueError(f"{what}: one migration per version step (1 to {version - 1}) is required")
        self.version = version
        self.migrations = dict(migrations)
        self.keys = self.keys | {VERSION_KEY}
        self.required = self.required | {VERSION_KEY}

    def dump(self, obj: Any) -> dict[str, Any]:
        out: dict[str, Any] = {VERSION_KEY: self.version}
        self._dump_into(out, obj)
        return out

    def pack(self, obj: Any) -> bytes:
        """``obj`` as msgpack bytes of the current version."""
        return msgpack.packb(self.dump(obj), use_bin_type=True)  # type: ignore[no-any-return]

    def version_of(self, state: Any) -> int:
        """The version a saved state declares (maps: ``"v"``; the positional first versions:
        the first element).

        Raises:
            MeshStateError: no version, or one this SDK does not read.
        """
        if type(state) is dict:
            version = state.get(VERSION_KEY)
        elif type(state) is list and state:
            version = state[0]
        else:
            version = None
        if type(version) is not int:
            raise MeshStateError(f"{self.what} has an unknown layout")
        if version > self.version:
            raise MeshStateError(
                f"{self.what} version {version} is newer than this SDK reads (up to version "
                f"{self.version}); upgrade kars-agt-mesh"
            )
        if version < 1:
            raise MeshStateError(f"{self.what} version {version} is not a known version")
        return version

    def upgrade(self, state: Any) -> Any:
        """``state`` migrated to the current version (unchecked: :meth:`load` checks it).

        Raises:
            MeshStateError: unknown version, or a state a migration cannot read.
        """
        version = self.version_of(state)
        while version < self.version:
            failed = False
            try:
                state = self.migrations[version](state)
            except _BAD_INPUT:
                failed = True
            if failed:
                raise MeshStateError(f"{self.what} version {version} is corrupted")
            version += 1
        return state

    def load(self, state: Any) -> dict[str, Any]:
        """Checked attribute values of a saved state of any version this SDK reads.

        Raises:
            MeshStateError: unknown version, wrong layout or fields, or a malformed value.
        """
        state = self.upgrade(state)
        if type(state) is not dict or state.get(VERSION_KEY) != self.version:
            raise MeshStateError(f"{self.what} version {self.version} is not a map")
        return super().load(state)

    def unpack_and_load(self, data: bytes) -> dict[str, Any]:
        """:meth:`load` of msgpack bytes."""
        return self.load(unpack(data, self.what))


# -- checks (each returns the checked value, or raises ValueError/TypeError) ------------


def binary(*sizes: int) -> Check:
    """Bytes of one of ``sizes`` (any length if none is given)."""
    allowed = frozenset(sizes)

    def check(value: Any) -> bytes:
        if type(value) is not bytes or (allowed and len(value) not in allowed):
            raise ValueError("wrong type or size")
        return value

    return check


def optional(inner: Check) -> Check:
    """``None``, or a value that passes ``inner``."""

    def check(value: Any) -> Any:
        return None if value is None else inner(value)

    return check


def count(limit: int) -> Check:
    """An integer in ``[0, limit]`` (not a bool)."""

    def check(value: Any) -> int:
        if type(value) is not int or not 0 <= value <= limit:
            raise ValueError("not a count in range")
        return value

    return check


def flag(value: Any) -> bool:
    """A bool."""
    if type(value) is not bool:
        raise TypeError("not a bool")
    return value


def text(value: Any) -> str:
    """A string."""
    if type(value) is not str:
        raise TypeError("not a string")
    return value


def number(value: Any) -> float:
    """A finite int or float (not a bool), as a float."""
    if type(value) not in (int, float) or not math.isfinite(value):
        raise ValueError("not a finite number")
    return float(value)


def one_of(values: Iterable[str]) -> Check:
    """One of the strings ``values``."""
    allowed = frozenset(values)

    def check(value: Any) -> str:
        if type(value) is not str or value not in allowed:
            raise ValueError("not an allowed value")
        return value

    return check
