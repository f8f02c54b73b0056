"""Format registry: one line per format; each format lives in its own module.

A format module provides

* ``convert(source: TensorSource, out: Path, subtype: str | None, options: dict, progress: bool) -> Path``
  writing a self-describing artifact (atomically), reading the source through the one read path;
* ``load(path: Path, device: str = "cpu", backend: str | None = None, dtype=None) -> torch.nn.Module``
  rebuilding a working ``ZImageTransformer2DModel`` from the artifact alone;
* optionally ``list_types() -> list[tuple[str, float, str]]`` (subtype, bits/weight, summary).

Nothing here imports a format module until it is used, so ``import zopt`` stays fast.
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MissingDependency, SourceNotFound, UnsupportedFormat


@dataclass(frozen=True)
class FormatInfo:
    name: str
    module: str
    summary: str
    bits: float | None  # nominal bits per weight of quantized tensors (None: depends on subtype)
    artifact: str  # "file" (a single file) or "folder"
    needs: tuple[tuple[str, str], ...] = field(default=())  # (import name, pip extra) to convert/load
    default_subtype: str | None = None


FORMATS: dict[str, FormatInfo] = {
    f.name: f
    for f in (
        FormatInfo("bf16", "zopt.formats.plain", "diffusers folder, bfloat16 (the reference)", 16, "folder"),
        FormatInfo("fp16", "zopt.formats.plain", "diffusers folder, float16", 16, "folder"),
        FormatInfo("fp32", "zopt.formats.plain", "diffusers folder, float32", 32, "folder"),
        FormatInfo("gguf", "zopt.formats.gguf", "GGUF file (llama.cpp/ComfyUI/sd.cpp), F32 ... Q2_K and K-quant recipes",
                   None, "file", default_subtype="Q8_0"),
        FormatInfo("fp8", "zopt.formats.lowbit.fp8", "FP8 E4M3FN (or E5M2) weights, per-output-channel scales", 8, "folder"),
        FormatInfo("int8", "zopt.formats.lowbit.int8", "INT8 symmetric per-output-channel weights", 8, "folder"),
        FormatInfo("int8_w8a8", "zopt.formats.lowbit.int8", "INT8 weights + dynamic per-token INT8 activations", 8, "folder"),
        FormatInfo("int4", "zopt.formats.lowbit.int4", "INT4 group-wise asymmetric weights with clipping search", 4, "folder"),
        FormatInfo("nf4", "zopt.formats.lowbit.nf4", "bitsandbytes 4-bit NormalFloat, blocksize 64", 4, "folder"),
        FormatInfo("onnx", "zopt.formats.onnx", "ONNX export (fp32/fp16/bf16) and onnxruntime int8/int4 variants",
                   None, "folder", needs=(("onnx", "onnx"), ("onnxruntime", "onnx")), default_subtype="fp32"),
        FormatInfo("tensorrt", "zopt.formats.onnx.tensorrt", "TensorRT engine built from the ONNX export (NVIDIA GPU)",
                   None, "folder", needs=(("tensorrt", "tensorrt"),), default_subtype="bf16"),
    )
}

MANIFEST_NAME = "zopt-manifest.json"


def parse_spec(spec: str) -> tuple[FormatInfo, str | None]:
    """``"gguf:Q4_K_M"`` -> (FormatInfo for gguf, "Q4_K_M"); ``"fp8"`` -> (fp8, None)."""
    name, _, sub = spec.partition(":")
    name = name.strip().lower()
    if name not in FORMATS:
        raise UnsupportedFormat(f"unknown format {spec!r}; known: {', '.join(FORMATS)}")
    info = FORMATS[name]
    return info, (sub.strip() or info.default_subtype or None)


def module_for(info: FormatInfo):
    for pkg, extra in info.needs:
        if importlib.util.find_spec(pkg) is None:
            raise MissingDependency(pkg, extra, f"the {info.name} format")
    try:
        return importlib.import_module(info.module)
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("zopt"):
            raise UnsupportedFormat(f"format {info.name!r} is not available in this zopt build") from None
        raise


def convert(source: Any, to: str, out: str | os.PathLike, *, options: dict[str, Any] | None = None,
            progress: bool = True, allow_pickle: bool = False) -> Path:
    """Convert ``source`` (path, hub id, ``tiny`` or an open TensorSource) to format spec ``to`` at ``out``."""
    from .. import checkpoint

    info, sub = parse_spec(to)
    mod = module_for(info)
    src = source if isinstance(source, checkpoint.TensorSource) else checkpoint.open(source, allow_pickle=allow_pickle)
    opts = dict(options or {})
    if info.name in ("bf16", "fp16", "fp32", "int8", "int8_w8a8"):
        opts.setdefault("format", info.name)
    result = mod.convert(src, Path(out), sub, opts, progress)
    source_spec = os.fspath(source.path) if isinstance(source, checkpoint.TensorSource) else os.fspath(source)
    _record_command(result, command_line(to, source_spec, options or {}))
    return result


def command_line(to: str, source: str | None, options: dict[str, Any]) -> str:
    """The ``zopt convert`` command that reproduces a conversion with these user options."""
    import shlex

    parts = ["zopt", "convert", source or "SOURCE", "--to", to]
    for pat in options.get("keep", []) or []:
        parts += ["--keep", str(pat)]
    for pat in options.get("quantize", []) or []:
        parts += ["--quantize", str(pat)]
    if options.get("layout"):
        parts += ["--layout", str(options["layout"])]
    for k, v in sorted(options.items()):
        if k in ("keep", "quantize", "layout", "format", "hash_source") or k.startswith("_"):
            continue
        parts += ["--option", f"{k}={str(v).lower() if isinstance(v, bool) else v}"]
    return " ".join(shlex.quote(p) for p in parts)


def _record_command(result: Path, command: str) -> None:
    """Add the reproducing command to a folder artifact's manifest (the manifest is not hashed)."""
    manifest = result / MANIFEST_NAME if result.is_dir() else None
    if manifest is None or not manifest.exists():
        return
    data = json.loads(manifest.read_text())
    data["command"] = command
    tmp = manifest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, manifest)


def artifact_format(path: str | os.PathLike) -> str:
    """The format name of an artifact on disk: ``gguf`` for .gguf files, the manifest's for zopt
    folders, ``bf16`` for a plain diffusers folder, ``tiny`` for the embedded default."""
    p = Path(path)
    from ..models import EMBEDDED

    if os.fspath(path) in EMBEDDED:
        return "tiny"
    if not p.exists():
        raise SourceNotFound("no such file or folder", p)
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return "gguf"
        return "safetensors"
    for cand in (p / MANIFEST_NAME, p / "transformer" / MANIFEST_NAME):
        if cand.exists():
            return json.loads(cand.read_text())["format"]
    return "bf16"


def load(path: str | os.PathLike, device: str = "cpu", backend: str | None = None, dtype: Any = None):
    """Load any artifact (or source checkpoint) as a ready ``ZImageTransformer2DModel``-like module."""
    fmt = artifact_format(path)
    if fmt in ("tiny", "safetensors"):
        from .plain import load_source

        return load_source(path, device=device, dtype=dtype)
    if fmt == "bf16" and not (Path(path) / MANIFEST_NAME).exists() and not (Path(path) / "transformer" / MANIFEST_NAME).exists():
        from .plain import load_source

        return load_source(path, device=device, dtype=dtype)
    info = FORMATS.get(fmt)
    if info is None:
        raise UnsupportedFormat(f"artifact has unknown format {fmt!r}", path)
    mod = module_for(info)
    return mod.load(Path(path), device=device, backend=backend, dtype=dtype)
