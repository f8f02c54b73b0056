"""GGUF sources, read through gguf-py and dequantized by :mod:`zopt.ggml`."""

from __future__ import annotations

import builtins
import os
from pathlib import Path

from ..errors import CorruptFile
from .base import TensorInfo, TensorSource, _short, read_at

# --------------------------------------------------------------------------------------------
# GGUF


class GGUFSource(TensorSource):
    """A GGUF file read through gguf-py. ``get`` dequantizes to float32; ``raw`` gives the blocks."""

    kind = "gguf"

    def __init__(self, path: str | os.PathLike):
        import gguf

        from ..validate import gguf as validate_gguf

        self.path = Path(path)
        self.header = validate_gguf.gguf_header(self.path)  # bounded walk first: gguf-py trusts counts
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
        orig_shapes = {key[len(validate_gguf.ORIG_SHAPE):]: tuple(val[1]) for key, (_, val) in self.header.kv.items()
                       if key.startswith(validate_gguf.ORIG_SHAPE)}
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

        from ..ggml import dequantize

        info, t = self._tensors[name]
        data = self._read(t)
        if t.tensor_type == T.BF16:
            return torch.from_numpy(data.view(np.int16)).view(torch.bfloat16).reshape(info.shape)
        if t.tensor_type in (T.F32, T.F16):
            return torch.from_numpy(data).reshape(info.shape)
        stored = tuple(int(x) for x in reversed(t.shape.tolist()))  # rows as stored (info.shape may differ)
        return dequantize(torch.from_numpy(data), t.tensor_type, stored).reshape(info.shape)


