"""What every checkpoint source shares: the :class:`TensorSource` interface, positional reads and
the cached source hash."""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CorruptFile

# safetensors dtype name -> (torch dtype name, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}
_MAX_HEADER = 256 << 20


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor. ``dtype`` is a safetensors name or a GGML type name."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class TensorSource(ABC):
    """A lazy, read-only view of a checkpoint's tensors.

    ``names()``/``info()`` never read tensor data; ``get(name)`` returns one ``torch.Tensor``.
    """

    kind: str = "?"
    path: Path
    metadata: dict[str, str]
    config: dict[str, Any] | None = None
    # how the user named the source when it is not a path: a built-in name (``tiny``) or a Hub id
    # pinned to its revision (``owner/name@<commit>``); what a reproducing command should say
    spec: str | None = None

    @abstractmethod
    def names(self) -> list[str]:
        ...

    @abstractmethod
    def info(self, name: str) -> TensorInfo:
        ...

    @abstractmethod
    def get(self, name: str):
        ...

    @property
    def files(self) -> list[Path]:
        """The files whose bytes make up this source (for hashing and provenance)."""
        return [self.path]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __contains__(self, name: object) -> bool:
        return name in set(self.names())

    def infos(self) -> list[TensorInfo]:
        return [self.info(n) for n in self.names()]

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self.infos())

    def num_params(self) -> int:
        return sum(i.numel for i in self.infos())

    def sha256(self) -> str:
        """sha256 over the source's files (cached beside zopt's cache by path, size and mtime)."""
        return _cached_sha256(self.files)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_at(fd: int, buf: Any, offset: int, path: Path) -> None:
    """Fill the writable buffer ``buf`` with the file's bytes from ``offset`` (positional reads:
    safe from several threads, no memory map whose pages would count as resident)."""
    view, done = memoryview(buf).cast("B"), 0
    while done < len(view):  # a read returns at most ~2 GB on Linux
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [view[done:]], offset + done)
        else:
            chunk = os.pread(fd, min(len(view) - done, 1 << 30), offset + done)
            n = len(chunk)
            view[done:done + n] = chunk
        if n <= 0:
            raise CorruptFile(f"truncated while reading at byte {offset + done}", path)
        done += n


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
    return msg[:160]


def _cached_sha256(files: list[Path]) -> str:
    """Combined sha256 of files; per-file digests are cached keyed by (path, size, mtime)."""
    import hashlib

    from .._io import cache_dir, sha256_file

    cache_file = cache_dir() / "sha256-cache.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError, RecursionError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    digests = []
    changed = False
    for f in files:
        st = f.stat()
        key = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in cache:
            cache[key] = sha256_file(f)
            changed = True
        digests.append(cache[key])
    if changed:
        try:
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, cache_file)
        except OSError:
            pass
    if len(digests) == 1:
        return digests[0]
    return hashlib.sha256("".join(digests).encode()).hexdigest()

