"""The GGUF loader's INT8 backend (int-mm-cpu) and the torch.compile paths around it."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import rel_err

from zopt import _compile
from zopt.formats import load  # selects the backend once, then the GGUF loader
from zopt.formats.gguf.loader import GGUFInt8Linear, GGUFLinear
from zopt.formats.lowbit import int_mm


def _x(rows=70, k=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g) * torch.linspace(0.1, 3, k)  # uneven channels, like activations


def test_weights_are_per_row_int8_codes_of_the_gguf_values(tiny_gguf):
    exact = load(tiny_gguf("Q4_K"), backend="torch-dequant", cache="none")
    fast = load(tiny_gguf("Q4_K"))
    name = "layers.0.feed_forward.w2"  # Q4_K even on the tiny model (rows of 1,024)
    w = exact.get_submodule(name).dequantize()
    lin = fast.get_submodule(name)
    assert isinstance(lin, GGUFInt8Linear) and lin.kind == "int8" and lin.q.dtype == torch.int8
    # one byte per weight plus one float per row: no float copy of the weight is kept
    assert lin.q.shape == w.shape and lin.row_scale.shape == (w.shape[0],)
    assert sum(b.numel() * b.element_size() for b in lin.buffers()) <= w.numel() + 4 * w.shape[0]
    # re-quantizing per row is round-to-nearest: no weight moves by more than half a step
    err = (lin.q.float() * lin.row_scale[:, None] - w).abs()
    assert torch.all(err <= lin.row_scale[:, None] / 2 * (1 + 1e-5))
    assert lin.q.abs().amax(dim=1).eq(127).all()  # the row's largest weight uses the full range

def test_integer_matmul_equals_float_math_on_the_same_codes():
    torch.manual_seed(0)
    q = torch.randint(-127, 128, (512, 1024), dtype=torch.int8)
    scale = torch.rand(512) * 0.01 + 1e-3
    bias = torch.randn(512)
    for rows in (3, 70):  # fewer rows than the kernel's minimum are padded
        x = _x(rows)
        xq, sx = int_mm.quantize_tokens(x)
        assert xq.dtype == torch.int8 and torch.all((xq.float() * sx - x).abs() <= sx / 2 * (1 + 1e-5))
        want = (xq.double() @ q.double().t()) * sx.double() * scale.double() + bias.double()
        got = int_mm.linear(x, q, scale, bias)
        assert got.shape == (rows, 512) and got.dtype == torch.float32
        assert rel_err(got, want.float()) < 1e-6  # INT32 accumulation is exact; only the scaling rounds


def test_default_cpu_load_uses_int8_everywhere_it_can(tiny_gguf):
    m = load(tiny_gguf("Q4_K_M"))
    kinds = {type(mod) for mod in m.modules() if isinstance(mod, (GGUFLinear, GGUFInt8Linear))}
    assert kinds == {GGUFInt8Linear}
    assert load(tiny_gguf("Q4_K"), backend="torch-dequant").get_submodule("layers.0.attention.to_q").kind != "int8"


def test_compiled_blocks_match_eager(tiny_gguf, tiny_reference_inputs, monkeypatch):
    if not _compile.cxx_available():
        pytest.skip("no C++ compiler: inductor cannot compile here")
    x, t, cap = tiny_reference_inputs
    monkeypatch.setenv("ZOPT_COMPILE", "1")
    exact = load(tiny_gguf("Q4_K_M"), backend="torch-dequant")
    eager = load(tiny_gguf("Q4_K_M"), compile=False)
    compiled = load(tiny_gguf("Q4_K_M"))  # the default compiles with int-mm-cpu when allowed
    assert isinstance(compiled.layers[0].forward, _compile._Fused)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a failed compile would warn and fall back
        e = exact(x, t, cap, return_dict=False)[0][0]
        a = eager(x, t, cap, return_dict=False)[0][0]
        b = compiled(x, t, cap, return_dict=False)[0][0]
    # fused kernels round some activations to the neighbouring INT8 code, so the two differ by
    # part of the INT8 backend's own error (about 0.02 on this model), and are equally far from
    # the exact result
    assert rel_err(b, a) < 0.015
    assert abs(rel_err(b, e) - rel_err(a, e)) < 0.25 * rel_err(a, e)
    assert compiled.layers[0].forward._compiled is not None and not compiled.layers[0].forward._failed


def test_compile_failure_falls_back_to_eager_with_one_warning(monkeypatch):
    import torch

    def broken_compile(fn, **kw):
        def run(*a, **k):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return run

    monkeypatch.setenv("ZOPT_COMPILE", "1")
    monkeypatch.setattr(_compile, "cxx_available", lambda: True)  # a compiler that then fails
    monkeypatch.setattr(torch, "compile", broken_compile)
    f = _compile.fused(lambda x: x * 2 + 1)
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*eagerly"):
        assert torch.equal(f(torch.ones(3)), torch.full((3,), 3.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(f(torch.zeros(2)), torch.ones(2))  # eager from then on, no second warning


def test_compile_switch(monkeypatch):
    for value, setting in (("0", False), ("off", False), ("1", True), ("yes", True), ("", None)):
        monkeypatch.setenv("ZOPT_COMPILE", value)
        assert _compile.env_setting() is setting
        assert _compile.enabled() is (setting is not False and _compile.cxx_available())


def test_no_compiler_means_eager_with_one_warning(monkeypatch):
    monkeypatch.setenv("ZOPT_COMPILE", "1")
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(_compile, "_warned", [])
    f = _compile.fused(lambda x: x + 1)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        assert torch.equal(f(torch.zeros(2)), torch.ones(2))
    assert f._compiled is None  # never tried
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))
