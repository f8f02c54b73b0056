"""The planner's step-time model against step times measured on a GPU.

    python benchmarks/gpu_vs_plan.py docs/gpu-runs/2026-11-27-h200/gpu-bench-full.json
    python benchmarks/gpu_vs_plan.py --fit docs/gpu-runs/2026-11-27-h200/gpu-bench-full.json

For each case of a ``gpu_bench.py`` report (one transformer call at the report's resolution and text
length, weights resident), the planner is run for that GPU (its name picks the speed table's row,
``zopt.runtime.costs.SPEEDS``) and that model size, and its predicted step for the same format and
backend (offload none) is printed beside the measured median, with their ratio. Cases the planner
does not weigh (fp16, int8_w8a8) are listed without a prediction.

``--fit`` also prints the constants of ``zopt.runtime.costs`` that the report implies: the CUDA
efficiency that makes bf16 exact, each dequantizing format's effective passes
(``GPU_DEQUANT_PASSES``: its time above bf16 over one pass at the card's bandwidth) and the bytes
per activation element of the activation-quantizing kernels (``ACT_QUANT_BYTES``). Fitted on one
report, the constants reproduce it by construction: the check is another report (another size or
another card) printed without ``--fit``. (The fit rebuilds the planner's work figures as
``planner.plan`` does; keep the two in step.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's zopt

GIB = 1024**3


def hardware_for(machine: dict):
    """A hardware record for the report's GPU: an NVIDIA Hopper-class profile renamed, with the
    report's memory, capability and the optional packages it had."""
    from zopt.platform.fakes import PROFILES

    cc = tuple(int(x) for x in str(machine.get("compute_capability") or "9.0").split("."))
    total = int(machine.get("total_memory") or 80 * GIB)
    packages = {k: v for k in ("bitsandbytes", "gguf", "onnxruntime") if (v := machine.get(k))}
    return dataclasses.replace(PROFILES["cuda-sm90-80gb"], device_name=machine["name"], compute_capability=cc,
                               arch=f"sm_{cc[0]}{cc[1]}", total_memory=total, free_memory=total - GIB,
                               packages=packages)


def config_for(report: dict) -> dict:
    from zopt.families import zimage

    return {"full": zimage.FULL_CONFIG, "medium": zimage.MEDIUM_CONFIG, "tiny": zimage.TINY_CONFIG}[report["size"]]


def predictions(report: dict) -> dict[tuple[str, str], float]:
    """(format, backend) -> predicted seconds per step, offload none, from :func:`planner.plan`."""
    from zopt.runtime import planner

    st = report["settings"]
    hw = hardware_for(report["machine"])
    p = planner.plan(hw, st["width"], st["height"], text_tokens=st["text_tokens"], config=config_for(report),
                     approximate=True)
    return {(o.spec, o.backend): o.step_s for o in p.options
            if o.offload == "none" and o.text_encoder == "device" and not o.vae_tiling}


def fit(report: dict, measured: dict[tuple[str, str], float]) -> list[str]:
    """The constants of zopt.runtime.costs this report implies (see the module docstring)."""
    from zopt.runtime import costs, planner
    from zopt.runtime.memory import _key, _param_split, quant_io, shape_for

    st = report["settings"]
    hw = hardware_for(report["machine"])
    s = costs.speed_of(hw)
    config = config_for(report)
    quant, other, *_ = _param_split(_key(config))
    shape = shape_for(st["width"], st["height"], 1, st["text_tokens"])
    work = costs.work_for(config, quant + other, quant, shape.tokens, shape.text_tokens, st["width"] * st["height"],
                          1, 0.0, planner.TEXT_ENCODER_PARAMS, quant_io(_key(config)))
    lines = []
    bf16 = measured.get(("bf16", "torch"))
    if bf16 is None:
        return ["no bf16 case: nothing to fit against"]
    eff = costs.CUDA_EFFICIENCY * costs.compute_seconds(work, s, hw, "torch", 2) / bf16
    lines.append(f"CUDA_EFFICIENCY = {eff:.3f}   (now {costs.CUDA_EFFICIENCY})")
    cands = {c.spec: c for c in planner.CANDIDATES}
    for (spec, backend), t in sorted(measured.items()):
        c = cands.get(spec)
        if c is None or not c.dequant or backend in costs.KERNEL_CLASS:
            continue
        unit = costs.dequant_seconds(quant, c.bits, 1.0, s)
        now = costs.dequant_passes(spec, backend, c.unpack, hw)
        lines.append(f"passes {spec} {backend} = {(t - bf16) / unit:.1f}   (now {now})")
    saved = costs.CUDA_EFFICIENCY, costs.ACT_QUANT_BYTES
    try:
        costs.CUDA_EFFICIENCY, costs.ACT_QUANT_BYTES = eff, 0.0
        for (spec, backend), t in sorted(measured.items()):
            if backend in costs.APPROXIMATE and spec in cands and work.act_elements:
                bare = costs.compute_seconds(work, s, hw, backend, 2)
                lines.append(f"ACT_QUANT_BYTES ({spec} {backend}) = {(t - bare) * s.memory * costs.GB / work.act_elements:.1f}"
                             f"   (now {saved[1]})")
    finally:
        costs.CUDA_EFFICIENCY, costs.ACT_QUANT_BYTES = saved
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", type=Path, help="gpu_bench.py JSON reports")
    ap.add_argument("--fit", action="store_true", help="also print the constants each report implies")
    args = ap.parse_args(argv)
    for path in args.reports:
        report = json.loads(path.read_text())
        m = report["machine"]
        st = report["settings"]
        print(f"{path}: {report['size']} model, {m['name']}, {st['width']}x{st['height']}, "
              f"{st['text_tokens']} text tokens ({report['started']})")
        pred = predictions(report)
        measured = {}
        print(f"  {'format':12s} {'backend':14s} {'measured':>10s} {'predicted':>10s} {'ratio':>6s}")
        for r in report["results"]:
            if r.get("status") != "ok":
                continue
            key = (r["format"], r["backend"])
            t = r["latency_ms"]["median"] / 1000
            measured[key] = t
            p = pred.get(key)
            shown = f"{p * 1000:8.1f} ms {t / p:6.2f}" if p else f"{'not planned':>10s}"
            print(f"  {key[0]:12s} {key[1]:14s} {t * 1000:7.1f} ms {shown}")
        if args.fit:
            for line in fit(report, measured):
                print("  fit:", line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
