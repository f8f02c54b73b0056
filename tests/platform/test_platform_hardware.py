"""Hardware records: detection on this machine, and the simulated ones."""

from __future__ import annotations

import json
import os

import pytest

from zopt.errors import ZoptError
from zopt.platform.fakes import FAKES, fake
from zopt.platform.hardware import Hardware, detect


def test_detect_this_machine():
    import importlib.util

    import psutil

    from zopt.formats.registry import packages

    # the packages to probe come from the format registry (the platform layer knows no formats)
    assert {"onnxruntime", "bitsandbytes", "tensorrt"} <= set(packages())
    hw = detect(packages())
    assert hw.device in ("cuda", "rocm", "mps", "xpu", "cpu")
    assert 0 < hw.free_memory <= hw.total_memory
    assert hw.cores == (os.cpu_count() or 1)
    assert abs(hw.system_memory - psutil.virtual_memory().total) < 1024**2
    assert hw.torch_version and hw.torch_version[0].isdigit()
    if hw.device == "cpu":
        assert hw.compute_capability is None and not hw.fp8_matmul
        assert hw.total_memory == hw.system_memory
    cpuinfo = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    for flag in hw.cpu_flags:
        assert flag in cpuinfo
    if " avx2 " in cpuinfo:
        assert "AVX2" in hw.isa()
    if importlib.util.find_spec("onnxruntime"):
        assert "onnxruntime" in hw.packages and "CPUExecutionProvider" in hw.ort_providers
    else:
        assert hw.ort_providers == ()
    for name in hw.packages:
        assert importlib.util.find_spec(name) is not None


@pytest.mark.parametrize("name", list(FAKES))
def test_records_round_trip_through_json(name):
    hw = FAKES[name]
    back = Hardware.from_dict(json.loads(json.dumps(hw.to_dict())))
    assert back == hw and back.fingerprint() == hw.fingerprint()


def test_simulated_machines_are_what_they_claim():
    gib = 1024**3
    cc = {n: h.compute_capability for n, h in FAKES.items()}
    assert cc["cuda-sm80-24gb"] == (8, 0) and FAKES["cuda-sm80-24gb"].total_memory == 24 * gib
    assert cc["cuda-sm89-8gb"] == (8, 9) and FAKES["cuda-sm89-8gb"].total_memory == 8 * gib
    assert cc["cuda-sm90-80gb"] == (9, 0) and FAKES["cuda-sm90-80gb"].total_memory == 80 * gib
    mi = FAKES["rocm-mi300x"]
    assert mi.device == "rocm" and mi.arch == "gfx942" and mi.total_memory == 192 * gib and mi.torch_device == "cuda"
    assert FAKES["apple-mps"].device == "mps" and FAKES["apple-mps"].unified_memory
    assert FAKES["cpu-only"].device == "cpu" and not FAKES["cpu-only"].is_gpu
    for hw in FAKES.values():
        assert 0 < hw.free_memory <= hw.total_memory and hw.system_free <= hw.system_memory
        # FP8 tensor-core matmul exactly on sm_89+ and CDNA3
        assert hw.fp8_matmul == (hw.compute_capability is not None and hw.compute_capability >= (8, 9)
                                 or hw.arch == "gfx942")
    assert "AMX" in FAKES["cuda-sm90-80gb"].isa() and "NEON" in FAKES["apple-mps"].isa()
    assert [n for n, h in FAKES.items() if h.has_streams] == ["cuda-sm80-24gb", "cuda-sm89-8gb",
                                                              "cuda-sm90-80gb", "rocm-mi300x"]


def test_unknown_fake_is_a_clear_error():
    with pytest.raises(ZoptError, match="cpu-only"):
        fake("tpu-v5")


def test_cpu_vector_width_comes_from_torch_dispatch():
    """The CPU cost model uses the ISA torch's kernels dispatch to, not a parse of /proc/cpuinfo."""
    import dataclasses

    import torch

    from zopt.platform.hardware import detect

    hw = detect()
    assert hw.cpu_capability == torch.backends.cpu.get_cpu_capability()
    want = {"AVX512": 16, "AVX2": 8}.get(hw.cpu_capability, 4)
    assert hw.vector_width() == want
    # the capability decides even where the flags say more (ATEN_CPU_CAPABILITY=avx2 on an AVX-512 CPU)
    lowered = dataclasses.replace(hw, cpu_capability="AVX2", cpu_flags=("avx2", "avx512f"))
    assert lowered.vector_width() == 8
    assert dataclasses.replace(hw, cpu_capability="", cpu_flags=("avx2", "avx512f")).vector_width() == 16
