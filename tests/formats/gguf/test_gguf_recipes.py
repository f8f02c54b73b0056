"""GGUF per-tensor policy and the streaming writer (no model weights needed)."""

from __future__ import annotations

import numpy as np
import pytest

from zopt.families import zimage
from zopt.formats.gguf import recipes as R
from zopt.formats.gguf.writer import StreamingGGUFWriter


@pytest.fixture(scope="module")
def full_plan():
    shapes = R.full_size_shapes()
    return {name: {p.name: p.qtype for p in R.plan(shapes, name)} for name in R.RECIPES}


DIRECT_PATH = ("t_embedder.mlp.0.weight", "x_embedder.weight", "final_layer.linear.weight",
               "final_layer.adaLN_modulation.1.weight")
MODULATION = ("cap_embedder.1.weight", "layers.7.adaLN_modulation.0.weight", "noise_refiner.0.adaLN_modulation.0.weight")
SENSITIVE_WEIGHTS = DIRECT_PATH + MODULATION


def test_sensitive_tensors_keep_precision_in_every_recipe(full_plan):
    for name, types in full_plan.items():
        if name == "F32":
            assert set(types.values()) == {"F32"}
            continue
        assert types["x_pad_token"] == types["cap_pad_token"] == "F32"
        assert types["layers.3.attention.q_norm.weight"] == "F32"
        assert types["layers.3.attention_norm1.weight"] == "F32"
        assert types["layers.3.adaLN_modulation.0.bias"] == "F32"
        # the direct path BF16 everywhere; adaLN and cap_embedder BF16 in the float recipes and
        # Q8_0 (8.5 bits, within ~0.4% of BF16) in every quantized one
        for n in DIRECT_PATH:
            assert types[n] == "BF16", (name, n)
        for n in MODULATION:
            assert types[n] == ("BF16" if name in R.FLOAT_TYPES else "Q8_0"), (name, n)


def test_keep_holds_sensitive_weights_in_bf16():
    shapes = R.full_size_shapes()
    types = {p.name: p.qtype for p in R.plan(shapes, "Q4_K_M", keep=[r"adaLN_modulation"])}
    assert types["layers.7.adaLN_modulation.0.weight"] == "BF16"
    assert types["cap_embedder.1.weight"] == "Q8_0"


def test_q4_k_m_raises_qkv_and_w2_as_documented(full_plan):
    t = full_plan["Q4_K_M"]
    # 30 main blocks: llama.cpp's use_more_bits picks 0-2, 27-29 and every third block from 5
    assert R.more_bits_block(0, 30) and R.more_bits_block(5, 30) and not R.more_bits_block(4, 30)
    assert t["layers.0.attention.qkv.weight"] == "Q6_K"
    assert t["layers.4.attention.qkv.weight"] == "Q5_K"
    assert t["layers.0.feed_forward.w2.weight"] == "Q6_K"
    assert t["layers.4.feed_forward.w2.weight"] == "Q4_K"
    assert t["layers.4.feed_forward.w1.weight"] == "Q4_K"
    assert t["layers.4.attention.out.weight"] == "Q4_K"
    assert t["context_refiner.1.attention.qkv.weight"] == "Q6_K"
    assert t["noise_refiner.0.feed_forward.w2.weight"] == "Q6_K"


def test_uniform_and_mixed_recipes(full_plan):
    sensitive = {n for n in full_plan["Q4_K"] if zimage.sensitive_reason(n) is not None}
    quantized = {n for n, q in full_plan["Q4_K"].items() if q not in R.FLOAT_TYPES and n not in sensitive}
    assert {full_plan["Q4_K"][n] for n in quantized} == {"Q4_K"}
    q8 = {n for n in sensitive if full_plan["Q4_K"][n] not in R.FLOAT_TYPES}
    assert {full_plan["Q4_K"][n] for n in q8} == {"Q8_0"} and all("adaLN" in n or "cap_embedder" in n for n in q8)
    assert {full_plan["Q3_K_S"][n] for n in quantized} == {"Q3_K"}
    assert {full_plan["Q8_0"][n] for n in quantized} == {"Q8_0"}
    l3 = full_plan["Q3_K_L"]
    assert l3["layers.10.attention.qkv.weight"] == "Q5_K" and l3["layers.10.attention.out.weight"] == "Q4_K"
    assert full_plan["Q2_K"]["layers.10.feed_forward.w1.weight"] == "Q2_K"
    assert full_plan["Q2_K"]["layers.10.feed_forward.w2.weight"] == "Q3_K"


