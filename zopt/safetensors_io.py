"""A streaming safetensors writer: header from shapes first, then one tensor at a time.

``safetensors.torch.save_file`` needs the whole state dict in memory; converters of a 12 GB model
cannot afford that. The file is byte-compatible with the safetensors format (8-byte little-endian
header length, JSON header padded to 8 bytes, tensors back to back in header order).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

TORCH_TO_ST = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
ST_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
               "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def st_dtype(torch_dtype) -> str:
    """safetensors dtype name of a torch dtype (``torch.bfloat16`` -> ``"BF16"``)."""
    return TORCH_TO_ST[str(torch_dtype).replace("torch.", "")]


class StreamingSafetensorsWriter:
    """Write a safetensors file whose tensors are declared up front and supplied one by one.

    >>> w = StreamingSafetensorsWriter(path, [("a", "F32", (2, 3))], metadata={"k": "v"})
    >>> w.write("a", torch.zeros(2, 3)); w.close()

    Tensors must be written in the declared order; ``close`` checks that all were written.
    The caller is responsible for atomicity (write to a temp path, rename at the end).
    """

    def __init__(self, path: str | os.PathLike, entries: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._order: list[tuple[str, str, tuple[int, ...], int]] = []
        for name, dtype, shape in entries:
            n = 1
            for d in shape:
                n *= int(d)
            nbytes = n * ST_ITEMSIZE[dtype]
            header[name] = {"dtype": dtype, "shape": [int(d) for d in shape], "data_offsets": [offset, offset + nbytes]}
            self._order.append((name, dtype, tuple(int(d) for d in shape), nbytes))
            offset += nbytes
        hbytes = json.dumps(header, separators=(",", ":")).encode()
        hbytes += b" " * (-len(hbytes) % 8)
        self._f = open(self.path, "wb")
        self._f.write(struct.pack("<Q", len(hbytes)))
        self._f.write(hbytes)
        self._next = 0

    def write(self, name: str, tensor) -> None:
        exp_name, dtype, shape, nbytes = self._order[self._next]
        if name != exp_name:
            raise ValueError(f"expected tensor {exp_name!r} next, got {name!r}")
        if st_dtype(tensor.dtype) != dtype or tuple(tensor.shape) != shape:
            raise ValueError(
                f"tensor {name!r}: declared {dtype}{list(shape)}, got {st_dtype(tensor.dtype)}{list(tensor.shape)}"
            )
        t = tensor.detach().contiguous().cpu()
        data = t.reshape(-1).view(__import__("torch").uint8).numpy()
        if data.nbytes != nbytes:
            raise ValueError(f"tensor {name!r}: {data.nbytes} bytes, expected {nbytes}")
        self._f.write(memoryview(data))
        self._next += 1

    def close(self) -> None:
        if self._f.closed:
            return
        self._f.close()
        if self._next != len(self._order):
            missing = self._order[self._next][0]
            raise ValueError(f"{self.path}: tensor {missing!r} was declared but never written")

    def abort(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
