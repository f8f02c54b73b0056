"""Check the planner's memory model against measured peak memory of the transformer forward on CPU.

For each (config, resolution) a fresh subprocess builds the transformer (fp32), runs one warm-up
forward at a small size, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``), runs the
forward at the target size and reads the peak (``VmHWM``). glibc runs with a fixed mmap threshold
(``MALLOC_MMAP_THRESHOLD_``) so freed activation buffers go back to the OS and the peak is repeatable. Printed per case: predicted and
measured weights, activations and their sum, and the relative errors.

    python benchmarks/planner_validation.py            # tiny at 512/1024/2048, medium at 512/768/1024
    python benchmarks/planner_validation.py --quick    # fewer cases
    python benchmarks/planner_validation.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's zopt, not an installed one

TEXT_TOKENS = 128

CHILD = r"""
import ctypes, gc, json, sys, torch
torch.set_grad_enabled(False)
torch.set_num_threads(2)
from zopt.families import zimage
from zopt.families.zimage.tiny import build_tiny_transformer

def trim():
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap pages back so RSS shows live memory


def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
    raise KeyError(key)

size, width, height, text = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
cfg = zimage.CONFIGS[size]
zimage.expected_shapes(cfg)  # imports every module the build touches, allocating nothing (meta device)
trim()
rss_before = status("VmRSS")
model = build_tiny_transformer(0, cfg).float().eval()
trim()
rss_model = status("VmRSS")

def run(w, h, t):
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(cfg["in_channels"], 1, h // 8, w // 8, generator=g)]
    cap = [torch.randn(t, cfg["cap_feat_dim"], generator=g)]
    return model(x, torch.tensor([0.5]), cap, return_dict=False)[0]

out = run(128, 128, 32)  # warm-up: loads kernels and thread pools
del out
trim()
rss_base = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
out = run(width, height, text)
peak = status("VmHWM")
print(json.dumps({"weights": rss_model - rss_before, "base_overhead": rss_base - rss_model,
                  "activations": peak - rss_base}))
"""


def measure(size: str, width: int, height: int, text: int = TEXT_TOKENS) -> dict:
    root = Path(__file__).resolve().parents[1]
    # A fixed mmap threshold stops glibc from raising it on the fly and keeping freed blocks in the heap,
    # which otherwise makes the peak wander by ~20% between identical runs.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    r = subprocess.run([sys.executable, "-c", CHILD, size, str(width), str(height), str(text)],
                       capture_output=True, text=True, cwd=root, timeout=1800, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"{size} {width}x{height}: child failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def predict(size: str, width: int, height: int, text: int = TEXT_TOKENS) -> dict:
    from zopt.families import zimage
    from zopt.runtime import planner

    cfg = zimage.CONFIGS[size]
    shape = planner.shape_for(width, height, 1, text)
    return {"weights": planner.weight_bytes(cfg, 32, 32),
            "activations": planner.activation_bytes(cfg, shape, elem_bytes=4, attention="native"),
            "tokens": shape.tokens}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cases = [("tiny", 512), ("tiny", 1024), ("tiny", 2048), ("medium", 512), ("medium", 768), ("medium", 1024)]
    if args.quick:
        cases = [("tiny", 1024), ("medium", 512)]
    mib = 1024**2
    print(f"{'config':<7} {'res':>5} {'tokens':>6} | {'weights MiB pred/meas':>22} | "
          f"{'activ. MiB pred/meas':>21} {'err':>6} | {'total MiB pred/meas':>20} {'err':>6}")
    records = []
    for size, res in cases:
        p, m = predict(size, res, res), measure(size, res, res)
        tot_p, tot_m = p["weights"] + p["activations"], m["weights"] + m["activations"]
        ea = (p["activations"] - m["activations"]) / m["activations"]
        et = (tot_p - tot_m) / tot_m
        print(f"{size:<7} {res:>5} {p['tokens']:>6} | {p['weights'] / mib:>10.1f} /{m['weights'] / mib:>10.1f} | "
              f"{p['activations'] / mib:>9.1f} /{m['activations'] / mib:>9.1f} {ea:>+6.1%} | "
              f"{tot_p / mib:>9.1f} /{tot_m / mib:>9.1f} {et:>+6.1%}", flush=True)
        records.append({"config": size, "resolution": res, "predicted": p, "measured": m,
                        "activation_error": ea, "total_error": et})
    worst_a = max(abs(r["activation_error"]) for r in records)
    worst_t = max(abs(r["total_error"]) for r in records)
    print(f"worst |error|: activations {worst_a:.1%}, weights+activations {worst_t:.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
