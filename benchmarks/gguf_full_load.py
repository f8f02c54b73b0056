"""Load a full-size Z-Image GGUF on CPU and run one transformer forward pass, per backend.

Each backend runs in its own subprocess (so peak RSS is its own): load time, peak RSS
(ru_maxrss), the held weight bytes, and the latency of forward passes at 256 image tokens
(a 512x512 image: 64x64 latent, patch 2) plus 32 caption tokens; the first pass (which compiles
the blocks with the default backend) is reported apart. Make the file with
``zopt convert /work/bench-data/zimage-full-synth.safetensors --to gguf:Q8_0 -o FILE``.

Usage: python benchmarks/gguf_full_load.py FILE.gguf [--backends int-mm-cpu,torch-dequant] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time
import torch
from zopt.formats import load
path, backend, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3])
t0 = time.perf_counter()
m = load(path, backend=backend)
load_s = time.perf_counter() - t0
held = sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
g = torch.Generator().manual_seed(0)
x = [torch.randn(16, 1, 32, 32, generator=g)]
cap = [torch.randn(32, m.config.cap_feat_dim, generator=g)]
t = torch.tensor([0.5])
runs = []
with torch.inference_mode():
    for i in range(repeats + 1):
        t1 = time.perf_counter()
        m(x, t, cap, return_dict=False)
        runs.append(time.perf_counter() - t1)
print(json.dumps({"load_s": load_s, "held_gb": held / 1e9, "rss_after_load_gb": rss_load,
                  "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                  "first_s": runs[0], "forward_s": min(runs[1:])}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--backends", default="int-mm-cpu,torch-dequant")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    size = os.path.getsize(args.file) / 1e9
    print(f"file: {args.file} ({size:.2f} GB), load average {os.getloadavg()[0]:.1f}")
    print(f"{'backend':<16}{'load s':>9}{'held GB':>9}{'peak RSS GB':>13}{'1st pass s':>12}{'pass s':>9}")
    for backend in args.backends.split(","):
        p = subprocess.run([sys.executable, "-c", CHILD, args.file, backend, str(args.repeats)],
                           capture_output=True, text=True)
        if p.returncode != 0:
            print(f"{backend:<16} failed: {(p.stderr.strip().splitlines() or ['?'])[-1]}")
            continue
        r = json.loads(p.stdout.strip().splitlines()[-1])
        print(f"{backend:<16}{r['load_s']:>9.1f}{r['held_gb']:>9.2f}{r['peak_rss_gb']:>13.2f}"
              f"{r['first_s']:>12.1f}{r['forward_s']:>9.2f}")


if __name__ == "__main__":
    main()
