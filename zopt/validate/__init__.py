"""Bounds and schemas for everything zopt reads from disk that it did not just write.

Every boundary calls one function here: files (regular files only, opened without blocking),
JSON (size, depth, integer length, UTF-8, no NaN), safetensors headers, GGUF headers, model
configs, artifact and publish manifests, sharded indexes and paths named by them (confined to
their folder). A failure is a :class:`~zopt.errors.ZoptError` subclass naming the file and the
problem in one line.

The checks are written by hand rather than with pydantic or jsonschema: most of them are not
shape-of-JSON rules but byte arithmetic (dtype x shape = byte span, sorted non-overlapping
offsets, GGUF block sizes) and cross-field consistency (``dim % n_heads``, ``sum(axes_dims)``),
which a schema library would only wrap in custom validators; the JSON bounds must act before any
schema library sees the data; the error text must name the file and the field in one line; and
neither library is a declared dependency of zopt.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from ..errors import ChecksumMismatch, CorruptFile, SourceNotFound, ZoptError

MAX_JSON_BYTES = 256 << 20  # a full-size safetensors header is ~100 KB, a manifest ~200 KB
MAX_JSON_DEPTH = 32
MAX_INT_DIGITS = 20  # enough for any uint64
MAX_DIM = 1 << 40
MAX_NDIM = 8
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a device"),
                       (stat.S_ISBLK, "a device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """Open ``path`` for reading only if it is a regular file (never blocks on a FIFO or device)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SourceNotFound("no such file", path) from None
    except PermissionError:
        raise ZoptError("permission denied", path) from None
    except OSError as e:
        raise ZoptError(f"cannot open ({e.strerror})", path) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CorruptFile(f"is {_kind(mode)}; zopt reads only regular files", path)
    return os.fdopen(fd, "rb")


