"""Z-Image family: layout detection, key maps, configs, sensitive tensors."""

from __future__ import annotations

import pytest
import torch

from zopt import checkpoint
from zopt.errors import ShapeMismatch, UnknownArchitecture
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


def test_roundtrip_diffusers_original_diffusers_is_lossless(tiny_transformer_dir, tiny_original_file):
    d = checkpoint.open(tiny_transformer_dir)
    back = zimage.as_diffusers(checkpoint.open(tiny_original_file))
    assert sorted(back.names()) == sorted(d.names())
    for n in d.names():
        a, b = back.get(n), d.get(n)
        assert a.dtype == b.dtype and torch.equal(a, b), n


def test_original_mapping_agrees_with_diffusers_single_file_converter(tiny_transformer_dir, tiny_original_file):
    """zopt's original->diffusers map gives the same names and tensors as diffusers' own converter."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    sd = load_file(str(tiny_original_file))
    sd["norm_final.weight"] = torch.ones(3)  # some original files carry it; both sides drop it
    theirs = convert_z_image_transformer_checkpoint_to_diffusers(dict(sd))
    ours = zimage.as_diffusers(checkpoint.open(tiny_original_file))
    assert sorted(theirs) == sorted(ours.names())
    for n in theirs:
        assert torch.equal(theirs[n], ours.get(n)), n


def test_original_file_loads_in_diffusers_from_single_file(tiny_transformer_dir, tiny_original_file):
    from diffusers import ZImageTransformer2DModel

    m = ZImageTransformer2DModel.from_single_file(
        str(tiny_original_file), config=str(tiny_transformer_dir), torch_dtype=torch.bfloat16
    )
    ref = checkpoint.open(tiny_transformer_dir)
    sd = m.state_dict()
    for n in ref.names():
        assert torch.equal(sd[n], ref.get(n)), n


def test_detect_and_infer_config(tiny_transformer_dir, tiny_original_file):
    for path in (tiny_transformer_dir, tiny_original_file):
        src = checkpoint.open(path)
        src.config = None  # force inference from shapes
        cfg = zimage.infer_config(src)
        for k in ("dim", "n_layers", "n_refiner_layers", "n_heads", "cap_feat_dim", "in_channels", "axes_dims"):
            assert cfg[k] == zimage.TINY_CONFIG[k], k
    assert zimage.axes_dims_for(128) == [32, 48, 48]


def test_unknown_architecture(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "sdxl.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4)}, str(p))
    with pytest.raises(UnknownArchitecture, match="not a Z-Image"):
        zimage.detect(checkpoint.open(p))


def test_shape_mismatch_names_tensor(tmp_path, tiny_transformer_dir):
    from safetensors.torch import save_file

    src = checkpoint.open(tiny_transformer_dir)
    sd = {n: src.get(n) for n in src.names()}
    sd["layers.1.feed_forward.w2.weight"] = torch.zeros(384, 1000, dtype=torch.bfloat16)
    p = tmp_path / "bad.safetensors"
    save_file(sd, str(p))
    with pytest.raises(ShapeMismatch, match="layers.1.feed_forward.w2.weight"):
        zimage.check_shapes(checkpoint.open(p), zimage.TINY_CONFIG)


def test_sensitive_rules_cover_the_policy():
    must = {
        "x_pad_token": "F32",
        "cap_pad_token": "F32",
        "layers.3.attention.norm_q.weight": "F32",
        "layers.3.attention_norm1.weight": "F32",
        "all_final_layer.2-1.linear.bias": "F32",
        "t_embedder.mlp.0.weight": "BF16",
        "cap_embedder.1.weight": "BF16",
        "all_x_embedder.2-1.weight": "BF16",
        "final_layer.linear.weight": "BF16",  # original layout too
        "layers.0.adaLN_modulation.0.weight": "BF16",
    }
    for name, keep in must.items():
        rule = zimage.sensitive_reason(name)
        assert rule is not None and rule.keep == keep and rule.reason, name
    for name in ("layers.0.attention.to_q.weight", "layers.7.feed_forward.w2.weight", "layers.2.attention.qkv.weight"):
        assert zimage.sensitive_reason(name) is None, name
