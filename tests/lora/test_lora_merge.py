"""LoRA files in every published layout are detected and merged exactly: each merged weight equals
``W + scale * alpha / rank * B @ A`` computed here with plain torch; convert --lora records them."""

from __future__ import annotations

import json

import pytest
import torch
from lora_helpers import LAYOUTS, merged_weights, random_lora, tiny_modules, write_lora

from zopt import checkpoint, formats
from zopt.families import zimage
from zopt.families.zimage.keys import LORA_PREFIXES
from zopt.lora import Branch, merged_source, read, stack


@pytest.fixture(scope="module")
def tiny_fp32(tmp_path_factory, tiny_transformer_dir):
    """The tiny transformer stored in float32, so a merged weight can be compared to 1e-6."""
    return formats.convert(tiny_transformer_dir, "fp32", tmp_path_factory.mktemp("f32") / "tiny-fp32", progress=False)


def _weights(src) -> dict:
    d = zimage.as_diffusers(src)
    return {n: d.get(n).float() for n in d.names()}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_layout_is_detected_and_merged_exactly(tmp_path, tiny_fp32, layout):
    with_alpha = LAYOUTS[layout][3]
    lora = random_lora(tiny_modules(), rank=4, seed=11, alpha=2.0 if with_alpha else None)
    path = write_lora(tmp_path / f"{layout}.safetensors", lora, layout)
    lf = read(path, LORA_PREFIXES)
    assert lf.layout == ("kohya" if layout.startswith("kohya") else "peft")
    merged = merged_source(checkpoint.open(tiny_fp32), [f"{path}:0.7"])
    want = merged_weights(_weights(checkpoint.open(tiny_fp32)), [(lora, 0.7)])
    got = _weights(merged)
    assert set(got) == set(want)
    changed = 0
    for n in want:
        assert torch.allclose(got[n], want[n], rtol=0, atol=2e-6), n
        changed += not torch.equal(got[n], _weights_cache(tiny_fp32)[n])
    assert changed == len(lora)  # every Linear the LoRA names, and nothing else, moved
    rec = merged.loras[0]
    assert rec["file"] == path.name and rec["scale"] == 0.7 and len(rec["sha256"]) == 64
    assert rec["targets"] == ("fused qkv" if layout.endswith("qkv") else "separate q/k/v")


_CACHE: dict = {}


def _weights_cache(path):
    if path not in _CACHE:
        _CACHE[path] = _weights(checkpoint.open(path))
    return _CACHE[path]


def test_original_layout_source_gets_stacked_qkv_update(tmp_path, tiny_fp32):
    """A fused qkv weight (original-layout source, what GGUF stores) gets the q, k and v updates
    of a diffusers LoRA stacked: the same rows as merging q, k, v separately."""
    lora = random_lora(tiny_modules(), rank=3, seed=5, attention_only=True)
    path = write_lora(tmp_path / "sep.safetensors", lora, "diffusers")
    orig = zimage.as_original(merged_source(checkpoint.open(tiny_fp32), [str(path)]))
    want = merged_weights(_weights_cache(tiny_fp32), [(lora, 1.0)])
    qkv = orig.get("layers.1.attention.qkv.weight")
    ref = torch.cat([want[f"layers.1.attention.to_{p}.weight"] for p in "qkv"], 0)
    assert torch.allclose(qkv.float(), ref, rtol=0, atol=2e-6)


def test_stack_is_block_diagonal_low_rank():
    g = torch.Generator().manual_seed(0)
    parts = [Branch(torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g), 0.5), None,
             Branch(torch.randn(3, 6, generator=g), torch.randn(4, 3, generator=g), 2.0)]
    fused = stack(parts, [4, 4, 4], 6)
    assert fused.rank == 5
    ref = torch.cat([parts[0].delta(), torch.zeros(4, 6), parts[2].delta()], 0)
    assert torch.allclose(fused.delta(), ref, atol=1e-6)


def test_two_loras_add_up(tmp_path, tiny_fp32):
    mods = tiny_modules()
    a, b = random_lora(mods, rank=4, seed=1), random_lora(mods, rank=8, seed=2, alpha=4.0)
    pa = write_lora(tmp_path / "a.safetensors", a, "diffusers")
    pb = write_lora(tmp_path / "b.safetensors", b, "kohya-qkv")
    got = _weights(merged_source(checkpoint.open(tiny_fp32), [f"{pa}:0.5", f"{pb}:-1.25"]))
    want = merged_weights(_weights_cache(tiny_fp32), [(a, 0.5), (b, -1.25)])
    assert all(torch.allclose(got[n], want[n], rtol=0, atol=3e-6) for n in want)


@pytest.mark.parametrize("spec", ["gguf:Q4_K_M", "gguf:Q8_0", "bf16", "fp8", "int8", "int8_w8a8", "int4", "nf4"])
def test_convert_with_lora_records_it_and_merges(tmp_path, tiny_fp32, spec):
    """convert --lora: the artifact records the LoRA (file, sha256, scale) and holds the merged
    weights: for a lossless path (bf16) they equal the merged reference rounded to bf16; for a
    quantized one, the artifact is nearer the merged weights than the unmerged ones."""
    lora = random_lora(tiny_modules(), rank=8, seed=3, std=0.15)
    path = write_lora(tmp_path / "style.safetensors", lora, "kohya")
    out = formats.convert(tiny_fp32, spec, tmp_path / "out", progress=False, loras=[f"{path}:0.8"])
    if spec.startswith("gguf"):
        src = checkpoint.open(out)
        recs = json.loads(src.metadata["zopt.loras"])
    else:
        man = json.loads((out / "zopt-manifest.json").read_text())
        recs = man["source"]["loras"]
        assert "--lora" in man["command"]
    assert recs[0]["file"] == "style.safetensors" and recs[0]["scale"] == 0.8
    assert recs[0]["sha256"] == read(path).sha256
    want = merged_weights(_weights_cache(tiny_fp32), [(lora, 0.8)])
    name = "layers.0.feed_forward.w1.weight"
    if spec == "bf16":
        got = _weights(checkpoint.open(out))[name]
        assert torch.equal(got, want[name].to(torch.bfloat16).float())
        return
    model = formats.load(out, dtype=torch.float32)
    layer = model.get_submodule(name[: -len(".weight")])
    w = _dense(layer)
    base = _weights_cache(tiny_fp32)[name]
    assert (w - want[name]).norm() < 0.5 * (w - base).norm()


def _dense(layer):
    """The dense float weight of a loaded layer, by running the identity through it."""
    eye = torch.eye(layer.in_features)
    with torch.no_grad():
        y = layer(eye)
    if getattr(layer, "bias", None) is not None:
        y = y - layer.bias.float()
    return y.float().t()
