"""zopt verify PATH: every checksum of a published folder or of one artifact (folder or .gguf),
and that every variant loads."""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("repo_dir", metavar="PATH",
                   help="folder written by zopt publish, or one artifact: a zopt folder or .gguf file")
    p.add_argument("--no-load", action="store_true", help="check checksums only, do not load the variants")
    p.add_argument("--no-progress", action="store_true")


def _size(paths) -> str:
    n = sum(f.stat().st_size for f in paths if f.is_file())
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def run(args) -> int:
    from ..errors import SourceNotFound
    from ..progress import note

    path = Path(args.repo_dir)
    if not path.exists():
        raise SourceNotFound("no such file or folder", path)
    if path.is_dir() and (path / "zopt-publish.json").exists():
        return _verify_published(path, args, note)
    return _verify_artifact(path, args, note)


def _verify_published(path: Path, args, note) -> int:
    import json

    from ..progress import progress_bar
    from ..publish import verify

    files = json.loads((path / "zopt-publish.json").read_text()).get("files", {})  # validated inside verify
    note(f"checking the sha256 of {len(files)} files ({_size(path.rglob('*'))})"
         + ("" if args.no_load else ", then loading every variant"))
    with progress_bar(len(files) if isinstance(files, dict) else 0, "verify", enabled=not args.no_progress) as bar:
        manifest = verify(path, load=not args.no_load, progress=lambda rel: bar.advance(1))
    n = len(manifest.get("files", {}))
    v = len(manifest.get("variants", []))
    print(f"ok: {n} files match their sha256" + ("" if args.no_load else f"; {v} variants load"))
    return 0


def _verify_artifact(path: Path, args, note) -> int:
    from ..errors import CorruptFile
    from ..formats import MANIFEST_NAME, artifact_format

    fmt = artifact_format(path)
    if fmt == "gguf":
        from .. import checkpoint
        from ..validate.gguf import verify_digest

        note(f"checking the checksum of {path.name} ({_size([path])})")
        verify_digest(checkpoint.open(path).header, path)
        what = "its zopt.sha256 matches"
    else:
        folder = path / "transformer" if (path / "transformer" / MANIFEST_NAME).exists() else path
        if not (folder / MANIFEST_NAME).exists():
            raise CorruptFile(f"not a zopt artifact or publish folder (no {MANIFEST_NAME} or zopt-publish.json)",
                              path)
        from ..formats.artifact import read_manifest, verify_manifest

        manifest = read_manifest(folder)
        note(f"checking the sha256 of {len(manifest['files'])} files ({_size(folder.rglob('*'))})")
        verify_manifest(folder, manifest)
        what = f"{len(manifest['files'])} files match their sha256"
    if not args.no_load:
        from .. import formats

        note(f"loading {path.name} ({fmt})")
        formats.load(path, device="cpu")
    print(f"ok: {path}: {what}" + ("" if args.no_load else f"; it loads ({fmt})"))
    return 0
