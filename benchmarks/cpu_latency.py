"""CPU step latency of every format's default CPU backend next to the BF16 model, in one run.

The model (``medium``: dim 1536, 8 + 1 + 1 layers, seeded weights, 600 MB in BF16; or ``tiny``)
is converted to each spec, and every artifact is loaded with the backend zopt selects on this
CPU (``zopt.formats.load``: the same selection ``zopt generate`` makes). With ``--reference`` each
quantized format is also loaded with its dequantizing kernel (``torch-dequant`` / ``fp8-storage``,
the CPU default before ``int-mm-cpu``). All models stay loaded and are timed **interleaved**: each
round runs one transformer forward of every model (the starting model rotates each round), so
load changes on a shared machine hit all of them alike; the table shows medians. Input: a 32x32
latent (256 image tokens) and 64 caption tokens, float32 activations (zopt's CPU default).

    python benchmarks/cpu_latency.py                      # medium, every format, 5 rounds
    python benchmarks/cpu_latency.py --size tiny --rounds 3 --specs int4 nf4

Columns: median ms per forward, ratio to the BF16 model's median, relative L2 error of the output
against the BF16 model's output, and MB the loaded model holds (parameters and buffers).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from lowbit_table import make_inputs, make_source

SPECS = ["fp8", "int8", "int8_w8a8", "int4", "int4:r32", "nf4", "nf4:r32", "gguf:Q8_0", "gguf:Q4_K_M"]
DEQUANT = {"fp8": "fp8-storage", "int8": "torch-dequant", "int4": "torch-dequant", "nf4": "torch-dequant"}


def cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def held_mb(model) -> float:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / 1e6


def forward(model, inputs):
    import torch

    x, t, cap = inputs
    with torch.no_grad():
        t0 = time.perf_counter()
        y = model(x, t, cap, return_dict=False)[0][0]
        return y.float(), time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="medium", choices=["tiny", "medium"])
    ap.add_argument("--specs", nargs="+", default=SPECS)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared machine)")
    ap.add_argument("--reference", action="store_true", help="also time each format's dequantizing kernel")
    args = ap.parse_args()

    import os

    import torch

    from zopt import formats
    from zopt.formats.plain import load_source

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {cpu_name()} ({os.cpu_count()} cores), "
          f"size {args.size}, {args.rounds} rounds")
    with tempfile.TemporaryDirectory(prefix="zopt-cpu-latency-") as td:
        tmp = Path(td)
        src = make_source(args.size, tmp)
        models = [("bf16", "torch", load_source(src, dtype=torch.float32))]
        for spec in args.specs:
            out = tmp / spec.replace(":", "-")
            if spec.startswith("gguf"):
                out = out.with_suffix(".gguf")
            formats.convert(src, spec, out, options={"hash_source": False}, progress=False)
            m = formats.load(out, device="cpu", dtype=torch.float32)
            models.append((spec, m.zopt_backend, m))
            ref_kernel = DEQUANT.get(spec.split(":")[0])
            if args.reference and ref_kernel and ref_kernel != m.zopt_backend:
                models.append((spec, ref_kernel, formats.load(out, device="cpu", backend=ref_kernel,
                                                              dtype=torch.float32)))
            print(f"  loaded {spec}", flush=True)
        inputs = make_inputs(dict(models[0][2].config), 32)
        outputs = [forward(m, inputs)[0] for _, _, m in models]  # warm-up (and compilation), outputs
        times: list[list[float]] = [[] for _ in models]
        for r in range(args.rounds):
            for k in range(len(models)):
                i = (k + r) % len(models)
                times[i].append(forward(models[i][2], inputs)[1])
        ref, ref_t = outputs[0], statistics.median(times[0])
        print("\n| format | CPU backend | ms/forward | vs BF16 | rel. error | held MB |")
        print("|---|---|---|---|---|---|")
        for (spec, backend, m), y, ts in zip(models, outputs, times, strict=True):
            t = statistics.median(ts)
            err = float((y - ref).norm() / ref.norm())
            print(f"| {spec} | {backend} | {t * 1000:.0f} | {t / ref_t:.2f}x | {err:.4f} | {held_mb(m):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
