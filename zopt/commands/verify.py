"""zopt verify REPO_DIR: every checksum of a published folder, and every variant loads."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("repo_dir", help="folder written by zopt publish")
    p.add_argument("--no-load", action="store_true", help="check checksums only, do not load the variants")


def run(args) -> int:
    from ..publish import verify

    manifest = verify(args.repo_dir, load=not args.no_load)
    n = len(manifest.get("files", {}))
    v = len(manifest.get("variants", []))
    print(f"ok: {n} files match their sha256" + ("" if args.no_load else f"; {v} variants load"))
    return 0
