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

from .. import validate
from .._io import sha256_file
from ..errors import ChecksumMismatch, CorruptFile
from . import MANIFEST_NAME

MANIFEST_VERSION = 1
# What a reader must understand to rebuild an artifact correctly, beyond MANIFEST_VERSION 1; a
# manifest's ``requires`` naming anything else (a newer zopt wrote it) is refused, never misread.
KNOWN_REQUIREMENTS = frozenset({"int8-hadamard-rotation"})
DIGEST_FIELD = "manifest_sha256"
# fields outside the manifest's own digest: the digest itself, and the reproducing command that
# is added once the artifact is in place
UNDIGESTED = (DIGEST_FIELD, "command")


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces), digest and command left out."""
    import hashlib

    body = {k: v for k, v in manifest.items() if k not in UNDIGESTED}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def source_provenance(src: Any, hash_source: bool = True) -> dict[str, Any]:
    """Provenance of a TensorSource: path, kind, layout, (optionally) sha256 of its files, and the
    LoRAs merged into it (file, sha256, scale) if any."""
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
    if getattr(src, "loras", None):  # merged before converting (zopt.lora.MergedSource)
        prov["loras"] = list(src.loras)
    return prov


# diffusers picks a quantizer by ``quantization_config.quant_method`` and refuses an unknown one:
# a folder whose weights it cannot read (scales it would ignore, packed int4 it would mis-shape)
# carries this marker, so ``from_pretrained`` fails naming zopt instead of returning a wrong model
DIFFUSERS_GUARD_METHOD = "zopt"


def diffusers_guard(format: str) -> dict[str, Any]:
    """The ``quantization_config`` of a folder only zopt can load (diffusers raises
    "Unknown quantization type, got zopt")."""
    return {"quant_method": DIFFUSERS_GUARD_METHOD, "format": format,
            "load_with": "zopt.load(folder)"}


def write_config(folder: Path, config: dict[str, Any], *, zopt_only: str | None = None) -> None:
    """Write ``config.json``; ``zopt_only`` (the format name) marks a folder diffusers cannot load
    (unless the config already names a quantizer diffusers has)."""
    from ..families import for_config

    cls = for_config(config).model_class_name
    cfg = {"_class_name": cls, **{k: v for k, v in config.items() if k != "_class_name"}}
    if zopt_only and "quantization_config" not in cfg:
        cfg["quantization_config"] = diffusers_guard(zopt_only)
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
    manifest[DIGEST_FIELD] = manifest_digest(manifest)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=False) + "\n")
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked manifest of the artifact folder (types, required keys, confined paths)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        raise CorruptFile("not a zopt artifact (no zopt-manifest.json)", folder)
    m = validate.manifest(validate.read_json(path, "manifest"), path)
    # the manifest says how tensors are rebuilt, so it is checked like the files it lists
    # (manifests written before the digest existed carry none and get the structural checks only)
    if DIGEST_FIELD in m and m[DIGEST_FIELD] != manifest_digest(m):
        raise ChecksumMismatch(f"{DIGEST_FIELD} differs from the manifest's contents (corrupted or modified)", path)
    unknown = sorted(set(m.get("requires", [])) - KNOWN_REQUIREMENTS)
    if unknown:
        from ..errors import UnsupportedFormat

        raise UnsupportedFormat(f"{path}: made by a newer zopt (needs {', '.join(unknown)}); upgrade zopt to load it")
    return m


def verify_manifest(folder: str | os.PathLike, manifest: dict[str, Any] | None = None,
                    reads: list[str | os.PathLike] = ()) -> dict[str, Any]:
    """Check every file listed in the manifest (size, then sha256) and that every file in ``reads``
    (what the loader will open) is listed; raise ChecksumMismatch on the first bad one.

    Paths stay inside ``folder`` (symlinks included). ``ZOPT_VERIFY=0`` skips the hashing only.
    """
    folder = Path(folder)
    manifest = manifest or read_manifest(folder)
    mpath = folder / MANIFEST_NAME
    files = manifest["files"]
    if not files:
        raise ChecksumMismatch("manifest lists no files", mpath)
    for r in reads:
        rel = Path(os.path.relpath(r, folder)).as_posix()
        if rel not in files:
            raise ChecksumMismatch(f"{rel} would be loaded but is not listed in the manifest", mpath)
    for rel, meta in files.items():
        f = validate.confined(folder, rel, mpath, "manifest file")
        if not f.exists():
            raise ChecksumMismatch("file listed in the manifest is missing", f)
        size = validate.regular_file(f).st_size
        if size != meta["bytes"]:
            raise ChecksumMismatch(f"size {size} differs from the manifest's {meta['bytes']}", f)
        if validate.verify_enabled() and sha256_file(f) != meta["sha256"]:
            raise ChecksumMismatch("sha256 differs from the manifest (corrupted or modified)", f)
    _same_config(folder, manifest, mpath)
    return manifest


def _same_config(folder: Path, manifest: dict[str, Any], mpath: Path) -> None:
    """The manifest's config (which loaders build from) must agree with the checksummed config.json."""
    if "config.json" not in manifest["files"]:
        return
    written = validate.read_json(folder / "config.json", "config.json")
    if not isinstance(written, dict):
        raise CorruptFile("config.json is not a JSON object", folder / "config.json")
    cfg = manifest["config"]
    for k in sorted((set(cfg) | set(written)) & validate.CONFIG_KEYS - {"quantization_config"}):
        if written.get(k) != cfg.get(k):
            raise ChecksumMismatch(f"manifest config {k}={str(cfg.get(k))[:40]} differs from config.json", mpath)


def refuse_zopt_folder(src: Any) -> None:
    """A zopt artifact whose weights are stored quantized (fp8 with scales, packed int4, ...) is an
    output, not a source: one ZoptError naming its format and the source it was made from.
    Plain artifacts (bf16/fp16/fp32, whose folders hold ordinary diffusers weights) pass."""
    from ..errors import ZoptError
    from .plain import DTYPES

    path = Path(src.path)
    folder = path if path.is_dir() else path.parent
    if not (folder / MANIFEST_NAME).exists():
        return
    m = read_manifest(folder)
    if m["format"] in DTYPES:
        return
    origin = (m.get("source") or {}).get("path")
    raise ZoptError(f"is a zopt {m['format']} artifact (quantized weights), not a source; convert from the "
                    f"checkpoint it was made from{f' ({origin})' if origin else ''}", folder)
