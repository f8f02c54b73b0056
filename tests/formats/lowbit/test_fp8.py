"""FP8: quantizer bounds, the diffusers-layout artifact, the ComfyUI scaled-FP8 layout, kernels."""

from __future__ import annotations

import json

import pytest
from conftest import rel_err
from lowbit_helpers import artifact, cosine, output, reference_output


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("fp8")


@pytest.mark.parametrize("var,bound", [("e4m3", 0.04), ("e5m2", 0.08)])
def test_quantize_fp8_error_bound(var, bound):
    import torch

    from zopt.formats.lowbit.fp8 import quantize_fp8

    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, 512, generator=g) * torch.rand(256, 1, generator=g) * 3
    q, s = quantize_fp8(w, var)
    assert q.dtype == getattr(torch, {"e4m3": "float8_e4m3fn", "e5m2": "float8_e5m2"}[var])
    dq = q.float() * s[:, None]
    assert rel_err(dq, w) < bound
    # per-channel scaling puts every row's max exactly on the largest finite FP8 value
    fmax = 448.0 if var == "e4m3" else 57344.0
    assert torch.allclose(q.float().abs().amax(1), torch.full((256,), fmax))


def test_fp8_artifact_reloads_within_bounds(root, tiny_transformer_dir, tiny_reference_inputs):
    import torch

    import zopt

    out = artifact(root, tiny_transformer_dir, "fp8")
    model = zopt.load(out, dtype=torch.float32, backend="fp8-storage")  # the stored FP8 as it is
    assert model.zopt_backend == "fp8-storage"
    to_q = model.layers[0].attention.to_q
    assert type(to_q).__name__ == "FP8Linear" and to_q.weight.dtype == torch.uint8
    y, ref = output(model, tiny_reference_inputs), reference_output(tiny_transformer_dir, tiny_reference_inputs)
    assert rel_err(y, ref) < 0.08
    assert cosine(y, ref) > 0.995
    # loaded weights are the stored FP8 codes times scales, not a re-quantization of the source
    from safetensors import safe_open

    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), "pt") as f:
        q = f.get_tensor("layers.0.attention.to_q.weight")
        s = f.get_tensor("layers.0.attention.to_q.weight_scale")
    assert torch.equal(to_q.dequantize(), q.float() * s[:, None])


def test_fp8_e5m2_option(root, tiny_transformer_dir, tiny_reference_inputs):
    import torch

    import zopt

    out = artifact(root, tiny_transformer_dir, "fp8", fp8="e5m2")
    m = json.loads((out / "zopt-manifest.json").read_text())
    assert m["options"]["fp8"] == "e5m2"
    assert m["tensors"]["layers.0.feed_forward.w1.weight"]["storage"] == "F8_E5M2"
    y = output(zopt.load(out, dtype=torch.float32), tiny_reference_inputs)
    assert rel_err(y, reference_output(tiny_transformer_dir, tiny_reference_inputs)) < 0.15


def test_comfy_layout_names_and_dtypes(root, tiny_transformer_dir):
    import torch
    from safetensors import safe_open

    from zopt import checkpoint
    from zopt.families import zimage

    out = artifact(root, tiny_transformer_dir, "fp8", layout="comfy")
    m = json.loads((out / "zopt-manifest.json").read_text())
    assert m["layout"] == "comfy"
    orig = zimage.as_original(checkpoint.open(tiny_transformer_dir))
    with safe_open(str(out / m["file"]), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("scaled_fp8").dtype == torch.float8_e4m3fn
        qkv = f.get_tensor("layers.0.attention.qkv.weight")
        scale = f.get_tensor("layers.0.attention.qkv.scale_weight")
        assert qkv.dtype == torch.float8_e4m3fn and qkv.shape == orig.info("layers.0.attention.qkv.weight").shape
        assert scale.dtype == torch.float32 and scale.shape == ()
        # dequantized weights reproduce the originals within FP8 E4M3 rounding (2^-4 relative)
        for name in ("layers.0.attention.qkv.weight", "layers.1.feed_forward.w2.weight", "layers.0.attention.out.weight"):
            w = orig.get(name).float()
            dq = f.get_tensor(name).float() * f.get_tensor(name[: -len("weight")] + "scale_weight")
            assert rel_err(dq, w) < 0.05, name
            big = w.abs() > w.abs().max() / 4  # normal range: each value within half an FP8 step
            assert ((dq - w).abs()[big] <= w.abs()[big] * 2**-4 + 1e-6).all(), name
        # sensitive layers stay plain tensors with no scale
        assert f.get_tensor("layers.0.adaLN_modulation.0.weight").dtype == torch.bfloat16
        assert "layers.0.adaLN_modulation.0.scale_weight" not in keys
        assert f.get_tensor("x_embedder.weight").dtype == torch.bfloat16
    # the original layout: every key of the original view plus one scale per FP8 weight and the marker
    fp8_keys = {k for k in orig.names() if k + "" in keys and k.replace("weight", "scale_weight") in keys}
    assert keys == set(orig.names()) | {k.replace("weight", "scale_weight") for k in fp8_keys} | {"scaled_fp8"}


def test_comfy_layout_reloads(root, tiny_transformer_dir, tiny_reference_inputs):
    import torch

    import zopt

    out = artifact(root, tiny_transformer_dir, "fp8", layout="comfy")
    y = output(zopt.load(out, dtype=torch.float32), tiny_reference_inputs)
    ref = reference_output(tiny_transformer_dir, tiny_reference_inputs)
    assert rel_err(y, ref) < 0.1 and cosine(y, ref) > 0.99


@pytest.mark.gpu
def test_scaled_mm_matches_storage_kernel_on_cuda(root, tiny_transformer_dir, tiny_reference_inputs):
    import torch

    import zopt

    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("torch._scaled_mm needs compute capability >= 8.9")
    out = artifact(root, tiny_transformer_dir, "fp8")
    x, t, cap = tiny_reference_inputs
    inputs = ([v.cuda().bfloat16() for v in x], t.cuda().bfloat16(), [c.cuda().bfloat16() for c in cap])
    fast = zopt.load(out, device="cuda", dtype=torch.bfloat16)
    assert fast.zopt_backend == "scaled-mm"
    slow = zopt.load(out, device="cuda", backend="fp8-storage", dtype=torch.bfloat16)
    assert rel_err(output(fast, inputs).cpu(), output(slow, inputs).cpu()) < 0.05


def test_fnuz_conversion_is_exact():
    """MI300-class GPUs multiply E4M3FNUZ: every E4M3FN code, halved, is one (the kernel scales by 2)."""
    import torch

    from zopt.formats.lowbit.fp8 import to_fnuz

    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    finite = codes[torch.isfinite(codes.float())]
    assert torch.equal(to_fnuz(finite).float() * 2, finite.float())


def test_densified_fp8_matches_the_storage_kernel(root, tiny_transformer_dir, tiny_reference_inputs):
    """What an MPS device gets (no float8 dtype there): the same weights held dense."""
    import torch

    import zopt
    from zopt.formats.lowbit.fp8 import densify

    out = artifact(root, tiny_transformer_dir, "fp8")
    fp8 = zopt.load(out, dtype=torch.float32, backend="fp8-storage")
    dense = densify(zopt.load(out, dtype=torch.float32, backend="fp8-storage"), torch.float32)
    kinds = {type(m).__name__ for m in dense.modules()}
    assert "FP8Linear" not in kinds and "Linear" in kinds
    assert rel_err(output(dense, tiny_reference_inputs), output(fp8, tiny_reference_inputs)) < 1e-5
