"""Small file helpers shared across zopt: atomic writes and hashing."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

TMP_TAG = ".zopt-tmp"  # .NAME.PID.RANDOM.zopt-tmp: an output being written by process PID
OLD_TAG = ".zopt-old"  # .NAME.PID.zopt-old: an earlier output set aside while PID swaps in a new one
_WRITE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO, errno.EFBIG}


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only if the block succeeds.

    On any exception (including KeyboardInterrupt) the temporary file or folder is removed, so a
    failed or interrupted write never leaves a partial output at ``final``. An existing ``final``
    is replaced only when that loses nothing but an earlier output: a file by a file, a folder by
    a folder only if it is empty or holds a zopt manifest (ZoptError otherwise, before any work).
    A folder is swapped in atomically (``renameat2(RENAME_EXCHANGE)``; elsewhere the old one is
    renamed aside first), so a complete output exists at ``final`` at every instant. Temporary
    names carry the writer's pid: leftovers of a killed process are removed by the next write
    to the same path (and a set-aside output is restored if the swap was cut short).
    Disk full or permission errors become one ZoptError naming ``final``.
    """
    final = Path(final)
    _check_replaceable(final, is_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(final)
    tmp = final.parent / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_TAG}"
    try:
        if is_dir:
            tmp.mkdir()  # mode 0o777 less the umask, like any folder the user makes
        else:
            open(tmp, "xb").close()  # noqa: SIM115 (0o666 less the umask)
        yield tmp
        _swap_in(tmp, final, is_dir)
    except BaseException as e:
        _remove(tmp)
        if isinstance(e, OSError) and e.errno in _WRITE_ERRORS:
            from .errors import ZoptError

            raise ZoptError(f"cannot write the output ({e.strerror})", final) from None
        raise


def _swap_in(tmp: Path, final: Path, is_dir: bool) -> None:
    if not (is_dir and (final.exists() or final.is_symlink())):
        os.replace(tmp, final)
        return
    if _exchange(tmp, final):  # tmp now holds the old output
        _remove(tmp)
        return
    old = final.parent / f".{final.name}.{os.getpid()}{OLD_TAG}"
    os.rename(final, old)
    os.rename(tmp, final)
    _remove(old)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def remove_stale(final: str | os.PathLike) -> list[Path]:
    """Remove temporary outputs for ``final`` left by processes that no longer run; restore a
    set-aside earlier output if ``final`` itself is missing. Returns what was removed."""
    final = Path(final)
    prefix, removed = f".{final.name}.", []
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return removed
    for entry in entries:
        name = entry.name
        if not name.startswith(prefix) or not name.endswith((TMP_TAG, OLD_TAG)):
            continue
        pid = name[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if name.endswith(OLD_TAG) and not (final.exists() or final.is_symlink()):
            os.rename(entry.path, final)
            continue
        _remove(Path(entry.path))
        removed.append(Path(entry.path))
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


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


def build_cached(target: str | os.PathLike, build, marker: str = "model_index.json") -> Path:
    """The cache folder ``target``, made on first use: ``build(tmp)`` fills a temporary sibling that
    is then renamed into place (a killed build leaves nothing ``target`` could be mistaken for). If
    another process published the same folder first (``target/marker`` exists), theirs is kept."""
    import tempfile

    target = Path(target)
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=TMP_TAG, dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / marker).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


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
