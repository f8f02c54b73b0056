"""Safetensors sources: one file, or a diffusers folder of shards with its index and config."""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from .. import validate
from ..errors import CorruptFile, SourceNotFound
from .base import _MAX_HEADER, SAFETENSORS_DTYPES, TensorInfo, TensorSource, read_at

# safetensors


class SafetensorsFile(TensorSource):
    """One ``.safetensors`` file; the header is parsed and validated by zopt itself."""

    kind = "safetensors"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fh = validate.open_regular(self.path)
        try:
            self._read_header()
        except BaseException:
            self._fh.close()
            raise

    def _read_header(self) -> None:
        size = os.fstat(self._fh.fileno()).st_size
        if size < 8:
            raise CorruptFile(f"truncated: {size} bytes is too short for a safetensors header", self.path)
        (hlen,) = struct.unpack("<Q", self._fh.read(8))
        if hlen > _MAX_HEADER or 8 + hlen > size:
            raise CorruptFile(
                f"truncated or not safetensors: header claims {hlen} bytes but the file has {size}", self.path
            )
        header = validate.parse_json(self._fh.read(hlen), self.path, "safetensors header")
        self._data_start = 8 + hlen
        meta, entries = validate.safetensors_header(header, size - self._data_start, self.path)
        self.metadata = dict(meta)
        self._entries: dict[str, tuple[TensorInfo, int]] = {
            name: (TensorInfo(name, shape, dtype, b - a), a) for name, dtype, shape, a, b in entries
        }
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
    config = _read_config(folder / "config.json")
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        weight_map = validate.shard_index(validate.read_json(indexes[0], "index"), indexes[0])
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


def _read_config(path: Path) -> dict[str, Any] | None:
    """A model folder's config.json, read with the JSON bounds and checked when it describes a
    transformer config zopt knows (others are passed on unchecked)."""
    if not path.exists():
        return None
    cfg = validate.read_json(path, "config.json")
    if not isinstance(cfg, dict):
        raise CorruptFile("config.json is not a JSON object", path)
    if validate.is_model_config(cfg):
        validate.model_config(cfg, path, "config.json")
    return cfg


