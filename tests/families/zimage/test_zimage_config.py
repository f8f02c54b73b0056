"""Z-Image configs: shapes without a model, inference from a source, the shape check."""

from __future__ import annotations

import pytest
import torch

from zopt import checkpoint
from zopt.errors import ShapeMismatch
from zopt.families import zimage


@pytest.mark.parametrize("size", ["tiny", "medium", "full"])
def test_expected_shapes_match_diffusers_class(size):
    from diffusers import ZImageTransformer2DModel

    cfg = zimage.config_for(size)
    with torch.device("meta"):
        model = ZImageTransformer2DModel(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    real = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert zimage.expected_shapes(cfg) == real
    if size == "full":
        assert sum(p.numel() for p in model.parameters()) == zimage.FULL_NUM_PARAMS


def test_detect_and_infer_config(tiny_transformer_dir, tiny_original_file):
    for path in (tiny_transformer_dir, tiny_original_file):
        src = checkpoint.open(path)
        src.config = None  # force inference from shapes
        cfg = zimage.infer_config(src)
        for k in ("dim", "n_layers", "n_refiner_layers", "n_heads", "cap_feat_dim", "in_channels", "axes_dims"):
            assert cfg[k] == zimage.TINY_CONFIG[k], k
    assert zimage.axes_dims_for(128) == [32, 48, 48]


def test_shape_mismatch_names_tensor(tmp_path, tiny_transformer_dir):
    from safetensors.torch import save_file

    src = checkpoint.open(tiny_transformer_dir)
    sd = {n: src.get(n) for n in src.names()}
    sd["layers.1.feed_forward.w2.weight"] = torch.zeros(384, 1000, dtype=torch.bfloat16)
    p = tmp_path / "bad.safetensors"
    save_file(sd, str(p))
    with pytest.raises(ShapeMismatch, match="layers.1.feed_forward.w2.weight"):
        zimage.check_shapes(checkpoint.open(p), zimage.TINY_CONFIG)
