"""GGUF conversion of the full-size (6.15B, 12.3 GB bf16) synthetic checkpoint: zopt vs stable-diffusion.cpp.

Writes the synthetic checkpoint (``zopt.families.zimage.synthetic.write_synthetic``) if absent, then converts it to
Q8_0 and Q4_K_M with zopt and to q8_0 and q4_K with stable-diffusion.cpp's converter
(``stable-diffusion-cpp-python``'s ``convert``; skipped with a message if not installed). Every run
is its own subprocess; it reports wall time, source throughput and its peak RSS (ru_maxrss).
Outputs are deleted after each run. zopt's wall time includes loading (or, on a machine's first
run, compiling) its torch.compile kernels; ``ZOPT_COMPILE=0`` measures the eager quantizers. The
1-minute load average before and after each run is printed: other processes sharing the cores
distort every figure. At the end, zopt/sd.cpp ratios per type (when both ran).

Usage: python benchmarks/gguf_convert_speed.py [--data /work/bench-data] [--only zopt|sdcpp] [--types Q8_0,Q4_K_M]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

SD_TYPES = {"Q8_0": ("q8_0", 8), "Q4_K_M": ("q4_K", 12)}  # sd.cpp has no mixed recipes: closest uniform type

ZOPT_CHILD = """
import json, resource, sys, time
from zopt.formats import convert
src, out, sub = sys.argv[1:4]
t0 = time.perf_counter()
convert(src, "gguf:" + sub, out, progress=False, force=True)
wall = time.perf_counter() - t0
print(json.dumps({"wall": wall, "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""

SDCPP_CHILD = """
import json, resource, sys, time
from stable_diffusion_cpp import stable_diffusion_cpp as lib
src, out, t = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
ok = lib.convert(src.encode(), b"", out.encode(), t, b"", True)
wall = time.perf_counter() - t0
print(json.dumps({"wall": wall, "ok": bool(ok), "rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6}))
"""


def run_child(code: str, args: list[str]) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def has_sdcpp() -> bool:
    import importlib.util

    return importlib.util.find_spec("stable_diffusion_cpp") is not None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("ZOPT_BENCH_DATA", "/work/bench-data"))
    ap.add_argument("--only", choices=["zopt", "sdcpp"], default=None)
    ap.add_argument("--types", default="Q8_0,Q4_K_M")
    args = ap.parse_args()
    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    src = data / "zimage-full-synth.safetensors"
    if not src.exists():
        from zopt.families.zimage.synthetic import write_synthetic

        print(f"writing the full-size synthetic checkpoint to {src} ...", flush=True)
        write_synthetic(src, "full")
    gb = src.stat().st_size / 1e9
    print(f"source: {src} ({gb:.2f} GB), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}", flush=True)
    runners = []
    for sub in args.types.split(","):
        if args.only in (None, "zopt"):
            runners.append((f"zopt gguf:{sub}", ZOPT_CHILD, sub))
        if args.only in (None, "sdcpp"):
            if sub not in SD_TYPES:
                print(f"stable-diffusion.cpp has no counterpart of {sub}; skipped")
            elif not has_sdcpp():
                print("stable-diffusion.cpp peer skipped: pip install stable-diffusion-cpp-python to compare")
            else:
                runners.append((f"sd.cpp {SD_TYPES[sub][0]}", SDCPP_CHILD, sub))
    print(f"{'converter':<22}{'wall s':>9}{'GB/s':>8}{'peak RSS GB':>13}{'out GB':>9}{'load before/after':>19}",
          flush=True)
    results: dict[tuple[str, str], dict] = {}
    for label, code, sub in runners:
        out = data / f".bench-{label.replace(' ', '-').replace(':', '-')}.gguf"
        extra = [str(SD_TYPES[sub][1])] if code is SDCPP_CHILD else [sub]
        t0 = time.perf_counter()
        load0 = os.getloadavg()[0]
        res = run_child(code, [str(src), str(out), *extra])
        size = out.stat().st_size / 1e9 if out.exists() else float("nan")
        out.unlink(missing_ok=True)
        if "error" in res or res.get("ok") is False:
            print(f"{label:<22} failed after {time.perf_counter() - t0:.0f} s: {res.get('error', 'convert returned false')}")
            continue
        results[("sdcpp" if code is SDCPP_CHILD else "zopt", sub)] = res
        print(f"{label:<22}{res['wall']:>9.1f}{gb / res['wall']:>8.3f}{res['rss_gb']:>13.2f}{size:>9.2f}"
              f"{load0:>10.1f} / {os.getloadavg()[0]:.1f}", flush=True)
    for sub in args.types.split(","):
        z, c = results.get(("zopt", sub)), results.get(("sdcpp", sub))
        if z and c:
            print(f"{sub}: zopt / sd.cpp {SD_TYPES[sub][0]}: wall {z['wall'] / c['wall']:.2f}x, "
                  f"peak RSS {z['rss_gb'] / c['rss_gb']:.2f}x")


if __name__ == "__main__":
    main()
