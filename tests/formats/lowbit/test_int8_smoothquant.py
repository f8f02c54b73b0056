"""SmoothQuant for int8_w8a8 (``--imatrix``): per-channel smoothing from calibrated abs-max lowers
the W8A8 error where activations have outlier channels; artifacts record it and load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from zopt.errors import ZoptError
from zopt.formats import convert, load
from zopt.formats.imatrix import Imatrix, Stat, write
from zopt.formats.lowbit.int8 import Int8Scheme


def _outlier_case():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    x[:, :4] *= 40  # a few outlier channels, as in real transformers' activations
    w = torch.randn(128, 256, generator=g) / 16
    return x, w


def _w8a8_error(x, w, imatrix) -> float:
    name = "layers.0.feed_forward.w2.weight"
    scheme = Int8Scheme("int8_w8a8", imatrix)
    stored = scheme.quantize_named(name, w)
    parts = {p: t for (p, _, _), t in zip(scheme.parts(name, tuple(w.shape)), stored, strict=True)}
    m = scheme.module(parts, tuple(w.shape), "torch-dequant")
    with torch.inference_mode():
        y = m(x)
    ref = x @ w.t()
    return float((y - ref).norm() / ref.norm())


def test_smoothing_lowers_w8a8_error_on_outlier_channels():
    x, w = _outlier_case()
    im = Imatrix({"layers.0.feed_forward.w2.weight": Stat(x.double().square().sum(0).numpy(), 64.0,
                                                          x.abs().amax(0).numpy())})
    plain, smooth = _w8a8_error(x, w, None), _w8a8_error(x, w, im)
    assert smooth < 0.5 * plain, (plain, smooth)


def test_artifact_records_smoothing_and_loads(tmp_path, tiny_transformer_dir, tiny_reference_inputs):
    from zopt import checkpoint
    from zopt.families import zimage
    from zopt.formats.plain import load_source

    view = zimage.as_original(checkpoint.open(tiny_transformer_dir))
    rng = np.random.default_rng(0)
    entries = {n: Stat(np.ones(view.info(n).shape[1]), 1.0, rng.uniform(0.5, 5, view.info(n).shape[1]))
               for n in view.names() if n.endswith(".weight") and len(view.info(n).shape) == 2}
    path = write(Imatrix(entries, ["seeded"]), tmp_path / "t.imatrix")
    out = convert(tiny_transformer_dir, "int8_w8a8", tmp_path / "sq", options={"imatrix": str(path)},
                  progress=False)
    manifest = json.loads((out / "zopt-manifest.json").read_text())
    assert manifest["scheme"]["smoothing"]["method"] == "SmoothQuant"
    smoothed = [n for n, r in manifest["tensors"].items() if any(p.endswith("_smooth") for p in r.get("parts", ()))]
    assert smoothed
    x, t, cap = tiny_reference_inputs
    ref = load_source(tiny_transformer_dir, dtype=torch.float32)
    model = load(out, device="cpu", dtype=torch.float32, backend="torch-dequant")
    with torch.inference_mode():
        a, b = model(x, t, cap, return_dict=False)[0][0], ref(x, t, cap, return_dict=False)[0][0]
    assert float((a - b).norm() / b.norm()) < 0.05
    name = smoothed[0].rsplit(".", 1)[0]
    mod = model.get_submodule(name)
    w = ref.get_submodule(name).weight
    assert float((mod.dequantize() - w).norm() / w.norm()) < 0.02  # the smoothing is undone exactly


def test_weight_only_int8_refuses_an_imatrix(tmp_path, tiny_transformer_dir):
    path = write(Imatrix({"x.weight": Stat(np.ones(8), 1.0)}), tmp_path / "x.imatrix")
    with pytest.raises(ZoptError, match="int8_w8a8"):
        convert(tiny_transformer_dir, "int8", tmp_path / "o", options={"imatrix": str(path)}, progress=False)
    assert not (tmp_path / "o").exists()
