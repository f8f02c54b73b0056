"""A bounded walk over a GGUF header before any other reader sees the file.

gguf-py trusts the counts and lengths it reads (a flipped byte in an array count can loop for
hours, a tensor offset past the end yields a silently short memory map); this walk checks every
count, length, KV type, tensor type, dimension and offset against the file size first, so the
reader only ever parses a header whose structure is known to be sound.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

from ..errors import ChecksumMismatch, CorruptFile, UnsupportedFormat
from . import HEX64, MAX_DIM, model_config, need, open_regular, parse_json

# the GGML types zopt's reader and loader handle (a test keeps this equal to the writer's table)
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
STRING, ARRAY = 8, 9
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
MAX_ITEMS = 1 << 22  # array items kept in Python (a tokenizer has ~150K); larger arrays are skipped over
MAX_COUNT = 1 << 20  # tensors or KV pairs
ORIG_SHAPE = "comfy.gguf.orig_shape."
DIGEST_KEY = "zopt.sha256"


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first)
    type: str
    offset: int  # absolute, in the file
    nbytes: int


@dataclass(frozen=True)
class GGUFHeader:
    kv: dict[str, tuple[int, Any]]  # key -> (GGUF value type, value); arrays: (ARRAY, (item type, list|None))
    tensors: list[GGUFTensor]
    data_offset: int
    size: int
    digest_at: int | None = None  # file offset of the zopt.sha256 value


class _Walk:
    def __init__(self, buf, path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        need(self.pos + n <= len(self.buf), f"GGUF header is truncated at byte {self.pos}", self.path)
        v = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v[0] if len(v) == 1 else v

    def string(self, what: str, limit: int) -> str:
        n = self.take("<Q")
        need(n <= limit and self.pos + n <= len(self.buf), f"GGUF {what} length {n} is out of bounds "
                                                            f"at byte {self.pos - 8}", self.path)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptFile(f"GGUF {what} at byte {self.pos - n} is not UTF-8", self.path) from None

    def value(self, vtype: int, depth: int = 0):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == STRING:
            return self.string("string value", len(self.buf))
        need(vtype == ARRAY and depth < 2, f"GGUF value type {vtype} at byte {self.pos - 4} is unknown", self.path)
        itype, count = self.take("<I"), self.take("<Q")
        if itype in _SCALARS:
            nbytes = count * struct.calcsize(_SCALARS[itype])
            need(self.pos + nbytes <= len(self.buf), f"GGUF array of {count} items overruns the file", self.path)
            items = None
            if count <= MAX_ITEMS:
                items = list(struct.unpack_from(f"<{count}{_SCALARS[itype][1]}", self.buf, self.pos))
            self.pos += nbytes
            return itype, items
        need(count <= MAX_ITEMS and count * 8 <= len(self.buf) - self.pos,
             f"GGUF array of {count} items overruns the file", self.path)
        return itype, [self.value(itype, depth + 1) for _ in range(count)]


def gguf_header(path: str | os.PathLike) -> GGUFHeader:
    """Walk and check the header of the GGUF file at ``path``; CorruptFile/UnsupportedFormat on any flaw."""
    import gguf

    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        need(size >= 24, f"truncated: {size} bytes is too short for a GGUF header", path)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            w = _Walk(buf, path)
            need(w.take("<4s") == b"GGUF", "not a GGUF file (bad magic)", path)
            version = w.take("<I")
            need(version in (2, 3), f"GGUF version {version} is not supported (2 or 3)", path)
            n_tensors, n_kv = w.take("<Q"), w.take("<Q")
            need(n_tensors <= MAX_COUNT and n_kv <= MAX_COUNT, f"GGUF header claims {n_tensors} tensors "
                                                                f"and {n_kv} keys", path)
            kv: dict[str, tuple[int, Any]] = {}
            digest_at = None
            for _ in range(n_kv):
                key = w.string("key", 65535)
                need(key not in kv, f"GGUF key {key[:120]!r} appears twice", path)
                vtype = w.take("<I")
                if key == DIGEST_KEY:
                    digest_at = w.pos + 8
                kv[key] = (vtype, w.value(vtype))
            infos = []
            for _ in range(n_tensors):
                name = w.string("tensor name", 1024)
                nd = w.take("<I")
                need(1 <= nd <= 4, f"tensor {name[:120]!r} has {nd} dimensions", path)
                dims = [w.take("<Q") for _ in range(nd)]
                tid, off = w.take("<I"), w.take("<Q")
                infos.append((name, dims, tid, off))
            header_end = w.pos
    align = 32
    if "general.alignment" in kv:
        t, align = kv["general.alignment"]
        need(t == 4 and align > 0 and align & (align - 1) == 0, "GGUF general.alignment must be a power of "
                                                                 "two (uint32)", path)
    data_offset = header_end + (-header_end % align)
    tensors, names = [], set()
    for name, dims, tid, off in infos:
        where = f"tensor {name[:120]!r}"
        need(name not in names, f"{where} appears twice", path)
        names.add(name)
        need(all(1 <= d <= MAX_DIM for d in dims), f"{where} has a dimension outside [1, {MAX_DIM}]: {dims}", path)
        try:
            qtype = gguf.GGMLQuantizationType(tid)
        except ValueError:
            raise CorruptFile(f"{where} has unknown GGML type id {tid}", path) from None
        if qtype.name not in SUPPORTED_TYPES:
            raise UnsupportedFormat(f"{where} has GGML type {qtype.name}, which zopt does not read "
                                    f"(supported: {', '.join(SUPPORTED_TYPES)})", path)
        block, tsize = gguf.GGML_QUANT_SIZES[qtype]
        need(dims[0] % block == 0, f"{where}: row length {dims[0]} is not a multiple of the {qtype.name} "
                                   f"block size {block}", path)
        need(off % align == 0, f"{where}: data offset {off} is not aligned to {align}", path)
        nbytes = math.prod(dims) // block * tsize
        tensors.append(GGUFTensor(name, tuple(reversed(dims)), qtype.name, data_offset + off, nbytes))
    end = data_offset
    for t in sorted(tensors, key=lambda t: t.offset):
        need(t.offset >= end, f"tensor {t.name[:120]!r} overlaps the tensor before it", path)
        end = t.offset + t.nbytes
    need(end <= size, f"truncated: tensor data ends at byte {end} but the file has {size}", path)
    header = GGUFHeader(kv, tensors, data_offset, size, digest_at)
    _check_zopt_keys(header, path)
    return header


def _check_zopt_keys(h: GGUFHeader, path) -> None:
    """Type and consistency of the keys zopt itself interprets."""
    numel = {t.name: math.prod(t.shape) for t in h.tensors}
    for key, (vtype, val) in h.kv.items():
        if key.startswith(ORIG_SHAPE):
            name = key[len(ORIG_SHAPE):]
            ok = vtype == ARRAY and val[0] in (4, 5, 10, 11) and val[1] is not None and 1 <= len(val[1]) <= 8
            need(ok and all(1 <= d <= MAX_DIM for d in val[1]), f"{key} must be a list of positive dimensions",
                 path)
            need(name in numel, f"{key} names no tensor in the file", path)
            need(math.prod(val[1]) == numel[name], f"{key} = {val[1]} does not hold the tensor's {numel[name]} "
                                                   "elements", path)
        elif key in ("zopt.config", "zopt.sha256", "zopt.recipe", "zopt.source.sha256", "zopt.version"):
            need(vtype == STRING, f"GGUF key {key} must be a string", path)
        elif key == "zopt.bits_per_weight":
            need(vtype in (6, 12) and 0 < val < 64, "GGUF key zopt.bits_per_weight must be a number in (0, 64)",
                 path)
    if "zopt.config" in h.kv:
        model_config(parse_json(h.kv["zopt.config"][1], path, "zopt.config"), path, "zopt.config")
    if "zopt.sha256" in h.kv:
        need(HEX64.match(h.kv["zopt.sha256"][1]) is not None, "zopt.sha256 must be 64 hex digits", path)


def file_digest(header: bytes | bytearray, digest_at: int, data_hash) -> str:
    """The ``zopt.sha256`` value: sha256 of (sha256 of the header without the digest's own 64 bytes,
    sha256 of the data section), so a changed byte anywhere in the file is caught."""
    import hashlib

    h = hashlib.sha256(bytes(header[:digest_at]) + bytes(header[digest_at + 64:]))
    return hashlib.sha256((h.hexdigest() + data_hash.hexdigest()).encode()).hexdigest()


def verify_digest(header: GGUFHeader, path: str | os.PathLike) -> None:
    """Check a GGUF's ``zopt.sha256`` (files zopt wrote must carry one; ``ZOPT_VERIFY=0`` skips the check).

    GGUF files from other tools carry no zopt checksum and are read as they are.
    """
    import hashlib

    from . import verify_enabled

    if not verify_enabled():
        return
    if DIGEST_KEY not in header.kv:
        need("zopt.version" not in header.kv and "zopt.recipe" not in header.kv,
             f"GGUF written by zopt has no {DIGEST_KEY} checksum (made by an older zopt, or altered): "
             "convert it again, or set ZOPT_VERIFY=0 to load it unchecked", path)
        return
    with open_regular(path) as f:
        head = f.read(header.data_offset)
        data = hashlib.sha256()
        while block := f.read(16 << 20):
            data.update(block)
    if len(head) != header.data_offset or file_digest(head, header.digest_at, data) != header.kv[DIGEST_KEY][1]:
        raise ChecksumMismatch(f"{DIGEST_KEY} differs from the file's contents (corrupted or modified)", path)
