"""Memory planner: the memory model's arithmetic, and recommendations on every simulated machine."""

from __future__ import annotations

import json

import pytest

from zopt.errors import ZoptError
from zopt.families import zimage
from zopt.platform.fakes import FAKES, PROFILES
from zopt.runtime import planner
from zopt.runtime.offload import device_bytes

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


def expected(hw):
    """What people run on each class of machine (full model, 1024x1024, batch 1): (rule, check)."""
    gib = hw.total_memory / GIB
    resident = ("none", "model")  # no transformer weights streamed per denoising step
    if hw.device in ("cpu", "mps"):
        return "fits, or says nothing fits", lambda p, r: r is None or r.device_bytes <= p.budget
    if gib >= 20:
        return "bf16 resident", lambda p, r: r.spec == "bf16" and r.offload == "none"
    if gib >= 14:
        return "bf16, fp8 or Q8_0 resident, text encoder freed or on the CPU", lambda p, r: (
            r.spec in ("bf16", "fp8", "gguf:Q8_0") and r.offload in resident and r.text_encoder in ("free", "cpu"))
    if gib >= 10:
        return "Q8_0 or fp8-storage resident", lambda p, r: r.offload in resident and (
            r.spec == "gguf:Q8_0" or (r.spec, r.backend) == ("fp8", "fp8-storage"))
    if gib >= 7:
        return "a 4-5-bit GGUF, nf4 or int4 resident", lambda p, r: r.offload in resident and r.spec in (
            "gguf:Q5_K_M", "gguf:Q4_K_M", "gguf:Q4_K_S", "nf4", "int4")
    if gib >= 5:
        return "Q3_K_M, Q4_K_S, nf4 or int4 resident", lambda p, r: r.offload in resident and r.spec in (
            "gguf:Q3_K_M", "gguf:Q4_K_S", "nf4", "int4")
    return "the fastest option, slowdown stated", lambda p, r: (
        r is not None and p.slowdown is not None and (p.slowdown < 1.05 or "slower" in p.reason))


@pytest.mark.parametrize("machine", list(PROFILES))
def test_every_profile_gets_what_people_run(machine):
    hw = PROFILES[machine]
    p = planner.plan(hw)
    rule, ok = expected(hw)
    r = p.recommended
    assert ok(p, r), f"{machine}: expected {rule}, got {r and (r.spec, r.backend, r.offload, r.text_encoder)}"
    if r is not None:
        assert r.device_bytes <= p.budget and r.device_bytes == max(r.stages.values())
        assert r.backend is None or r.backend not in planner_costs().APPROXIMATE


@pytest.mark.parametrize("vram", ["4GB", "6GB", "8GB", "12GB", "16GB", "24GB"])
def test_vram_budgets_get_what_people_run(vram):
    hw = planner.budget_hardware(planner.parse_size(vram))
    p = planner.plan(hw)
    rule, ok = expected(hw)
    assert ok(p, p.recommended), f"--vram {vram}: expected {rule}, got {p.recommended}"


def planner_costs():
    from zopt.runtime import costs

    return costs


@pytest.mark.parametrize("machine", ["rtx4090-24gb", "rtx3070-8gb", "rtx3050-6gb", "t4-16gb", "cpu-32gb"])
def test_recommendation_is_the_fastest_group_then_quality(machine):
    hw = PROFILES[machine]
    p = planner.plan(hw)
    r = p.recommended
    fits = [o for o in p.options if o.fits and not o.approximate]
    rec = next(o for o in fits if (o.spec, o.backend, o.offload, o.text_encoder, o.vae_tiling)
               == (r.spec, r.backend, r.offload, r.text_encoder, r.vae_tiling))
    roomy = p.budget - min(planner.HEADROOM * p.budget, planner.HEADROOM_CAP)
    if rec.resident and not rec.fallback and rec.peak <= roomy:
        group = [o for o in fits if o.resident and not o.fallback and o.peak <= roomy]
        assert rec.image_s <= planner.BAND * min(o.image_s for o in group)
        for o in group:  # nothing near as fast is of better quality
            if o.image_s <= planner.BAND * min(g.image_s for g in group):
                from zopt.runtime.stages import TE_QUALITY

                assert (TE_QUALITY[rec.text_encoder], rec.quality) <= (TE_QUALITY[o.text_encoder], o.quality)


def test_stages_peak_is_the_largest_stage_not_the_sum():
    p = planner.plan(PROFILES["rtx4080-16gb"])
    r = p.recommended
    assert r.offload == "model" and r.text_encoder == "free"
    # the 7.5 GiB text encoder and the 11.5 GiB transformer never share the device
    assert r.stages["text"] < 8.5 * GIB and r.stages["denoise"] > 11 * GIB
    assert r.device_bytes == max(r.stages.values()) < sum(r.stages.values()) - 7 * GIB


