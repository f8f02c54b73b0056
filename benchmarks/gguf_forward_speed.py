"""Forward-pass latency of GGUF models on CPU: zopt's loader vs diffusers' GGUF path vs eager.

Builds a ~48M-parameter Z-Image transformer (dim 768, 4 layers, 1+1 refiners; every row length a
multiple of 256), converts it with zopt to GGUF Q8_0 and Q4_K, and times one forward pass at
1,024 image tokens (64x64 latent, patch 2) plus 64 caption tokens:

* zopt ``formats.gguf_loader.load``: its default on CPU (backend ``int-mm-cpu``: INT8 weights,
  dynamic INT8 activations, integer matmul; transformer blocks through torch.compile, whose
  one-off compile happens in the untimed warm-up), the same with ``compile=False``, and the exact
  ``torch-dequant`` backend (GGUF blocks dequantized per call),
* diffusers ``from_single_file(..., GGUFQuantizationConfig)`` (dequantizes every weight per call),
* the plain model in BF16 and FP32 eager.

The error column is ||out - ref|| / ||ref|| against eager FP32 on the same inputs.

Usage: python benchmarks/gguf_forward_speed.py [--repeats 3] [--threads N] [--cpu-time] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

from zopt.families import zimage

CONFIG = {**zimage.MEDIUM_CONFIG, "dim": 768, "n_layers": 4, "n_refiner_layers": 1, "n_heads": 6,
          "n_kv_heads": 6, "cap_feat_dim": 1024}
TYPES = ("Q8_0", "Q4_K")


def inputs():
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(CONFIG["in_channels"], 1, 64, 64, generator=g)]  # 32x32 = 1,024 patches
    cap = [torch.randn(64, CONFIG["cap_feat_dim"], generator=g)]
    return x, torch.tensor([0.5]), cap


CLOCK = time.perf_counter  # --cpu-time switches to process CPU time (robust on a busy machine)


OUTPUTS: dict[str, torch.Tensor] = {}  # row name -> output, for the error column


def timed(model, dtype, repeats: int, name: str = "") -> float:
    x, t, cap = inputs()
    x, cap = [v.to(dtype) for v in x], [v.to(dtype) for v in cap]
    with torch.inference_mode():
        OUTPUTS[name] = model(x, t, cap, return_dict=False)[0][0].float()  # warm-up
        runs = []
        for _ in range(repeats):
            t0 = CLOCK()
            model(x, t, cap, return_dict=False)
            runs.append(CLOCK() - t0)
    return statistics.median(runs)


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    for m in model.modules():
        c = getattr(m, "_cached", None)
        if isinstance(c, torch.Tensor):
            total += c.numel() * c.element_size()
    return total


def prepare(work: Path, types) -> Path:
    from zopt import formats
    from zopt.families.zimage.tiny import build_tiny_transformer

    folder = work / "medium-48m"
    if not (folder / "config.json").exists():
        build_tiny_transformer(7, CONFIG).save_pretrained(folder)
    for qt in types:
        if not (work / f"medium-48m-{qt}.gguf").exists():
            formats.convert(folder, f"gguf:{qt}", work / f"medium-48m-{qt}.gguf", progress=False,
                            options={"hash_source": False})
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated GGUF types")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with process CPU time instead of wall time (use with --threads 1 on a busy machine)")
    ap.add_argument("--work", default=os.environ.get("ZOPT_BENCH_DATA", "/work/bench-data") + "/gguf-forward")
    args = ap.parse_args()
    global CLOCK
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        CLOCK = time.process_time
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import GGUFQuantizationConfig, ZImageTransformer2DModel

    from zopt.formats import load  # selects the backend once, then the GGUF loader
    from zopt.formats.plain import load_source

    types = tuple(args.types.split(","))
    folder = prepare(work, types)
    print(f"model: {sum(p.numel() for p in load_source(folder).parameters()) / 1e6:.1f}M params, "
          f"1,024 image + 64 caption tokens, torch threads {torch.get_num_threads()}, "
          f"{'CPU' if args.cpu_time else 'wall'} time, load average {os.getloadavg()[0]:.1f}")
    rows = []
    for name, dt in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        m = load_source(folder, dtype=dt)
        rows.append((f"eager {name}", timed(m, dt, args.repeats, f"eager {name}"), weight_bytes(m)))
        del m
    eager = {r[0]: r[1] for r in rows}
    results = {}
    for qt in types:
        path = work / f"medium-48m-{qt}.gguf"
        for label, kw in (("default", {}), ("not compiled", {"compile": False}),
                          ("torch-dequant", {"backend": "torch-dequant"})):
            m = load(path, dtype=torch.float32, **kw)
            rows.append((f"zopt {qt} ({label})", timed(m, torch.float32, args.repeats, f"zopt {qt} ({label})"),
                         weight_bytes(m)))
            results[(qt, "zopt", label)] = rows[-1][1]
            del m
        for label, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            d = ZImageTransformer2DModel.from_single_file(
                str(path), config=str(folder), torch_dtype=dt, local_files_only=True,
                quantization_config=GGUFQuantizationConfig(compute_dtype=dt))
            rows.append((f"diffusers {qt} ({label})", timed(d, dt, args.repeats, f"diffusers {qt} ({label})"),
                         weight_bytes(d)))
            results[(qt, "diffusers", label)] = rows[-1][1]
            del d
    ref = OUTPUTS["eager fp32"]
    print(f"{'model':<28}{'latency s':>11}{'weights MB':>12}{'rel. error':>12}")
    for name, sec, nbytes in rows:
        err = float((OUTPUTS[name] - ref).norm() / ref.norm())
        print(f"{name:<28}{sec:>11.3f}{nbytes / 1e6:>12.1f}{err:>12.4f}")
    for qt in types:
        z, zn = results[(qt, "zopt", "default")], results[(qt, "zopt", "not compiled")]
        dv = min(results[(qt, "diffusers", lb)] for lb in ("fp32", "bf16"))
        print(f"{qt}: zopt default {z:.3f} s, diffusers best {dv:.3f} s -> zopt/diffusers = {z / dv:.2f} "
              f"(target <= 0.50; not compiled {zn / dv:.2f}, torch-dequant "
              f"{results[(qt, 'zopt', 'torch-dequant')] / dv:.2f}); zopt/eager-fp32 = {z / eager['eager fp32']:.2f}")

if __name__ == "__main__":
    main()
