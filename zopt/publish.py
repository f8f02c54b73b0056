"""Publish converted variants as a Hugging Face Hub-ready folder with a measured model card.

``assemble`` puts variant files where each ecosystem expects them (GGUF files at the top level,
artifact folders as subfolders), hard-links instead of copying where the filesystem allows,
writes ``README.md`` (YAML front matter + a table built from benchmark records) and
``zopt-publish.json`` (sha256 of every file + provenance). ``verify`` re-checks it; ``push``
uploads it with huggingface_hub.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ._io import atomic_path, sha256_file
from .card import CARD_METRICS, _get  # noqa: F401  (the card's columns, also read by callers of publish)
from .errors import ChecksumMismatch, CorruptFile, SourceNotFound, UnknownArchitecture, ZoptError

PUBLISH_MANIFEST = "zopt-publish.json"
MANIFEST_VERSION = 1


@dataclass
class Variant:
    """What a published file or folder is, read from its own metadata (never from the source)."""

    name: str  # file or folder name inside the repo
    kind: str  # "file" | "folder"
    format: str
    subtype: str | None
    spec: str  # e.g. "gguf:Q4_K_M", "fp8"
    bytes: int
    params: int | None
    bits_per_weight: float | None
    source_sha256: str | None
    source_name: str | None
    zopt_version: str | None
    command: str
    config: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


def _params(config: dict[str, Any]) -> int | None:
    from .families import for_config

    try:
        return sum(_prod(s) for s in for_config(config).expected_shapes(config).values())
    except (KeyError, TypeError, ValueError, UnknownArchitecture):
        return None


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _source_name(path: str | None) -> str | None:
    """A readable name for a source path (a diffusers ``transformer/`` folder goes by its parent's)."""
    if not path:
        return None
    p = Path(path)
    return p.parent.name if p.name == "transformer" and p.parent.name else p.name


def _command(spec: str, source: str | None, options: dict[str, Any]) -> str:
    from .formats import command_line

    return command_line(spec, source, options)


def describe_variant(path: str | os.PathLike) -> Variant:
    """Read a variant's format, type, provenance and size from the artifact alone."""
    from .formats import artifact_format

    p = Path(path)
    if not p.exists() and not p.is_symlink():
        raise SourceNotFound("no such file or folder", p)
    _refuse_links(p)
    fmt = artifact_format(p)
    if fmt == "gguf":
        from . import checkpoint
        from .validate.gguf import verify_digest

        src = checkpoint.open(p)
        verify_digest(src.header, p)
        md = src.metadata
        recipe = md.get("zopt.recipe") or md.get("general.file_type", "?")
        config = json.loads(md.get("zopt.config", "{}"))  # checked when the header was read
        if not config:
            from .families import detect

            config = detect(src).infer_config(src)
        params = _params(config) if config else src.num_params()
        size = p.stat().st_size
        bpw = float(md["zopt.bits_per_weight"]) if "zopt.bits_per_weight" in md else (8 * size / params if params else None)
        spec = f"gguf:{recipe}"
        return Variant(p.name, "file", "gguf", recipe, spec, size, params, bpw, md.get("zopt.source.sha256") or None,
                       md.get("zopt.source.name") or None, md.get("zopt.version"),
                       _command(spec, md.get("zopt.source.name"), {}), config)
    folder = p / "transformer" if (p / "transformer").is_dir() and not (p / "zopt-manifest.json").exists() else p
    from .formats.artifact import read_manifest, verify_manifest

    m = verify_manifest(folder, read_manifest(folder))
    unlisted = sorted(f.relative_to(folder).as_posix() for f in folder.rglob("*")
                      if f.is_file() and f.name != "zopt-manifest.json"
                      and f.relative_to(folder).as_posix() not in m["files"])
    if unlisted:
        raise ChecksumMismatch("is not listed in the variant's manifest; publish copies only verified files",
                               folder / unlisted[0])
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    weights = sum(f.stat().st_size for f in folder.rglob("*") if f.suffix in (".safetensors", ".onnx", ".data", ".engine"))
    config = m.get("config", {})
    params = _params(config)
    spec = f"{m['format']}:{m['subtype']}" if m.get("subtype") else m["format"]
    src = m.get("source", {})
    name = _source_name(src.get("path"))
    return Variant(p.name, "folder", m["format"], m.get("subtype"), spec, size, params,
                   (8 * weights / params) if params else None, src.get("sha256"), name,
                   m.get("zopt_version"), m.get("command") or _command(spec, name, {}), config, m.get("options", {}))


def _refuse_links(p: Path) -> None:
    """A variant must be made of regular files and folders: a symlink could pull in anything."""
    if p.is_symlink():
        raise ZoptError("is a symlink; publish takes only regular files and folders", p)
    for root, dirs, files in os.walk(p):
        for n in dirs + files:
            q = Path(root) / n
            if q.is_symlink():
                raise ZoptError("is a symlink; publish takes only regular files and folders", q)
            if n in files and not q.is_file():
                raise ZoptError("is not a regular file; publish takes only regular files and folders", q)


# ---------------------------------------------------------------------------------------------
# benchmark records


def match_records(variants: list[Variant], records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """variant name -> the ok benchmark record of the same format (and type and source, when both say)."""
    out: dict[str, dict[str, Any]] = {}
    for v in variants:
        for r in records:
            if r.get("status") != "ok":
                continue
            fmt = r.get("format") or {}
            name, sub = fmt.get("name") or fmt.get("spec", "").partition(":")[0], fmt.get("subtype")
            # "fp8" benchmarked is the same variant as an fp8 artifact whose manifest says "e4m3"
            if name.lower() != v.format.lower() or (sub and v.subtype and sub.lower() != v.subtype.lower()):
                continue
            rsha = (r.get("source") or {}).get("sha256")
            if rsha and v.source_sha256 and rsha != v.source_sha256:
                continue
            out[v.name] = r
            break
    return out


def reference_record(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in records if r.get("role") == "reference" and r.get("status") == "ok"), None)


# ---------------------------------------------------------------------------------------------
# assembling


def _place(src: Path, dst: Path, mode: str) -> str:
    """Put ``src`` at ``dst`` by hard link (default), move or copy; returns what was done."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if mode == "move":
        shutil.move(src, dst)
        return "moved"
    if mode == "link":
        try:
            os.link(src, dst)
            return "linked"
        except OSError:
            pass  # another filesystem, or links unsupported: copy
    shutil.copy2(src, dst)
    return "copied"


def _place_tree(src: Path, dst: Path, mode: str) -> str:
    if src.is_file():
        return _place(src, dst, mode)
    how = set()
    for f in sorted(src.rglob("*")):
        if f.is_file():
            how.add(_place(f, dst / f.relative_to(src), mode))
    if mode == "move":
        shutil.rmtree(src, ignore_errors=True)
    return "/".join(sorted(how)) or "empty"


def assemble(
    variants: list[str | os.PathLike],
    out: str | os.PathLike,
    *,
    repo_id: str | None = None,
    records: list[dict[str, Any]] | None = None,
    license: str | None = None,
    base_model: str = "Tongyi-MAI/Z-Image-Turbo",
    mode: str = "link",
    record_roots: dict[int, str | os.PathLike] | None = None,
) -> Path:
    """Build the repository folder at ``out`` (atomically) and return it; ``record_roots`` maps
    ``id(record)`` to the folder its image paths are relative to (the card's image grid)."""
    from ._version import __version__
    from .card import render_card, write_grid

    if not variants:
        raise ZoptError("publish needs at least one variant")
    described = [describe_variant(v) for v in variants]
    names = [d.name for d in described]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ZoptError(f"two variants would be published as {sorted(dupes)[0]!r}; rename one")
    records = records or []
    matched = match_records(described, records)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ZoptError("output folder exists and is not empty", out)
    with atomic_path(out, is_dir=True) as tmp:
        placed = {}
        for path, v in zip(variants, described):
            placed[v.name] = _place_tree(Path(path), tmp / v.name, "copy" if mode == "move" else mode)
        gguf_cfg = next((v.config for v in described if v.kind == "file" and v.config), None)
        if gguf_cfg:  # from_single_file(..., config=<repo>) needs the transformer config beside the files
            from .formats.artifact import write_config

            write_config(tmp, gguf_cfg)
        reference = reference_record(records)
        grid = write_grid(described, matched, reference, record_roots or {}, tmp)
        card = render_card(described, matched, reference, repo_id=repo_id, license=license,
                           base_model=base_model, zopt_version=__version__, grid=grid)
        (tmp / "README.md").write_text(card)
        files = {}
        for f in sorted(q for q in tmp.rglob("*") if q.is_file()):
            rel = f.relative_to(tmp).as_posix()
            files[rel] = {"sha256": sha256_file(f), "bytes": f.stat().st_size}
        manifest = {
            "zopt_publish": MANIFEST_VERSION,
            "zopt_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "repo_id": repo_id,
            "base_model": base_model,
            "variants": [asdict(v) | {"placed": placed[v.name]} for v in described],
            "benchmarks": {name: r.get("run_id") for name, r in matched.items()},
            "files": files,
        }
        (tmp / PUBLISH_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if mode == "move":
        for path in variants:
            p = Path(path)
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return out


# ---------------------------------------------------------------------------------------------
# verifying and pushing


def verify(repo_dir: str | os.PathLike, load: bool = True, progress=None) -> dict[str, Any]:
    """Check every file's sha256 against ``zopt-publish.json`` and that every variant loads.

    Raises ChecksumMismatch (or the loader's error) naming the first bad file.
    """
    from . import validate

    repo = Path(repo_dir)
    mpath = repo / PUBLISH_MANIFEST
    if not mpath.exists():
        raise CorruptFile(f"not a zopt publish folder (no {PUBLISH_MANIFEST})", repo)
    manifest = validate.publish_manifest(validate.read_json(mpath, "publish manifest"), mpath)
    listed = manifest["files"]
    # walk without following links: whatever is in the folder is what gets uploaded
    present: list[str] = []
    for root, dirs, files in os.walk(repo):
        for n in sorted(dirs + files):
            q = Path(root) / n
            rel = q.relative_to(repo).as_posix()
            if rel == ".cache" or rel.startswith(".cache/huggingface"):
                continue  # huggingface_hub's own upload bookkeeping
            if q.is_symlink():
                raise ChecksumMismatch("is a symlink; a published folder holds only regular files", q)
            if n in files and rel != PUBLISH_MANIFEST:
                present.append(rel)
    for rel, meta in listed.items():
        f = validate.confined(repo, rel, mpath, "publish manifest file")
        if not f.exists():
            raise ChecksumMismatch("listed in the manifest but missing", f)
        if validate.regular_file(f).st_size != meta["bytes"] or sha256_file(f) != meta["sha256"]:
            raise ChecksumMismatch("sha256 differs from the publish manifest (corrupted or modified)", f)
        if progress:
            progress(rel)
    extra = sorted(set(present) - set(listed))
    if extra:
        raise ChecksumMismatch("file is not listed in the publish manifest", repo / extra[0])
    if load:
        from . import formats

        for v in manifest["variants"]:
            formats.load(repo / v["name"], device="cpu")
    return manifest


def push(repo_dir: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
         token: str | None = None, api=None) -> str:
    """Upload the folder to the Hub: create the repo (and branch), then upload, resumably when large.

    Fails at once, leaving the folder untouched, when there is no token or the Hub is unreachable.
    ``api`` defaults to ``huggingface_hub.HfApi``.
    """
    from huggingface_hub import constants, get_token

    from .checkpoint import _endpoint_reachable

    repo = Path(repo_dir)
    verify(repo, load=False)
    token = token or get_token()
    if not token:
        raise ZoptError("no Hugging Face token: set HF_TOKEN or run 'hf auth login'; the folder is kept", repo)
    if api is None:
        if constants.HF_HUB_OFFLINE or not _endpoint_reachable(constants.ENDPOINT):
            raise ZoptError("the Hugging Face Hub is unreachable (offline); the folder is kept for a later --push", repo)
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, private=private, repo_type="model", exist_ok=True)
    if revision:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    total = sum(f.stat().st_size for f in repo.rglob("*") if f.is_file())
    if total > 1 << 30:
        # chunked, resumable upload for multi-GB variants (re-running resumes where it stopped)
        api.upload_large_folder(repo_id=repo_id, folder_path=str(repo), repo_type="model", revision=revision,
                                private=private)
    else:
        api.upload_folder(repo_id=repo_id, folder_path=str(repo), repo_type="model", revision=revision,
                          commit_message="Upload quantized Z-Image variants (zopt publish)")
    return f"{repo_id}@{revision or 'main'}"
