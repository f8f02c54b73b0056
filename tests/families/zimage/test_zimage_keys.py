"""Z-Image key layouts: detection, the name maps both ways, and the lazy views."""

from __future__ import annotations

import pytest
import torch

from zopt import checkpoint
from zopt.errors import UnknownArchitecture
from zopt.families import zimage


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


def test_unknown_architecture(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "sdxl.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4)}, str(p))
    with pytest.raises(UnknownArchitecture, match="not a Z-Image"):
        zimage.detect(checkpoint.open(p))
