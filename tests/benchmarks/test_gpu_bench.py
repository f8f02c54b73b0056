"""The GPU benchmark's CPU smoke (``--dry``): the same build/measure/compare/report code on the tiny
model, so the script cannot rot between the rare runs on a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

# one case per way the benchmark builds a model (plain, Scheme, NF4, GGUF, ONNX through files):
# (format, backend) -> bound on the output's relative error against the unquantized model (tiny
# model, float32 on the CPU; measured 0.040, 0.022, 0.149, 0.008 and below 1e-4)
BOUNDS = {("fp8", "fp8-storage"): 0.1, ("int8_w8a8", "int-mm-cpu"): 0.05, ("nf4", "torch-dequant"): 0.25,
          ("gguf:Q8_0", "torch-dequant"): 0.04, ("onnx", "ort-cpu"): 1e-3}
GPU_ONLY = {("fp8", "scaled-mm"), ("int8_w8a8", "int-mm-cuda"), ("nf4", "bitsandbytes"), ("onnx", "ort-cuda")}


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    import contextlib
    import io

    import gpu_bench

    out = tmp_path_factory.mktemp("gpu-bench") / "dry.json"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = gpu_bench.main(["--dry", "--formats", "bf16", "fp8", "int8_w8a8", "nf4", "gguf:Q8_0", "onnx",
                             "--json", str(out)])
    return rc, json.loads(out.read_text()), buf.getvalue(), out


@pytest.mark.slow
def test_dry_run_measures_every_cpu_case(dry):
    pytest.importorskip("onnxruntime")
    rc, report, _, _ = dry
    assert rc == 0 and report["schema"] == "zopt-gpu-bench/1" and report["size"] == "tiny"
    got = {(r["format"], r["backend"]): r for r in report["results"]}
    assert set(got) == set(BOUNDS) | GPU_ONLY | {("bf16", "torch")}
    ref = got[("bf16", "torch")]
    assert ref["status"] == "ok" and ref["rel_err"] == 0.0 and ref["weights_bytes"] > 0
    for key, bound in BOUNDS.items():
        r = got[key]
        assert r["status"] == "ok", (key, r.get("reason"))
        assert r["rel_err"] < bound and (key[0] == "onnx" or r["rel_err"] > 0), (key, r["rel_err"])
        lat = r["latency_ms"]
        assert lat["n"] == 3 and len(lat["all"]) == 3 and lat["timer"] == "wall-clock"
        assert 0 < lat["min"] <= lat["median"] <= lat["max"]
        assert r["peak_allocated_bytes"] is None if key[0] == "onnx" else "peak_allocated_bytes" not in r
    for key in GPU_ONLY:  # refused by the backend registry, with its reason
        assert got[key]["status"] == "skipped" and ("CUDA" in got[key]["reason"] or "NVIDIA" in got[key]["reason"]), got[key]


@pytest.mark.slow
def test_table_is_printed_last_and_rebuilt_from_json(dry, capsys):
    import gpu_bench

    _, report, printed, path = dry
    table = gpu_bench.table([report])
    assert printed.rstrip().endswith(table.rstrip())
    rows = [line for line in table.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == len(report["results"])
    assert gpu_bench.main(["--table", str(path)]) == 0
    assert capsys.readouterr().out.strip() == table.strip()


def test_gpu_run_without_cuda_says_so_and_writes_nothing(tmp_path, capsys):
    import gpu_bench
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU run is the gpu_check.sh part")
    assert gpu_bench.main(["--size", "medium", "--json", str(tmp_path / "x.json")]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("script", ["gpu_check.sh", "gpu_wheels.sh"])
def test_kit_scripts_parse(script):
    proc = subprocess.run(["bash", "-n", str(REPO / "benchmarks" / script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
