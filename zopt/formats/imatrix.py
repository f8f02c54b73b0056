"""Importance matrices: per-input-channel activation statistics of every Linear, on disk.

An importance matrix (``imatrix``) holds, for each weight matrix, the sum of squares of every input
channel over the calibration tokens, the number of tokens, and (zopt's addition) each channel's
largest magnitude. ``sum2 / count`` is the mean square ``E[x_j^2]`` that llama.cpp's quantizers
take as ``quant_weights``: the output error of ``y = W x`` is ``sum_ij dW_ij^2 E[x_j^2]`` when
channels are uncorrelated. The abs-max serves SmoothQuant-style smoothing.

Files are written in llama.cpp's GGUF imatrix format (``general.type = "imatrix"``; per matrix
``<name>.in_sum2`` F32 of ``ne = (n_in, 1)`` and ``<name>.counts`` F32 of ``ne = (1, 1)``; keys
``imatrix.datasets``, ``imatrix.chunk_count``, ``imatrix.chunk_size``), keyed by the tensor names
of the GGUF files zopt writes (original layout: ``layers.0.attention.qkv.weight``). zopt adds
``<name>.in_absmax``, which llama.cpp's loader ignores. The legacy binary ``.dat`` format
(llama.cpp before the GGUF format, and stable-diffusion.cpp's ``--imat-out``) is read too; its
``model.diffusion_model.`` prefixes are stripped.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import CorruptFile, ZoptError

SUM2, COUNTS, ABSMAX = ".in_sum2", ".counts", ".in_absmax"
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "model.")
MAX_ENTRIES = 1 << 16
MAX_CHANNELS = 1 << 20


@dataclass
class Stat:
    """One matrix's statistics: ``sum2`` (n_in,) float64, ``count`` tokens, ``absmax`` (n_in,) or None."""

    sum2: np.ndarray
    count: float
    absmax: np.ndarray | None = None

    @property
    def mean_square(self) -> np.ndarray:
        """``E[x_j^2]`` per input channel (ones for a matrix that saw no input, as llama.cpp)."""
        if self.count <= 0:
            return np.ones_like(self.sum2, dtype=np.float32)
        return (self.sum2 / self.count).astype(np.float32)


@dataclass
class Imatrix:
    """Statistics by tensor name (original layout), with llama.cpp's provenance keys."""

    entries: dict[str, Stat] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    path: Path | None = None
    sha256: str = ""

    def entry(self, name: str) -> Stat | None:
        """The statistics of tensor ``name`` in either key layout (diffusers ``to_q``/``to_k``/``to_v``
        share the fused ``qkv`` entry), or None."""
        st = self.entries.get(_strip(name))
        if st is None:
            from ..families import zimage

            orig = zimage.to_original_name(_strip(name))
            for part in (".attention.to_q.", ".attention.to_k.", ".attention.to_v."):
                orig = orig.replace(part, ".attention.qkv.")
            st = self.entries.get(orig)
        return st

    def importance(self, name: str, n_cols: int) -> np.ndarray | None:
        """``E[x^2]`` for the columns of tensor ``name``, or None when the file has no such entry;
        ZoptError when the entry's length does not match the tensor's rows."""
        st = self.entry(name)
        if st is None:
            return None
        if st.sum2.shape[0] != n_cols:
            raise ZoptError(f"imatrix entry {name} has {st.sum2.shape[0]} channels, the tensor's rows have "
                            f"{n_cols}", self.path)
        return st.mean_square

    def absmax(self, name: str) -> np.ndarray | None:
        """Largest input magnitude per channel of tensor ``name`` (None without an entry or abs-max)."""
        st = self.entry(name)
        return None if st is None else st.absmax


def _strip(name: str) -> str:
    for p in _PREFIXES:
        if name.startswith(p):
            return name[len(p):]
    return name


def write(im: Imatrix, path: str | os.PathLike, architecture: str = "lumina2") -> Path:
    """Write ``im`` as a llama.cpp GGUF imatrix at ``path`` (atomically); returns the path."""
    import gguf

    from .._io import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), architecture)
        w.add_type(gguf.GGUFType.IMATRIX)
        w.add_array(gguf.Keys.IMatrix.DATASETS, list(im.datasets) or ["zopt calibrate"])
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_COUNT, int(im.chunk_count))
        w.add_uint32(gguf.Keys.IMatrix.CHUNK_SIZE, int(im.chunk_size))
        for name in sorted(im.entries):
            st = im.entries[name]
            w.add_tensor(name + SUM2, st.sum2.astype(np.float32).reshape(1, -1))
            w.add_tensor(name + COUNTS, np.array([[st.count]], dtype=np.float32))
            if st.absmax is not None:
                w.add_tensor(name + ABSMAX, st.absmax.astype(np.float32).reshape(1, -1))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return path


