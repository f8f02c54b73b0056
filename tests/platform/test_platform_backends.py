"""Backend registry: every requirement helper and selection rule, on every simulated machine."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

import pytest

from zopt.errors import UnsupportedFormat
from zopt.formats.registry import select_backend
from zopt.platform import backends as B
from zopt.platform.fakes import FAKES

CUDA = {"cuda-sm80-24gb", "cuda-sm89-8gb", "cuda-sm90-80gb"}
ALL = set(FAKES)


def holds(req) -> set[str]:
    return {name for name, hw in FAKES.items() if req(hw)}


@pytest.mark.parametrize(
    "req, expected",
    [
        (B.needs_device("cuda"), CUDA),
        (B.needs_device("rocm"), {"rocm-mi300x"}),
        (B.needs_device("cuda", "rocm"), CUDA | {"rocm-mi300x"}),
        (B.needs_mps(), {"apple-mps"}),
        (B.needs_device("cpu"), {"cpu-only"}),
        (B.needs_cc(8, 0), CUDA),
        (B.needs_cc(8, 9), {"cuda-sm89-8gb", "cuda-sm90-80gb"}),
        (B.needs_cc(9, 0, below=(10, 0)), {"cuda-sm90-80gb"}),
        (B.needs_cc(10, 0), set()),
        (B.needs_rocm_arch("gfx94"), {"rocm-mi300x"}),
        (B.needs_rocm_arch("gfx90a", "gfx11"), set()),
        (B.needs_package("bitsandbytes", "bnb"), CUDA),
        (B.needs_package("tensorrt", "tensorrt"), {"cuda-sm89-8gb", "cuda-sm90-80gb"}),
        (B.needs_package("flash_attn"), {"cuda-sm80-24gb", "cuda-sm90-80gb", "rocm-mi300x"}),
        (B.needs_ort_provider("CPUExecutionProvider"), ALL),
        (B.needs_ort_provider("CUDAExecutionProvider"), CUDA),
        (B.needs_ort_provider("TensorrtExecutionProvider"), {"cuda-sm89-8gb", "cuda-sm90-80gb"}),
        (B.needs_ort_provider("ROCMExecutionProvider"), {"rocm-mi300x"}),
        (B.needs_free_memory(16 * 1024**3), ALL - {"cuda-sm89-8gb"}),
        (B.needs_free_memory(100 * 1024**3), {"rocm-mi300x"}),
        (B.needs_cpu_flag("amx_tile"), {"cuda-sm90-80gb"}),
        (B.needs_cpu_flag("avx512_vnni", "avx_vnni"), ALL - {"apple-mps"}),
        (B.needs_cpu_flag("neon"), {"apple-mps"}),
        (B.needs_any(B.needs_cc(8, 0), B.needs_rocm_arch("gfx94")), CUDA | {"rocm-mi300x"}),
    ],
    ids=lambda v: getattr(v, "name", None),
)
def test_requirement_holds_exactly_on_expected_machines(req, expected):
    assert holds(req) == expected
    assert req.missing.startswith("needs")  # the user is told what is missing


@pytest.fixture
def local_formats():
    """Test-local backend declarations (data, as a registry entry holds them) mirroring the
    project's per-format backend plan."""
    made = {
        "t-fp8": [("scaled-mm", 20, (B.needs_device("cuda"), B.needs_cc(8, 9))), ("fp8-storage", 10, ())],
        "t-nf4": [("bitsandbytes", 20, (B.needs_device("cuda"), B.needs_package("bitsandbytes", "bnb"))),
                  ("torch-dequant", 10, ())],
        "t-w8a8": [("int-mm-cuda", 20, (B.needs_device("cuda"),)), ("torch-dequant", 10, ())],
        "t-onnx": [("ort-tensorrt", 30, (B.needs_ort_provider("TensorrtExecutionProvider"),)),
                   ("ort-cuda", 20, (B.needs_ort_provider("CUDAExecutionProvider"),)),
                   ("ort-cpu", 10, (B.needs_ort_provider("CPUExecutionProvider"),))],
        "t-trt": [("tensorrt", 10, (B.needs_device("cuda"), B.needs_package("tensorrt", "tensorrt")))],
        "t-big": [("roomy", 20, (B.needs_free_memory(64 * 1024**3),)), ("mps-only", 15, (B.needs_mps(),)),
                  ("cdna3", 12, (B.needs_rocm_arch("gfx94"),)), ("amx", 11, (B.needs_cpu_flag("amx_tile"),))],
    }
    return {fmt: _Entry(fmt, tuple(B.Backend(name, prio, req, f"{name} test backend") for name, prio, req in rows))
            for fmt, rows in made.items()}


@dataclass(frozen=True)
class _Entry:
    """What select() needs of a registry entry: a name and its backends."""

    name: str
    backends: tuple


