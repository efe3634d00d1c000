"""Wire encodings: base64 flavours and JSON.stringify-style JSON."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agt_mesh.core.encoding import (
    b64_decode,
    b64_encode,
    b64url_decode,
    b64url_encode,
    compact_json,
)


@settings(max_examples=1000, deadline=None)
@given(data=st.binary(max_size=200))
def test_base64_round_trips(data: bytes) -> None:
    std = b64_encode(data)
    url = b64url_encode(data)
    assert std == base64.b64encode(data).decode()
    assert url == base64.urlsafe_b64encode(data).decode().rstrip("=")
    assert "=" not in url and "+" not in url and "/" not in url
    for text in (std, std.rstrip("="), url, url + "=" * (-len(url) % 4), f" {std}\n"):
        assert b64_decode(text) == data
        assert b64url_decode(text) == data


def test_known_answers() -> None:
    data = bytes([0xFB, 0xFF, 0xBF])
    assert b64_encode(data) == "+/+/"
    assert b64url_encode(data) == "-_-_"
    assert b64_encode(b"a") == "YQ=="
    assert b64url_encode(b"a") == "YQ"
    assert b64_encode(b"") == b64url_encode(b"") == ""
    for text in ("YQ", "YQ=", "YQ==", "YQ===="):
        assert b64_decode(text) == b"a"
    # mixing both alphabets in one string is accepted, like Node's Buffer.from
    assert b64_decode("+_-/") == data
    assert b64_decode("-/+_-/+_") == data + data


@pytest.mark.parametrize(
    "text",
    [
        "A",  # impossible length
        "AAAAA",
        "!!!!",
        "AA*A",
        "AA AA",  # inner whitespace is not skipped
        "AA\nAA",
        "AA=A",  # padding in the middle
        "=AAA",
        "AAA.",
        "ÀÁÂÃ",  # non-ASCII
        "AAAA\x00",
    ],
)
def test_garbage_rejected(text: str) -> None:
    with pytest.raises(ValueError):
        b64_decode(text)
    with pytest.raises(ValueError):
        b64url_decode(text)


@pytest.mark.parametrize("value", [b"AAAA", None, 5, ["AAAA"]])
def test_non_strings_rejected(value: Any) -> None:
    with pytest.raises(ValueError, match="string"):
        b64_decode(value)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=40))
def test_decoder_never_raises_anything_but_value_error(text: str) -> None:
    try:
        out = b64_decode(text)
    except ValueError:
        return
    assert isinstance(out, bytes)
    assert b64_decode(b64_encode(out)) == out


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # JSON.stringify known answers
        ({"a": 1, "b": [1, 2]}, '{"a":1,"b":[1,2]}'),
        ({"b": 1, "a": 2}, '{"b":1,"a":2}'),  # key order kept, not sorted
        ([None, True, False, "x"], '[null,true,false,"x"]'),
        ("café ✓ 日本 😀", '"café ✓ 日本 😀"'),
        ('q"b\\', '"q\\"b\\\\"'),
        ("\n\t\r\b\f", '"\\n\\t\\r\\b\\f"'),
        ("\x00\x1f", '"\\u0000\\u001f"'),
        ("\x7f\u2028", '"\x7f\u2028"'),
        ({"nested": {"empty": {}, "list": []}}, '{"nested":{"empty":{},"list":[]}}'),
        (-0.5, "-0.5"),
        (10**20, "100000000000000000000"),
    ],
)
def test_compact_json_matches_json_stringify(value: Any, expected: str) -> None:
    assert compact_json(value) == expected
    assert json.loads(expected) == value


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), [float("nan")]])
def test_compact_json_never_emits_invalid_json(value: Any) -> None:
    """JSON.stringify writes NaN/Infinity as null; Python's default writes the bare tokens
    NaN/Infinity, which JSON.parse (the TS peer) rejects.  Either refuse or write null."""

    def strict(token: str) -> Any:
        raise ValueError(f"non-standard JSON token {token}")

    try:
        text = compact_json(value)
    except ValueError:
        return  # refusing is acceptable
    try:
        json.loads(text, parse_constant=strict)
    except ValueError:
        pytest.fail(f"compact_json({value!r}) wrote {text!r}, which JSON.parse rejects")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        # ES2019 "well-formed JSON.stringify": lone surrogates are written as escapes.
        ("\ud800", '"\\ud800"'),
        ("a\udfffb", '"a\\udfffb"'),
        ({"k\udc00": 1}, '{"k\\udc00":1}'),
    ],
)
def test_compact_json_escapes_lone_surrogates(value: Any, expected: str) -> None:
    """``json.loads`` turns an escaped lone surrogate from a hostile frame into a str that
    cannot be UTF-8 encoded; written back raw, it makes the frame unsendable."""
    text = compact_json(value)
    assert text == expected
    text.encode("utf-8")
