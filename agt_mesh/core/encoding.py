"""Byte encodings used on the wire.

* Relay frames carry **standard base64 with padding** (RFC 4648 §4), as Node's
  ``Buffer.toString("base64")`` writes it.
* The registry carries **base64url without padding** (RFC 4648 §5).
* Decoding is lenient in the same way Node's ``Buffer.from(s, "base64")`` is for honest
  input: both alphabets and missing padding are accepted.  Unlike Node, characters outside
  both alphabets are rejected instead of skipped (Python's own ``b64decode`` would silently
  drop ``-`` and ``_``, which is why input is normalised first).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

__all__ = [
    "b64_decode",
    "b64_encode",
    "b64url_decode",
    "b64url_encode",
    "compact_json",
]

_TO_STD = str.maketrans("-_", "+/")
_TO_URL = bytes.maketrans(b"+/", b"-_")


def b64_encode(data: bytes) -> str:
    """Standard base64 with padding."""
    return base64.b64encode(data).decode("ascii")


def b64url_encode(data: bytes) -> str:
    """base64url without padding."""
    return base64.b64encode(data).translate(_TO_URL).rstrip(b"=").decode("ascii")


def b64_decode(text: str) -> bytes:
    """Decode base64 in either alphabet, with or without padding.

    Raises:
        ValueError: if ``text`` is not a string or contains characters outside both alphabets.
    """
    if not isinstance(text, str):
        raise ValueError("expected a base64 string")
    s = text.strip().translate(_TO_STD).rstrip("=")
    if len(s) % 4 == 1:
        raise ValueError("invalid base64 length")
    s += "=" * (-len(s) % 4)
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("invalid base64") from None


#: base64url decoding is the same lenient decoder.
b64url_decode = b64_decode


_SURROGATE = re.compile("[\ud800-\udfff]")


def compact_json(value: Any) -> str:
    """``JSON.stringify`` equivalent: no spaces, non-ASCII left as is.

    Lone surrogates (which JSON text may carry as ``\\udXXX`` escapes) are written
    escaped, as ``JSON.stringify`` does, so the result is always encodable as UTF-8.

    Raises:
        ValueError: for NaN or infinite numbers (not JSON; the TypeScript peer's
            ``JSON.parse`` would reject them) and other non-JSON values.
    """
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    return text
