"""zopt convert SOURCE --to FORMAT[:TYPE] -o OUT."""

from __future__ import annotations

from pathlib import Path


def add_arguments(p) -> None:
    p.add_argument("source", nargs="?", help="checkpoint: .safetensors, .gguf, diffusers folder, 'tiny' or owner/name[@rev]")
    p.add_argument("--to", dest="to", help="target, e.g. gguf:Q4_K_M, gguf:Q8_0, fp8, int8, int8_w8a8, int4, nf4, "
                   "onnx:fp32; several comma separated (gguf:Q8_0,gguf:Q4_K_M,fp8) are written in one pass over "
                   "the source into the -o folder")
    p.add_argument("-o", "--out", help="output file (.gguf, added if missing) or folder (default: "
                   "exports/<model>-<TYPE>.gguf, exports/<model>-<format>[-<subtype>][-<layout>]/)")
    p.add_argument("--force", action="store_true", help="replace an existing output (atomically)")
    p.add_argument("--keep", action="append", default=[], metavar="PATTERN",
                   help="regex of tensor names to keep unquantized (overrides the Z-Image policy)")
    p.add_argument("--quantize", action="append", default=[], metavar="PATTERN",
                   help="regex of tensor names to quantize even if the policy keeps them")
    p.add_argument("--layout", choices=["diffusers", "comfy"], default=None,
                   help="artifact layout where a format offers several (fp8: comfy = ComfyUI scaled-FP8 single file)")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="format option, e.g. group_size=64, double_quant=true, fp8=e5m2 (each format's "
                        "options: docs/formats.md; an unknown key is an error)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="merge a LoRA into the weights before quantizing (repeatable; scale default 1)")
    p.add_argument("--imatrix", metavar="FILE", help="importance matrix (zopt calibrate, llama.cpp or "
                   "stable-diffusion.cpp) for importance-weighted quantization")
    p.add_argument("--target-bpw", type=float, metavar="BITS", help="gguf:auto: file size as bits per parameter")
    p.add_argument("--target-size", metavar="SIZE", help="gguf:auto: file size, e.g. 5GB or 800MB")
    p.add_argument("--list-types", action="store_true", help="list formats and types with bits per weight")
    p.add_argument("--allow-pickle", action="store_true", help="accept .ckpt/.pt/.bin (loaded with weights_only=True)")
    p.add_argument("--no-hash", action="store_true", help="skip hashing the source for provenance")
    p.add_argument("--no-progress", action="store_true")


def _value(v: str):
    low = v.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v


def list_types() -> list[tuple[str, str, str]]:
    """(spec, bits per weight, summary) for every format and subtype."""
    import importlib

    from ..formats import FORMATS

    rows = []
    for f in FORMATS.values():
        try:
            mod = importlib.import_module(f.module)
        except ImportError:
            mod = None
        if mod is not None and hasattr(mod, "list_types"):
            for sub, bits, summary in mod.list_types():
                rows.append((f"{f.name}:{sub}", f"{bits:.2f}" if bits else "-", summary))
        else:
            rows.append((f.name, f"{f.bits:.0f}" if f.bits else "-", f.summary))
    return rows


def default_out(source: str, to: str, layout: str | None = None) -> Path:
    """The output path when no ``-o`` is given (see :func:`zopt.formats.outputs.default_output`)."""
    from ..formats.outputs import default_output

    return default_output(source, to, layout)


