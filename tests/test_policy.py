"""One keep/quantize policy: a --keep pattern keeps the same tensors in every format, whichever key
layout the format writes and whichever layout the pattern is written in."""

from __future__ import annotations

import json

import pytest

from zopt import checkpoint, formats
from zopt.families import resolve_source, zimage
from zopt.policy import Policy, is_linear_weight

# the same two tensors, the first named in the original layout (attention.out), the second in the
# diffusers layout (attention.to_q: stored fused as attention.qkv in GGUF and ComfyUI files)
KEEP_ORIGINAL = [r"layers\.1\.attention\.out\.", r"noise_refiner\.0\.attention\.to_q\."]
KEEP_DIFFUSERS = [r"layers\.1\.attention\.to_out\.0\.", r"noise_refiner\.0\.attention\.to_q\."]


def _linear(config):
    return {n for n, s in zimage.expected_shapes(config).items() if is_linear_weight(n, s)}


def test_linear_rule_matches_the_model():
    from zopt.formats.lowbit.common import linear_weight_names

    for config in (zimage.TINY_CONFIG, zimage.FULL_CONFIG):
        assert _linear(config) == set(linear_weight_names(config))


def test_fused_qkv_is_quantized_only_with_all_its_parts():
    p = Policy(keep=[r"\.to_k\."])
    assert not p.decide("layers.0.attention.qkv.weight", (1152, 384)).quantize
    assert p.decide("layers.0.attention.to_q.weight", (384, 384)).quantize
    # a pattern on the fused name reaches every part in the diffusers layout
    q = Policy(keep=[r"attention\.qkv"])
    assert not any(q.decide(f"layers.0.attention.{p}.weight", (384, 384)).quantize for p in ("to_q", "to_k", "to_v"))
    # --quantize overrides the family's rules but cannot make a norm or bias a quantized weight
    f = Policy(quantize=[r"adaLN_modulation"])
    assert f.decide("layers.0.adaLN_modulation.0.weight", (1536, 256)).forced
    assert not f.decide("layers.0.adaLN_modulation.0.bias", (1536,)).quantize


def _kept_lowbit(folder, linear):
    m = json.loads((folder / "zopt-manifest.json").read_text())
    return {n for n in linear if "parts" not in m["tensors"][n] and "scale" not in m["tensors"][n]}


def _kept_plain(folder, linear):
    # a plain format "quantizes" by casting to its dtype; the manifest records the policy's reason
    m = json.loads((folder / "zopt-manifest.json").read_text())
    return {n for n in linear if m["tensors"][n]["reason"] != "policy"}


def _kept_gguf(path, linear):
    """Linear weights a GGUF file does not store at its recipe's types: float, or (adaLN and
    cap_embedder in a quantized recipe) at their family rule's GGUF type, Q8_0."""
    from zopt.formats.gguf.recipes import FLOAT_TYPES
    from zopt.policy import diffusers_parts

    src = checkpoint.open(path)
    kept = set()
    for n in src.names():
        if src.info(n).dtype in FLOAT_TYPES or src.info(n).dtype == "Q8_0":
            kept |= {p for p in diffusers_parts(n) if p in linear}
    return kept


def _kept_onnx(tmp_path, config, keep):
    onnx = pytest.importorskip("onnx")
    from zopt.formats.onnx import quantizable_matmuls, weight_of
    from zopt.formats.onnx.export import MODEL_NAME, export

    folder = tmp_path / "onnx"
    folder.mkdir()
    export(checkpoint.open(resolve_source("tiny-random")), folder, "fp32", progress=False)
    m = onnx.load(str(folder / MODEL_NAME), load_external_data=False)
    other = quantizable_matmuls(m, Policy(keep=keep))[1]
    by_node = {node.name: weight_of(node.input[1]) for node in m.graph.node if node.op_type == "MatMul"}
    return {by_node[n] for n in other} & _linear(config)


def test_a_pattern_means_the_same_in_either_layout():
    src = checkpoint.open(resolve_source("tiny-random"))
    views = (zimage.as_diffusers(src), zimage.as_original(src))
    a, b = Policy(keep=KEEP_ORIGINAL), Policy(keep=KEEP_DIFFUSERS)
    for view in views:
        for n in view.names():
            shape = view.info(n).shape
            assert a.decide(n, shape) == b.decide(n, shape) or a.decide(n, shape).reason.startswith("--keep"), n
            assert a.decide(n, shape).quantize == b.decide(n, shape).quantize, n


def test_same_keep_pattern_keeps_the_same_tensors_in_every_format(tmp_path):
    keep = KEEP_ORIGINAL  # one pattern in each layout's names
    config = zimage.check_shapes(checkpoint.open(resolve_source("tiny-random")))
    linear = _linear(config)
    default_kept = {n for n in linear if zimage.sensitive_reason(n) is not None}
    want = default_kept | {"layers.1.attention.to_out.0.weight", "noise_refiner.0.attention.to_q.weight"}
    kept: dict[str, set[str]] = {}
    for spec in ("fp8", "int8", "int8_w8a8", "int4", "nf4", "bf16"):
        out = formats.convert("tiny-random", spec, tmp_path / spec, options={"keep": keep, "hash_source": False},
                              progress=False)
        kept[spec] = (_kept_plain if spec == "bf16" else _kept_lowbit)(out, linear)
    comfy = formats.convert("tiny-random", "fp8", tmp_path / "comfy", options={"keep": keep, "layout": "comfy"},
                            progress=False)
    kept["fp8 comfy"] = _kept_lowbit(comfy, linear)
    # Q4_K: the recipe's own types (Q4_K, Q5_0 for rows of 384) differ from the sensitive weights' Q8_0
    gguf = formats.convert("tiny-random", "gguf:Q4_K", tmp_path / "t.gguf", options={"keep": keep}, progress=False)
    kept["gguf"] = _kept_gguf(gguf, linear)
    # the file records the options that shaped it (a default conversion records none)
    assert json.loads(checkpoint.open(gguf).metadata["zopt.options"]) == {"keep": keep}
    kept["onnx"] = _kept_onnx(tmp_path, config, keep)
    # the fused qkv of the original layout holds to_q, to_k and to_v: files in that layout keep all three
    fused = {"noise_refiner.0.attention.to_k.weight", "noise_refiner.0.attention.to_v.weight"}
    for spec, got in kept.items():
        expect = want | fused if spec in ("gguf", "fp8 comfy") else want
        assert got == expect, (spec, sorted(got ^ expect))
