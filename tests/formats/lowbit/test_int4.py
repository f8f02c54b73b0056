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


def test_importance_weighted_clipping_lowers_output_error_on_outlier_channels(tmp_path):
    """With an imatrix, the clipping search minimizes the error of the layer's output on inputs
    like the calibration's (a few loud channels), not the weight's own; bytes stay one INT4 layout."""
    import torch

    from zopt.formats.imatrix import Imatrix, Stat
    from zopt.formats.lowbit.int4 import Int4Scheme, dequantize_int4

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 256, generator=g)
    x[:, :8] *= 30  # outlier input channels, as real transformers' activations have
    w = torch.randn(128, 256, generator=g) / 16
    name = "layers.0.feed_forward.w2.weight"
    im = Imatrix({name: Stat(x.double().square().sum(0).numpy(), 256.0)})
    plain, weighted = Int4Scheme(128), Int4Scheme(128, imatrix=im)
    ref = x @ w.t()

    def out_err(scheme):
        q = scheme.quantize_named(name, w)
        assert [tuple(t.shape) for t in q] == [tuple(s) for _, _, s in scheme.parts(name, tuple(w.shape))]
        return float((x @ dequantize_int4(*q).t() - ref).norm() / ref.norm())

    e_plain, e_weighted = out_err(plain), out_err(weighted)
    assert e_weighted < 0.9 * e_plain, (e_weighted, e_plain)
    # a weight the imatrix has no entry for is quantized exactly as without it
    other = "layers.0.feed_forward.w1.weight"
    assert all(torch.equal(a, b) for a, b in zip(weighted.quantize_named(other, w), plain.quantize(w), strict=True))
    assert weighted.describe()["clip_search_importance"]["imatrix_sha256"] == im.sha256


def test_int4_imatrix_conversion_and_refusals(tmp_path, tiny_transformer_dir):
    import json

    from zopt import formats
    from zopt.errors import ZoptError
    from zopt.formats.imatrix import Imatrix, Stat, write

    shapes = {"layers.0.feed_forward.w1.weight": 384}
    import numpy as np

    path = write(Imatrix({n: Stat(np.ones(c), 1.0) for n, c in shapes.items()}), tmp_path / "m.imatrix")
    out = formats.convert(tiny_transformer_dir, "int4", tmp_path / "a", options={"imatrix": str(path)}, progress=False)
    scheme = json.loads((out / "zopt-manifest.json").read_text())["scheme"]
    assert "clip_search_importance" in scheme
    # a subtype keeps the imatrix (it used to drop options the manifest does not record)
    out = formats.convert(tiny_transformer_dir, "int4:g64", tmp_path / "g", options={"imatrix": str(path)},
                          progress=False)
    assert "clip_search_importance" in json.loads((out / "zopt-manifest.json").read_text())["scheme"]
    with pytest.raises(ZoptError, match="low-rank"):
        formats.convert(tiny_transformer_dir, "int4:r16", tmp_path / "b", options={"imatrix": str(path)},
                        progress=False)
    for opts, msg in (({"clip_search": False}, "clip_search=false"), ({"rank": 16}, "low-rank")):
        with pytest.raises(ZoptError, match=msg):
            formats.convert(tiny_transformer_dir, "int4", tmp_path / "b", options={"imatrix": str(path), **opts},
                            progress=False)
        assert not (tmp_path / "b").exists()
