"""Size, error and CPU latency of every ONNX variant against the fp32 export (onnxruntime CPU).

    python benchmarks/onnx_variants.py                  # tiny model (seconds)
    python benchmarks/onnx_variants.py --size medium    # dim 1536, 8 layers: realistic matmul shapes

Rows: onnx:fp32 (reference), fp16, bf16 (size only: onnxruntime's CPU provider has no bf16 MatMul),
int8 (dynamic), int4 (MatMulNBits), and the int8 / fp8 Q/DQ graphs that ``tensorrt:int8`` and
``tensorrt:fp8`` engines are built from, run here by onnxruntime's CPU provider (fp8 unfused).
Error: relative L2 of the output vs the fp32 export, mean over the listed input shapes, which
include two captions of different lengths in one batch. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

NAMES = ("latents", "timestep", "text_embeds", "text_lens")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="tiny", choices=["tiny", "medium"])
    ap.add_argument("--data", default="/work/bench-data")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    import onnxruntime as ort
    import torch

    from zopt import checkpoint, formats
    from zopt.families.zimage.synthetic import write_synthetic
    from zopt.families.zimage.tiny import tiny_pipeline_dir
    from zopt.formats.onnx import file_bytes
    from zopt.formats.onnx.graph import graph_inputs
    from zopt.formats.onnx.tensorrt import calibration_feeds, qdq_model

    if args.size == "tiny":
        src_path = tiny_pipeline_dir() / "transformer"
        shapes = [(2, 32, 32, 64), (1, 64, 48, 100)]  # 256 / 768 image tokens
    else:
        src_path = Path(args.data) / "zimage-medium-synth.safetensors"
        if not src_path.exists():
            write_synthetic(src_path, "medium", seed=0)
        shapes = [(2, 32, 32, 64), (1, 64, 64, 128)]  # 256 / 1024 image tokens (256 / 512 px)
    src = checkpoint.open(src_path)
    config = dict(src.config) if getattr(src, "config", None) else None
    work = Path(tempfile.mkdtemp(prefix="onnx-variants-", dir=args.data if args.size != "tiny" else None))
    rows = []
    try:
        folders = {}
        for sub in ("fp32", "fp16", "bf16", "int8", "int4"):
            t0 = time.perf_counter()
            folders[sub] = formats.convert(src, f"onnx:{sub}", work / sub, options={"hash_source": False},
                                           progress=False)
            folders[sub + "_s"] = time.perf_counter() - t0
        from zopt.families import zimage

        config = zimage.check_shapes(src)
        for sub in ("int8", "fp8"):
            d = work / f"qdq-{sub}"
            d.mkdir()
            t0 = time.perf_counter()
            qdq_model(folders["fp32"] / "model.onnx", d / "model.onnx", sub, calibration_feeds(config, {}))
            folders[f"trt-{sub}"], folders[f"trt-{sub}_s"] = d, time.perf_counter() - t0
        inputs = [graph_inputs(config, *s, seed=i) for i, s in enumerate(shapes)]

        def session(folder, optimize=True):
            so = ort.SessionOptions()
            if not optimize:
                so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            return ort.InferenceSession(str(folder / "model.onnx"), so, providers=["CPUExecutionProvider"])

        def run(sess):
            outs, times = [], []
            for a in inputs:
                feeds = dict(zip(NAMES, (x.numpy() for x in a), strict=True))
                sess.run(None, feeds)  # warm-up
                t0 = time.perf_counter()
                for _ in range(args.repeats):
                    o = sess.run(None, feeds)[0]
                times.append((time.perf_counter() - t0) / args.repeats)
                outs.append(torch.from_numpy(o))
            return outs, times

        ref, ref_t = run(session(folders["fp32"]))
        labels = {"fp32": "onnx:fp32", "fp16": "onnx:fp16", "bf16": "onnx:bf16", "int8": "onnx:int8",
                  "int4": "onnx:int4", "trt-int8": "tensorrt:int8 graph (QDQ)", "trt-fp8": "tensorrt:fp8 graph (QDQ)"}
        base = file_bytes(folders["fp32"])
        for key, label in labels.items():
            size = file_bytes(folders[key])
            row = {"variant": label, "MB": size / 1e6, "vs fp32": size / base, "convert s": folders[key + "_s"]}
            if key == "bf16":
                row.update(err="n/a (no CPU kernels)", ms="n/a")
            else:
                outs, times = (ref, ref_t) if key == "fp32" else run(session(folders[key], key != "trt-fp8"))
                errs = [float((o - r).norm() / r.norm()) for o, r in zip(outs, ref, strict=True)]
                row.update(err=f"{sum(errs) / len(errs):.2e}", ms=" / ".join(f"{t * 1e3:.0f}" for t in times))
            rows.append(row)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    toks = " / ".join(f"{(h // 2) * (w // 2)}" for _, h, w, _ in shapes)
    print(f"\nZ-Image {args.size}: onnxruntime {ort.__version__} CPU, error vs onnx:fp32, latency per forward at "
          f"{toks} image tokens (batch {' / '.join(str(s[0]) for s in shapes)})\n")
    print("| variant | size MB | vs fp32 | rel. error | CPU ms / forward | convert s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['MB']:.1f} | {r['vs fp32']:.2f} | {r['err']} | {r['ms']} | {r['convert s']:.0f} |")


if __name__ == "__main__":
    main()
