"""Peak memory of streaming low-bit conversion on the full-size synthetic checkpoint.

Each conversion runs ``python -m zopt.cli convert`` in a child process; the peak resident set
size is the child's own ``ru_maxrss`` (from ``os.wait4``) (kernel accounting, includes mapped file pages it touched).

    python -m zopt.cli synth -o /work/bench-data/zimage-full-synth.safetensors   # once, 12.3 GB
    python benchmarks/lowbit_rss.py /work/bench-data/zimage-full-synth.safetensors --out /work/bench-data \\
        --formats fp8 int4

Prints one line per format: seconds, peak RSS, output size. Target: peak RSS <= 2 GB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def measure(source: str, fmt: str, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "zopt.cli", "convert", source, "--to", fmt, "-o", str(out), "--no-progress",
           "--no-hash", *extra]
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage
        dt = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{fmt}: convert failed\n{err.read().decode()[-2000:]}")
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"format": fmt, "seconds": dt, "peak_rss_gb": usage.ru_maxrss * 1024 / 1e9, "out_gb": size / 1e9}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("--out", default="/work/bench-data", help="folder for the outputs (deleted after measuring)")
    ap.add_argument("--formats", nargs="+", default=["fp8", "int4"])
    ap.add_argument("--keep-outputs", action="store_true")
    args = ap.parse_args()
    src_gb = os.path.getsize(args.source) / 1e9 if os.path.isfile(args.source) else float("nan")
    print(f"source {args.source} ({src_gb:.2f} GB)")
    print(f"{'format':<12} {'seconds':>8} {'peak RSS GB':>12} {'output GB':>10}")
    for spec in args.formats:
        fmt, _, layout = spec.partition("/")
        out = Path(args.out) / f"rss-{fmt.replace(':', '-')}{'-' + layout if layout else ''}"
        r = measure(args.source, fmt, out, ["--layout", layout] if layout else [])
        print(f"{spec:<12} {r['seconds']:8.0f} {r['peak_rss_gb']:12.2f} {r['out_gb']:10.2f}", flush=True)
        if not args.keep_outputs:
            shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
