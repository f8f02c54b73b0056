"""The one read path: every checkpoint zopt reads goes through :func:`open`.

A :class:`TensorSource` lists names, shapes and dtypes from headers alone and materializes one
tensor at a time. Safetensors tensors are memory-mapped region by region, so a tensor's pages are
released as soon as the caller drops it: streaming a 12 GB file never keeps 12 GB resident.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import struct
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CorruptFile, OfflineError, PickleRefused, SourceNotFound, ZoptError

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


# --------------------------------------------------------------------------------------------
# safetensors


class SafetensorsFile(TensorSource):
    """One ``.safetensors`` file; the header is parsed and validated by zopt itself."""

    kind = "safetensors"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fh = builtins.open(self.path, "rb")
        size = os.fstat(self._fh.fileno()).st_size
        if size < 8:
            raise CorruptFile(f"truncated: {size} bytes is too short for a safetensors header", self.path)
        (hlen,) = struct.unpack("<Q", self._fh.read(8))
        if hlen > _MAX_HEADER or 8 + hlen > size:
            raise CorruptFile(
                f"truncated or not safetensors: header claims {hlen} bytes but the file has {size}", self.path
            )
        try:
            header = json.loads(self._fh.read(hlen))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CorruptFile(f"safetensors header is not valid JSON ({e.__class__.__name__})", self.path) from None
        if not isinstance(header, dict):
            raise CorruptFile("safetensors header is not a JSON object", self.path)
        self.metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        self._data_start = 8 + hlen
        self._entries: dict[str, tuple[TensorInfo, int]] = {}
        for name, e in header.items():
            try:
                dtype, shape, (a, b) = e["dtype"], tuple(int(d) for d in e["shape"]), e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise CorruptFile(f"malformed header entry for tensor {name!r}", self.path) from None
            if dtype not in SAFETENSORS_DTYPES:
                raise CorruptFile(f"tensor {name!r} has unknown dtype {dtype!r}", self.path)
            info = TensorInfo(name, shape, dtype, int(b) - int(a))
            if info.nbytes != info.numel * SAFETENSORS_DTYPES[dtype][1] or a < 0:
                raise CorruptFile(f"tensor {name!r}: byte range does not match its shape {shape}", self.path)
            if self._data_start + int(b) > size:
                raise CorruptFile(
                    f"truncated: tensor {name!r} ends at byte {self._data_start + int(b)} "
                    f"but the file has {size} bytes",
                    self.path,
                )
            self._entries[name] = (info, int(a))
        self._names = list(self._entries)

    def names(self) -> list[str]:
        return list(self._names)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._entries[name][0]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def get(self, name: str):
        import torch

        info = self.info(name)
        offset = self._data_start + self._entries[name][1]
        tdtype = getattr(torch, SAFETENSORS_DTYPES[info.dtype][0])
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=tdtype)
        # Read just this tensor into a fresh buffer: resident memory stays bounded by the tensors
        # alive, and one large positional read per tensor streams faster than faulting in the
        # pages of a memory map one by one (measured in docs/checkpoints.md).
        flat = torch.empty(info.nbytes, dtype=torch.uint8)
        read_at(self._fh.fileno(), flat.numpy(), offset, self.path)
        return flat.view(tdtype).reshape(info.shape)

    def close(self) -> None:
        self._fh.close()


class MultiSource(TensorSource):
    """Several sources seen as one (sharded checkpoints)."""

    def __init__(self, path: Path, parts: list[TensorSource], kind: str, config: dict | None = None):
        self.path = path
        self.kind = kind
        self.parts = parts
        self.config = config
        self.metadata = {}
        self._where: dict[str, TensorSource] = {}
        for p in parts:
            self.metadata.update(p.metadata)
            for n in p.names():
                if n in self._where:
                    raise CorruptFile(f"tensor {n!r} appears in two shards", p.path)
                self._where[n] = p

    def names(self) -> list[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        return self._where[name].info(name)

    def get(self, name: str):
        return self._where[name].get(name)

    @property
    def files(self) -> list[Path]:
        return [f for p in self.parts for f in p.files]

    def close(self) -> None:
        for p in self.parts:
            p.close()


def _open_diffusers_folder(folder: Path) -> TensorSource:
    cfg_path = folder / "config.json"
    config = None
    if cfg_path.exists():
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise CorruptFile(f"config.json is not valid JSON ({e.msg})", cfg_path) from None
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CorruptFile("not a valid sharded-checkpoint index (no weight_map)", indexes[0]) from None
        shard_names = list(dict.fromkeys(weight_map.values()))
        for s in shard_names:
            if not (folder / s).exists():
                raise SourceNotFound(f"shard {s} listed in {indexes[0].name} is missing", folder / s)
        parts: list[TensorSource] = [SafetensorsFile(folder / s) for s in shard_names]
    else:
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise SourceNotFound("no .safetensors weights in this folder", folder)
        parts = [SafetensorsFile(f) for f in files]
    return MultiSource(folder, parts, kind="diffusers", config=config)


# --------------------------------------------------------------------------------------------
# GGUF


class GGUFSource(TensorSource):
    """A GGUF file read through gguf-py. ``get`` dequantizes to float32; ``raw`` gives the blocks."""

    kind = "gguf"

    def __init__(self, path: str | os.PathLike):
        import gguf

        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path, "r")
        except Exception as e:  # gguf-py raises ValueError/struct.error/etc. for bad files
            raise CorruptFile(f"not a readable GGUF file ({_short(e)})", self.path) from None
        self.metadata = {}
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF."):
                continue
            try:
                val = field.contents()
            except Exception:
                continue
            if isinstance(val, (str, int, float, bool)):
                self.metadata[key] = str(val)
        orig_shapes = {}
        for key, field in self.reader.fields.items():
            if key.startswith("comfy.gguf.orig_shape."):
                orig_shapes[key[len("comfy.gguf.orig_shape.") :]] = tuple(int(x) for x in field.contents())
        self._tensors = {}
        for t in self.reader.tensors:
            shape = orig_shapes.get(t.name) or tuple(int(x) for x in reversed(t.shape.tolist()))
            self._tensors[t.name] = (TensorInfo(t.name, shape, t.tensor_type.name, int(t.n_bytes)), t)

    def names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        return self._tensors[name][0]

    def raw(self, name: str):
        """(numpy uint8/float data as stored, GGMLQuantizationType) without dequantizing: a copy
        read from the file, so walking every tensor never maps the whole file into memory."""
        t = self._tensors[name][1]
        return self._read(t), t.tensor_type

    def _read(self, t):
        # the reader's memmap would do, but its pages count as this process's memory once touched
        # and stay until the source is dropped: loading a 6.7 GB file would peak near twice that
        import numpy as np

        buf = np.empty(t.data.shape, dtype=t.data.dtype)
        with builtins.open(self.path, "rb") as f:  # this module's open() opens checkpoints
            read_at(f.fileno(), buf, int(t.data_offset), self.path)
        return buf

    def get(self, name: str):
        import numpy as np
        import torch
        from gguf import GGMLQuantizationType as T
        from gguf.quants import dequantize

        info, t = self._tensors[name]
        data = self._read(t)
        if t.tensor_type == T.BF16:
            return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16).reshape(info.shape)
        if t.tensor_type in (T.F32, T.F16):
            return torch.from_numpy(data).reshape(info.shape)
        return torch.from_numpy(dequantize(data, t.tensor_type)).reshape(info.shape)


# --------------------------------------------------------------------------------------------
# pickle (opt-in only)


class PickleSource(TensorSource):
    kind = "pickle"

    def __init__(self, path: Path):
        import torch

        self.path = path
        self.metadata = {}
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            raise CorruptFile(f"cannot be loaded with weights_only=True ({_short(e)})", path) from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(hasattr(v, "shape") for v in obj.values()):
            raise CorruptFile("does not hold a flat dict of tensors", path)
        self._sd = obj

    def names(self) -> list[str]:
        return list(self._sd)

    def info(self, name: str) -> TensorInfo:
        t = self._sd[name]
        dtype = {v[0]: k for k, v in SAFETENSORS_DTYPES.items()}.get(str(t.dtype).replace("torch.", ""), "F32")
        return TensorInfo(name, tuple(t.shape), dtype, t.numel() * t.element_size())

    def get(self, name: str):
        return self._sd[name]


# --------------------------------------------------------------------------------------------
# hub


_HUB_ID = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:@([\w./-]+))?$")


def _resolve_hub(spec: str) -> Path:
    """Resolve ``owner/name[@revision]`` to a local snapshot folder via huggingface_hub's cache.

    The cache is tried first. Only if that misses is the network used, after a quick reachability
    check, so an offline machine fails at once instead of hanging in retries.
    """
    m = _HUB_ID.match(spec)
    assert m
    repo_id, revision = m.group(1), m.group(2)
    from huggingface_hub import snapshot_download

    patterns = ["model_index.json", "transformer/*"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or not _endpoint_reachable(constants.ENDPOINT):
        raise OfflineError(
            "not in the local Hugging Face cache and the Hub is unreachable (offline); "
            "download it elsewhere or pass a local folder",
            spec,
        )
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as e:
        raise SourceNotFound(f"cannot fetch from the Hub ({_short(e)})", spec) from None


def _endpoint_reachable(url: str, timeout: float = 3.0) -> bool:
    import socket
    import threading
    from urllib.parse import urlparse

    u = urlparse(url)
    host, port = u.hostname or "", u.port or (443 if u.scheme == "https" else 80)
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    th = threading.Thread(target=probe, daemon=True)  # DNS lookups ignore socket timeouts
    th.start()
    th.join(timeout)
    return bool(result and result[0])


# --------------------------------------------------------------------------------------------
# entry point


def open(source: str | os.PathLike, *, allow_pickle: bool = False) -> TensorSource:  # noqa: A001
    """Open any checkpoint zopt understands and return a lazy :class:`TensorSource`.

    ``source`` is a diffusers folder (the pipeline folder, its ``transformer/`` or a model folder,
    single or sharded), a single ``.safetensors`` file (original/ComfyUI or diffusers layout), a
    ``.gguf`` file, ``tiny`` (the embedded default), or a Hub id ``owner/name[@revision]``.
    Pickle files are refused unless ``allow_pickle`` (then loaded with ``weights_only=True``).
    """
    spec = os.fspath(source)
    path = Path(spec).expanduser()
    if not path.exists():
        from .models import EMBEDDED, embedded_pipeline_dir

        if spec in EMBEDDED:
            return open(embedded_pipeline_dir(spec) / "transformer")
        if _HUB_ID.match(spec) and not spec.startswith((".", "/")):
            return open(_resolve_hub(spec), allow_pickle=allow_pickle)
        raise SourceNotFound("no such file or folder", path)
    if path.is_dir():
        if (path / "transformer").is_dir():
            return _open_diffusers_folder(path / "transformer")
        return _open_diffusers_folder(path)
    suffix = path.suffix.lower()
    if suffix == ".gguf" or _magic(path) == b"GGUF":
        return GGUFSource(path)
    if suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise PickleRefused(
                "pickle checkpoints can run code when loaded; convert it to safetensors "
                "or pass --allow-pickle (it is then loaded with weights_only=True)",
                path,
            )
        return PickleSource(path)
    if suffix == ".safetensors" or suffix == "":
        src = SafetensorsFile(path)
        cfg = path.parent / "config.json"
        if cfg.exists():
            try:
                src.config = json.loads(cfg.read_text())
            except json.JSONDecodeError:
                pass
        return src
    raise ZoptError(f"unrecognized checkpoint type {suffix!r} (expected .safetensors, .gguf or a folder)", path)


def _magic(path: Path) -> bytes:
    with builtins.open(path, "rb") as f:
        return f.read(4)


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
    return msg[:160]


def _cached_sha256(files: list[Path]) -> str:
    """Combined sha256 of files; per-file digests are cached keyed by (path, size, mtime)."""
    import hashlib

    from ._io import cache_dir, sha256_file

    cache_file = cache_dir() / "sha256-cache.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
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
