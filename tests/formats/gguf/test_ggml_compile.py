"""Compiled GGML kernels (torch.compile / inductor) write the eager quantizers' bytes; fallbacks.

Only this file compiles: the rest of the suite quantizes small tensors, where compiling (seconds per
kernel, once per machine thanks to inductor's disk cache) would cost more than it saves, so the
converter keeps them eager (``gguf.COMPILE_MIN_WEIGHTS``).
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from zopt.formats.gguf import compile as ggml_compile
from zopt.formats.gguf import quants as gq


@pytest.fixture(autouse=True)
def default_compile_setting(monkeypatch):
    # the suite runs with ZOPT_COMPILE=0 (tests/conftest.py); these tests are about the default
    monkeypatch.delenv("ZOPT_COMPILE", raising=False)


def _data() -> torch.Tensor:
    # rows of 1792 = 7 K-blocks / 56 legacy blocks; shapes chosen so no two dims coincide
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 1792, generator=g) * 0.02
    x[1] = 0  # all-zero blocks: ggml stores +0 scales, some types memset the block
    x[2, :256] = 0.5  # a flat block (max == min)
    x[3, 256:512] *= 40  # one block of outliers
    return x


@pytest.mark.slow
@pytest.mark.parametrize("qtype", gq.SUPPORTED)
def test_compiled_bytes_equal_eager(qtype):
    if not shutil.which("g++") and not shutil.which("c++"):
        pytest.skip("no C++ compiler: inductor cannot compile here")
    x = _data()
    eager = gq.quantize(x, qtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a fallback to eager would hide a failure
        with ggml_compile.compiled() as on:
            assert on
            fast = gq.quantize(x, qtype)
            fast_part = gq.quantize(x[:4], qtype)  # a second shape: served by the same compilation
    assert torch.equal(fast, eager), f"{qtype}: {(fast != eager).sum().item()} bytes differ"
    assert torch.equal(fast_part, eager[:4])


def test_zopt_compile_0_keeps_eager(monkeypatch):
    monkeypatch.setenv("ZOPT_COMPILE", "0")
    with ggml_compile.compiled() as on:
        assert not on and not ggml_compile.enabled()


def test_without_compiler_warns_once_and_stays_eager(monkeypatch):
    monkeypatch.delenv("ZOPT_COMPILE", raising=False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(ggml_compile, "_broken", {})
    x = _data()
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler") as rec:
        with ggml_compile.compiled() as on:
            out = gq.quantize(x, "Q8_0")
            assert not on
            gq.quantize(x, "Q4_0")
    assert len(rec) == 1
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with ggml_compile.compiled() as on:  # stays off for the process once it gave up
        assert not on
    import gguf

    want = gguf.quants.quantize(x.numpy(), gguf.GGMLQuantizationType.Q8_0)
    assert out.numpy().tobytes() == want.tobytes()


def test_compile_failure_falls_back_to_eager(monkeypatch):
    monkeypatch.delenv("ZOPT_COMPILE", raising=False)
    monkeypatch.setattr(ggml_compile, "_broken", {})
    monkeypatch.setattr(ggml_compile, "cxx_available", lambda: True)  # a compiler that then fails

    def broken_compile(fn, **kw):
        def run(*a):
            raise RuntimeError("C++ compile error: simulated")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)

    @ggml_compile.kernel
    def double(t):
        return t * 2

    with pytest.warns(RuntimeWarning, match="simulated"):
        with ggml_compile.compiled():
            assert torch.equal(double(torch.ones(3)), torch.full((3,), 2.0))
    assert not ggml_compile.enabled()
