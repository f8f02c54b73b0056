"""INT4: packing, the clipping search against round-to-nearest, reload bounds."""

from __future__ import annotations

import pytest
from conftest import rel_err
from lowbit_helpers import artifact, cosine, output, reference_output


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("int4")


def _weight(rows=256, cols=512, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    # gaussian with rare 4x outliers, like trained weights: the case where clipping pays
    return torch.randn(rows, cols, generator=g) * (1 + 3 * (torch.rand(rows, cols, generator=g) > 0.995))


@pytest.mark.parametrize("group", [64, 128])
def test_int4_layout_and_bounds(group):
    import torch

    from zopt.formats.lowbit.int4 import dequantize_int4, quantize_int4

    w = _weight()
    packed, scale, zero = quantize_int4(w, group)
    assert packed.dtype == torch.uint8 and packed.shape == (256, 256)
    assert scale.dtype == torch.float16 and scale.shape == (256, 512 // group)
    assert zero.dtype == torch.uint8 and int(zero.max()) <= 15
    # two codes per byte: low nibble holds the even column
    codes = torch.round(w[:, :2].reshape(256, 1, 2) / scale.float()[:, :1, None] + zero.float()[:, :1, None])
    codes = codes.clamp(0, 15).to(torch.uint8).reshape(256, 2)
    assert torch.equal(packed[:, 0] & 0xF, codes[:, 0]) and torch.equal(packed[:, 0] >> 4, codes[:, 1])
    dq = dequantize_int4(packed, scale, zero)
    assert rel_err(dq, w) < (0.12 if group == 128 else 0.11)


def test_clipping_search_beats_round_to_nearest():
    import torch

    from zopt.formats.lowbit.int4 import dequantize_int4, quantize_int4

    for seed in range(3):
        w = _weight(seed=seed)
        plain = dequantize_int4(*quantize_int4(w, 128, clip_search=False))
        searched = dequantize_int4(*quantize_int4(w, 128, clip_search=True))
        e_plain, e_search = (plain - w).square().sum(), (searched - w).square().sum()
        assert e_search < 0.97 * e_plain, (float(e_search), float(e_plain))
        # and never worse on any single group (1.0 is among the candidates)
        gp = (plain - w).square().reshape(256, -1, 128).sum(-1)
        gs = (searched - w).square().reshape(256, -1, 128).sum(-1)
        assert (gs <= gp * (1 + 1e-5) + 1e-9).all()
    assert torch.isfinite(searched).all()


def test_int4_artifact_reloads_within_bounds(root, tiny_transformer_dir, tiny_reference_inputs):
    import json

    import torch

    import zopt

    out = artifact(root, tiny_transformer_dir, "int4", group_size=64)
    m = json.loads((out / "zopt-manifest.json").read_text())
    assert m["options"]["group_size"] == 64 and m["options"]["clip_search"] is True
    assert m["tensors"]["layers.0.feed_forward.w1.weight"]["storage"] == "INT4_G64"
    model = zopt.load(out, dtype=torch.float32, backend="torch-dequant")  # the stored INT4 as it is
    y, ref = output(model, tiny_reference_inputs), reference_output(tiny_transformer_dir, tiny_reference_inputs)
    assert rel_err(y, ref) < 0.25 and cosine(y, ref) > 0.97
    lin = model.layers[0].feed_forward.w1
    assert type(lin).__name__ == "Int4Linear" and lin.weight.dtype == torch.uint8


def test_bad_group_size_refused(tmp_path, tiny_transformer_dir):
    from zopt import formats
    from zopt.errors import ZoptError

    with pytest.raises(ZoptError, match="group_size"):
        formats.convert(tiny_transformer_dir, "int4", tmp_path / "x", options={"group_size": 100}, progress=False)
    assert not (tmp_path / "x").exists()