def test_bits_per_weight_order():
    bpw = {name: bits for name, bits, _ in R.list_types()}
    order = ["F32", "BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M",
             "Q3_K_S", "Q2_K"]
    assert all(bpw[a] > bpw[b] for a, b in zip(order[:-1], order[1:], strict=True)), bpw
    assert 8.5 < bpw["Q8_0"] < 9.0 and 4.5 < bpw["Q4_K_M"] < 6.0


def test_row_length_fallback():
    rec = R.recipe("Q4_K_M")
    assert R.choose("layers.4.feed_forward.w1.weight", (1024, 320), rec, 30)[0] == "Q5_0"
    assert R.choose("layers.4.feed_forward.w1.weight", (1024, 300), rec, 30)[0] == "BF16"
    assert R.choose("layers.0.attention.qkv.weight", (1536, 288), rec, 30)[0] == "Q8_0"  # Q6_K -> Q8_0
    assert R.choose("layers.0.attention.qkv.weight", (1536, 512), rec, 30, keep=[r"qkv"])[0] == "BF16"


def test_unknown_type_is_a_zopt_error():
    from zopt.errors import ZoptError

    with pytest.raises(ZoptError, match="Q7_K"):
        R.recipe("Q7_K")


def test_writer_output_reads_back_in_gguf_py(tmp_path):
    import gguf

    a = np.arange(64 * 3, dtype=np.float32).reshape(3, 64)
    b = np.arange(32, dtype=np.float16)
    meta = {"general.architecture": "lumina2", "x.int": 7, "x.neg": -3, "x.float": 0.5, "x.flag": True,
            "x.list": [1, 2, 3], "x.strs": ["a", "bc"], "x.hash": "0" * 8}
    path = tmp_path / "w.gguf"
    with StreamingGGUFWriter(path, [("a", (3, 64), "F32"), ("b", (32,), "F16")], meta) as w:
        w.write("a", iter([a[:2], a[2:]]))
        w.write("b", b)
        w.patch_string("x.hash", "deadbeef")
    r = gguf.GGUFReader(path)
    assert r.fields["general.architecture"].contents() == "lumina2"
    assert r.fields["x.int"].contents() == 7 and r.fields["x.neg"].contents() == -3
    assert r.fields["x.list"].contents() == [1, 2, 3] and r.fields["x.strs"].contents() == ["a", "bc"]
    assert r.fields["x.hash"].contents() == "deadbeef" and r.fields["x.flag"].contents() is True
    ta, tb = r.tensors
    assert ta.name == "a" and list(ta.shape) == [64, 3] and np.array_equal(ta.data, a)
    assert tb.tensor_type.name == "F16" and np.array_equal(tb.data, b)
    assert ta.data_offset % 32 == 0 and tb.data_offset % 32 == 0


def test_writer_refuses_wrong_order_and_sizes(tmp_path):
    with pytest.raises(ValueError, match="never written"), \
            StreamingGGUFWriter(tmp_path / "x.gguf", [("a", (2, 32), "F32"), ("b", (32,), "F32")], {}) as w:
        with pytest.raises(ValueError, match="out of order"):
            w.write("b", np.zeros(32, np.float32))
        with pytest.raises(ValueError, match="bytes"):
            w.write("a", np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="multiple"):
        StreamingGGUFWriter(tmp_path / "y.gguf", [("a", (2, 48), "Q8_0")], {})
