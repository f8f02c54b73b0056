"""A streaming GGUF (version 3) writer: header first, then one tensor at a time.

The GGUF layout (llama.cpp ``docs/gguf.md``): magic ``GGUF``, version, tensor count, KV count,
the KV pairs, one info record per tensor (name, dims innermost-first, GGML type, offset into the
data section), padding to ``general.alignment``, then the tensor data, each tensor starting at an
aligned offset. Everything in the header follows from names, shapes and types, so it is written
before any tensor is quantized and the writer never holds more than the tensor being written.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any, BinaryIO

from gguf.constants import GGMLQuantizationType, GGUFValueType

from ...validate.gguf import DIGEST_KEY, file_digest
from .recipes import TYPE_LAYOUT, tensor_nbytes

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 32

# GGUF metadata value types and GGML type ids: gguf's enums (ggml.h's numbers), never a copy
UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, INT64 = (int(GGUFValueType[k]) for k in (
    "UINT32", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY", "INT64"))
GGML_TYPE_ID: dict[str, int] = {name: int(GGMLQuantizationType[name]) for name in TYPE_LAYOUT}


def _string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _value(v: Any) -> tuple[int, bytes]:
    """(GGUF value type, encoded value) for a Python scalar, string or list of one kind."""
    if isinstance(v, bool):
        return BOOL, struct.pack("<?", v)
    if isinstance(v, int):
        return (UINT32, struct.pack("<I", v)) if 0 <= v < 2**32 else (INT64, struct.pack("<q", v))
    if isinstance(v, float):
        return FLOAT32, struct.pack("<f", v)
    if isinstance(v, str):
        return STRING, _string(v)
    if isinstance(v, (list, tuple)):
        if not v:
            return ARRAY, struct.pack("<IQ", INT32, 0)
        if all(isinstance(x, int) and not isinstance(x, bool) for x in v):
            return ARRAY, struct.pack("<IQ", INT32, len(v)) + struct.pack(f"<{len(v)}i", *v)
        items = [_value(x) for x in v]
        kinds = {k for k, _ in items}
        if len(kinds) != 1:
            raise TypeError("GGUF arrays hold one value type")
        return ARRAY, struct.pack("<IQ", kinds.pop(), len(v)) + b"".join(b for _, b in items)
    raise TypeError(f"cannot store {type(v).__name__} in GGUF metadata")


def as_bytes(data: Any):
    """A flat uint8 numpy view of a torch tensor or numpy array (no copy when contiguous)."""
    import numpy as np

    if hasattr(data, "detach"):  # torch: numpy has no bfloat16, so reinterpret as bytes first
        import torch

        data = data.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
    return np.ascontiguousarray(data).reshape(-1).view(np.uint8)


def _pad(n: int, align: int = ALIGNMENT) -> int:
    return (align - n % align) % align


class StreamingGGUFWriter:
    """Write a GGUF file whose tensors are declared up front and then written in order.

    ``tensors`` is a list of (name, shape in torch order, GGML type name). ``write(name, data)``
    takes the stored bytes of that tensor (a uint8 numpy array or torch tensor, or anything with
    ``tobytes``/``numpy``), must be called in declaration order, and checks the byte count.
    """

    def __init__(self, path: str | os.PathLike, tensors: list[tuple[str, tuple[int, ...], str]],
                 metadata: dict[str, Any]):
        self.path = Path(path)
        self._order = [n for n, _, _ in tensors]
        self._sizes = {n: tensor_nbytes(tuple(s), t) for n, s, t in tensors}
        for n, s, t in tensors:
            if s and s[-1] % TYPE_LAYOUT[t][0]:
                raise ValueError(f"{n}: row length {s[-1]} is not a multiple of the {t} block size")
        header = bytearray(GGUF_MAGIC + struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(metadata) + 1))
        header += _string("general.alignment") + struct.pack("<II", UINT32, ALIGNMENT)
        self._value_at: dict[str, tuple[int, int]] = {}  # key -> (offset, length) of a string value
        for k, v in metadata.items():
            kind, enc = _value(v)
            header += _string(k) + struct.pack("<I", kind)
            if kind == STRING:
                self._value_at[k] = (len(header) + 8, len(enc) - 8)
            header += enc
        offset = 0
        for n, s, t in tensors:
            dims = list(reversed(s)) or [1]
            header += _string(n) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
            header += struct.pack("<IQ", GGML_TYPE_ID[t], offset)
            offset += self._sizes[n] + _pad(self._sizes[n])
        header += b"\0" * _pad(len(header))
        self._header = header  # kept to compute the zopt.sha256 digest once patched values are in
        self._data_hash = hashlib.sha256()
        self.data_start = len(header)
        self.total_bytes = len(header) + offset
        self._f: BinaryIO = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self._f.write(header)
        self._next = 0

    def write(self, name: str, data: Any) -> None:
        """Write tensor ``name`` (the next declared one): its stored bytes, or an iterable of
        consecutive pieces of them (row chunks), so no whole quantized tensor need exist."""
        if self._next >= len(self._order) or self._order[self._next] != name:
            want = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise ValueError(f"tensor {name} written out of order (expected {want})")
        pieces = data if isinstance(data, (list, tuple)) or hasattr(data, "__next__") else [data]
        written = 0
        for piece in pieces:
            buf = as_bytes(piece)
            written += buf.nbytes
            if written > self._sizes[name]:
                break
            self._f.write(buf.data)
            self._data_hash.update(buf.data)
        if written != self._sizes[name]:
            raise ValueError(f"tensor {name}: {written} bytes given, {self._sizes[name]} declared")
        self._f.write(b"\0" * _pad(written))
        self._data_hash.update(b"\0" * _pad(written))
        self._next += 1

    def patch_string(self, key: str, value: str) -> None:
        """Overwrite string metadata ``key`` in place with ``value`` of the same byte length
        (lets a value known only at the end, like the source hash, live in a header written first)."""
        pos, length = self._value_at[key]
        enc = value.encode("utf-8")
        if len(enc) != length:
            raise ValueError(f"{key}: patched value must be {length} bytes, got {len(enc)}")
        self._header[pos:pos + length] = enc
        here = self._f.tell()
        self._f.seek(pos)
        self._f.write(enc)
        self._f.seek(here)

    def close(self) -> None:
        if self._f.closed:
            return
        complete = self._next == len(self._order)
        if complete and DIGEST_KEY in self._value_at:  # a checksum of everything but itself
            pos, length = self._value_at[DIGEST_KEY]
            self.patch_string(DIGEST_KEY, file_digest(self._header, pos, self._data_hash))
        self._f.close()
        if not complete:
            raise ValueError(f"{len(self._order) - self._next} declared tensors were never written")

    def __enter__(self) -> StreamingGGUFWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._f.close()
            return
        self.close()
