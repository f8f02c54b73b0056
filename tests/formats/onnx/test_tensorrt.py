"""TensorRT: optimization-profile arithmetic (pure Python) here; engine build and run on a GPU only.

The int8/fp8 Q/DQ graphs TensorRT builds from are checked on CPU in test_onnx.py.
"""

from __future__ import annotations

import importlib.util

import pytest

from zopt.errors import MissingDependency, ShapeMismatch, ZoptError
from zopt.families import zimage
from zopt.formats.onnx.tensorrt import ShapeRange, _check_in_profile, image_tokens, profile_shapes


def test_default_profile_for_the_full_model():
    shapes = profile_shapes(zimage.FULL_CONFIG, ShapeRange())
    # 512..1536 px per side -> latents 64..192 (VAE 8x); batch 1..2 (CFG); text 1..512 tokens
    assert shapes["latents"] == ((1, 16, 64, 64), (1, 16, 128, 128), (2, 16, 192, 192))
    assert shapes["text_embeds"] == ((1, 1, 2560), (1, 128, 2560), (2, 512, 2560))
    assert shapes["timestep"] == ((1,), (1,), (2,)) and shapes["text_lens"] == ((1,), (1,), (2,))
    assert image_tokens(ShapeRange()) == (1024, 4096, 9216)


def test_profile_from_options_and_limits():
    rng = ShapeRange.from_options({"min_size": "256", "max_size": 2048, "opt_text": 64, "keep": ["x"]})
    assert (rng.min_size, rng.opt_size, rng.max_size, rng.opt_text) == (256, 1024, 2048, 64)
    shapes = profile_shapes(zimage.TINY_CONFIG, rng)
    assert shapes["latents"][2] == (2, 16, 256, 256) and shapes["text_embeds"][0] == (1, 1, 256)
    with pytest.raises(ZoptError, match="multiples of 16"):
        profile_shapes(zimage.FULL_CONFIG, ShapeRange(opt_size=1000))
    with pytest.raises(ZoptError, match="min_size <= opt_size"):
        profile_shapes(zimage.FULL_CONFIG, ShapeRange(min_size=1024, opt_size=512))
    with pytest.raises(ZoptError, match="RoPE"):  # 1000 text tokens pad to 1024 > 1023 positions
        profile_shapes(zimage.FULL_CONFIG, ShapeRange(max_text=1000))
    with pytest.raises(ZoptError, match="RoPE"):  # 512 patches per side at most
        profile_shapes(zimage.FULL_CONFIG, ShapeRange(max_size=8208))
    assert profile_shapes(zimage.FULL_CONFIG, ShapeRange(max_size=8192, max_text=960))


def test_runtime_refuses_shapes_outside_the_profile():
    shapes = {k: list(v) for k, v in profile_shapes(zimage.FULL_CONFIG, ShapeRange()).items()}
    _check_in_profile(shapes, "latents", (2, 16, 64, 192))  # aspect ratios within the side range pass
    with pytest.raises(ShapeMismatch, match="outside the engine's profile"):
        _check_in_profile(shapes, "latents", (1, 16, 32, 64))
    with pytest.raises(ShapeMismatch):
        _check_in_profile(shapes, "text_embeds", (3, 77, 2560))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed")
def test_convert_without_tensorrt_says_what_to_install(tiny_transformer_dir, tmp_path):
    from zopt import formats

    with pytest.raises(MissingDependency, match="tensorrt"):
        formats.convert(tiny_transformer_dir, "tensorrt:bf16", tmp_path / "e", progress=False)
    assert not (tmp_path / "e").exists()


@pytest.mark.gpu
@pytest.mark.parametrize("subtype,bound", [("bf16", 2e-2), ("fp16", 5e-3), ("int8", 0.15)])
def test_engine_matches_eager(tiny_transformer_dir, tmp_path, subtype, bound):
    """Build a tiny engine (range 64..256 px) and compare it with the eager fp32 model."""
    pytest.importorskip("tensorrt")
    import torch
    from conftest import rel_err

    from zopt import formats
    from zopt.formats.plain import load_source

    opts = {"min_size": 64, "opt_size": 128, "max_size": 256, "max_text": 128, "opt_text": 64, "workspace_gb": 2}
    out = formats.convert(tiny_transformer_dir, f"tensorrt:{subtype}", tmp_path / subtype, options=opts,
                          progress=False)
    engine = formats.load(out)
    eager = load_source(tiny_transformer_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    for side in (64, 128, 256):
        x = [torch.randn(16, 1, side // 8, side // 8, generator=g) for _ in range(2)]
        cap = [torch.randn(n, 256, generator=g) for n in (40, 100)]
        t = torch.tensor([0.3, 0.3])
        with torch.no_grad():
            ref = eager(x, t, cap, return_dict=False)[0]
        got = engine(x, t, cap, return_dict=False)[0]
        assert max(rel_err(a, b) for a, b in zip(got, ref, strict=True)) < bound
    with pytest.raises(ShapeMismatch):
        engine([torch.randn(16, 1, 40, 40)], torch.tensor([0.5]), [torch.randn(5, 256)], return_dict=False)


@pytest.mark.gpu
def test_ort_tensorrt_backend_runs_the_export(tiny_transformer_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime without the TensorRT execution provider")
    import torch

    from zopt import formats

    out = formats.convert(tiny_transformer_dir, "onnx:fp16", tmp_path / "o", progress=False)
    mod = formats.load(out, device="cuda", backend="ort-tensorrt")
    assert mod.providers[0] == "TensorrtExecutionProvider"
    res = mod([torch.randn(16, 1, 16, 16)], torch.tensor([0.5]), [torch.randn(20, 256)], return_dict=False)[0]
    assert torch.isfinite(res[0]).all()