def test_step_time_model(monkeypatch):
    from zopt.runtime import costs

    hw = PROFILES["rtx4090-24gb"]
    key = ("fp8", "scaled-mm", "none", "device", False)
    p = planner.plan(hw, approximate=True)
    opts = {(o.spec, o.backend, o.offload, o.text_encoder, o.vae_tiling): o for o in p.options}
    none = opts[("bf16", "torch", "none", "device", False)]
    streamed = opts[("bf16", "torch", "sequential", "free", False)]
    assert streamed.step_s > none.step_s * 1.2  # 11.5 GiB over PCIe each step
    # FP8 tensor cores more than halve the matmul time on their own; quantizing the activations per
    # call then adds its memory traffic on top (costs.ACT_QUANT_BYTES per activation element)
    monkeypatch.setattr(costs, "ACT_QUANT_BYTES", 0.0)
    untaxed = {(o.spec, o.backend, o.offload, o.text_encoder, o.vae_tiling): o
               for o in planner.plan(hw, approximate=True).options}[key]
    monkeypatch.undo()
    assert untaxed.step_s < 0.8 * none.step_s
    assert opts[key].step_s > untaxed.step_s
    # approximate kernels are recommended only when allowed
    assert planner.plan(hw).recommended.backend not in costs.APPROXIMATE
    # guidance runs the transformer on two sequences
    g = planner.plan(hw, guidance=4.0).recommended
    assert g.step_s == pytest.approx(2 * planner.plan(hw).recommended.step_s, rel=0.05)


def test_prefer_quality_takes_the_best_format_that_fits():
    p = planner.plan(PROFILES["rtx3070-8gb"], prefer="quality")
    assert p.recommended.spec == "bf16"  # streamed, but it fits
    with pytest.raises(ZoptError):
        planner.plan(PROFILES["rtx3070-8gb"], prefer="fastest")


def test_device_specific_rules():
    t4 = planner.plan(PROFILES["t4-16gb"])
    assert t4.dtype == "fp16"  # pre-Ampere: no bf16
    mps = planner.plan(PROFILES["apple-m2-16gb"])
    assert {o.offload for o in mps.options} == {"none"}  # unified memory: offloading saves nothing
    w = {o.spec: o.weights_bytes for o in mps.options}
    assert w["fp8"] == w["bf16"]  # no float8 on MPS: held as bf16
    sm86 = planner.plan(PROFILES["rtx3060-12gb"], approximate=True)
    assert "scaled-mm" not in {o.backend for o in sm86.options}


def test_nothing_fits_is_said_plainly(capsys):
    import dataclasses

    p = planner.plan(planner.budget_hardware(planner.parse_size("1GB")))
    assert p.recommended is None and p.reason.startswith("nothing fits")
    small = dataclasses.replace(PROFILES["cpu-16gb"], free_memory=2 * GIB, system_free=2 * GIB)
    p = planner.plan(small)
    assert p.recommended is None and "of RAM" in p.reason
    from zopt.cli import main

    assert main(["plan", "--hardware", "cpu-16gb", "--vram", "2GB"]) == 0
    assert "recommended: none. Nothing fits" in capsys.readouterr().out


def test_doc_table_is_current():
    from pathlib import Path

    from zopt.runtime import plan_table

    doc = Path(__file__).resolve().parents[2] / "docs" / "runtime.md"
    assert plan_table.current(doc) == plan_table.markdown(), "run python -m zopt.runtime.plan_table --write docs/runtime.md"


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
    assert d["batch"] == 2 and d["image_tokens"] == 4096
    assert d["recommended"]["device_gib"] <= d["budget_gib"] and len(d["rows"]) == len(planner.CANDIDATES)
    assert main(["plan", "--hardware", "cuda-sm90-80gb"]) == 0
    out = capsys.readouterr().out
    assert "recommended: --to bf16 --backend torch --offload none" in out and "attention: _flash_3" in out
    assert main(["plan"]) == 0  # this machine
    assert "recommended" in capsys.readouterr().out
    assert main(["plan", "--vram", "lots"]) == 2


def test_gguf_on_cpu_is_planned_as_int8_codes():
    pytest.importorskip("zopt.formats.gguf")
    opts = planner.plan(FAKES["cpu-only"], approximate=True).options
    held = {(o.spec, o.backend): o.weights_bytes for o in opts}
    # int-mm-cpu holds INT8 codes for every GGUF type: Q4_K_M costs what Q8_0 costs on CPU
    assert held[("gguf:Q8_0", "int-mm-cpu")] == held[("gguf:Q4_K_M", "int-mm-cpu")]
    assert held[("gguf:Q4_K_M", "torch-dequant")] < 0.7 * held[("gguf:Q8_0", "torch-dequant")]
