"""Export the Z-Image transformer to ONNX at full (or medium) size and print time and peak memory.

    python benchmarks/onnx_export_full.py                       # full size, bf16 weights
    python benchmarks/onnx_export_full.py --size medium --precision fp32 --check

The source is a seeded synthetic checkpoint (``zopt.families.zimage.synthetic.write_synthetic``, bf16, original
layout) in /work/bench-data, written on first use. The export streams: peak memory is the trace of
a weight-free skeleton plus one tensor, whatever the model size. ``--check`` (medium/tiny only)
runs onnxruntime once and compares with the eager model in fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class PeakRSS:
    """Samples this process's RSS every 50 ms (ru_maxrss alone misses nothing but mixes in imports)."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.05)

    def __enter__(self):
        self.start = self.proc.memory_info().rss
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="full", choices=["full", "medium", "tiny"])
    ap.add_argument("--precision", default="bf16", choices=["fp32", "fp16", "bf16"])
    ap.add_argument("--data", default="/work/bench-data", help="folder for the synthetic source and the export")
    ap.add_argument("--keep", action="store_true", help="keep the exported folder")
    ap.add_argument("--check", action="store_true", help="compare onnxruntime with eager (not for full)")
    args = ap.parse_args()

    from zopt import checkpoint
    from zopt.families.zimage.synthetic import write_synthetic
    from zopt.formats.onnx.export import export

    data = Path(args.data)
    data.mkdir(parents=True, exist_ok=True)
    src_path = data / f"zimage-{args.size}-synth.safetensors"
    if not src_path.exists():
        write_synthetic(src_path, args.size, seed=0)
    src = checkpoint.open(src_path)
    out = data / f"onnx-{args.size}-{args.precision}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    t0 = time.perf_counter()
    with PeakRSS() as rss:
        stats = export(src, out, args.precision, progress=True)
    wall = time.perf_counter() - t0
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    row = {
        "size": args.size, "precision": args.precision, "source_bytes": src_path.stat().st_size,
        "wall_s": round(wall, 1), "trace_s": stats["trace_seconds"], "weights": stats["weights"],
        "graph_bytes": sizes.get("model.onnx"), "data_bytes": sizes.get("model.onnx.data"),
        "rss_start_gb": round(rss.start / 2**30, 2), "rss_peak_gb": round(rss.peak / 2**30, 2),
        "ru_maxrss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "cores": os.cpu_count(),
    }
    if args.check and args.size != "full":
        import onnxruntime as ort
        import torch

        from zopt.formats.onnx.graph import graph_inputs
        from zopt.formats.plain import load_source

        m = load_source(src, dtype=torch.float32).eval()
        lat, t, emb, lens = graph_inputs(dict(m.config), 2, 32, 24, 70, seed=5)
        with torch.no_grad():
            ref = m([x[:, None] for x in lat], t, [e[:n] for e, n in zip(emb, lens, strict=True)], return_dict=False)[0]
        ref = torch.stack([r[:, 0] for r in ref])
        sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
        feeds = dict(zip(("latents", "timestep", "text_embeds", "text_lens"),
                         (lat.numpy(), t.numpy(), emb.numpy(), lens.numpy()), strict=True))
        got = torch.from_numpy(sess.run(None, feeds)[0])
        row["rel_err_vs_eager"] = float((got - ref).norm() / ref.norm())
    print(json.dumps(row, indent=1))
    print(f"\n| size | precision | wall s | trace s | peak RSS GB | graph MB | data GB |\n|---|---|---|---|---|---|---|\n"
          f"| {args.size} | {args.precision} | {row['wall_s']} | {row['trace_s']} | {row['rss_peak_gb']} | "
          f"{row['graph_bytes'] / 1e6:.1f} | {row['data_bytes'] / 1e9:.2f} |")
    if not args.keep:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
