"""Full-size synthetic checkpoint: write it streaming, then inspect it from headers alone.

    python benchmarks/scale_foundation.py [--path /work/bench-data/zimage-full-synth.safetensors]

Prints wall time and peak RSS of `zopt synth --size full` (skipped when the file exists) and of
`zopt inspect`, and the parameter count inspect reports (6,154,908,736 expected).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import run_measured, zopt_argv  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--path", default="/work/bench-data/zimage-full-synth.safetensors")
    args = ap.parse_args()
    path = Path(args.path)
    if not path.exists():
        wall, rss, p = run_measured(zopt_argv("synth", "--size", "full", "-o", str(path), "--no-progress"))
        if p.returncode:
            print(p.stderr, file=sys.stderr)
            return 1
        size = path.stat().st_size
        print(f"synth full   : {wall:7.1f} s  {size / 1e9:.2f} GB  {size / wall / 1e6:.0f} MB/s  peak RSS {rss / 2**20:.0f} MiB")
    # inspect in a fresh child per measurement (ru_maxrss of children is a running max)
    out = subprocess.run(
        [sys.executable, "-c", (
            "import sys,time,subprocess,resource,json;"
            "t=time.perf_counter();"
            f"p=subprocess.run({zopt_argv('inspect', str(path), '--json')!r},capture_output=True,text=True);"
            "w=time.perf_counter()-t;"
            "print(json.dumps({'wall':w,'rss':resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024,"
            "'rc':p.returncode,'out':p.stdout,'err':p.stderr}))"
        )],
        capture_output=True, text=True,
    )
    r = json.loads(out.stdout)
    if r["rc"]:
        print(r["err"], file=sys.stderr)
        return 1
    d = json.loads(r["out"])
    print(f"inspect full : {r['wall']:7.2f} s  peak RSS {r['rss'] / 2**20:.0f} MiB  "
          f"parameters {d['parameters']:,}  layout {d['layout']}  data {d['bytes'] / 1e9:.2f} GB")
    return 0 if d["parameters"] == 6_154_908_736 else 1


if __name__ == "__main__":
    sys.exit(main())
