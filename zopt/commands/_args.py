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
    """Defaults of a built-in source (``resolution``, ``prompts``, ``steps``) for the options the
    user left out, also for a file or folder converted from one (a GGUF's ``zopt.source.name``, a
    zopt folder whose manifest config is the built-in model's); empty for anything else. Cheap:
    headers and JSON only, no torch."""
    from ..families import FAMILIES, get

    text = os.fspath(spec)
    for name in FAMILIES:
        fam = get(name)
        if text in fam.builtin_sources():
            return fam.builtin_defaults(text)
    built = _built_from(Path(text).expanduser())
    return source_defaults(built) if built and built != text else {}


def _built_from(path: Path) -> str | None:
    """The built-in source a zopt artifact was converted from, when it says so; None otherwise."""
    import json

    from ..families import FAMILIES, get

    try:
        if path.is_file() and path.suffix.lower() == ".gguf":
            from ..checkpoint import open as open_checkpoint

            name = open_checkpoint(path).metadata.get("zopt.source.name")
            return name if isinstance(name, str) else None
        manifest = path / "zopt-manifest.json"
        if not manifest.is_file():
            return None
        config = json.loads(manifest.read_text(encoding="utf-8")).get("config") or {}
    except Exception:  # unreadable or damaged: the command that reads it says what is wrong with it
        return None
    norm = lambda v: json.loads(json.dumps(v))  # noqa: E731  (tuples and lists alike)
    for fam_name in FAMILIES:
        fam = get(fam_name)
        for name in fam.builtin_sources():
            want = fam.builtin_config(name) or {}
            if want and fam.builtin_defaults(name) and all(
                    norm(config.get(k)) == norm(v) for k, v in want.items() if not k.startswith("_")):
                return name
    return None
