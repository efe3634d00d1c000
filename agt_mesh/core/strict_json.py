"""Strict parsing of inbound JSON text: frames, decrypted payloads, plaintext payloads.

Python's :func:`json.loads` is lenient where a hostile peer can hurt us: it accepts
``NaN``, ``Infinity`` and ``-Infinity`` (not JSON; our own :func:`compact_json` refuses to
write them back, which is how one ``NaN`` used to stop the receive path), turns ``1e400``
into ``inf``, auto-detects UTF-16/32 in ``bytes``, and nests as deep as the interpreter's
recursion limit, which the application's own code shares.  :func:`loads_strict` accepts
exactly RFC 8259 JSON in UTF-8 within the limits below, and raises
:class:`~agt_mesh.errors.MalformedJsonError` (with a short stable ``reason``) for
everything else.  Whatever it returns can be written back by :func:`compact_json`.

It is as fast as :func:`json.loads` for ordinary payloads: the only per-value hook is on
floats (to refuse values that overflow to infinity), and the depth walk runs only when
the text contains more brackets than the depth limit.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any

from agt_mesh.errors import MalformedJsonError

__all__ = ["MAX_INT_DIGITS", "MAX_JSON_DEPTH", "depth_exceeds", "loads_strict"]

#: Deepest nesting of arrays and objects accepted.  serde_json stops at 128 too; the
#: application walks payloads with Python code that shares the interpreter's recursion
#: limit (1000) with everything else on the stack, so much deeper values would crash it.
MAX_JSON_DEPTH = 128
#: Longest integer literal accepted (digits).  Decimal text to ``int`` costs time
#: quadratic in its length; this is CPython's own default guard (CVE-2020-10735), enforced
#: here even when the application lifted the interpreter-wide limit.
MAX_INT_DIGITS = 4300


def _refuse_constant(name: str) -> Any:
    raise MalformedJsonError(f"{name} is not a JSON number", reason="non_finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 overflows to inf: JSON.stringify would write null
        raise MalformedJsonError(f"number {text[:20]}{'...' if len(text) > 20 else ''} is out of range", reason="range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise MalformedJsonError(f"integer with more than {MAX_INT_DIGITS} digits", reason="range")
    return int(text)


_FAST = json.JSONDecoder(parse_float=_finite_float, parse_constant=_refuse_constant)
_CHECKED_INTS = json.JSONDecoder(parse_float=_finite_float, parse_constant=_refuse_constant, parse_int=_bounded_int)


def _int_guard_active() -> bool:
    """Whether CPython's own integer-length guard enforces at least our limit."""
    get = getattr(sys, "get_int_max_str_digits", None)
    return get is not None and 0 < get() <= MAX_INT_DIGITS


def depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` nests arrays/objects deeper than ``limit`` (iterative)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def loads_strict(data: str | bytes, *, max_bytes: int, max_depth: int = MAX_JSON_DEPTH, what: str = "input") -> Any:
    """Parse strict JSON.

    Args:
        data: UTF-8 bytes or text.
        max_bytes: refuse longer input (bytes, or characters for text) before parsing.
        max_depth: deepest nesting of arrays/objects accepted.
        what: names the input in error messages ("frame", "payload").

    Raises:
        MalformedJsonError: ``reason`` is ``size``, ``utf8``, ``syntax``, ``depth``,
            ``non_finite`` or ``range``.
    """
    if len(data) > max_bytes:
        raise MalformedJsonError(f"{what} of {len(data)} bytes exceeds the {max_bytes}-byte limit", reason="size")
    if isinstance(data, bytes | bytearray | memoryview):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedJsonError(f"{what} is not valid JSON: UnicodeDecodeError", reason="utf8") from None
    else:
        text = data
    decoder = _FAST if _int_guard_active() else _CHECKED_INTS
    try:
        value = decoder.decode(text)
    except MalformedJsonError as exc:  # from a number hook
        raise MalformedJsonError(f"{what} refused: {exc}", reason=exc.reason) from None
    except RecursionError:
        raise MalformedJsonError(f"{what} JSON is nested too deeply", reason="depth") from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):  # CPython's own digit limit
            raise MalformedJsonError(
                f"{what} refused: integer with more than {MAX_INT_DIGITS} digits", reason="range"
            ) from None
        raise MalformedJsonError(f"{what} is not valid JSON: JSONDecodeError", reason="syntax") from None
    # cheap pre-check: fewer brackets than the limit cannot nest deeper than it
    deep = text.count("[") + text.count("{") > max_depth and isinstance(value, dict | list)
    if deep and depth_exceeds(value, max_depth):
        raise MalformedJsonError(f"{what} JSON is nested too deeply (limit {max_depth})", reason="depth")
    return value
