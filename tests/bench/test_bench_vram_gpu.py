"""VRAM figures of the benchmarks agree with ``torch.cuda.max_memory_allocated`` measured
independently around the same work (within 10%), and account for a known transient allocation."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

SCRATCH = 256 * 1024**2  # bytes allocated and dropped inside each measured call


def _independent_peak(fn) -> int:
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return int(torch.cuda.max_memory_allocated())


@pytest.fixture(scope="module")
def work():
    """A tiny model on the GPU and one call that also holds SCRATCH bytes for a moment."""
    import gpu_models as M
    import torch

    from zopt.families import zimage

    cfg = zimage.TINY_CONFIG
    model = M.build_plain(cfg, 0, "cuda")
    example = M.inputs(cfg, 256, 256, 64, "cuda", torch.bfloat16)

    def step():
        scratch = torch.ones(SCRATCH, dtype=torch.uint8, device="cuda")
        M.forward(model, example)
        del scratch

    return model, step


def test_gpu_bench_measure_matches_torch(work):
    import gpu_bench
    import gpu_models as M

    model, step = work
    rec = gpu_bench.measure(step, "cuda", warmup=1, iters=10)
    independent = _independent_peak(step)
    assert abs(rec["peak_allocated_bytes"] - independent) <= 0.1 * independent
    assert rec["peak_allocated_bytes"] >= M.model_bytes(model) + SCRATCH
    assert rec["peak_reserved_bytes"] >= rec["peak_allocated_bytes"]
    lat = rec["latency_ms"]
    assert lat["n"] == 10 and lat["timer"] == "cuda-events" and 0 < lat["min"] <= lat["median"] <= lat["max"]


def test_bench_peak_memory_matches_torch(work):
    import torch

    from zopt.bench.metrics import PeakMemory

    _, step = work
    step()  # kernels loaded and workspaces made before the measured call
    for cached in (True, False):
        if not cached:
            torch.cuda.empty_cache()  # the scratch buffer's room must now come from the device
        with PeakMemory("cuda") as pm:
            step()
        got = pm.as_dict()
        independent = _independent_peak(step)
        assert got["kind"] == "cuda"
        assert abs(got["cuda_max_allocated"] - independent) <= 0.1 * independent
        # peak_bytes is the growth above entry: at least the scratch buffer, also when torch's cache
        # already held the room for it (NVML then sees no growth), and no more than torch reserved
        # plus what NVML also counts outside torch
        assert SCRATCH <= got["peak_bytes"] <= got["cuda_max_reserved"] + 512 * 1024**2
        if got["counter"] == "nvml-process" and not cached:
            assert got["counter_peak_bytes"] >= SCRATCH  # NVML saw the device memory grow


def test_gpu_bench_report_vram_matches_torch(tmp_path):
    """The figure the benchmark writes for the medium bf16 model, against the same model built and
    run again with torch's counters read around it."""
    import json

    import gpu_bench
    import gpu_models as M
    import torch

    from zopt.families import zimage

    out = tmp_path / "bench.json"
    assert gpu_bench.main(["--size", "medium", "--formats", "bf16", "--resolution", "512", "--iters", "10",
                           "--warmup", "1", "--json", str(out)]) == 0
    rec = next(r for r in json.loads(out.read_text())["results"] if r["format"] == "bf16")
    assert rec["status"] == "ok" and rec["rel_err"] < 1e-3  # the reference is this same model
    cfg = zimage.config_for("medium")
    model = M.build_plain(cfg, 0, "cuda")
    example = M.inputs(cfg, 512, 512, 128, "cuda", torch.bfloat16)
    M.forward(model, example)
    independent = _independent_peak(lambda: M.forward(model, example))
    assert rec["weights_bytes"] == M.model_bytes(model)
    assert abs(rec["peak_allocated_bytes"] - independent) <= 0.1 * independent
