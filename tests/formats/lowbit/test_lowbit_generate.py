"""Every low-bit artifact generates an image through the pipeline; one does it through the CLI."""

from __future__ import annotations

import pytest
from lowbit_helpers import artifact

SPECS = [("fp8", {}), ("fp8", {"layout": "comfy"}), ("int8", {}), ("int8_w8a8", {}), ("int4", {}), ("nf4", {})]
# mean absolute pixel difference (0..255) against the BF16 model's image from the same seed; measured
# 1.2-1.5 (fp8), 0.4-0.7 (int8), 4.0-4.2 (int4, nf4); the image itself has std ~124
PIXEL_BOUND = {"fp8": 4.0, "int8": 2.0, "int8_w8a8": 2.0, "int4": 10.0, "nf4": 10.0}


def _generate(model, out_dir):
    import numpy as np
    from PIL import Image

    from zopt.runtime import pipeline as P

    pipe = P.build_pipeline(model, device="cpu")
    req = P.GenerateRequest(prompts=["a red fox"], seeds=[7], steps=2, height=64, width=64)
    (img,) = P.run(pipe, req, out_dir)
    return np.asarray(Image.open(img.path).convert("RGB"), dtype=np.float32)


@pytest.fixture(scope="module")
def reference_image(tiny_transformer_dir, tmp_path_factory):
    return _generate(tiny_transformer_dir.parent, tmp_path_factory.mktemp("gen-ref"))


@pytest.mark.parametrize("spec,opts", SPECS, ids=[s + ("-comfy" if o else "") for s, o in SPECS])
def test_generates_close_to_bf16(tmp_path_factory, tiny_transformer_dir, reference_image, spec, opts):
    root = tmp_path_factory.mktemp("gen")
    img = _generate(artifact(root, tiny_transformer_dir, spec, **opts), root / "img")
    assert img.shape == reference_image.shape and img.std() > 1.0
    assert abs(img - reference_image).mean() < PIXEL_BOUND[spec]


def test_cli_generate_from_artifact(tmp_path, tiny_transformer_dir):
    import numpy as np
    from PIL import Image

    from zopt.cli import main

    out = artifact(tmp_path, tiny_transformer_dir, "int4")
    png = tmp_path / "x.png"
    assert main(["generate", str(out), "--steps", "2", "--resolution", "64x64", "-o", str(png)]) == 0
    assert np.asarray(Image.open(png)).shape == (64, 64, 3)
