"""Step-time samples from repeated identical runs, for the regression gate's noise test.

Each run is a fresh process that prepares the tiny pipeline on the CPU (``prepare()``, as the
bench does), generates one warm-up image, then two 128x128 images of 8 steps, timing every denoising step
the way the bench worker does (transformer call to the end of the scheduler step). The samples
go to ``tests/bench/data/gate_noise.json``; ``tests/bench/test_bench_gate.py`` replays them.

    python benchmarks/gate_noise.py --runs 8 -o tests/bench/data/gate_noise.json

(The recorded file holds 7 runs from two invocations, merged: 4 + 3.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CHILD = r"""
import json, time, torch
from zopt.runtime import pipeline as P
pipe, _ = P.prepare("tiny", device="cpu", width=128, height=128)
times, cpu, start = [], [], [0.0, 0.0]
def pre(*a):
    start[0], start[1] = time.perf_counter(), time.process_time()
pipe.transformer.register_forward_pre_hook(pre)
def cb(p, i, t, kw):
    times.append(time.perf_counter() - start[0])
    cpu.append(time.process_time() - start[1])
    return {}
for n in range(3):
    lat = P.initial_latents(pipe, n, 128, 128, torch.float32)
    pipe(prompt=["a lighthouse on a cliff at dawn"], height=128, width=128, num_inference_steps=8, latents=lat,
         max_sequence_length=128, callback_on_step_end=cb)
    if n == 0:
        times.clear()
        cpu.clear()
print(json.dumps({"wall": [round(t * 1000, 3) for t in times], "cpu": [round(t * 1000, 3) for t in cpu]}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("-o", "--out", default="tests/bench/data/gate_noise.json")
    args = ap.parse_args()
    env = dict(os.environ, ZOPT_COMPILE="0", HF_HUB_OFFLINE="1")
    runs = []
    for i in range(args.runs):
        t0 = time.time()
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, check=True)
        samples = json.loads(out.stdout.strip().splitlines()[-1])
        runs.append(samples)
        med, cmed = (sorted(samples[k])[len(samples[k]) // 2] for k in ("wall", "cpu"))
        print(f"run {i + 1}/{args.runs}: {len(samples['wall'])} steps, median {med:.1f} ms wall, {cmed:.1f} ms CPU "
              f"({time.time() - t0:.0f} s)", flush=True)
        doc = {"what": "per-step wall-clock and process-CPU milliseconds of identical runs of the tiny pipeline on "
                       "CPU, 128x128, 8 steps x 2 images after one warm-up image (benchmarks/gate_noise.py)",
               "machine": f"{os.cpu_count()} CPU cores, shared", "runs": runs}
        with open(args.out, "w") as f:  # after every run: an interrupted session keeps what it measured
            json.dump(doc, f, indent=None)
            f.write("\n")
    for k in ("wall", "cpu"):
        meds = [sorted(r[k])[len(r[k]) // 2] for r in runs]
        print(f"{k} medians: min {min(meds):.1f} max {max(meds):.1f} ms ({(max(meds) / min(meds) - 1) * 100:.0f}% apart)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
