"""Which kernel a loader accepts for modules built on the CPU: offloading stages quantized modules in
system RAM and runs them on the accelerator, so a CUDA kernel named explicitly must be accepted
there on a CUDA machine (simulated) and refused on a machine without one."""

from __future__ import annotations

import pytest

from zopt.platform.fakes import FAKES

STAGED = [("fp8", "scaled-mm"), ("int8_w8a8", "int-mm-cuda"), ("nf4", "bitsandbytes")]


def _on(monkeypatch, name: str) -> None:
    import zopt.platform.hardware as H

    monkeypatch.setattr(H, "detect", lambda: FAKES[name])


@pytest.mark.parametrize("fmt,backend", STAGED)
def test_cuda_kernel_named_for_cpu_staging_on_a_cuda_machine(fmt, backend, monkeypatch):
    from zopt.formats.lowbit.common import choose_backend

    _on(monkeypatch, "cuda-sm90-80gb")
    assert choose_backend(fmt, "cpu", backend) == backend
    assert choose_backend(fmt, "cuda", backend) == backend


@pytest.mark.parametrize("fmt,cpu_choice", [("fp8", "fp8-storage"), ("int8_w8a8", "int-mm-cpu"),
                                            ("nf4", "torch-dequant")])
def test_automatic_choice_for_the_cpu_stays_a_cpu_kernel(fmt, cpu_choice, monkeypatch):
    from zopt.formats.lowbit.common import choose_backend

    _on(monkeypatch, "cuda-sm90-80gb")
    assert choose_backend(fmt, "cpu", None) == cpu_choice


def test_cuda_kernel_refused_where_no_accelerator_can_run_it(monkeypatch):
    from zopt.errors import UnsupportedFormat
    from zopt.formats.lowbit.common import choose_backend

    _on(monkeypatch, "cuda-sm80-24gb")  # Ampere: no FP8 matmul, so staging does not help either
    with pytest.raises(UnsupportedFormat, match="scaled-mm"):
        choose_backend("fp8", "cpu", "scaled-mm")
    cpu_only = next(n for n, hw in FAKES.items() if hw.device == "cpu")
    _on(monkeypatch, cpu_only)
    with pytest.raises(UnsupportedFormat, match="int-mm-cuda"):
        choose_backend("int8_w8a8", "cpu", "int-mm-cuda")