def run(args) -> int:
    from ..errors import ZoptError
    from ..formats import convert

    if args.list_types:
        from rich.console import Console
        from rich.table import Table

        t = Table("--to", "bits/weight", "what")
        for row in list_types():
            t.add_row(*row)
        Console().print(t)
        return 0
    if not args.source or not args.to:
        raise ZoptError("convert needs SOURCE and --to FORMAT (see --list-types)")
    from ..formats.outputs import check_spec, output_path
    from ..progress import note

    specs = [t.strip() for t in args.to.split(",") if t.strip()]
    infos = [check_spec(t)[0] for t in specs]  # before the source is read: a typo costs nothing
    from ..lora.files import LoraSpec

    for spec in args.lora:  # a scale that is not a number fails here too
        LoraSpec.parse(spec)
    options = {}
    for kv in args.option:
        if "=" not in kv:
            raise ZoptError(f"--option {kv!r} is not KEY=VALUE")
        k, v = kv.split("=", 1)
        options[k.strip()] = _value(v.strip())
    if args.keep:
        options["keep"] = args.keep
    if args.quantize:
        options["quantize"] = args.quantize
    if args.layout:
        options["layout"] = args.layout
    if args.no_hash:
        options["hash_source"] = False
    for key in ("imatrix", "target_bpw", "target_size"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if len(specs) > 1:
        return _convert_many(args, specs, options, note)
    out = Path(args.out) if args.out else default_out(args.source, args.to, args.layout)
    out = output_path(infos[0], args.out if args.out else out, force=args.force)
    typed = infos[0].parse_options(options)  # an unknown key or bad value fails here, before any work
    note(f"converting {args.source} to {specs[0]} -> {out}")
    result = convert(args.source, specs[0], out, options=typed, progress=not args.no_progress,
                     allow_pickle=args.allow_pickle, force=args.force, loras=args.lora)
    print(f"wrote {result} ({_size(result)})")
    if infos[0].name == "gguf":
        _print_auto_types(result, every=specs[0].partition(":")[2].strip().lower() == "auto")
    return 0


def _size(path: Path) -> str:
    n = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _convert_many(args, specs: list[str], options: dict, note) -> int:
    """Several targets: -o names the folder that receives each one under its default name."""
    from ..formats.multi import convert_many, split_options
    from ..formats.outputs import check_spec, output_path

    folder = Path(args.out or "exports")
    if folder.suffix.lower() in (".gguf", ".safetensors") or (folder.exists() and not folder.is_dir()):
        from ..errors import ZoptError

        raise ZoptError("several targets need a folder for -o (each is written under its default name)", folder)
    targets = [(t, folder / default_out(args.source, t, args.layout).name) for t in specs]
    shares = split_options(options, [check_spec(t)[0].name for t in specs])
    for t in specs:  # every option checked for every target before the note and the source
        info = check_spec(t)[0]
        info.parse_options(shares[info.name])
    for t, out in targets:
        output_path(check_spec(t)[0], out, force=args.force)
    note(f"converting {args.source} to {len(specs)} formats in one pass -> {folder}/")
    results, shared = convert_many(args.source, targets, options=options, progress=not args.no_progress,
                                   allow_pickle=args.allow_pickle, force=args.force, loras=args.lora)
    for r in results:
        print(f"wrote {r} ({_size(r)})")
    print(f"read the source once: {shared.reads} tensor reads for {len(shared.src.names())} tensors "
          f"({shared.rereads} read again)")
    return 0


def _print_auto_types(path: Path, every: bool) -> None:
    """The per-tensor types measurement chose, as recorded in the file: gguf:auto's (``every``: one
    line per tensor) or a re-tuned recipe's (the count per type); nothing for a rule's file."""
    import json
    from collections import Counter

    from .. import checkpoint
    from ..formats.gguf import AUTO_TYPES_KEY

    meta = checkpoint.open(path).metadata
    if AUTO_TYPES_KEY not in meta:
        return
    types = json.loads(meta[AUTO_TYPES_KEY])
    counts = sorted(Counter(types.values()).items())
    on = " (weight errors alone)"
    if "zopt.sensitivity.calls.description" in meta:
        d = json.loads(meta["zopt.sensitivity.calls.description"])
        way = d.get("measured_types")
        file = meta.get("zopt.sensitivity.calls.file") or d.get("description", "")
        if way == "gradient":  # weight errors times each tensor's gain from the model's gradient
            over = f"calls ({file})" if meta.get("zopt.sensitivity.calls.file") else "seeded random calls"
            on = f" (weight error x output gain from the model's gradient on {d.get('calls')} {over})"
        else:
            way = {"one": "one run per tensor", "all": "one run per tensor and type"}.get(way, "")
            on = f" on the model's output over {d.get('calls')} calls ({file}{', ' + way if way else ''})"
    if not every:  # the quantized tensors: what measurement chose among
        moved = ", ".join(f"{t}: {n}" for t, n in counts if t not in ("F32", "F16", "BF16"))
        print(f"quantized types chosen by measured sensitivity{on} within the recipe's bytes ({moved}); "
              f"per tensor: the header's {AUTO_TYPES_KEY}")
        return
    bpw = meta.get("zopt.bits_per_weight")
    try:
        bpw = f"{float(bpw):.3f}"
    except (TypeError, ValueError):  # a file without the key (or another zopt's spelling of it)
        pass
    print(f"{bpw} bits/weight; types chosen by measured sensitivity{on}; " +
          ", ".join(f"{t}: {n}" for t, n in counts))
    for name, t in types.items():
        print(f"  {t:5} {name}")
