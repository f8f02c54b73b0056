"""Step latency, peak VRAM and output error of every format and backend on a CUDA GPU.

    python benchmarks/gpu_bench.py --size medium --budget 80 --json OUT.json   # one part of gpu_check.sh
    python benchmarks/gpu_bench.py --table OUT1.json OUT2.json                 # the short table
    python benchmarks/gpu_bench.py --dry                                       # CPU smoke: tiny model

For a Z-Image transformer of the chosen size (``medium``: dim 1536, 8 layers; ``full``: the
6.15B-parameter original) with seeded random weights made on the GPU (``gpu_models.py``), each
case builds the format in memory, runs one transformer call (one denoising step) ``--warmup``
times, then times ``--iters`` calls with CUDA events and reports the median, the peak allocated
and reserved VRAM during the timed calls (``torch.cuda.max_memory_*``), the resident weight bytes
and the output's relative L2 error against the bf16 model's. Whether a backend can run here is
the backend registry's answer (``zopt.formats.registry.select_backend``); cases it refuses are listed as
skipped with its reason. The JSON is rewritten after every case, so a part stopped by its time
budget keeps what it measured. Without CUDA, ``--dry`` runs the same code on the tiny model on
the CPU (wall-clock timing, no VRAM) and any GPU run is refused with a message.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMA = "zopt-gpu-bench/1"
# (format, backend, where): "gpu" cases run on CUDA, "cpu" ones in the dry smoke, "any" in both.
# Ordered by what matters most, so a part cut short by its budget loses the least.
CASES: tuple[tuple[str, str, str], ...] = (
    ("bf16", "torch", "any"),
    ("fp8", "scaled-mm", "gpu"),
    ("int8_w8a8", "int-mm-cuda", "gpu"),
    ("int8_w8a8", "int-mm-cpu", "cpu"),
    ("nf4", "bitsandbytes", "gpu"),
    ("fp16", "torch", "any"),
    ("fp8", "fp8-storage", "any"),
    ("int8", "torch-dequant", "any"),
    ("int4", "torch-dequant", "any"),
    ("nf4", "torch-dequant", "any"),
    ("gguf:Q8_0", "torch-dequant", "any"),
    ("gguf:Q4_K_M", "torch-dequant", "any"),
    ("onnx", "ort-cuda", "gpu"),
    ("onnx", "ort-cpu", "cpu"),
)
SIZES = {"medium": "medium", "full": "full", "tiny": "tiny"}
ONNX_SIZES = ("tiny", "medium")  # exporting the full model (24 GB of fp32 graph) does not fit a part's budget


def device_info() -> dict[str, Any]:
    """Card, driver, torch, CUDA and the versions of the packages the formats use."""
    import importlib.metadata as md

    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "host": platform.node()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device="cuda", name=p.name, compute_capability=f"{p.major}.{p.minor}",
                    total_memory=p.total_memory)
        try:
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as e:  # nvidia-ml-py missing or no NVML: the card still runs
            info["driver"] = f"unknown ({type(e).__name__})"
    else:
        info.update(device="cpu", name=platform.processor() or platform.machine())
    for pkg in ("diffusers", "transformers", "bitsandbytes", "gguf", "onnxruntime", "onnxruntime-gpu", "accelerate"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    return info


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn, device: str, warmup: int, iters: int, events: bool = True) -> dict[str, Any]:
    """Run ``fn`` ``warmup`` times, then time ``iters`` calls.

    Returns latency in ms (median, min, max, every call), and on CUDA the peak allocated and reserved
    bytes during the timed calls (peak statistics reset after the warm-up, cached blocks released
    first so the reserved figure is these calls' own) and the allocated bytes before them.
    ``events`` False times CUDA work by wall clock around a synchronize (for runtimes outside torch).
    """
    import torch

    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    _sync(device)
    out: dict[str, Any] = {}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        out["allocated_before_bytes"] = int(torch.cuda.memory_allocated())
    times = []
    for _ in range(iters):
        if cuda and events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(float(start.elapsed_time(end)))
        else:
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - t0) * 1000.0)
    if cuda:
        out["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
        out["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
    out["latency_ms"] = {"median": round(statistics.median(times), 3), "min": round(min(times), 3),
                         "max": round(max(times), 3), "n": len(times), "all": [round(t, 3) for t in times],
                         "timer": "cuda-events" if cuda and events else "wall-clock"}
    return out


def rel_err(a, b) -> float:
    """Relative L2 error ||a - b|| / ||b|| in float32."""
    a, b = a.float().flatten(), b.float().flatten().to(a.device)
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def why_not(fmt: str, backend: str, device: str) -> str | None:
    """The backend registry's reason ``backend`` cannot run ``fmt`` here, or None when it can."""
    from zopt.errors import ZoptError
    from zopt.formats.registry import packages, select_backend
    from zopt.platform.hardware import detect, for_device

    try:
        select_backend(fmt.split(":")[0], for_device(detect(packages()), device), prefer=backend)
    except ZoptError as e:
        return str(e)
    return None


def run_case(config, fmt: str, backend: str, args, device: str, ref, example) -> dict[str, Any]:
    """Build one format, measure it, compare its output with the bf16 reference ``ref``."""
    import gpu_models as M
    import torch

    rec: dict[str, Any] = {"format": fmt, "backend": backend}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="zopt-gpu-bench-") as work:
        model = M.build(config, fmt, backend, args.seed, device, work, args.compute_dtype)
        _sync(device)
        rec["build_s"] = round(time.perf_counter() - t0, 2)
        onnx = fmt == "onnx"
        if onnx:
            call_args = tuple([t.float() for t in v] if isinstance(v, list) else v.float() for v in example)
            rec["providers"] = list(getattr(model, "providers", []))
        else:
            dtype = torch.float16 if fmt == "fp16" else args.compute_dtype
            call_args = tuple([t.to(dtype) for t in v] if isinstance(v, list) else v for v in example)
            rec["weights_bytes"] = M.model_bytes(model)
        out = None

        def step():
            nonlocal out
            out = M.forward(model, call_args)

        rec.update(measure(step, device, args.warmup, args.iters, events=not onnx))
        if onnx:  # onnxruntime allocates outside torch's allocator: torch's counters do not see it
            for k in ("peak_allocated_bytes", "peak_reserved_bytes"):
                rec[k] = None
            rec["note"] = "VRAM of onnxruntime is not visible to torch.cuda counters"
        err = rel_err(out, ref)
        rec["rel_err"] = round(err, 6) if math.isfinite(err) else None
        if not math.isfinite(err):
            rec["note"] = "the output has inf or NaN values"
        out = None  # free the output before the next case is built
    return rec