EXPECTED = {
    #                  t-fp8          t-nf4            t-w8a8           t-onnx          t-trt       t-big
    "cuda-sm80-24gb": ("fp8-storage", "bitsandbytes", "int-mm-cuda", "ort-cuda", None, None),
    "cuda-sm89-8gb": ("scaled-mm", "bitsandbytes", "int-mm-cuda", "ort-tensorrt", "tensorrt", None),
    "cuda-sm90-80gb": ("scaled-mm", "bitsandbytes", "int-mm-cuda", "ort-tensorrt", "tensorrt", "roomy"),
    "rocm-mi300x": ("fp8-storage", "torch-dequant", "torch-dequant", "ort-cpu", None, "roomy"),
    "apple-mps": ("fp8-storage", "torch-dequant", "torch-dequant", "ort-cpu", None, "mps-only"),
    "cpu-only": ("fp8-storage", "torch-dequant", "torch-dequant", "ort-cpu", None, None),
}


@pytest.mark.parametrize("machine", list(FAKES))
def test_selection_rules_on_every_machine(local_formats, machine):
    hw = FAKES[machine]
    for entry, want in zip(local_formats.values(), EXPECTED[machine], strict=True):
        if want is None:
            with pytest.raises(UnsupportedFormat) as e:
                B.select(entry, hw)
            assert "no backend can run" in str(e.value) and "needs" in str(e.value) and entry.name in str(e.value)
            continue
        sel = B.select(entry, hw)
        assert sel.name == want, (entry.name, machine)
        assert not sel.backend.why_not(hw)
        # every higher-priority backend really was unavailable, and the reason says so
        for b in B.ordered(entry):
            if b.priority > sel.backend.priority:
                assert b.why_not(hw) and b.name in sel.reason


def test_sm90_80gb_amx_order(local_formats):
    # with the roomy backend gone, the CPU-flag one is next on the H100 box (AMX), absent elsewhere
    big = local_formats["t-big"]
    big = replace(big, backends=tuple(b for b in big.backends if b.name != "roomy"))
    assert B.select(big, FAKES["cuda-sm90-80gb"]).name == "amx"
    assert B.select(big.backends, FAKES["rocm-mi300x"]).name == "cdna3"  # a plain sequence works too


def test_requested_backend_that_cannot_run_names_what_is_missing(local_formats):
    fp8, trt = local_formats["t-fp8"], local_formats["t-trt"]
    with pytest.raises(UnsupportedFormat) as e:
        B.select(fp8, FAKES["cuda-sm80-24gb"], prefer="scaled-mm")
    assert "compute capability >= 8.9" in str(e.value)
    with pytest.raises(UnsupportedFormat) as e:
        B.select(trt, FAKES["apple-mps"], prefer="tensorrt")
    assert "CUDA" in str(e.value) and "zopt[tensorrt]" in str(e.value)
    with pytest.raises(UnsupportedFormat) as e:
        B.select(fp8, FAKES["cpu-only"], prefer="nonesuch")
    assert "scaled-mm" in str(e.value) and "fp8-storage" in str(e.value)
    assert B.select(fp8, FAKES["cpu-only"], prefer="fp8-storage").reason == "fp8-storage requested"
    assert B.select(fp8, FAKES["cpu-only"], prefer="auto").name == "fp8-storage"


def test_a_selection_is_made_once(local_formats):
    # a Selection handed on is used as it is, whatever the hardware it meets later
    sel = B.select(local_formats["t-fp8"], FAKES["cuda-sm90-80gb"])
    assert sel.name == "scaled-mm"
    assert B.select(local_formats["t-fp8"], FAKES["cpu-only"], prefer=sel) is sel


def test_platform_layer_imports_no_format():
    import ast
    from pathlib import Path

    root = Path(B.__file__).parent
    for f in root.glob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = ("." * node.level) + (node.module or "")
                # only the leaf modules above it (errors) may be imported from the package root
                assert "formats" not in mod and (not mod.startswith("..") or mod == "..errors"), (f.name, mod)
            elif isinstance(node, ast.Import):
                assert not any("zopt.formats" in a.name for a in node.names), f.name


def test_format_missing_from_build_is_reported_not_crashed(monkeypatch):
    from zopt.formats import registry

    ghost = registry.Format("ghost", "zopt.formats.ghost_not_here", "test", 4, "folder", "Options",
                            (B.Backend("torch", 10),))
    monkeypatch.setitem(registry.FORMATS, "ghost", ghost)
    monkeypatch.delitem(registry._STATUS, "ghost", raising=False)
    assert registry.status("ghost") == "not in this build"
    with pytest.raises(UnsupportedFormat, match="not in this zopt build"):
        registry.select_backend("ghost", FAKES["cpu-only"])
    from zopt.runtime.matrix import format_report

    assert format_report(FAKES["cpu-only"])["ghost"] == {"status": "not in this build", "selected": None,
                                                         "reason": None, "backends": []}
    registry._STATUS.pop("ghost", None)


