"""The planner's step-time model against the committed GPU run (docs/gpu-runs/): the constants
of zopt.runtime.costs were fitted to it, so every format the planner weighs is predicted within
10 % and in the measured order; a change to the time model that breaks this needs a new run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import gpu_vs_plan  # noqa: E402

RUN = Path(__file__).resolve().parents[2] / "docs" / "gpu-runs" / "2026-11-27-h200" / "gpu-bench-full.json"


def test_full_size_run_is_reproduced():
    report = json.loads(RUN.read_text())
    assert report["machine"]["name"] == "NVIDIA H200" and report["size"] == "full"
    pred = gpu_vs_plan.predictions(report)
    measured = {(r["format"], r["backend"]): r["latency_ms"]["median"] / 1000 for r in report["results"]
                if r["status"] == "ok" and (r["format"], r["backend"]) in pred}
    assert len(measured) >= 8
    for key, t in measured.items():
        assert abs(pred[key] / t - 1) < 0.10, (key, t, pred[key])
    # the order of the measured times, where two differ by more than 10 %
    for a, ta in measured.items():
        for b, tb in measured.items():
            if ta > 1.1 * tb:
                assert pred[a] > pred[b], (a, b)


def test_cli_prints_each_case(capsys):
    assert gpu_vs_plan.main([str(RUN), "--fit"]) == 0
    out = capsys.readouterr().out
    assert "gguf:Q4_K_M" in out and "not planned" in out and "fit: CUDA_EFFICIENCY" in out
