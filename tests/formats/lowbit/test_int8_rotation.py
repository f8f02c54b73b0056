"""Hadamard rotation for int8_w8a8 (``--option rotate=B``): the rotated layer computes the same
product, spreads outlier input channels so per-token INT8 activations lose less, and artifacts
record it and reload (both CPU kernels giving the same numbers)."""

from __future__ import annotations

import json

import pytest
import torch

from zopt.errors import ZoptError
from zopt.formats import convert, load
from zopt.formats.lowbit.int8 import Int8Scheme, hadamard, rotate_cols, rotation_block


def test_hadamard_is_orthonormal_and_blocks_divide_the_width():
    for b in (2, 16, 64):
        h = hadamard(b)
        assert torch.allclose(h @ h.t(), torch.eye(b), atol=1e-6)
    x = torch.randn(5, 96)
    assert torch.allclose(rotate_cols(rotate_cols(x, 32), 32), x, atol=1e-5)  # its own inverse
    assert rotation_block(96, 64) == 32 and rotation_block(3840, 64) == 64 and rotation_block(10240, 256) == 256
    assert rotation_block(100, 64) == 4 and rotation_block(7, 64) == 1


def _layer_error(x, w, rotate: int, backend: str):
    name = "layers.0.feed_forward.w2.weight"
    scheme = Int8Scheme("int8_w8a8", rotate=rotate)
    stored = scheme.quantize_named(name, w)
    parts = {p: t for (p, _, _), t in zip(scheme.parts(name, tuple(w.shape)), stored, strict=True)}
    m = scheme.module(parts, tuple(w.shape), backend)
    with torch.inference_mode():
        y = m(x)
    ref = x @ w.t()
    return float((y - ref).norm() / ref.norm()), m


def test_rotation_spreads_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g)
    x[:, :4] *= 40  # a few loud input channels set every token's INT8 scale
    w = torch.randn(128, 256, generator=g) / 16
    plain, _ = _layer_error(x, w, 0, "torch-dequant")
    rotated, m = _layer_error(x, w, 64, "torch-dequant")
    fast, _ = _layer_error(x, w, 64, "int-mm-cpu")
    assert rotated < 0.5 * plain, (plain, rotated)
    assert abs(fast - rotated) < 1e-4  # the integer kernel rotates the same way
    # the stored weight is W H; dequantize gives W back (per-row INT8 rounding of W H only)
    assert float((m.dequantize() - w).norm() / w.norm()) < 0.01


def test_artifact_records_rotation_and_reloads(tmp_path, tiny_transformer_dir, tiny_reference_inputs):
    from zopt.formats.plain import load_source

    out = convert(tiny_transformer_dir, "int8_w8a8", tmp_path / "rot", options={"rotate": 64}, progress=False)
    manifest = json.loads((out / "zopt-manifest.json").read_text())
    assert manifest["scheme"]["rotation"]["block"] == 64
    # it changes the stored weights: recorded where the conversion can be repeated from, and a
    # reader that does not know the rotation refuses the file instead of misreading it
    assert manifest["options"]["rotate"] == 64 and "rotate=64" in manifest["command"]
    assert manifest["requires"] == ["int8-hadamard-rotation"]
    assert {r["storage"] for r in manifest["tensors"].values() if "parts" in r} == {"I8_H64"}
    x, t, cap = tiny_reference_inputs
    ref = load_source(tiny_transformer_dir, dtype=torch.float32)
    with torch.inference_mode():
        want = ref(x, t, cap, return_dict=False)[0][0]
        got = {b: load(out, device="cpu", dtype=torch.float32, backend=b)(x, t, cap, return_dict=False)[0][0]
               for b in ("torch-dequant", "int-mm-cpu")}
    assert float((got["int-mm-cpu"] - got["torch-dequant"]).norm() / want.norm()) < 1e-4
    assert float((got["int-mm-cpu"] - want).norm() / want.norm()) < 0.05
    model = load(out, device="cpu", dtype=torch.float32, backend="torch-dequant")
    name = "layers.0.attention.to_q"
    assert model.get_submodule(name).rotate > 1
    w = ref.get_submodule(name).weight
    assert float((model.get_submodule(name).dequantize() - w).norm() / w.norm()) < 0.02


@pytest.mark.parametrize("spec,rotate,match", [("int8", 64, "int8_w8a8"), ("int8_w8a8", 48, "power of two"),
                                               ("int8_w8a8", 1, "power of two")])
def test_bad_rotation_is_refused_before_writing(tmp_path, tiny_transformer_dir, spec, rotate, match):
    with pytest.raises(ZoptError, match=match):
        convert(tiny_transformer_dir, spec, tmp_path / "o", options={"rotate": rotate}, progress=False)
    assert not (tmp_path / "o").exists()


def test_a_manifest_needing_an_unknown_feature_is_refused(tmp_path, tiny_transformer_dir):
    from zopt.formats.artifact import DIGEST_FIELD, manifest_digest

    out = convert(tiny_transformer_dir, "int8_w8a8", tmp_path / "rot", options={"rotate": 64}, progress=False)
    path = out / "zopt-manifest.json"
    m = json.loads(path.read_text())
    m["requires"] = ["int8-hadamard-rotation", "some-later-feature"]
    m[DIGEST_FIELD] = manifest_digest(m)
    path.write_text(json.dumps(m))
    with pytest.raises(ZoptError, match="newer zopt.*some-later-feature"):
        load(out, device="cpu")
