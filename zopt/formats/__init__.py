"""Formats: the registry (:mod:`zopt.formats.registry`, one entry per format) and the verbs that
use it: :func:`convert` (typed options, then the format's converter) and :func:`load` (the backend
selected once, then the format's loader). Each format lives in its own module or subpackage;
nothing here imports one until it is used, so ``import zopt`` stays fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..errors import SourceNotFound, UnsupportedFormat
from .registry import ALIASES, FORMATS, Format, select_backend

FormatInfo = Format  # the name older code used for a registry entry

MANIFEST_NAME = "zopt-manifest.json"


def parse_spec(spec: str) -> tuple[Format, str | None]:
    """``"gguf:Q4_K_M"`` -> (the gguf entry, "Q4_K_M"); ``"fp8"`` -> (fp8, None)."""
    name, _, sub = spec.partition(":")
    name = name.strip().lower()
    if name not in FORMATS:
        from .outputs import check_spec

        check_spec(spec)  # raises, naming the closest known spec
    info = FORMATS[name]
    return info, (sub.strip() or info.default_subtype or None)


def module_for(info: Format):
    """The format's module (see :meth:`Format.load_module`)."""
    return info.load_module()


def convert(source: Any, to: str, out: str | os.PathLike, *, options: dict[str, Any] | None = None,
            progress: bool = True, allow_pickle: bool = False, force: bool = False,
            loras: list | None = None) -> Path:
    """Convert ``source`` (path, hub id, ``tiny`` or an open TensorSource) to format spec ``to`` at ``out``.

    ``options``: the format's options as a dict (``--option`` strings or Python values) or an
    instance of its options class; an unknown key or a bad value raises OptionError before any
    work is done. ``loras`` (``FILE[:SCALE]`` strings) are merged into each weight as it streams
    through, before quantizing; every LoRA is checked against the source first, and the artifact
    records each one (file, sha256, scale). ``out`` gets the format's suffix if it has none (``x`` -> ``x.gguf``); a file
    name for a folder format (or the reverse) and an existing output without ``force`` raise
    ZoptError before any work; with ``force`` the new output replaces the old one atomically.
    """
    from .. import checkpoint
    from ..families import resolve_source
    from .options import Options
    from .outputs import check_spec, output_path

    info, sub = check_spec(to)
    out = output_path(info, out, force=force)
    opts = options if isinstance(options, Options) else info.parse_options(options)
    src = source if isinstance(source, checkpoint.TensorSource) else \
        checkpoint.open(resolve_source(source), allow_pickle=allow_pickle)
    source_spec = os.fspath(source.path) if isinstance(source, checkpoint.TensorSource) else \
        checkpoint.pinned_hub_id(os.fspath(source), src.path)
    return convert_open(src, source_spec, to, info, sub, out, opts, progress, loras, allow_pickle)


def convert_open(src: Any, source_spec: str, to: str, info: Format, sub: str | None, out: Path, opts: Any,
                 progress: bool, loras: list | None = None, allow_pickle: bool = False) -> Path:
    """The conversion itself, all checks done: open source ``src`` -> ``out``, with ``loras`` merged
    as it streams; the manifest records the command that reproduces it (``source_spec`` as its SOURCE)."""
    if src.kind == "gguf":  # a zopt GGUF is an artifact: checked before it is converted further
        from ..validate.gguf import verify_digest

        verify_digest(src.header, src.path)
    from .artifact import refuse_zopt_folder

    refuse_zopt_folder(src)
    if loras and not getattr(src, "loras", None):  # (a one-pass view of several outputs is merged already)
        from ..lora import merged_source

        src = merged_source(src, list(loras), allow_pickle=allow_pickle)
    if not Path(source_spec).expanduser().exists():  # a built-in name or Hub id, not a path
        src.spec = source_spec
    result = module_for(info).convert(src, out, sub, opts, progress, format=info.name)
    _record_command(result, command_line(to, source_spec, opts.changed(), loras))
    return result


