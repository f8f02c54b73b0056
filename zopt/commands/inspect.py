"""zopt inspect SOURCE: family, variant, layout, parameters, dtype histogram, bytes (headers only)."""

from __future__ import annotations

import json
from collections import Counter


def add_arguments(p) -> None:
    p.add_argument("source", help="checkpoint: .safetensors, .gguf, diffusers folder, 'tiny' or owner/name[@rev]")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--tensors", action="store_true", help="also list every tensor")
    p.add_argument("--allow-pickle", action="store_true", help="open .ckpt/.pt/.bin (weights_only=True)")


def describe(src) -> dict:
    from ..families import detect

    family = detect(src)
    det = family.detect(src)
    infos = src.infos()
    hist_params: Counter = Counter()
    hist_bytes: Counter = Counter()
    for i in infos:
        hist_params[i.dtype] += i.numel
        hist_bytes[i.dtype] += i.nbytes
    cfg = family.infer_config(src)
    return {
        "path": str(src.path),
        "kind": src.kind,
        "family": det.family,
        "variant": det.variant,
        "layout": det.layout,
        "prefix": det.prefix,
        "parameters": sum(i.numel for i in infos),
        "tensors": len(infos),
        "bytes": sum(i.nbytes for i in infos),
        "file_bytes": sum(f.stat().st_size for f in src.files),
        "dtypes": {k: {"parameters": hist_params[k], "bytes": hist_bytes[k]} for k in sorted(hist_params)},
        "config": {k: cfg[k] for k in ("dim", "n_layers", "n_refiner_layers", "n_heads", "cap_feat_dim", "in_channels")},
        "metadata_keys": sorted(src.metadata)[:50],
    }


def run(args) -> int:
    from .. import checkpoint
    from ..families import detect, resolve_source

    src = checkpoint.open(resolve_source(args.source), allow_pickle=args.allow_pickle)
    d = describe(src)
    family = detect(src)
    if args.tensors:
        d["tensor_list"] = [
            {"name": i.name, "shape": list(i.shape), "dtype": i.dtype, "bytes": i.nbytes,
             "sensitive": (r.reason if (r := family.sensitive_reason(i.name)) else None)}
            for i in src.infos()
        ]
    if args.json:
        print(json.dumps(d, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    c = Console()
    c.print(f"[bold]{d['path']}[/bold]  ({d['kind']})")
    c.print(f"family {d['family']}   variant {d['variant']}   layout {d['layout']}"
            + (f"   prefix '{d['prefix']}'" if d["prefix"] else ""))
    c.print(f"parameters {d['parameters']:,}   tensors {d['tensors']}   "
            f"data {d['bytes'] / 1e9:.3f} GB   on disk {d['file_bytes'] / 1e9:.3f} GB")
    c.print("config " + "  ".join(f"{k}={v}" for k, v in d["config"].items()))
    t = Table("dtype", "parameters", "bytes", "share")
    for k, v in d["dtypes"].items():
        t.add_row(k, f"{v['parameters']:,}", f"{v['bytes']:,}", f"{100 * v['parameters'] / max(1, d['parameters']):.1f}%")
    c.print(t)
    if args.tensors:
        tt = Table("tensor", "shape", "dtype", "sensitive")
        for r in d["tensor_list"]:
            tt.add_row(r["name"], "x".join(map(str, r["shape"])), r["dtype"], "yes" if r["sensitive"] else "")
        c.print(tt)
    return 0
