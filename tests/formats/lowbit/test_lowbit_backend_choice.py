"""Offloading stages quantized modules in system RAM and runs them on the accelerator: the backend is
selected once, for the compute device, and the loader builds modules on the CPU with that choice
instead of selecting again for the staging device (which would refuse the CUDA kernels)."""

from __future__ import annotations

import pytest
from lowbit_helpers import artifact

from zopt.errors import UnsupportedFormat
from zopt.platform.fakes import FAKES

STAGED = [("fp8", "scaled-mm"), ("int8_w8a8", "int-mm-cuda")]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("staging")


@pytest.mark.parametrize("fmt,backend", STAGED)
def test_cuda_selection_builds_modules_on_the_cpu(fmt, backend, root, tiny_transformer_dir):
    from zopt.formats import load
    from zopt.formats.registry import select_backend

    sel = select_backend(fmt, FAKES["cuda-sm90-80gb"])
    assert sel.name == backend
    model = load(artifact(root, tiny_transformer_dir, fmt), device="cpu", backend=sel)
    assert model.zopt_backend == backend
    quantized = [m for m in model.modules() if getattr(m, "backend", None) == backend]
    assert quantized and all(p.device.type == "cpu" for m in quantized for p in m.buffers())


@pytest.mark.parametrize("fmt", ["fp8", "int8", "int8_w8a8", "int4", "nf4", "gguf"])
def test_automatic_choice_for_a_cpu_machine_is_the_integer_matmul(fmt):
    # the one CPU kernel measured faster than the BF16 model (benchmarks/cpu_latency.py)
    from zopt.formats.registry import select_backend

    for hw in (h for h in FAKES.values() if h.device == "cpu"):
        assert select_backend(fmt, hw).name == "int-mm-cpu"


@pytest.mark.parametrize("fmt,gpu_choice", [("fp8", "scaled-mm"), ("int8", "torch-dequant"), ("int4", "torch-dequant"),
                                            ("nf4", "bitsandbytes")])
def test_the_cpu_kernel_is_never_chosen_for_a_gpu(fmt, gpu_choice):
    from zopt.formats.registry import select_backend

    assert select_backend(fmt, FAKES["cuda-sm90-80gb"]).name == gpu_choice


def test_cuda_kernel_refused_where_no_accelerator_can_run_it():
    from zopt.formats.registry import select_backend

    with pytest.raises(UnsupportedFormat, match="scaled-mm"):
        select_backend("fp8", FAKES["cuda-sm80-24gb"], prefer="scaled-mm")  # Ampere: no FP8 matmul
    cpu_only = next(hw for hw in FAKES.values() if hw.device == "cpu")
    with pytest.raises(UnsupportedFormat, match="int-mm-cuda"):
        select_backend("int8_w8a8", cpu_only, prefer="int-mm-cuda")
