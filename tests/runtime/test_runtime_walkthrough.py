"""Every profile's recommendation, executed: plan -> convert -> prepare() -> generate.

The plan is made for the simulated machine (full-size model, 1024x1024); the same choices
(format, backend, offload mode, text-encoder placement, VAE tiling, attention, compute dtype)
then go through ``prepare()`` with the tiny model, and the CPU stands in for the device: the
offload hooks, the quantized text encoder, the host-side text encoder and the format's kernels
all run for real. Only an attention kernel that needs a GPU is recorded without being switched
on (``prepare`` says so in the reason).
"""

from __future__ import annotations

import math

import pytest

from zopt.platform.fakes import PROFILES
from zopt.runtime import planner

SPECS: dict[str, object] = {}


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """Tiny conversions, one per format spec, made on first use."""
    from zopt import formats

    root = tmp_path_factory.mktemp("walk")

    def get(spec: str):
        if spec not in SPECS:
            name = spec.replace(":", "-")
            out = root / (name + (".gguf" if spec.startswith("gguf") else ""))
            SPECS[spec] = formats.convert("tiny", spec, out, progress=False)
        return SPECS[spec]

    return get


def _execute(hw, plan, artifacts, tmp_path, guidance: float = 0.0):
    import torch

    from zopt.runtime import pipeline as P

    r = plan.recommended
    pipe, ch = P.prepare(artifacts(r.spec), hardware=hw, place="cpu", offload=r.offload, backend=r.backend,
                         text_encoder=r.text_encoder, vae_tiling=r.vae_tiling, attention="auto", guidance=guidance,
                         width=64, height=64)
    planned = (r.spec.split(":")[0], r.backend, r.offload, r.text_encoder, r.vae_tiling, plan.attention, plan.dtype)
    prepared = (ch.format, ch.backend, ch.offload, ch.text_encoder, ch.vae_tiling, ch.attention, ch.dtype)
    assert prepared == planned
    # what was prepared is really there
    te = pipe.text_encoder
    kinds = {type(m).__name__ for m in te.modules()}
    if r.text_encoder == "int8":
        assert "Int8Linear" in kinds and "Linear" not in kinds
    elif r.text_encoder == "nf4":
        assert "NF4Linear" in kinds and "Linear" not in kinds
    elif r.text_encoder == "cpu":
        assert {p.dtype for p in te.parameters()} == {torch.float32}
    if r.offload == "model":
        assert hasattr(pipe.transformer, "_hf_hook")
    elif r.offload in ("group", "group-stream"):
        assert getattr(pipe.transformer, "_diffusers_hook", None) is not None
    backends = {getattr(m, "backend", None) for m in pipe.transformer.modules()} - {None}
    if r.spec.split(":")[0] in ("fp8", "int8", "int4", "nf4"):
        assert backends == {r.backend}  # quantized weights stay quantized, with the planned kernel
    assert pipe.vae.use_tiling == r.vae_tiling
    req = P.GenerateRequest(prompts=["a red fox in snow"], seeds=[0], steps=2, height=64, width=64,
                            guidance_scale=guidance, max_sequence_length=32)
    out = P.run(pipe, req, tmp_path)
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(out[0].path), dtype=np.float32)
    assert img.shape == (64, 64, 3) and math.isfinite(float(img.mean())) and img.std() > 0
    return ch


def _groups() -> dict[str, list[str]]:
    """Profiles whose plans ask for the same execution (format, backend, offload, text encoder,
    tiling, dtype, and whether the attention kernel needs a GPU): generated once, prepared each."""
    from zopt.runtime.attention import ATTENTION

    out: dict[tuple, list[str]] = {}
    for name, hw in PROFILES.items():
        p = planner.plan(hw)
        r = p.recommended
        key = (r.spec, r.backend, r.offload, r.text_encoder, r.vae_tiling, p.dtype,
               bool(ATTENTION[p.attention].requires)) if r else (name,)
        out.setdefault(key, []).append(name)
    return {"+".join(v): v for v in out.values()}


@pytest.mark.parametrize("group", list(_groups().items()), ids=lambda g: g[0])
def test_every_recommendation_runs(group, artifacts, tmp_path):
    from zopt.runtime import pipeline as P

    _, machines = group
    for i, machine in enumerate(machines):
        hw = PROFILES[machine]
        p = planner.plan(hw)
        if p.recommended is None:
            pytest.fail(f"{machine}: nothing recommended ({p.reason})")
        r = p.recommended
        if i == 0:
            ch = _execute(hw, p, artifacts, tmp_path)
        else:  # same execution as the first: check the decisions prepare() makes for this machine
            _, ch = P.prepare(artifacts(r.spec), hardware=hw, place="cpu", offload=r.offload, backend=r.backend,
                              text_encoder=r.text_encoder, vae_tiling=r.vae_tiling, width=64, height=64)
            assert (ch.format, ch.backend, ch.offload, ch.text_encoder, ch.vae_tiling, ch.attention, ch.dtype) == (
                r.spec.split(":")[0], r.backend, r.offload, r.text_encoder, r.vae_tiling, p.attention, p.dtype)
        assert ch.stand_in_for == (None if hw.device == "cpu" else hw.torch_device)


