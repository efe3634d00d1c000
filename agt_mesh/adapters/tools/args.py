"""Tool arguments, each declared once.

An :class:`Arg` holds every rule of one argument: its name, JSON type, description, whether
it is required, what leaving it out means (its default), its bounds or allowed values, and
the other names models use for it.  From the declarations of a tool (:class:`Args`) come

* the plain JSON Schema that MCP clients, Hermes and OpenClaw get (:meth:`Args.schema`):
  only the mandatory arguments ``required``, optional ones with their ``default`` — Hermes'
  schema sanitizer turns a nullable required property into a *mandatory* one, so the plain
  form is the only one that reaches their models as optional;
* the OpenAI *strict* form derived from it (:func:`strict_schema`): every property
  required, optional ones nullable (``null`` means "use the default"), no ``default``;
* the parser (:meth:`Args.parse`), which applies the same defaults and clamps numbers to
  the same bounds.  A missing argument and ``null`` both mean the default.

A description may name the argument's own default and bounds as ``{default}``, ``{lo}``
and ``{hi}`` (format fields; ``{{`` for a brace; other text goes in through
:func:`literal`), so the text the model reads states exactly what the parser does.

Every value may come from a hostile peer's message by way of the model: the parser checks
types, never trusts a number to be finite or in range, and ignores arguments it does not
know.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from agt_mesh.errors import MeshToolError

__all__ = ["Arg", "Args", "literal", "strict_schema"]

Kind = Literal["string", "boolean", "number", "integer", "array"]

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")

#: ``{default}``, ``{hi:g}`` ... in a description; ``{{`` and ``}}`` stand for one brace
_FIELD = re.compile(r"\{(default|lo|hi)(?::([^{}]*))?\}|\{\{|\}\}")

#: keywords OpenAI's strict mode rejects; the descriptions already state the defaults
_NOT_STRICT = ("default",)


def literal(text: object) -> str:
    """``text`` (a directory name, say) made safe to put into a description: its braces are
    never taken for format fields."""
    return str(text).replace("{", "{{").replace("}", "}}")


def _invalid(message: str) -> MeshToolError:
    return MeshToolError("invalid_argument", message)


@dataclass(frozen=True)
class Arg:
    """One tool argument.

    Args:
        name: the name the schema advertises.
        kind: its JSON type (``array`` is an array of strings).
        description: what the model reads; ``{default}``, ``{lo}``, ``{hi}`` are filled in.
        required: the tool cannot do without it (a non-empty string).
        default: what leaving it out or passing ``null`` means (shown in the plain schema);
            None for no default: then an optional string means None and an array ``[]``.
        lo / hi: numbers are clamped to these bounds.
        enum: the values a string may take.
        aliases: other names models use for it (kars prompts, older tools): accepted, never
            advertised; the first one present counts.
        item_label: what an array holds, for its error message.
        legacy_flag: ``(name, value)``: an older boolean argument that, when true and this
            one is left out, selects ``value`` (``mark_read=true`` for ``mode='consume'``).
    """

    name: str
    kind: Kind
    description: str
    required: bool = False
    default: Any = None
    lo: float | None = None
    hi: float | None = None
    enum: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    item_label: str = "strings"
    legacy_flag: tuple[str, Any] | None = None

    @property
    def text(self) -> str:
        """The description with the default and the bounds filled in."""
        values = {"default": self.default, "lo": self.lo, "hi": self.hi}
        return _FIELD.sub(lambda m: format(values[m[1]], m[2] or "") if m[1] else m[0][0], self.description)

    def schema(self) -> dict[str, Any]:
        """The plain JSON Schema of this argument."""
        prop: dict[str, Any] = {"type": self.kind, "description": self.text}
        if self.kind == "array":
            prop["items"] = {"type": "string"}
        if self.enum:
            prop["enum"] = list(self.enum)
        if not self.required and self.default is not None:
            prop["default"] = self.default
        return prop

    # -- parsing ------------------------------------------------------------------------------

    def given(self, args: Mapping[str, Any]) -> Any:
        """The value passed under the name or the first alias present (None: left out)."""
        value = args.get(self.name)
        if value is None:
            for key in self.aliases:
                value = args.get(key)
                if value is not None:
                    break
        return value

    def parse(self, args: Mapping[str, Any]) -> Any:
        """This argument's value in ``args``: checked, defaulted and clamped.

        Raises:
            MeshToolError: ``invalid_argument``, saying what the argument must be.
        """
        value = self.given(args)
        if self.kind == "string":
            return self._string(value, args)
        if self.kind == "boolean":
            return self._boolean(value, self.name, self.default)
        if self.kind == "array":
            return self._array(value)
        number = self._number(value)
        return int(number) if self.kind == "integer" else number

    def fallback(self) -> Any:
        """What the argument means when left out (None for a required one)."""
        if self.required:
            return None
        return self.parse({})

    def _string(self, value: Any, args: Mapping[str, Any]) -> str | None:
        if self.required:
            if not isinstance(value, str) or not value.strip():
                raise _invalid(f"'{self.name}' is required and must be a non-empty string")
            return value
        if value is not None and value != "" and not isinstance(value, str):
            raise _invalid(f"'{self.name}' must be a string or null")
        text: str | None = value or None
        if text is None and self.legacy_flag is not None:
            flag, selected = self.legacy_flag
            if self._boolean(args.get(flag), flag, False):
                text = selected
        if text is None:
            text = self.default
        if self.enum and text is not None and text not in self.enum:
            choices = " or ".join(repr(v) for v in self.enum)
            raise _invalid(f"'{self.name}' must be {choices}")
        return text

    @staticmethod
    def _boolean(value: Any, name: str, default: Any) -> bool:
        if value is None:
            return bool(default)
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in (*_TRUE, *_FALSE):
            return value.lower() in _TRUE
        raise _invalid(f"'{name}' must be true, false or null")

    def _number(self, value: Any) -> Any:
        if value is None:
            return self.default  # as configured (an int stays an int)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise _invalid(f"'{self.name}' must be a number or null")
        if self.lo is not None:
            value = max(value, self.lo)
        if self.hi is not None:
            value = min(value, self.hi)
        return float(value)

    def _array(self, value: Any) -> list[str]:
        if value is None:
            return list(self.default or ())
        if isinstance(value, str):  # "a, b" from models that do not build arrays
            value = [v.strip() for v in value.split(",")]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise _invalid(f"'{self.name}' must be a list of {self.item_label}, or null")
        return list(dict.fromkeys(v for v in value if v))


class Args:
    """The arguments of one tool, in the order the schema lists and the parser checks them."""

    def __init__(self, *args: Arg) -> None:
        self.args = args

    def schema(self) -> dict[str, Any]:
        """The plain JSON Schema of the arguments object (a new dict at every call)."""
        return {
            "type": "object",
            "properties": {a.name: a.schema() for a in self.args},
            "required": [a.name for a in self.args if a.required],
            "additionalProperties": False,
        }

    def parse(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Every argument's value by name (unknown arguments are ignored).

        Raises:
            MeshToolError: ``invalid_argument`` for the first argument that is not acceptable.
        """
        return {a.name: a.parse(args) for a in self.args}

    def parse_leniently(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Like :meth:`parse`, with the default in place of a value that is not acceptable
        (for time budgets, which are computed before the call reports the error)."""
        out: dict[str, Any] = {}
        for a in self.args:
            try:
                out[a.name] = a.parse(args)
            except MeshToolError:
                out[a.name] = a.fallback()
        return out


def strict_schema(schema: Mapping[str, Any]) -> dict[str, Any]:
    """The OpenAI strict-mode form of a plain schema: every property required, each optional
    one nullable (``null`` for "use the default"), ``default`` dropped; nested objects too."""
    out = {k: v for k, v in schema.items() if k not in _NOT_STRICT}
    if "items" in out and isinstance(out["items"], Mapping):
        out["items"] = strict_schema(out["items"])
    props = out.get("properties")
    if out.get("type") == "object" and isinstance(props, Mapping):
        required = set(out.get("required") or ())
        strict_props: dict[str, Any] = {}
        for name, sub in props.items():
            prop = strict_schema(sub)
            if name not in required:
                kinds = prop.get("type")
                kinds = list(kinds) if isinstance(kinds, list) else [kinds]
                prop["type"] = [*kinds, "null"] if "null" not in kinds else kinds
                if "enum" in prop and None not in prop["enum"]:
                    prop["enum"] = [*prop["enum"], None]
            strict_props[name] = prop
        out["properties"] = strict_props
        out["required"] = list(strict_props)
        out["additionalProperties"] = False
    return out
