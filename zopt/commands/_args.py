"""Argument helpers the commands share: deprecated aliases, seed lists, checks of a SOURCE that
run before any heavy import (a typo costs nothing)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


class DeprecatedAlias(argparse.Action):
    """An old spelling that still works: stores like ``--new`` (appending when ``append=True``)
    and says once on stderr which spelling to use instead."""

    def __init__(self, option_strings, dest, *, new: str, append: bool = False, **kw):
        self.new, self.append = new, append
        kw.setdefault("help", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"zopt: {option_string} is deprecated; use {self.new}", file=sys.stderr)
        if self.append:
            items = list(getattr(namespace, self.dest, None) or [])
            items.append(values)
            values = items
        setattr(namespace, self.dest, values)


def parse_seeds(items: list[str | int], flag: str = "--seeds") -> list[int]:
    """``["0", "1,2"]`` -> ``[0, 1, 2]`` (space or comma separated, repeatable)."""
    from ..errors import ZoptError

    try:
        return [int(s) for item in items for s in str(item).split(",") if s.strip()]
    except ValueError:
        raise ZoptError(f"{flag} {' '.join(map(str, items))!r}: seeds are integers") from None


def check_source(spec: str | os.PathLike) -> None:
    """An existing path, a built-in model name or a Hub id ``owner/name[@revision]``; SourceNotFound
    otherwise. Cheap: no file is read and nothing heavy is imported."""
    from ..checkpoint import _HUB_ID
    from ..errors import SourceNotFound
    from ..families import FAMILIES, get

    text = os.fspath(spec)
    if Path(text).expanduser().exists() or any(text in get(n).builtin_sources() for n in FAMILIES):
        return
    if _HUB_ID.match(text) and not text.startswith((".", "/", "~")):
        return
    names = sorted({s for n in FAMILIES for s in get(n).builtin_sources()})
    raise SourceNotFound(f"no such file or folder, built-in model ({', '.join(names)}) or Hub id "
                         "owner/name[@revision]", text)


def source_defaults(spec: str | os.PathLike) -> dict:
    """Defaults of a built-in source (``resolution``, ``prompts``) for the options the user left out;
    empty for anything else. Cheap: nothing is built or imported beyond the family."""
    from ..families import FAMILIES, get

    text = os.fspath(spec)
    for name in FAMILIES:
        fam = get(name)
        if text in fam.builtin_sources():
            return fam.builtin_defaults(text)
    return {}