def regular_file(path: str | os.PathLike) -> os.stat_result:
    """``os.stat`` of ``path``, refusing anything but a regular file (symlinks are followed)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise SourceNotFound("no such file", path) from None
    except OSError as e:
        raise ZoptError(f"cannot read ({e.strerror})", path) from None
    if not stat.S_ISREG(st.st_mode):
        raise CorruptFile(f"is {_kind(st.st_mode)}; zopt reads only regular files", path)
    return st


# ---------------------------------------------------------------------------------------------
# JSON


class _Bad(ValueError):
    pass


def _int(s: str) -> int:
    if len(s.lstrip("-")) > MAX_INT_DIGITS:
        raise _Bad(f"an integer of {len(s)} digits")
    return int(s)


def _float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise _Bad(f"a non-finite number {s[:20]}")
    return v


def _constant(s: str):
    raise _Bad(f"{s} is not JSON")


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _Bad(f"duplicate key {dup[:80]!r}")
    return out


def parse_json(data: bytes | str, path: str | os.PathLike, what: str = "JSON") -> Any:
    """Parse ``data`` with bounds: size, nesting depth, integer digits, strict UTF-8, no NaN."""
    if len(data) > MAX_JSON_BYTES:
        raise CorruptFile(f"{what} is {len(data)} bytes, more than the {MAX_JSON_BYTES} allowed", path)
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorruptFile(f"{what} is not UTF-8 (byte {e.start})", path) from None
    try:
        obj = json.loads(data, parse_int=_int, parse_float=_float, parse_constant=_constant,
                         object_pairs_hook=_pairs)
    except RecursionError:
        raise CorruptFile(f"{what} is nested too deeply", path) from None
    except _Bad as e:
        raise CorruptFile(f"{what} holds {e}", path) from None
    except ValueError as e:
        msg = getattr(e, "msg", None) or str(e).splitlines()[0][:80]
        raise CorruptFile(f"{what} is not valid JSON ({msg})", path) from None
    stack = [(obj, 1)]
    while stack:  # iterative: a depth check must not itself recurse
        o, d = stack.pop()
        if d > MAX_JSON_DEPTH:
            raise CorruptFile(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels", path)
        if isinstance(o, dict):
            stack.extend((v, d + 1) for v in o.values())
        elif isinstance(o, list):
            stack.extend((v, d + 1) for v in o)
    return obj


def read_json(path: str | os.PathLike, what: str = "JSON", max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Read and parse a JSON file (regular files only, at most ``max_bytes``)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise CorruptFile(f"{what} is {size} bytes, more than the {max_bytes} allowed", path)
        data = f.read(max_bytes + 1)
    return parse_json(data, path, what)


# ---------------------------------------------------------------------------------------------
# small type checks


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def need(cond: bool, problem: str, path: str | os.PathLike) -> None:
    if not cond:
        raise CorruptFile(problem, path)


def need_type(obj: dict, key: str, types: type | tuple, path, where: str = "", required: bool = True) -> Any:
    """``obj[key]`` if it has one of ``types`` (bool is never an int); CorruptFile otherwise."""
    label = f"{where}{key!r}"
    if key not in obj:
        need(not required, f"{label} is missing", path)
        return None
    v = obj[key]
    ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in (types if isinstance(types, tuple)
                                                                            else (types,)))
    need(ok, f"{label} has the wrong type ({type(v).__name__})", path)
    return v


def int_list(v: Any, label: str, path, lo: int = 0, hi: int = MAX_DIM, max_len: int = MAX_NDIM) -> list[int]:
    need(isinstance(v, list) and len(v) <= max_len and all(is_int(x) and lo <= x <= hi for x in v),
         f"{label} must be a list of at most {max_len} integers in [{lo}, {hi}]", path)
    return v


# ---------------------------------------------------------------------------------------------
# paths named by manifests and indexes


def rel_path(rel: Any, path: str | os.PathLike, label: str = "path") -> str:
    """A relative POSIX path that stays inside its folder lexically (no absolute, no ``..``)."""
    need(isinstance(rel, str) and 0 < len(rel) <= 4096, f"{label} must be a non-empty string", path)
    p = PurePosixPath(rel)
    bad = ("\\" in rel or "\0" in rel or p.is_absolute() or rel.startswith("~")
           or any(part in ("..", ".", "") for part in rel.split("/")))
    need(not bad, f"{label} {rel[:200]!r} leaves its folder (absolute, '..' or odd characters)", path)
    return rel


def confined(folder: str | os.PathLike, rel: Any, path: str | os.PathLike, label: str = "path") -> Path:
    """``folder / rel`` after checking ``rel`` lexically and that no symlink leads outside ``folder``."""
    rel = rel_path(rel, path, label)
    target = Path(folder) / rel
    root = Path(folder).resolve()
    real = target.resolve()
    if real != root and root not in real.parents:
        raise CorruptFile(f"{label} {rel!r} is a symlink leading outside its folder", path)
    return target


# ---------------------------------------------------------------------------------------------
# safetensors

SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
                        "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}


def safetensors_header(header: Any, data_size: int, path) -> tuple[dict[str, str], list[tuple]]:
    """Check a parsed safetensors header against the ``data_size`` bytes after it.

    Returns (metadata, [(name, dtype, shape, start, end)] in header order). Byte spans must equal
    dtype x shape, be sorted, contiguous from 0 and cover the data exactly (the format's rules).
    """
    need(isinstance(header, dict), "safetensors header is not a JSON object", path)
    meta = header.get("__metadata__", {})
    need(isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()),
         "safetensors __metadata__ must map strings to strings", path)
    entries = []
    for name, e in header.items():
        if name == "__metadata__":
            continue
        need(0 < len(name) <= 1024, "safetensors header has an empty or over-long tensor name", path)
        where = f"tensor {name[:120]!r}: "
        need(isinstance(e, dict) and set(e) == _ENTRY_KEYS,
             f"{where}entry must hold exactly dtype, shape and data_offsets", path)
        dtype = e["dtype"]
        need(isinstance(dtype, str) and dtype in SAFETENSORS_ITEMSIZE, f"{where}unknown dtype {str(dtype)[:20]!r}", path)
        shape = int_list(e["shape"], f"{where}shape", path)
        offs = int_list(e["data_offsets"], f"{where}data_offsets", path, hi=1 << 62, max_len=2)
        need(len(offs) == 2 and offs[0] <= offs[1], f"{where}data_offsets must be [start, end]", path)
        numel = math.prod(shape)
        need(offs[1] - offs[0] == numel * SAFETENSORS_ITEMSIZE[dtype],
             f"{where}byte span {offs[1] - offs[0]} does not match {dtype} x {shape}", path)
        entries.append((name, dtype, tuple(shape), offs[0], offs[1]))
    pos = 0
    for name, _, _, a, b in sorted(entries, key=lambda t: (t[3], t[4])):
        need(a == pos, f"tensor {name[:120]!r}: data starts at {a}, expected {pos} "
                       "(offsets overlap or leave a gap)", path)
        pos = b
    need(pos == data_size, f"truncated or padded: tensors cover {pos} data bytes, the file has {data_size}", path)
    return meta, entries


# ---------------------------------------------------------------------------------------------
# model configs

CONFIG_KEYS = {"all_patch_size", "all_f_patch_size", "in_channels", "dim", "n_layers", "n_refiner_layers",
               "n_heads", "n_kv_heads", "norm_eps", "qk_norm", "cap_feat_dim", "siglip_feat_dim", "rope_theta",
               "t_scale", "axes_dims", "axes_lens", "quantization_config"}
# name -> (low, high): generous for any real model, small enough that a bad value fails at once
CONFIG_INTS = {"dim": (1, 32768), "n_layers": (1, 512), "n_refiner_layers": (0, 64), "n_heads": (1, 512),
               "n_kv_heads": (1, 512), "in_channels": (1, 1024), "cap_feat_dim": (1, 65536)}


def is_model_config(cfg: dict[str, Any]) -> bool:
    """Whether a config.json describes a transformer this module checks (known by its keys, so
    the read path need not know model classes)."""
    return sum(k in cfg for k in CONFIG_KEYS if k != "in_channels") >= 3  # a key lost or mangled still counts


def model_config(cfg: Any, path, where: str = "config") -> dict[str, Any]:
    """Check a Z-Image transformer config: known keys, types, ranges and consistency."""
    need(isinstance(cfg, dict), f"{where} must be a JSON object", path)
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in CONFIG_KEYS)
    need(not unknown, f"{where} has unknown key {unknown[0][:80]!r}" if unknown else "", path)
    for k, (lo, hi) in CONFIG_INTS.items():
        v = need_type(cfg, k, int, path, f"{where} ")
        need(lo <= v <= hi, f"{where} {k}={v} is outside [{lo}, {hi}]", path)
    sig = cfg.get("siglip_feat_dim")
    need(sig is None or (is_int(sig) and 1 <= sig <= 65536), f"{where} siglip_feat_dim must be null or 1..65536",
         path)
    need(cfg["dim"] % cfg["n_heads"] == 0, f"{where} dim={cfg['dim']} is not a multiple of "
                                           f"n_heads={cfg['n_heads']}", path)
    need(cfg["n_heads"] % cfg["n_kv_heads"] == 0, f"{where} n_heads is not a multiple of n_kv_heads", path)
    patch = int_list(need_type(cfg, "all_patch_size", list, path, f"{where} "), f"{where} all_patch_size",
                     path, 1, 16)
    fpatch = int_list(need_type(cfg, "all_f_patch_size", list, path, f"{where} "), f"{where} all_f_patch_size",
                      path, 1, 16)
    need(0 < len(patch) == len(fpatch), f"{where} all_patch_size and all_f_patch_size differ in length", path)
    axes = int_list(need_type(cfg, "axes_dims", list, path, f"{where} "), f"{where} axes_dims", path, 1, 4096)
    lens = int_list(need_type(cfg, "axes_lens", list, path, f"{where} "), f"{where} axes_lens", path, 1, 1 << 20)
    head = cfg["dim"] // cfg["n_heads"]
    need(0 < len(axes) == len(lens), f"{where} axes_dims and axes_lens differ in length", path)
    need(sum(axes) == head, f"{where} axes_dims sum to {sum(axes)}, not the head size {head}", path)
    need(all(a % 2 == 0 for a in axes), f"{where} axes_dims must be even (rotary pairs)", path)
    for k, lo, hi in (("norm_eps", 0.0, 1.0), ("rope_theta", 0.0, 1e9), ("t_scale", 0.0, 1e9)):
        v = need_type(cfg, k, (int, float), path, f"{where} ", required=False)
        need(v is None or lo < v < hi, f"{where} {k}={v} is outside ({lo}, {hi})", path)
    need_type(cfg, "qk_norm", bool, path, f"{where} ", required=False)
    need_type(cfg, "quantization_config", dict, path, f"{where} ", required=False)
    return cfg


# ---------------------------------------------------------------------------------------------
# manifests and indexes


def files_table(files: Any, path, where: str = "files") -> dict[str, dict[str, Any]]:
    """``{relative path: {"sha256": hex, "bytes": n}}`` with confined paths."""
    need(isinstance(files, dict), f"{where} must be a JSON object", path)
    for rel, meta in files.items():
        rel_path(rel, path, f"{where} entry")
        need(isinstance(meta, dict) and is_int(meta.get("bytes")) and 0 <= meta["bytes"] <= 1 << 50
             and isinstance(meta.get("sha256"), str) and HEX64.match(meta["sha256"]) is not None,
             f"{where} entry {rel[:120]!r} needs a sha256 (64 hex digits) and a byte count", path)
    return files


_TENSOR_FIELDS = {"shape": list, "parts": list, "storage": str, "stored_as": str, "rows": list, "scale": str}


def manifest(m: Any, path) -> dict[str, Any]:
    """Check an artifact manifest (``zopt-manifest.json``): required keys, types and paths."""
    need(isinstance(m, dict), "manifest is not a JSON object", path)
    need_type(m, "zopt_manifest", int, path)
    need(isinstance(m.get("format"), str) and 0 < len(m["format"]) <= 64, "manifest 'format' must be a name", path)
    need(m.get("subtype") is None or isinstance(m["subtype"], str), "manifest 'subtype' must be a string", path)
    for key in ("options", "source", "summary"):
        need_type(m, key, dict, path, "manifest ", required=key == "options")
    for key in ("layout", "command", "zopt_version", "created", "family", "manifest_sha256"):
        need_type(m, key, str, path, "manifest ", required=False)
    if "requires" in m:
        need(isinstance(m["requires"], list) and all(isinstance(r, str) for r in m["requires"]),
             "manifest 'requires' must be a list of names", path)
    if "file" in m:
        rel_path(m["file"], path, "manifest 'file'")
    model_config(need_type(m, "config", dict, path, "manifest "), path, "manifest config")
    tensors = need_type(m, "tensors", dict, path, "manifest ")
    for name, rec in tensors.items():
        need(isinstance(rec, dict), f"manifest tensor {name[:120]!r} must be a JSON object", path)
        for k, t in _TENSOR_FIELDS.items():
            need_type(rec, k, t, path, f"manifest tensor {name[:120]!r} ", required=False)
        if "shape" in rec:
            int_list(rec["shape"], f"manifest tensor {name[:120]!r} shape", path)
        if "parts" in rec:
            need(all(isinstance(p, str) for p in rec["parts"]), f"manifest tensor {name[:120]!r} parts "
                                                                 "must be names", path)
        if "rows" in rec:
            r = int_list(rec["rows"], f"manifest tensor {name[:120]!r} rows", path, max_len=2)
            need(len(r) == 2 and r[0] < r[1], f"manifest tensor {name[:120]!r} rows must be [start, end]", path)
    files_table(need_type(m, "files", dict, path, "manifest "), path, "manifest files")
    return m


def publish_manifest(m: Any, path) -> dict[str, Any]:
    """Check ``zopt-publish.json``: version, files table, variants named by plain folder entries."""
    need(isinstance(m, dict), "publish manifest is not a JSON object", path)
    need_type(m, "zopt_publish", int, path)
    files_table(need_type(m, "files", dict, path, "publish manifest "), path, "publish manifest files")
    variants = need_type(m, "variants", list, path, "publish manifest ")
    for v in variants:
        need(isinstance(v, dict) and isinstance(v.get("format"), str),
             "publish manifest variant must be an object with a format", path)
        name = rel_path(v.get("name"), path, "publish manifest variant name")
        need("/" not in name and not name.startswith("."), f"variant name {name[:120]!r} must be a plain "
                                                           "top-level name", path)
    return m


def shard_index(idx: Any, path) -> dict[str, str]:
    """Check a ``*.safetensors.index.json``; returns its weight_map (tensor -> confined shard path)."""
    need(isinstance(idx, dict), "sharded-checkpoint index is not a JSON object", path)
    wm = need_type(idx, "weight_map", dict, path, "index ")
    need(len(wm) > 0, "index weight_map is empty", path)
    for name, shard in wm.items():
        rel_path(shard, path, f"index shard of {name[:120]!r}")
        need(shard.endswith(".safetensors"), f"index shard {shard[:120]!r} is not a .safetensors file", path)
    need_type(idx, "metadata", dict, path, "index ", required=False)
    return wm


def verify_enabled() -> bool:
    """Whether loaders check checksums (on unless ``ZOPT_VERIFY=0``)."""
    return os.environ.get("ZOPT_VERIFY", "1").strip().lower() not in ("0", "false", "no", "off")


def check_sha256(path: str | os.PathLike, want: str, start: int = 0, what: str = "") -> None:
    """Raise ChecksumMismatch unless the bytes of regular file ``path`` from ``start`` hash to ``want``."""
    import hashlib

    h = hashlib.sha256()
    with open_regular(path) as f:
        f.seek(start)
        while block := f.read(16 << 20):
            h.update(block)
    if h.hexdigest() != want:
        raise ChecksumMismatch(f"sha256 of {what or 'the file'} differs from the recorded one "
                               "(corrupted or modified)", path)