@pytest.mark.parametrize("machine", ["cuda-sm90-80gb", "rtx3060-12gb"])
def test_guidance_plans_a_mask_capable_attention_and_runs(machine, artifacts, tmp_path):
    from zopt.runtime.attention import ATTENTION

    hw = PROFILES[machine]
    p = planner.plan(hw, guidance=3.5)
    assert ATTENTION[p.attention].masks  # prompt and negative prompt pad to different lengths
    _execute(hw, p, artifacts, tmp_path, guidance=3.5)


@pytest.mark.parametrize("machine, prefer, approximate", [("rtx4090-24gb", "speed", True),
                                                          ("rtx3070-8gb", "quality", False),
                                                          ("rtx4060ti-16gb", "quality", True)])
def test_other_preferences_run_too(machine, prefer, approximate, artifacts, tmp_path):
    hw = PROFILES[machine]
    p = planner.plan(hw, prefer=prefer, approximate=approximate)
    ch = _execute(hw, p, artifacts, tmp_path)
    if prefer == "speed":  # the fastest prediction among the options that fit (within the time model's band)
        fastest = min(o.image_s for o in p.options if o.fits and o.resident and o.offload != "sequential")
        assert p.recommended.image_s <= planner.BAND * fastest and ch.backend == p.recommended.backend


@pytest.mark.gpu
@pytest.mark.parametrize("offload, text_encoder, spec", [
    (None, None, None),  # this machine's own recommendation
    ("model", "cpu", "fp8"), ("model", "int8", "gguf:Q4_K_M"), ("group-stream", "free", "nf4"), ("none", "nf4", "int8")])
def test_plans_run_on_this_gpu(offload, text_encoder, spec, artifacts, tmp_path):
    """On a real GPU: the same choices, placed on the device for real (streams, host encoder)."""
    import torch

    from zopt.runtime import detect  # with the optional packages, as prepare() detects
    from zopt.runtime import pipeline as P

    hw = detect()
    p = planner.plan(hw)
    r = p.recommended
    spec, offload = spec or r.spec, offload or r.offload
    text_encoder = text_encoder or r.text_encoder
    pipe, ch = P.prepare(artifacts(spec), offload=offload, text_encoder=text_encoder, width=64, height=64)
    assert (ch.offload, ch.text_encoder, ch.stand_in_for) == (offload, text_encoder, None)
    assert ch.device == hw.torch_device
    from zopt.formats.registry import select_backend

    # chosen for the GPU even when the weights load into RAM for offloading
    assert ch.backend == select_backend(spec.split(":")[0], hw).name
    req = P.GenerateRequest(prompts=["a red fox in snow"], seeds=[0], steps=2, height=64, width=64,
                            max_sequence_length=32)
    out = P.run(pipe, req, tmp_path)
    assert out[0].path.is_file()
    torch.cuda.synchronize()


@pytest.mark.parametrize("vram", ["2GB", "2.4GB"])
def test_small_budgets_recommend_what_runs(vram, artifacts, tmp_path):
    """``zopt plan --vram 2GB``: the answer (block streaming, not sequential offload) runs too."""
    hw = planner.budget_hardware(planner.parse_size(vram))
    p = planner.plan(hw)
    assert p.recommended is not None and p.recommended.offload != "sequential"
    _execute(hw, p, artifacts, tmp_path)


def test_sequential_offload_is_never_recommended_only_named():
    """No check here can run sequential offload (no CPU stands in for it): below the smallest
    budget that block streaming fits, the plan says nothing fits and what sequential would cost."""
    said = 0
    for tenths in range(5, 41):
        p = planner.plan(planner.budget_hardware(int(tenths / 10 * planner.GIB)))
        if p.recommended is not None:
            assert p.recommended.offload != "sequential" and p.recommended.device_bytes <= p.budget
            continue
        assert p.reason.startswith("nothing fits")
        if "only sequential offload fits" in p.reason:
            said += 1
            assert "--offload sequential" in p.reason and "x slower than bf16" in p.reason
    assert said >= 1