def read(path: str | os.PathLike) -> Imatrix:
    """Read a GGUF imatrix (llama.cpp's, zopt's) or a legacy ``.dat`` one (llama.cpp, stable-diffusion.cpp).

    A file that is neither, or whose values are not finite and non-negative, is a one-line
    CorruptFile naming it."""
    path = Path(path)
    if not path.is_file():
        raise ZoptError("no such imatrix file", path)
    with open(path, "rb") as f:
        magic = f.read(4)
    im = _read_gguf(path) if magic == b"GGUF" else _read_dat(path)
    if not im.entries:
        raise CorruptFile("imatrix holds no entries", path)
    for name, st in im.entries.items():
        if not np.all(np.isfinite(st.sum2)) or np.any(st.sum2 < 0) or not np.isfinite(st.count) or st.count < 0:
            raise CorruptFile(f"imatrix entry {name} has negative or non-finite values", path)
    im.path = path
    im.sha256 = _sha256(path)
    return im


def _read_gguf(path: Path) -> Imatrix:
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf-py raises ValueError/struct errors on damaged files
        raise CorruptFile(f"not a readable GGUF imatrix ({e})", path) from None
    tensors = {t.name: t for t in r.tensors}
    im = Imatrix()
    f = r.fields.get(gguf.Keys.IMatrix.DATASETS)
    if f is not None:
        im.datasets = [str(bytes(f.parts[i]), "utf-8") for i in f.data]
    for key, attr in ((gguf.Keys.IMatrix.CHUNK_COUNT, "chunk_count"), (gguf.Keys.IMatrix.CHUNK_SIZE, "chunk_size")):
        f = r.fields.get(key)
        if f is not None:
            setattr(im, attr, int(f.parts[f.data[0]][0]))
    for tname, t in tensors.items():
        if not tname.endswith(SUM2):
            continue
        base = tname[: -len(SUM2)]
        counts = tensors.get(base + COUNTS)
        if counts is None:
            raise CorruptFile(f"imatrix entry {base} has sums but no counts", path)
        sums = np.asarray(t.data, dtype=np.float64)
        cnt = np.asarray(counts.data, dtype=np.float64).reshape(-1)
        if sums.ndim == 2 and sums.shape[0] > 1:
            raise CorruptFile(f"imatrix entry {base} holds {sums.shape[0]} matrices (expert stacks are not used "
                              "by Z-Image)", path)
        am = tensors.get(base + ABSMAX)
        im.entries[_strip(base)] = Stat(sums.reshape(-1), float(cnt[0]) if cnt.size else 0.0,
                                        None if am is None else np.asarray(am.data, dtype=np.float32).reshape(-1))
    return im


def _read_dat(path: Path) -> Imatrix:
    """Legacy layout: int32 n; n x (int32 len, name, int32 ncall, int32 nval, float32[nval]) where the
    values are ``mean square * ncall``; then optionally int32 chunk count and a dataset name."""
    data = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise CorruptFile("truncated legacy imatrix (.dat)", path)
        out = struct.unpack_from(fmt, data, pos)
        pos += size
        return out

    (n,) = take("<i")
    if not 0 < n <= MAX_ENTRIES:
        raise CorruptFile(f"not an imatrix file (GGUF or legacy .dat): entry count {n}", path)
    im = Imatrix()
    for _ in range(n):
        (length,) = take("<i")
        if not 0 < length <= 4096:
            raise CorruptFile(f"bad name length {length} in legacy imatrix", path)
        name = bytes(take(f"<{length}s")[0]).decode("utf-8", errors="replace")
        ncall, nval = take("<ii")
        if not 0 < nval <= MAX_CHANNELS or ncall < 0:
            raise CorruptFile(f"bad entry {name!r} in legacy imatrix ({nval} values, {ncall} calls)", path)
        vals = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float64)
        if pos + 4 * nval > len(data):
            raise CorruptFile("truncated legacy imatrix (.dat)", path)
        pos += 4 * nval
        # stored as mean * ncall: keep (sum2, count) = (stored, ncall) so that sum2/count is the mean
        im.entries[_strip(name)] = Stat(vals, float(max(ncall, 1)))
    if pos + 4 <= len(data):
        (im.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            if 0 < length <= len(data) - pos:
                im.datasets = [data[pos:pos + length].decode("utf-8", errors="replace")]
    return im


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
