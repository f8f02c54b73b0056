"""Typed conversion options: one frozen dataclass per format, built from ``--option k=v`` strings
or a Python dict, recorded in the artifact's manifest and read back by ``load``.

Every format's options derive from :class:`Options`, which carries what every format shares: the
``keep`` / ``quantize`` tensor patterns of :mod:`zopt.policy` and ``hash_source``. A field's type
annotation says what it accepts (``bool``, ``int``, ``float``, ``str``, ``tuple[str, ...]``, and
``X | None``); ``metadata={"choices": (...)}`` limits the values; ``metadata={"record": False}``
marks a knob that changes how a conversion runs, not what it writes (left out of the manifest).
Unknown or misspelled keys and wrong value types are one-line :class:`OptionError` s.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..errors import ZoptError

T = TypeVar("T", bound="Options")

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


class OptionError(ZoptError):
    """A conversion option that the format does not have, or a value of the wrong type."""


@dataclass(frozen=True)
class Options:
    """Options every format accepts."""

    keep: tuple[str, ...] = ()  # regexes of tensor names kept unquantized (either key layout)
    quantize: tuple[str, ...] = ()  # regexes of tensor names quantized even where the policy keeps them
    hash_source: bool = field(default=True, metadata={"record": False})  # sha256 of the source for provenance

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls: type[T], raw: Mapping[str, Any] | None, *, format: str, strict: bool = True) -> T:
        """Options of format ``format`` from ``raw`` (CLI strings or Python values).

        ``strict`` (the default) rejects unknown keys; ``strict=False`` ignores them (reading a
        manifest that an older zopt wrote with descriptive entries).
        """
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in (raw or {}).items():
            if key not in fields:
                if strict:
                    raise OptionError(unknown_key_message(format, key, tuple(fields)))
                continue
            values[key] = _coerce(format, key, value, hints[key], fields[key].metadata.get("choices"))
        return cls(**values)

    def recorded(self) -> dict[str, Any]:
        """The options as written to the manifest: every field that shapes the output, JSON-ready."""
        out = {}
        for f in dataclasses.fields(self):
            if f.metadata.get("record", True):
                v = getattr(self, f.name)
                out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    def changed(self) -> dict[str, Any]:
        """Recorded options that differ from their defaults."""
        default = type(self)().recorded()
        return {k: v for k, v in self.recorded().items() if default.get(k) != v}


def unknown_key_message(format: str, key: str, valid: tuple[str, ...], subject: str | None = None) -> str:
    """``"<format> has no option 'key'; did you mean 'x'? (valid: ...)"`` (``subject`` replaces
    ``"<format> has no option"``)."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{subject or format + ' has no option'} {key!r}{hint} (valid: {', '.join(valid)})"


def _coerce(format: str, key: str, value: Any, hint: Any, choices: tuple | None) -> Any:
    kinds = _kinds(hint)
    if value is None and type(None) in kinds:
        return None
    errors = []
    for kind in kinds:
        if kind is type(None):
            continue
        try:
            out = _as(kind, value)
        except (TypeError, ValueError) as e:
            errors.append(str(e))
            continue
        if choices is not None and out not in choices:
            raise OptionError(f"{format} option {key}={value!r} is not one of {', '.join(map(str, choices))}")
        return out
    want = " or ".join(_label(k) for k in kinds)
    raise OptionError(f"{format} option {key}={value!r} is not {want}")


def _kinds(hint: Any) -> tuple[Any, ...]:
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return typing.get_args(hint)
    return (hint,)


def _label(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        return "a list of strings"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def _as(kind: Any, value: Any) -> Any:
    if typing.get_origin(kind) is tuple:
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(i, str) for i in items):
            raise TypeError("not strings")
        return tuple(items)
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise TypeError("not a boolean")
    if kind is int:
        if isinstance(value, bool):
            raise TypeError("a boolean is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value.strip())
        raise TypeError("not an integer")
    if kind is float:
        if isinstance(value, bool):
            raise TypeError("a boolean is not a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
        raise TypeError("not a number")
    if kind is str:
        if isinstance(value, (list, tuple, dict)):
            raise TypeError("not a string")
        return str(value).lower() if isinstance(value, bool) else str(value)
    raise TypeError(f"unsupported option type {kind}")
