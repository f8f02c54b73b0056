"""Checks on a conversion's target and output path, all done before any heavy work.

* :func:`check_spec`: the format and subtype of ``--to`` exist, else one line with the closest match
  ("did you mean gguf:Q4_K_M?"); only the registry and the formats' light modules are read.
* :func:`output_path`: the path a conversion writes: a single-file format's suffix is appended to a
  bare name, a file name for a folder format (or the reverse) is refused, and an existing output is
  refused unless ``force`` (the write itself then replaces it atomically, see ``zopt._io``).
* :func:`default_output`: ``exports/<model>-<TYPE><suffix>`` for single files (``tiny-Q4_K_M.gguf``,
  the name GGUF users know), ``exports/<model>-<format>[-<subtype>][-<layout>]/`` for folders.
"""

from __future__ import annotations

import difflib
import importlib
import os
from pathlib import Path

from .._io import _check_replaceable
from ..errors import UnsupportedFormat, ZoptError
from .registry import FORMATS, Format

# checkpoint files zopt reads: such a name is a file, never a folder format's output
_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".onnx", ".engine", ".json")


def _types(info: Format) -> list[str] | None:
    """The subtypes format ``info`` lists ([] for a format without subtypes), or None when its
    module cannot be imported here (then nothing can be checked)."""
    try:
        mod = importlib.import_module(info.module)
    except ImportError:
        return None
    fn = getattr(mod, "list_types", None)
    return [t[0] for t in fn()] if fn else []


def _suggest(word: str, choices: dict[str, str]) -> str:
    """`` (did you mean X?)`` for the closest of ``choices`` (lower-case key -> spelling), or ''."""
    match = difflib.get_close_matches(word.lower(), list(choices), n=1, cutoff=0.6)
    return f"; did you mean {choices[match[0]]}?" if match else ""


def check_spec(spec: str) -> tuple[Format, str | None]:
    """``spec``'s registry entry and subtype; UnsupportedFormat naming the closest known spec otherwise."""
    name, sep, sub = spec.partition(":")
    name, sub = name.strip().lower(), sub.strip()
    if name not in FORMATS:
        # a bare subtype (``Q4_K_M``) is matched against every format's types, so it finds its format
        choices = {f.name: f.name for f in FORMATS.values()}
        for f in FORMATS.values():
            for t in _types(f) or ():
                choices.setdefault(t.lower(), f"{f.name}:{t}")
                choices.setdefault(f"{f.name}:{t}".lower(), f"{f.name}:{t}")
        raise UnsupportedFormat(f"unknown format {spec!r}{_suggest(spec.strip(), choices)} "
                                "(zopt convert --list-types lists them)")
    info = FORMATS[name]
    types = _types(info) if sub else None
    if types == []:
        raise UnsupportedFormat(f"format {info.name!r} has no subtypes (got {spec!r}); use --to {info.name}")
    if types is not None and sub.lower() not in {t.lower() for t in types}:
        choices = {t.lower(): f"{info.name}:{t}" for t in types}
        raise UnsupportedFormat(f"unknown {info.name} type {sub!r}{_suggest(sub, choices)} "
                                f"(known: {', '.join(types)})")
    return info, (sub or info.default_subtype or None)


def output_path(info: Format, out: str | os.PathLike, *, force: bool = False) -> Path:
    """The path to write format ``info`` at for the user's ``out``; ZoptError for a name of the
    wrong kind or an existing output without ``force``."""
    raw = os.fspath(out)
    path = Path(raw)
    if info.artifact == "file":
        if raw.endswith((os.sep, "/")) or path.is_dir():
            raise ZoptError(f"is a folder name; {info.name} writes one file (e.g. {path.name or 'model'}"
                            f"{info.suffix})", path)
        if info.suffix and not path.suffix:
            path = path.with_name(path.name + info.suffix)
        elif info.suffix and path.suffix.lower() != info.suffix:
            raise ZoptError(f"{info.name} writes a {info.suffix} file; name the output *{info.suffix}", path)
    else:
        file_suffixes = {f.suffix for f in FORMATS.values() if f.suffix} | set(_FILE_SUFFIXES)
        if path.suffix.lower() in file_suffixes or (path.exists() and not path.is_dir()):
            raise ZoptError(f"is a file name; {info.name} writes a folder (e.g. {path.with_suffix('')}/)", path)
    _check_replaceable(path, info.artifact != "file")  # even --force never replaces a foreign folder
    if not force and (path.is_symlink() or path.exists()) and not (path.is_dir() and not any(path.iterdir())):
        raise ZoptError("exists; pass --force (force=True) to replace it", path)
    return path


def default_output(source: str, spec: str, layout: str | None = None) -> Path:
    """Where ``zopt convert SOURCE --to SPEC`` writes when no ``-o`` is given (see the module doc)."""
    info, sub = check_spec(spec)
    stem = Path(str(source).rstrip("/")).name.split("@")[0].split(".")[0] or "model"
    if info.artifact == "file":
        return Path("exports") / f"{stem}-{(sub or info.name).upper()}{info.suffix}"
    tag = "-".join(p for p in (info.name, sub and sub.lower(), layout if layout not in (None, "diffusers") else None)
                   if p)
    return Path("exports") / f"{stem}-{tag}"