def run(args) -> dict[str, Any]:
    """Measure every case that applies on this machine for ``args.size``; write JSON as it goes."""
    import gpu_models as M
    import torch

    from zopt.families import zimage

    t_start = time.monotonic()
    cuda = torch.cuda.is_available() and not args.dry
    device = "cuda" if cuda else "cpu"
    size = "tiny" if args.dry else args.size
    config = zimage.config_for(size)
    h = w = args.resolution if not args.dry else 64
    tokens = args.text_tokens if not args.dry else 16
    report: dict[str, Any] = {
        "schema": SCHEMA, "size": size, "dim": config["dim"], "layers": config["n_layers"],
        "settings": {"height": h, "width": w, "text_tokens": tokens, "warmup": args.warmup, "iters": args.iters,
                     "seed": args.seed, "budget_s": args.budget, "dry": bool(args.dry)},
        "machine": device_info(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "results": [],
    }
    # bf16 on CUDA, as the model runs there; float32 on the CPU, zopt's CPU default (bf16 matmuls are slow there)
    args.compute_dtype = torch.bfloat16 if cuda else torch.float32
    report["settings"]["compute_dtype"] = str(args.compute_dtype).replace("torch.", "")
    from zopt._compile import enabled

    # int8_w8a8's activation quantizer is torch.compile'd by default (ZOPT_COMPILE): its first
    # compilation falls in that case's warm-up, not in the timed calls
    report["settings"]["zopt_compile"] = enabled()
    example = M.inputs(config, h, w, tokens, device, args.compute_dtype)
    try:
        ref = _reference(config, args, device, example)
    except Exception as e:  # without the reference no case can be compared: say why and stop
        traceback.print_exc()
        report["error"] = f"the bf16 reference failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        if args.json:
            _write(args.json, report)
        return report
    for fmt, backend, where in CASES:
        rec: dict[str, Any] = {"format": fmt, "backend": backend}
        only = args.formats and fmt not in args.formats and fmt.split(":")[0] not in args.formats
        if only:
            continue
        elapsed = time.monotonic() - t_start
        if where == ("cpu" if cuda else "gpu"):
            reason = why_not(fmt, backend, device) or ("CPU smoke only" if where == "cpu" else "GPU only")
            rec.update(status="skipped", reason=reason)
        elif fmt == "onnx" and size not in ONNX_SIZES:
            rec.update(status="skipped", reason=f"exporting the {size} model to ONNX does not fit a part's budget")
        elif elapsed > args.budget:
            rec.update(status="skipped", reason=f"part budget of {args.budget:.0f} s spent ({elapsed:.0f} s)")
        elif (why := why_not(fmt, backend, device)) is not None:
            rec.update(status="skipped", reason=why)
        else:
            try:
                rec = {**run_case(config, fmt, backend, args, device, ref, example), "status": "ok"}
            except Exception as e:  # one broken format must not hide the others' figures
                traceback.print_exc()
                rec.update(status="error", reason=f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        report["results"].append(rec)
        _line(rec)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        if args.json:
            _write(args.json, report)
    report["elapsed_s"] = round(time.monotonic() - t_start, 1)
    if args.json:
        _write(args.json, report)
    return report


def _reference(config, args, device, example):
    """The bf16 model's output (built again: cheap, and no reference weights stay resident)."""
    import gpu_models as M

    model = M.build_plain(config, args.seed, device, args.compute_dtype)
    out = M.forward(model, example).float().clone()
    del model
    return out


def _write(path: str, report: dict[str, Any]) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    os.replace(tmp, p)


def _gib(n) -> str:
    return "-" if n is None else f"{n / 1024**3:.2f}"


def _err(e) -> str:
    return "non-finite" if e is None else f"{e:.4f}"


def _line(rec: dict[str, Any]) -> None:
    if rec.get("status") == "ok":
        lat = rec["latency_ms"]["median"]
        print(f"  {rec['format']:12s} {rec['backend']:14s} {lat:9.2f} ms  peak {_gib(rec.get('peak_allocated_bytes'))} "
              f"GiB  err {_err(rec['rel_err'])}  (built in {rec['build_s']} s)", flush=True)
    else:
        print(f"  {rec['format']:12s} {rec['backend']:14s} {rec.get('status')}: {rec.get('reason')}", flush=True)


def table(reports: list[dict[str, Any]]) -> str:
    """A short Markdown table of one or more reports (one row per case)."""
    lines = ["| size | format | backend | step ms (median) | peak alloc GiB | peak reserved GiB | weights GiB | rel err | status |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in reports:
        for c in r["results"]:
            if c.get("status") == "ok":
                lines.append(f"| {r['size']} | {c['format']} | {c['backend']} | {c['latency_ms']['median']:.2f} | "
                             f"{_gib(c.get('peak_allocated_bytes'))} | {_gib(c.get('peak_reserved_bytes'))} | "
                             f"{_gib(c.get('weights_bytes'))} | {_err(c['rel_err'])} | ok |")
            else:
                lines.append(f"| {r['size']} | {c['format']} | {c['backend']} | - | - | - | - | - | "
                             f"{c.get('status')}: {str(c.get('reason', ''))[:90]} |")
    for r in reports:
        if r.get("error"):
            lines.append(f"| {r['size']} | - | - | - | - | - | - | - | error: {r['error'][:120]} |")
    if reports:
        m = reports[0]["machine"]
        s = reports[0]["settings"]
        lines.append("")
        lines.append(f"{m.get('name')} (driver {m.get('driver', '-')}), torch {m.get('torch')}, CUDA {m.get('cuda')}; "
                     f"{s['height']}x{s['width']} px, {s['text_tokens']} text tokens, median of {s['iters']} "
                     f"after {s['warmup']} warm-up; {reports[0]['started']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=("medium", "full"), default="medium")
    ap.add_argument("--dry", action="store_true", help="CPU smoke on the tiny model (no GPU needed)")
    ap.add_argument("--formats", nargs="*", default=None, help="only these formats (e.g. bf16 fp8 gguf)")
    ap.add_argument("--resolution", type=int, default=1024, help="image side in pixels (latents are 1/8)")
    ap.add_argument("--text-tokens", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget", type=float, default=1e9, help="seconds after which remaining cases are skipped")
    ap.add_argument("--json", default=None, help="write the report here (rewritten after every case)")
    ap.add_argument("--table", nargs="+", default=None, metavar="JSON", help="print the table of these reports")
    args = ap.parse_args(argv)
    if args.table:
        reports = [json.loads(Path(p).read_text()) for p in args.table if Path(p).exists()]
        missing = [p for p in args.table if not Path(p).exists()]
        print(table(reports))
        for p in missing:
            print(f"(no report at {p}: that part did not run or wrote nothing)")
        return 0
    import torch

    if not args.dry and not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here: GPU benchmark skipped (run --dry for the CPU smoke)")
        return 0
    if args.dry:
        args.iters = min(args.iters, 3)
        args.warmup = min(args.warmup, 1)
    print(f"gpu_bench: {'dry CPU smoke, tiny model' if args.dry else args.size + ' model on ' + torch.cuda.get_device_name(0)}",
          flush=True)
    report = run(args)
    print(table([report]))
    failed = [f"{r['format']} {r['backend']}" for r in report["results"] if r.get("status") == "error"]
    if report.get("error") or failed:
        print(f"gpu_bench: {report.get('error') or 'errors in: ' + ', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
