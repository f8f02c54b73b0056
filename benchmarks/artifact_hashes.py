"""sha256 of every data file zopt writes for the tiny model with default options, as JSON.

Run it before and after a change to the converters and compare the two outputs: a refactoring
must leave the bytes unchanged. Manifests (``zopt-manifest.json``) are left out: they carry a
creation time. ``--out FILE`` also writes the JSON to FILE; ``--compare FILE`` exits 1 on any
difference from an earlier run.

    python benchmarks/artifact_hashes.py --out /tmp/before.json
    python benchmarks/artifact_hashes.py --compare /tmp/before.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

SPECS = ("gguf:Q8_0", "gguf:Q4_K_M", "gguf:Q3_K_S", "gguf:Q2_K", "gguf:BF16", "gguf:Q5_K_M", "gguf:Q4_0",
         "bf16", "fp16", "fp8", "fp8:e5m2", "int8", "int8_w8a8", "int4", "int4:g64", "nf4")
LAYOUTS = (("fp8", "comfy"),)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def hashes() -> dict[str, dict[str, str]]:
    import zopt

    out: dict[str, dict[str, str]] = {}
    jobs = [(s, {}) for s in SPECS] + [(s, {"layout": lay}) for s, lay in LAYOUTS]
    with tempfile.TemporaryDirectory() as tmp:
        for spec, options in jobs:
            label = spec + "".join(f" {k}={v}" for k, v in options.items())
            dest = Path(tmp) / label.replace(":", "-").replace(" ", "_").replace("=", "-")
            if spec.startswith("gguf"):
                dest = dest.with_suffix(".gguf")
            res = zopt.convert("tiny", spec, dest, options=options, progress=False)
            files = [res] if res.is_file() else sorted(p for p in res.rglob("*") if p.is_file())
            out[label] = {(f.relative_to(res).as_posix() if res.is_dir() else f.name): _sha(f)
                          for f in files if f.name != "zopt-manifest.json"}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", type=Path)
    args = ap.parse_args()
    got = hashes()
    text = json.dumps(got, indent=1, sort_keys=True)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.compare:
        want = json.loads(args.compare.read_text())
        bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        for k in bad:
            print(f"DIFFERENT: {k}", file=sys.stderr)
        print(f"{len(got) - len(bad)} of {len(set(want) | set(got))} artifacts byte-identical", file=sys.stderr)
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
