"""Small file helpers shared across zopt: atomic writes and hashing."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary file or folder is removed, so a
    failed or interrupted write never leaves a partial output at ``final``. An existing ``final``
    is replaced only when that loses nothing but an earlier output: a file by a file, a folder by
    a folder only if it is empty or holds a zopt manifest (ZoptError otherwise, before any work).
    """
    final = Path(final)
    _check_replaceable(final, is_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    if is_dir:
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
    if is_dir:
        os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        if is_dir and final.exists():
            shutil.rmtree(final) if final.is_dir() else final.unlink()
        os.replace(tmp, final)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        raise


# a folder holding one of these was written by zopt and may be replaced by a new conversion
ARTIFACT_MARKERS = ("zopt-manifest.json", "transformer/zopt-manifest.json", "zopt-publish.json")


def _check_replaceable(final: Path, is_dir: bool) -> None:
    """Refuse, before any work, an output path whose replacement would lose someone's data."""
    from .errors import ZoptError

    if not is_dir and final.is_dir():
        raise ZoptError("is a folder; give a file name for the output", final)
    if is_dir and final.exists():
        if not final.is_dir():
            raise ZoptError("exists and is a file; this format writes a folder", final)
        if any(final.iterdir()) and not any((final / m).is_file() for m in ARTIFACT_MARKERS):
            raise ZoptError("exists and is not a zopt output folder (no zopt-manifest.json); remove it or "
                            "choose another output path", final)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: str | os.PathLike, chunk: int = 16 << 20) -> str:
    """Hex sha256 of a file, read in chunks (constant memory)."""
    from .validate import open_regular

    h = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cache_dir() -> Path:
    """zopt's cache folder: $ZOPT_CACHE, else $XDG_CACHE_HOME/zopt, else ~/.cache/zopt."""
    env = os.environ.get("ZOPT_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "zopt"
