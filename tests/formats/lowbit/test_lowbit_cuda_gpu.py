"""CUDA kernels of the low-bit formats and GGUF: each runs its own kernel on the GPU (the kernel
function is seen being called) and matches the same artifact run by the exact float path on the CPU."""

from __future__ import annotations

import pytest
from conftest import rel_err
from lowbit_helpers import artifact

pytestmark = pytest.mark.gpu

# (format, CUDA backend, the kernel it must call: (module, attribute) or None, CPU reference backend,
#  bound on the relative L2 difference of the tiny model's output, bf16 on CUDA vs float32 on CPU).
# Bounds: the CPU emulation of scaled-mm (torch._scaled_mm runs on CPU too) measured 0.055 against
# the bf16 weights where fp8-storage gave 0.040, i.e. about 0.04 from quantizing activations to E4M3,
# plus bf16 rounding; the other CUDA kernels compute the CPU reference's numbers up to bf16 rounding.
CASES = [
    ("fp8", "scaled-mm", ("torch", "_scaled_mm"), "fp8-storage", 0.12),
    ("fp8", "fp8-storage", None, "fp8-storage", 0.05),
    ("int8_w8a8", "int-mm-cuda", ("torch", "_int_mm"), "torch-dequant", 0.05),
    ("int8", "torch-dequant", None, "torch-dequant", 0.05),
    ("int4", "torch-dequant", None, "torch-dequant", 0.05),
    ("nf4", "bitsandbytes", ("bitsandbytes", "matmul_4bit"), "torch-dequant", 0.05),
    ("nf4", "torch-dequant", None, "torch-dequant", 0.05),
]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("lowbit-cuda")


def _cuda_inputs(inputs):
    import torch

    x, t, cap = inputs
    return [v.cuda().to(torch.bfloat16) for v in x], t.cuda(), [c.cuda().to(torch.bfloat16) for c in cap]


def _out(model, inputs):
    import torch

    x, t, cap = inputs
    with torch.no_grad():
        return model(x, t, cap, return_dict=False)[0][0].float().cpu()


@pytest.mark.parametrize("fmt,backend,kernel,cpu_backend,bound", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_cuda_backend_matches_cpu_reference(fmt, backend, kernel, cpu_backend, bound, root, tiny_transformer_dir,
                                            tiny_reference_inputs, monkeypatch):
    import importlib

    import torch

    from zopt import formats

    if kernel and kernel[0] != "torch":
        pytest.importorskip(kernel[0])
    art = artifact(root, tiny_transformer_dir, fmt)
    cpu = formats.load(art, device="cpu", backend=cpu_backend, dtype=torch.float32)
    ref = _out(cpu, tiny_reference_inputs)
    gpu = formats.load(art, device="cuda", backend=backend, dtype=torch.bfloat16)
    assert gpu.zopt_backend == backend
    quantized = [m for m in gpu.modules() if hasattr(m, "KERNELS")]
    assert quantized and all(m.weight.device.type == "cuda" for m in quantized)
    # every quantized layer keeps the requested kernel (none fell back for its shape)
    assert {m.backend for m in quantized} == {backend if not (fmt == "int8_w8a8" and backend == "torch-dequant")
                                              else "torch-dequant-w8a8"}
    calls = []
    if kernel:
        mod = importlib.import_module(kernel[0])
        real = getattr(mod, kernel[1])

        def spy(*args, **kwargs):
            calls.append(1)
            return real(*args, **kwargs)

        monkeypatch.setattr(mod, kernel[1], spy)
    out = _out(gpu, _cuda_inputs(tiny_reference_inputs))
    assert torch.isfinite(out).all()
    if kernel:
        assert len(calls) >= len(quantized), f"{kernel[1]} ran {len(calls)} times for {len(quantized)} layers"
    assert rel_err(out, ref) < bound


@pytest.mark.parametrize("subtype", ["Q8_0", "Q4_K_M"])
def test_gguf_on_cuda_matches_cpu(subtype, tiny_gguf, tiny_reference_inputs):
    import torch

    from zopt import formats
    from zopt.formats.gguf.loader import GGUFLinear

    path = tiny_gguf(subtype)
    ref = _out(formats.load(path, device="cpu", backend="torch-dequant", dtype=torch.float32), tiny_reference_inputs)
    gpu = formats.load(path, device="cuda", dtype=torch.bfloat16)
    layers = [m for m in gpu.modules() if isinstance(m, GGUFLinear)]
    assert layers and all(m.q.device.type == "cuda" for m in layers)
    out = _out(gpu, _cuda_inputs(tiny_reference_inputs))
    # the same GGUF values dequantized on either device: only bf16 rounding differs
    assert rel_err(out, ref) < 0.05
