"""Self-describing artifacts: the manifest every zopt folder carries, and its verification.

A manifest records what was converted from what, how each tensor is stored and the sha256 of
every file, so ``load`` needs only the artifact and a tampered file is refused.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

from .._io import sha256_file
from ..errors import ChecksumMismatch, CorruptFile
from . import MANIFEST_NAME

MANIFEST_VERSION = 1


def source_provenance(src: Any, hash_source: bool = True) -> dict[str, Any]:
    """Provenance of a TensorSource: path, kind, layout and (optionally) sha256 of its files."""
    from ..families import detect

    det = detect(src).detect(src)
    prov: dict[str, Any] = {
        "path": os.fspath(src.path),
        "kind": src.kind,
        "layout": det.layout,
        "variant": det.variant,
        "bytes": sum(f.stat().st_size for f in src.files),
    }
    if hash_source:
        prov["sha256"] = src.sha256()
    return prov


def write_config(folder: Path, config: dict[str, Any]) -> None:
    from ..families import for_config

    cls = for_config(config).model_class_name
    cfg = {"_class_name": cls, **{k: v for k, v in config.items() if k != "_class_name"}}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def write_manifest(
    folder: Path,
    *,
    format: str,
    subtype: str | None,
    options: dict[str, Any],
    source: dict[str, Any],
    config: dict[str, Any],
    tensors: dict[str, dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Hash every file in ``folder`` and write ``zopt-manifest.json`` beside them."""
    from .._version import __version__
    from ..families import for_config

    files = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        rel = f.relative_to(folder).as_posix()
        files[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
    manifest = {
        "zopt_manifest": MANIFEST_VERSION,
        "format": format,
        "subtype": subtype,
        "options": options,
        "zopt_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "family": for_config(config).name,
        "source": source,
        "config": config,
        "tensors": tensors,
        "files": files,
        **(extra or {}),
    }
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CorruptFile("not a zopt artifact (no zopt-manifest.json)", folder) from None
    except json.JSONDecodeError as e:
        raise CorruptFile(f"manifest is not valid JSON ({e.msg})", path) from None


def verify_manifest(folder: str | os.PathLike, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """Check every file listed in the manifest (size, then sha256); raise ChecksumMismatch on the first bad one."""
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    for rel, meta in manifest.get("files", {}).items():
        f = folder / rel
        if not f.exists():
            raise ChecksumMismatch("file listed in the manifest is missing", f)
        if f.stat().st_size != meta["bytes"]:
            raise ChecksumMismatch(f"size {f.stat().st_size} differs from the manifest's {meta['bytes']}", f)
        if sha256_file(f) != meta["sha256"]:
            raise ChecksumMismatch("sha256 differs from the manifest (corrupted or modified)", f)
    return manifest
