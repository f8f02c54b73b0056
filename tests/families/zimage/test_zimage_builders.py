"""Z-Image's built-in models: the tiny pipeline, the synthetic checkpoint, the ONNX graph tables."""

from __future__ import annotations

import torch

from zopt import checkpoint
from zopt.families import zimage


def test_tiny_pipeline_folder_holds_what_the_builder_builds(tiny_transformer_dir):
    """The cached folder is exactly the seeded builder's output, so a stale cache cannot pass."""
    from zopt.families.zimage.tiny import TINY_SEED

    built = zimage.ZIMAGE.random_model(zimage.TINY_CONFIG, TINY_SEED).state_dict()
    src = checkpoint.open(tiny_transformer_dir)
    assert sorted(built) == sorted(src.names())
    for n in src.names():
        assert torch.equal(built[n], src.get(n)), n


def test_synthetic_layout_is_the_original_layout_of_the_config(tiny_transformer_dir):
    from zopt.families.zimage.synthetic import synthetic_layout

    orig = zimage.as_original(checkpoint.open(tiny_transformer_dir), prefix="model.diffusion_model.")
    want = sorted((n, orig.info(n).shape) for n in orig.names())
    assert synthetic_layout(zimage.TINY_CONFIG, prefix="model.diffusion_model.") == want


def test_synthetic_checkpoint_seed_and_prefix(tmp_path):
    """(Same seed, same bytes is checked through ``zopt synth`` in test_cli.)"""
    a = zimage.ZIMAGE.write_synthetic(tmp_path / "a.safetensors", size="tiny", seed=5, progress=False)
    b = zimage.ZIMAGE.write_synthetic(tmp_path / "b.safetensors", size="tiny", seed=6, prefix="model.diffusion_model.",
                                      progress=False)
    sa, sb = checkpoint.open(a), checkpoint.open(b)
    assert zimage.detect(sa).prefix == "" and zimage.detect(sb).prefix == "model.diffusion_model."
    name = "layers.0.attention.qkv.weight"
    assert not torch.equal(sa.get(name), sb.get("model.diffusion_model." + name))  # the seed matters
    assert zimage.check_shapes(sb)["dim"] == zimage.TINY_CONFIG["dim"]


def test_graph_tables_follow_the_rope_axes():
    cfg = zimage.TINY_CONFIG
    tables = zimage.ZIMAGE.graph_tables(cfg)
    for i, (d, n) in enumerate(zip(cfg["axes_dims"], cfg["axes_lens"])):
        assert tables[f"rope_cos_{i}"].shape == tables[f"rope_sin_{i}"].shape == (n, d // 2)
    # position 0 has angle 0 on every axis: cos 1, sin 0
    assert torch.equal(tables["rope_cos_0"][0], torch.ones(cfg["axes_dims"][0] // 2))
    assert torch.equal(tables["rope_sin_0"][0], torch.zeros(cfg["axes_dims"][0] // 2))
