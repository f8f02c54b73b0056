"""Memory planner: the memory model's arithmetic, and recommendations on every simulated machine."""

from __future__ import annotations

import json

import pytest

from zopt.errors import ZoptError
from zopt.families import zimage
from zopt.platform.fakes import FAKES
from zopt.runtime import planner
from zopt.runtime.offload import device_bytes, reserve

GIB = 1024**3


def test_parse_size():
    assert planner.parse_size("8GB") == 8 * GIB
    assert planner.parse_size("7.5g") == int(7.5 * GIB)
    assert planner.parse_size("8192MiB") == 8 * GIB
    for bad in ("eight", "-1GB", "8", "GB"):
        with pytest.raises(ZoptError):
            planner.parse_size(bad)


def test_token_counts():
    s = planner.shape_for(1024, 1024, 2, 300)
    assert (s.image_tokens, s.text_tokens, s.batch, s.tokens) == (4096, 320, 2, 4416)
    assert planner.shape_for(1000, 1000).image_tokens == 62 * 62 + 28  # padded to a multiple of 32


def test_weights_by_format():
    full = zimage.FULL_CONFIG
    assert planner.weight_bytes(full, 16) == 2 * zimage.FULL_NUM_PARAMS
    assert planner.weight_bytes(full, 32, 32) == 4 * zimage.FULL_NUM_PARAMS
    q4 = planner.weight_bytes(full, 4)
    # 4-bit body + the precision-sensitive remainder at 16 bits: between 25% and 30% of bf16
    assert 0.25 < q4 / planner.weight_bytes(full, 16) < 0.30
    from zopt.formats import FORMATS

    for c in planner.CANDIDATES:  # effective bits never below the registry's nominal bits
        nominal = FORMATS[c.spec.split(":")[0]].bits
        assert nominal is None or c.bits >= nominal
    bits = [c.bits for c in planner.CANDIDATES]
    assert bits[0] == 16 and bits[-1] == min(bits)


def test_activations_scale_with_tokens_and_attention_kind():
    full = zimage.FULL_CONFIG
    a1 = planner.activation_bytes(full, planner.shape_for(1024, 1024, 1))
    a2 = planner.activation_bytes(full, planner.shape_for(1024, 1024, 2))
    assert a2 - planner.ACT_FIXED == 2 * (a1 - planner.ACT_FIXED)
    s = planner.shape_for(1024, 1024)
    math_extra = planner.activation_bytes(full, s, attention="_native_math") - a1
    assert math_extra == full["n_heads"] * s.tokens**2 * 2 * 2  # the materialized score matrix (bf16, x2)
    assert planner.activation_bytes(full, s, elem_bytes=4) - planner.ACT_FIXED == 2 * (a1 - planner.ACT_FIXED)


@pytest.mark.parametrize("machine", list(FAKES))
@pytest.mark.parametrize("res", [512, 1024])
def test_recommendation_fits_and_is_fastest_then_best(machine, res):
    hw = FAKES[machine]
    p = planner.plan(hw, res, res)
    budget = hw.free_memory - reserve(hw)
    assert p.budget == budget
    r = p.recommended
    assert r is not None and r.device_bytes <= budget
    tiers = ["none", "model", "group-stream", "group", "sequential", "disk"]
    fallback = {c.spec for c in planner.CANDIDATES if c.fallback}
    assert r.spec not in fallback  # a >= 4-bit format fits on every simulated machine
    for row in p.rows:
        runnable = row.backend is not None or row.note == "format not in this build"
        if row.offload and runnable and row.spec not in fallback:
            assert tiers.index(row.offload) >= tiers.index(r.offload)
    same_tier = [row.spec for row in p.rows if row.offload == r.offload]
    assert r.spec == same_tier[0]  # quality order within the tier
    assert p.attention in ("native", "flash", "_flash_3", "xformers")


def test_budget_decisions():
    def rec(vram, res=1024):
        return planner.plan(planner.budget_hardware(planner.parse_size(vram)), res, res).recommended

    assert (rec("24GB").spec, rec("24GB").offload) == ("bf16", "none")
    assert rec("16GB").offload == "none" and rec("16GB").spec != "bf16"  # a smaller format avoids offload
    assert rec("8GB").offload in ("group-stream", "sequential")  # the text encoder alone is 7.5 GiB
    assert (rec("12GB").spec, rec("12GB").offload) == ("fp8", "model")  # not Q2_K merely to avoid offload
    assert rec("8GB", 512).device_bytes < rec("8GB", 2048).device_bytes
    assert rec("0.5GB") is None


def test_footprint_matches_offload_model():
    cand = planner.CANDIDATES[0]
    fp = planner.footprint(zimage.FULL_CONFIG, cand, planner.shape_for(1024, 1024), 1024, 1024)
    assert fp.transformer == 2 * zimage.FULL_NUM_PARAMS
    assert fp.text_encoder == 2 * planner.TEXT_ENCODER_PARAMS
    assert device_bytes("none", fp) == fp.weights + fp.activations


def test_plan_cli(capsys):
    from zopt.cli import main

    assert main(["plan", "--vram", "8GB", "--resolution", "1024x1024", "--batch", "2", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["batch"] == 2 and d["image_tokens"] == 4096 and d["budget_gib"] == pytest.approx(7.5, abs=0.01)
    assert d["recommended"]["device_gib"] <= d["budget_gib"] and len(d["rows"]) == len(planner.CANDIDATES)
    assert main(["plan", "--hardware", "cuda-sm90-80gb"]) == 0
    out = capsys.readouterr().out
    assert "recommended: --to bf16 --offload none" in out and "attention: _flash_3" in out
    assert main(["plan"]) == 0  # this machine
    assert "recommended" in capsys.readouterr().out
    assert main(["plan", "--vram", "lots"]) == 2


def test_gguf_on_cpu_is_planned_as_int8_codes():
    pytest.importorskip("zopt.formats.gguf")
    rows = {r.spec: r for r in planner.plan(FAKES["cpu-only"]).rows}
    q8, q4 = rows["gguf:Q8_0"], rows["gguf:Q4_K_M"]
    # int-mm-cpu holds INT8 codes for every GGUF type: Q4_K_M costs what Q8_0 costs on CPU
    assert q8.backend == q4.backend == "int-mm-cpu" and q4.weights_bytes == q8.weights_bytes
    on_gpu = {r.spec: r for r in planner.plan(FAKES["cuda-sm89-8gb"]).rows}
    assert on_gpu["gguf:Q4_K_M"].weights_bytes < 0.7 * on_gpu["gguf:Q8_0"].weights_bytes
