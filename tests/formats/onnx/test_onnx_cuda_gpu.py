"""The ONNX export under onnxruntime's CUDA execution provider matches the CPU provider's output
(skipped where onnxruntime has no CUDA provider: the CPU build, or onnxruntime-gpu missing)."""

from __future__ import annotations

import pytest
from conftest import rel_err

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def ort_cuda():
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip(f"onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                    f"(providers: {', '.join(ort.get_available_providers())}; install onnxruntime-gpu)")
    return ort


# fp32: onnxruntime's CUDA provider may use TF32 matmuls (10-bit mantissa), hence not 1e-5;
# bf16: the body's matmul weights in bf16 (no CPU kernels: compared with the fp32 graph on the CPU)
@pytest.mark.parametrize("subtype,bound", [("fp32", 5e-3), ("bf16", 0.03)])
def test_ort_cuda_matches_cpu_provider(subtype, bound, ort_cuda, tmp_path_factory, tiny_transformer_dir,
                                       tiny_reference_inputs):
    import torch

    from zopt import formats

    root = tmp_path_factory.mktemp("onnx-cuda")
    fp32 = formats.convert(tiny_transformer_dir, "onnx:fp32", root / "fp32", progress=False)
    art = fp32 if subtype == "fp32" else formats.convert(tiny_transformer_dir, f"onnx:{subtype}", root / subtype,
                                                         progress=False)
    cpu = formats.load(fp32, device="cpu", backend="ort-cpu")
    gpu = formats.load(art, device="cuda", backend="ort-cuda")
    assert gpu.providers[0] == "CUDAExecutionProvider", gpu.providers
    x, t, cap = tiny_reference_inputs
    with torch.no_grad():
        ref = cpu(x, t, cap, return_dict=False)[0][0]
        out = gpu([v.cuda() for v in x], t.cuda(), [c.cuda() for c in cap], return_dict=False)[0][0]
    assert out.device.type == "cuda"
    assert rel_err(out.cpu(), ref) < bound
