"""Size, accuracy and CPU latency of the low-bit formats against the BF16 reference.

For the tiny model and a medium config (dim 1536, 8 layers: ``zimage.MEDIUM_CONFIG``, seeded
random weights saved as a diffusers folder in a temp dir), each format is converted from the BF16
folder, reloaded from its artifact alone and run on one fixed transformer input on CPU:

* size on disk of the artifact vs the BF16 folder;
* output relative L2 error and cosine similarity vs the BF16 model's output (both computed in
  float32 activations, as zopt runs on CPU);
* median forward latency vs the BF16 model (float32 activations on CPU, the pipeline default).

    python benchmarks/lowbit_table.py                  # tiny and medium, every format
    python benchmarks/lowbit_table.py --sizes tiny --formats fp8 int4

Prints one table per format.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

FORMATS = ["fp8", "fp8:e5m2", "fp8/comfy", "int8", "int8_w8a8", "int4", "int4:g64", "nf4"]


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file() and f.name != "zopt-manifest.json")


def make_source(size: str, tmp: Path) -> Path:
    from zopt.families import zimage
    from zopt.families.zimage.tiny import build_tiny_transformer, tiny_pipeline_dir

    if size == "tiny":
        return tiny_pipeline_dir() / "transformer"
    out = tmp / size
    build_tiny_transformer(1234, zimage.config_for(size)).save_pretrained(out, safe_serialization=True)
    return out


def make_inputs(config: dict, latent: int):
    import torch

    g = torch.Generator().manual_seed(1234)
    x = [torch.randn(config["in_channels"], 1, latent, latent, generator=g)]
    cap = [torch.randn(64, config["cap_feat_dim"], generator=g)]
    return x, torch.tensor([0.6]), cap


def run(model, inputs, reps: int):
    import torch

    x, t, cap = inputs
    times = []
    with torch.no_grad():
        y = model(x, t, cap, return_dict=False)[0][0].float()  # warm-up, and the output
        for _ in range(reps):
            t0 = time.perf_counter()
            model(x, t, cap, return_dict=False)
            times.append(time.perf_counter() - t0)
    return y, statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "medium"])
    ap.add_argument("--formats", nargs="+", default=FORMATS)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared machine)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")

    from zopt import formats
    from zopt.formats.plain import load_source

    rows: dict[str, list[str]] = {f: [] for f in args.formats}
    with tempfile.TemporaryDirectory(prefix="zopt-lowbit-") as td:
        tmp = Path(td)
        for size in args.sizes:
            src = make_source(size, tmp)
            ref_model = load_source(src, dtype=torch.float32)
            inputs = make_inputs(dict(ref_model.config), 32)
            ref, ref_t = run(ref_model, inputs, args.reps)
            ref_bytes = folder_bytes(src)
            del ref_model
            print(f"[{size}] BF16 reference: {ref_bytes / 1e6:.1f} MB, {ref_t * 1000:.0f} ms/forward", flush=True)
            for spec in args.formats:
                fmt, _, layout = spec.partition("/")
                out = tmp / f"{size}-{spec.replace(':', '-').replace('/', '-')}"
                t0 = time.perf_counter()
                formats.convert(src, fmt, out, options={"layout": layout} if layout else {}, progress=False)
                conv = time.perf_counter() - t0
                model = formats.load(out, dtype=torch.float32)
                y, lat = run(model, inputs, args.reps)
                err = float((y - ref).norm() / ref.norm())
                cos = float((y.flatten() @ ref.flatten()) / (y.norm() * ref.norm()))
                size_b = folder_bytes(out)
                rows[spec].append(
                    f"| {size} | {model.zopt_backend} | {size_b / 1e6:.1f} | {size_b / ref_bytes:.2f}x | {err:.4f} "
                    f"| {cos:.5f} | {lat * 1000:.0f} | {lat / ref_t:.2f}x | {conv:.1f} |"
                )
                print(f"  {spec}: done ({conv:.0f} s convert)", flush=True)
                del model
    for spec, lines in rows.items():
        print(f"\n### {spec}\n")
        print("| model | backend | MB on disk | vs BF16 | rel. error | cosine | CPU ms | vs BF16 | convert s |")
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