def test_plain_formats_run_everywhere():
    from zopt.formats.registry import select_backend

    for hw in FAKES.values():
        for fmt in ("bf16", "fp16", "fp32", "tiny", "safetensors"):
            assert select_backend(fmt, hw).name == "torch"


# --- the real format modules (present after the format branches merge) ----------------------------

def _select_all(fmt):
    return {m: (select_backend(fmt, hw).name if _runs(fmt, hw) else None) for m, hw in FAKES.items()}


def _runs(fmt, hw):
    try:
        select_backend(fmt, hw)
        return True
    except UnsupportedFormat:
        return False


def test_fp8_rules():
    pytest.importorskip("zopt.formats.lowbit.fp8")
    got = _select_all("fp8")
    for m, name in got.items():
        # FP8 tensor cores: NVIDIA sm_89+ and AMD gfx94x/gfx95x (E4M3FNUZ on gfx94x)
        # CPUs have no FP8 arithmetic: INT8 codes and the integer matmul there
        fp8_mm = ("cuda-sm89-8gb", "cuda-sm90-80gb", "rocm-mi300x")
        assert name == ("scaled-mm" if m in fp8_mm else "int-mm-cpu" if m == "cpu-only" else "fp8-storage"), m


def test_nf4_rules():
    pytest.importorskip("zopt.formats.lowbit.nf4")
    for m, name in _select_all("nf4").items():
        assert name == ("bitsandbytes" if m in CUDA else "int-mm-cpu" if m == "cpu-only" else "torch-dequant"), m


def test_int8_rules():
    pytest.importorskip("zopt.formats.lowbit.int8")
    # torch._int_mm on CUDA; on CPU it was measured faster than dequant + matmul (docs/lowbit.md)
    gpu = CUDA | {"rocm-mi300x"}  # torch._int_mm runs on ROCm too (hipBLASLt)
    expected = {m: "int-mm-cuda" if m in gpu else "int-mm-cpu" if m == "cpu-only" else "torch-dequant" for m in FAKES}
    assert _select_all("int8_w8a8") == expected
    assert _select_all("int8") == {m: "int-mm-cpu" if m == "cpu-only" else "torch-dequant" for m in FAKES}


def test_dequant_formats_run_everywhere():
    pytest.importorskip("zopt.formats.lowbit.int4")
    # the integer matmul on CPU (measured faster than BF16 there, benchmarks/cpu_latency.py)
    assert _select_all("int4") == {m: "int-mm-cpu" if m == "cpu-only" else "torch-dequant" for m in FAKES}


def test_gguf_rules():
    pytest.importorskip("zopt.formats.gguf")
    # integer matmuls on CPU (measured 0.5x diffusers' GGUF path, docs/gguf.md), exact dequant elsewhere
    expected = {m: "int-mm-cpu" if m == "cpu-only" else "torch-dequant" for m in FAKES}
    assert _select_all("gguf") == expected


def test_onnx_and_tensorrt_rules():
    pytest.importorskip("zopt.formats.onnx")
    got = _select_all("onnx")
    assert got["cpu-only"] == "ort-cpu" and got["cuda-sm80-24gb"] in ("ort-cuda", "ort-tensorrt")
    assert got["cuda-sm90-80gb"] in ("ort-tensorrt", "ort-cuda")
    pytest.importorskip("zopt.formats.onnx.tensorrt")
    trt = _select_all("tensorrt")
    assert trt["cuda-sm90-80gb"] == "tensorrt" and trt["cpu-only"] is None and trt["apple-mps"] is None


# --- doctor and the generated matrix ------------------------------------------------------------------

@pytest.mark.parametrize("machine", list(FAKES))
def test_doctor_json_on_each_machine(machine, capsys):
    from zopt.cli import main

    assert main(["doctor", "--json", "--hardware", machine]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["simulated"] and rep["hardware"]["device"] == FAKES[machine].device
    assert rep["formats"]["bf16"]["selected"] == "torch"
    for fmt, e in rep["formats"].items():
        if e["status"] == "ok":
            avail = [b["name"] for b in e["backends"] if b["available"]]
            assert (e["selected"] in avail) if avail else e["selected"] is None, fmt
            for b in e["backends"]:
                assert b["available"] == (not b["missing"])
        else:
            assert e["backends"] == []
    assert rep["attention"]["auto"] in rep["attention"]["backends"]


def test_doctor_real_machine_text(capsys):
    from zopt.cli import main

    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "device" in out and "formats (selected backend first)" in out and "bf16       -> torch" in out
    assert main(["doctor", "--hardware", "nonesuch"]) == 2
    assert "cuda-sm89-8gb" in capsys.readouterr().err


def test_hardware_matrix_doc_is_current():
    from pathlib import Path

    from zopt.runtime.matrix import markdown

    doc = Path(__file__).resolve().parents[2] / "docs" / "hardware-matrix.md"
    assert doc.read_text() == markdown(), "regenerate: python -m zopt.runtime.matrix > docs/hardware-matrix.md"