def command_line(to: str, source: str | None, options: Any, loras: list | None = None) -> str:
    """The ``zopt convert`` command that reproduces a conversion with these user options
    (a dict, or an options instance: then its non-default recorded values)."""
    import shlex

    from .options import Options

    if isinstance(options, Options):
        options = options.changed()
    parts = ["zopt", "convert", source or "SOURCE", "--to", to]
    for spec in loras or []:
        parts += ["--lora", os.fspath(spec) if not hasattr(spec, "scale") else f"{spec.path}:{spec.scale:g}"]
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
    from .._io import atomic_path

    data = json.loads(manifest.read_text())
    data["command"] = command
    with atomic_path(manifest) as tmp:
        tmp.write_text(json.dumps(data, indent=1) + "\n")


def artifact_format(path: str | os.PathLike) -> str:
    """The format name of an artifact on disk: ``gguf`` for .gguf files, the manifest's for zopt
    folders, ``bf16`` for a plain diffusers folder, ``tiny`` for the embedded default."""
    p = Path(path)
    if os.fspath(path) == "tiny":
        return "tiny"
    if not p.exists():
        raise SourceNotFound("no such file or folder", p)
    if p.is_file():
        if p.suffix.lower() == ".gguf":
            return "gguf"
        return "safetensors"
    for cand in (p / MANIFEST_NAME, p / "transformer" / MANIFEST_NAME):
        if cand.exists():
            from .artifact import read_manifest

            return read_manifest(cand.parent)["format"]
    return "bf16"


def load(path: str | os.PathLike, device: str = "cpu", backend: Any = None, dtype: Any = None,
         hardware: Any = None, **kw: Any):
    """Load any artifact (or source checkpoint) as a ready transformer module of its family.

    The backend is selected here, once, for ``device`` on ``hardware`` (default: this machine):
    ``backend`` is a name to prefer, or a :class:`~zopt.platform.backends.Selection` already made
    (then it is used as it is). The format's loader receives the chosen name; ``kw`` goes to it too.
    The module's ``zopt_backend`` says which backend runs it. ``loras`` (``FILE[:SCALE]`` strings)
    are attached as run-time branches beside the layers (:func:`zopt.lora.add_loras`); a format
    that cannot take them (a compiled graph) is refused before loading.
    """
    from ..families import resolve_source

    loras = kw.pop("loras", None) or []
    allow_pickle = kw.pop("allow_pickle", False)

    path = resolve_source(path)
    fmt = artifact_format(path)
    info = FORMATS.get(ALIASES.get(fmt, fmt))
    if info is None:
        raise UnsupportedFormat(f"artifact has unknown format {fmt!r}", path)
    if loras and not info.runtime_lora:
        raise UnsupportedFormat(f"run-time LoRA is not possible on {info.name} (the weights are baked into the "
                                f"graph); merge it before converting: zopt convert SOURCE --lora FILE --to "
                                f"{info.name}", path)
    if not hasattr(backend, "backend") and any(b.requires for b in info.backends):
        from ..platform.hardware import detect, for_device
        from .registry import packages

        hardware = for_device(hardware or detect(packages()), device)
    backend = select_backend(info, hardware, prefer=backend)
    plain_source = fmt in ("tiny", "safetensors") or (
        fmt == "bf16" and not (Path(path) / MANIFEST_NAME).exists()
        and not (Path(path) / "transformer" / MANIFEST_NAME).exists())
    if plain_source:
        from .plain import load_source

        model = load_source(path, device=device, dtype=dtype)
    else:
        model = module_for(info).load(Path(path), device=device, backend=backend.name, dtype=dtype, **kw)
    model.zopt_backend = backend.name
    if loras:
        from ..lora import add_loras

        add_loras(model, list(loras), allow_pickle=allow_pickle)
    return model
