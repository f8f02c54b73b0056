"""Bench records for tests that do not need a sweep: built with the harness's own record code."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from zopt.bench.harness import Planned, _record

HARDWARE = {"device": "cpu", "device_name": "Test CPU", "cores": 2, "total_memory": 8 << 30}


def common(fingerprint: str = "cpu:Test CPU:x86_64:2") -> dict[str, Any]:
    return {
        "run_id": "20260101T000000Z-abcdef", "source": {"spec": "tiny", "sha256": "ab" * 32, "params": 9_000_000},
        "options": {}, "hardware": dict(HARDWARE), "fingerprint": fingerprint,
        "software": {"python": "3.11", "zopt": "0.1.0", "torch": "2.13.0"},
        "settings": {"steps": 2, "width": 64, "height": 64, "prompts": ["a", "b"], "seeds": [0], "repeats": 2,
                     "warmup": 1, "guidance_scale": 0.0, "device": "cpu"},
    }


def metrics(step_ms: float = 100.0, peak: int = 200_000_000, psnr: float | None = 40.0, bits: float = 16.0,
            rel_l2: float = 1e-3) -> dict[str, Any]:
    q = None if psnr is None else {
        "per_step": [{"step": 0, "rel_l2": rel_l2, "cosine": 0.9999}, {"step": 1, "rel_l2": rel_l2 * 2, "cosine": 0.9998}],
        "rel_l2_mean": rel_l2 * 1.5, "rel_l2_max": rel_l2 * 2, "cosine_min": 0.9998, "cosine_mean": 0.99985,
        "final_latent_rel_err": rel_l2 * 3, "psnr_db": psnr, "ssim": 0.98, "lpips": None,
        "lpips_status": "not available: package lpips is not installed",
        "per_image": [{"prompt": "a", "seed": 0, "final_latent_rel_err": 0.003, "psnr_db": psnr, "ssim": 0.98,
                       "lpips": None},
                      {"prompt": "b", "seed": 0, "final_latent_rel_err": 0.003, "psnr_db": psnr, "ssim": 0.98,
                       "lpips": None}]}
    return {"artifact_bytes": int(bits * 9_000_000 / 8), "bits_per_weight": bits, "convert_s": 1.0, "cached": False,
            "load_s": 0.5, "pipeline_s": 0.4,
            "memory": {"kind": "cpu_rss", "peak_bytes": peak, "baseline_bytes": 300_000_000,
                       "cuda_max_allocated": None, "cuda_max_reserved": None},
            "latency": {"step_ms": {"median": step_ms, "p90": step_ms * 1.2, "mean": step_ms, "min": step_ms,
                                    "max": step_ms * 1.3, "n": 4},
                        "image_s": {"median": 1.0, "p90": 1.1, "mean": 1.0, "min": 0.9, "max": 1.2, "n": 2}},
            "quality": q}


def record(spec: str = "bf16", backend: str | None = "torch", role: str = "variant", status: str = "ok",
           out: Path | None = None, images: list[str] | None = None, **kw) -> dict[str, Any]:
    name, _, sub = spec.partition(":")
    row = Planned(spec, name, sub or None, backend, f"{backend}: test")
    res = {"status": status, "message": None if status == "ok" else "something went wrong",
           "metrics": metrics(**kw) if status == "ok" else {}, "duration_s": 3.0, "compute_dtype": "float32",
           "images": [{"prompt": p, "seed": 0, "path": str(Path(out or ".") / im)}
                      for p, im in zip(("a", "b"), images or [], strict=False)]}
    if role == "reference" and status == "ok":
        res["metrics"]["quality"] = None
    return _record(common(), row, role, res, {}, None, Path(out or "."))


def records() -> list[dict[str, Any]]:
    """A reference, two quantized-looking variants and one skipped format."""
    return [record("fp32", role="reference", psnr=None, bits=32),
            record("bf16", psnr=60.0, bits=16, step_ms=90.0),
            record("fp16", psnr=45.0, bits=16, step_ms=95.0, rel_l2=3e-3),
            record("gguf:Q4_K_M", backend=None, status="unsupported")]


def clone(recs):
    return copy.deepcopy(recs)
