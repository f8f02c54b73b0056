"""zopt publish VARIANT... -o REPO_DIR: a Hub-ready folder with a measured model card."""

from __future__ import annotations


def add_arguments(p) -> None:
    p.add_argument("variants", nargs="+", help="converted variants: .gguf files and/or zopt artifact folders")
    p.add_argument("-o", "--out", required=True, help="repository folder to create (must not exist or be empty)")
    p.add_argument("--repo-id", default=None, help="user/name on the Hugging Face Hub")
    p.add_argument("--bench", action="append", default=[], metavar="RECORDS",
                   help="benchmark results (zopt bench JSON file or folder) whose figures go in the card")
    p.add_argument("--license", default=None, help="license of the base model (default: apache-2.0, Z-Image's)")
    p.add_argument("--base-model", default="Tongyi-MAI/Z-Image-Turbo")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--copy", action="store_true", help="copy files instead of hard-linking them")
    how.add_argument("--move", action="store_true", help="move the variants into the folder")
    p.add_argument("--push", action="store_true", help="upload to the Hub after assembling (needs --repo-id)")
    p.add_argument("--private", action="store_true")
    p.add_argument("--revision", default=None, help="branch to upload to")


def run(args) -> int:
    from ..errors import ZoptError
    from ..publish import assemble, push

    if args.push and not args.repo_id:
        raise ZoptError("--push needs --repo-id user/name")
    from pathlib import Path

    records, roots = [], {}
    if args.bench:
        from ..bench.schema import load_records

        for path in args.bench:
            loaded = load_records(path)
            root = Path(path) if Path(path).is_dir() else Path(path).parent  # image paths are relative to it
            roots.update({id(r): root for r in loaded})
            records += loaded
    mode = "copy" if args.copy else "move" if args.move else "link"
    from ..progress import note

    note(f"publishing {len(args.variants)} variant{'s' * (len(args.variants) != 1)} to {args.out}: "
         "checking each one's checksums")
    out = assemble(args.variants, args.out, repo_id=args.repo_id, records=records, license=args.license,
                   base_model=args.base_model, mode=mode, record_roots=roots)
    print(f"wrote {out} (model card: {out / 'README.md'})")
    if args.push:
        where = push(out, args.repo_id, private=args.private, revision=args.revision)
        print(f"uploaded to {where}")
    return 0
