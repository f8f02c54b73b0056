"""Base-style sampling: presets, negative prompts, CFG normalization/truncation, shift/sigmas, tiny-base,
the Turbo warning, prompt encoding before denoising, and guidance in the planner."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from zopt.errors import ZoptError
from zopt.families import zimage
from zopt.families.zimage.variants import PRESETS, variant_of
from zopt.runtime import sampling as S


@pytest.mark.parametrize("values, option", [
    ({"cfg_truncation": 1.5}, "--cfg-truncation"), ({"cfg_truncation": -0.1}, "--cfg-truncation"),
    ({"guidance": -1.0}, "--guidance"), ({"guidance": float("inf")}, "--guidance"),
    ({"cfg_normalization": -2.0}, "--cfg-normalization"), ({"shift": 0.0}, "--shift"),
    ({"steps": 0}, "--steps"), ({"max_sequence_length": 0}, "--max-sequence-length"),
    ({"max_sequence_length": 100_000}, "--max-sequence-length"), ({"sigmas": (1.0, 1.0)}, "--sigmas"),
    ({"sigmas": (1.0, 0.0)}, "--sigmas"), ({"sigmas": (1.0, 0.5), "steps": 3}, "--steps 3"),
])
def test_bad_values_are_refused_naming_the_option(values, option):
    with pytest.raises(ZoptError, match=option):
        S.check(**values)


def test_presets_and_explicit_values():
    base = S.resolve(PRESETS, "base")
    assert (base.steps, base.guidance, base.cfg_normalization, base.cfg_truncation) == (28, 4.0, 0.0, 1.0)
    turbo = S.resolve(PRESETS, "turbo")
    assert (turbo.steps, turbo.guidance, turbo.max_sequence_length) == (8, 0.0, 512)
    # auto follows the checkpoint's variant; unknown checkpoints sample like Turbo
    assert S.resolve(PRESETS, "auto", "base") == base
    assert S.resolve(PRESETS, None, None) == turbo
    # an explicit value beats the preset's, the rest stay the preset's
    s = S.resolve(PRESETS, "base", None, guidance=3.0, cfg_normalization=1.0, steps=None)
    assert (s.steps, s.guidance, s.cfg_normalization, s.preset) == (28, 3.0, 1.0, "base")
    s = S.resolve(PRESETS, "turbo", None, guidance=2.5)
    assert (s.steps, s.guidance) == (8, 2.5)
    # custom sigmas set the step count
    assert S.resolve(PRESETS, "base", None, sigmas=(1.0, 0.6, 0.2)).steps == 3
    with pytest.raises(ZoptError, match="--preset"):
        S.resolve(PRESETS, "fast")


def test_variant_of_checkpoints(tmp_path, tiny_dir):
    def folder(name, index=None, meta=None):
        d = tmp_path / name
        d.mkdir(parents=True)
        (d / "model_index.json").write_text(json.dumps(index or {"_class_name": "ZImagePipeline"}))
        if meta is not None:
            (d / "zopt.json").write_text(json.dumps(meta))
        return d

    assert variant_of(folder("a", {"_name_or_path": "Tongyi-MAI/Z-Image-Turbo"})) == "turbo"
    assert variant_of(folder("b", {"_name_or_path": "Tongyi-MAI/Z-Image"})) == "base"
    assert variant_of(folder("models--Tongyi-MAI--Z-Image-Turbo/snapshots/0123")) == "turbo"
    assert variant_of(folder("my-finetune")) is None
    assert variant_of(folder("c", {"_name_or_path": "Tongyi-MAI/Z-Image-Turbo"}, {"variant": "base"})) == "base"
    assert variant_of(tiny_dir) == "turbo"  # the embedded recipe: 8 steps, no guidance


def test_tiny_base_is_tiny_with_base_defaults(tiny_dir):
    from zopt.families import resolve_source

    tiny = resolve_source("tiny")
    base = resolve_source("tiny-base")
    assert base != tiny and variant_of(base) == "base"

    def sha(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    for rel in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                "scheduler/scheduler_config.json"):
        assert sha(tiny / rel) == sha(base / rel), rel
    assert S.variant_for("tiny-base") == "base" and S.variant_for("tiny") == "turbo"


def test_cfg_steps_follow_the_truncation_rule():
    # steps whose normalized time 1 - sigma (after the shift) exceeds T run unguided
    sig = S.schedule(8)
    assert sig[0] == 1.0 and all(b < a for a, b in zip(sig, sig[1:]))
    for t in (0.0, 0.1, 0.5, 0.9, 1.0):
        s = S.Sampling(8, 4.0, cfg_truncation=t)
        assert S.cfg_steps(s) == sum(1 - x <= t for x in sig)
    assert S.cfg_steps(S.Sampling(8, 0.0)) == 0


@pytest.fixture(scope="module")
def base_pipe():
    from zopt.runtime import pipeline as P

    pipe, choice = P.prepare("tiny-base", device="cpu", offload="none", attention="native", width=64, height=64,
                             guidance=4.0)
    return pipe, choice


def _png(path):
    from PIL import Image

    return np.asarray(Image.open(path)).astype(int)


def _run(pipe, tmp_path, name, **kw):
    from zopt.runtime import pipeline as P

    kw = {"steps": 3, "height": 64, "width": 64, "guidance_scale": 4.0, **kw}
    return _png(P.run(pipe, P.GenerateRequest(["a red cube on a table"], [7], **kw), tmp_path / name)[0].path)


def test_run_is_diffusers_cfg_with_prompts_encoded_first(base_pipe, tmp_path):
    """zopt's path (all prompts encoded first, then denoising from embeddings) gives the image diffusers'
    ZImagePipeline gives from the prompt strings, with guidance, normalization, truncation and shift."""
    from zopt.runtime import pipeline as P

    pipe, choice = base_pipe
    assert choice.variant == "base"
    settings = {"negative_prompt": "blurry, low quality", "cfg_normalization": 1.0, "cfg_truncation": 0.2,
                "shift": 3.0}  # not the micro default (2.0)
    shift = pipe.scheduler.config.shift
    ours = _run(pipe, tmp_path, "ours", **settings)
    S.apply_shift(pipe, 3.0)
    try:
        lat = P.initial_latents(pipe, 7, 64, 64, pipe.transformer.dtype)
        ref = pipe(prompt=["a red cube on a table"], negative_prompt=["blurry, low quality"], height=64, width=64,
                   num_inference_steps=3, guidance_scale=4.0, cfg_normalization=True, cfg_truncation=0.2,
                   latents=lat, max_sequence_length=512).images[0]
    finally:
        S.apply_shift(pipe, None)
    assert pipe.scheduler.config.shift == shift  # restored
    assert np.array_equal(ours, np.asarray(ref).astype(int))


def test_each_setting_changes_the_image(base_pipe, tmp_path):
    pipe, _ = base_pipe
    plain = _run(pipe, tmp_path, "plain")
    assert np.array_equal(plain, _run(pipe, tmp_path, "again"))  # same seed, same image
    changed = {
        "negative": _run(pipe, tmp_path, "neg", negative_prompt="a blue sphere"),
        "normalization": _run(pipe, tmp_path, "norm", cfg_normalization=1.0),
        "truncation": _run(pipe, tmp_path, "trunc", cfg_truncation=0.0),
        "shift": _run(pipe, tmp_path, "shift", shift=6.0),
        "sigmas": _run(pipe, tmp_path, "sig", sigmas=[1.0, 0.5, 0.2], steps=3),
        "guidance": _run(pipe, tmp_path, "g2", guidance_scale=2.0),
    }
    for what, img in changed.items():
        assert np.abs(img - plain).mean() > 0.5, what
    # truncation at 0 keeps only the first step guided; without guidance the negative prompt is unused
    unguided = _run(pipe, tmp_path, "g0", guidance_scale=0.0)
    assert np.array_equal(unguided, _run(pipe, tmp_path, "g0neg", guidance_scale=0.0, negative_prompt="x"))


def test_all_prompts_are_encoded_before_the_first_step(base_pipe, tmp_path):
    from zopt.runtime import pipeline as P

    pipe, _ = base_pipe
    calls: list[tuple[str, int]] = []
    hooks = [pipe.text_encoder.register_forward_pre_hook(lambda m, a, k: calls.append(("text", 0)), with_kwargs=True),
             pipe.transformer.register_forward_pre_hook(lambda m, a: calls.append(("denoise", len(a[0]))))]
    try:
        req = P.GenerateRequest(["fog", "a large red square in the centre on a blue background", "fog"], [1], steps=2, height=64, width=64, guidance_scale=4.0,
                                batch_size=2, jobs=[("fog", 1), ("a large red square in the centre on a blue background", 2, "dark"), ("fog", 3)])
        out = P.run(pipe, req, tmp_path)
    finally:
        for h in hooks:
            h.remove()
    kinds = [k for k, _ in calls]
    first = kinds.index("denoise")
    assert "text" not in kinds[first:]  # every encoding happens before any denoising
    # distinct texts only: "fog", "a large red square in the centre on a blue background", "" (default negative), "dark" in batches of 2
    assert kinds[:first] == ["text", "text"]
    # each guided step runs the batch and its negatives together: 2 x 2, then 2 x 1
    assert [n for k, n in calls if k == "denoise"] == [4, 4, 2, 2]
    assert [m.meta["negative_prompt"] for m in out] == ["", "dark", ""]


def test_generate_cli_base_with_negative_prompts(tmp_path, capsys):
    from zopt.cli import main

    common = ["generate", "tiny-base", "--steps", "2", "--resolution", "64x64", "--seeds", "5"]
    assert main(common + ["--prompt", "a large red square in the centre on a blue background", "--negative-prompt", "a blue sphere", "--guidance", "4",
                          "-o", str(tmp_path / "neg.png")]) == 0
    assert main(common + ["--prompt", "a large red square in the centre on a blue background", "--negative-prompt", "", "--guidance", "4",
                          "-o", str(tmp_path / "empty.png")]) == 0
    err = capsys.readouterr()
    assert "warning" not in err.err and "base preset, 2 steps, guidance 4" in err.out
    assert np.abs(_png(tmp_path / "neg.png") - _png(tmp_path / "empty.png")).mean() > 0.5
    meta = json.loads((tmp_path / "neg.json").read_text())
    assert (meta["negative_prompt"], meta["preset"], meta["variant"], meta["guidance_scale"]) == (
        "a blue sphere", "base", "base", 4.0)
    # without --guidance the Base preset's 4 applies; the prompts file gives per-prompt negatives
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a large red square in the centre on a blue background", "negative_prompt": "a blue sphere"}\nfog\n')
    out = tmp_path / "file"
    assert main(["generate", "tiny-base", "--steps", "2", "--resolution", "64x64", "--seeds", "5",
                 "--prompts-file", str(prompts), "--negative-prompt", "dark", "-o", str(out)]) == 0
    metas = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert [(m["prompt"], m["negative_prompt"], m["guidance_scale"]) for m in metas] == [
        ("a large red square in the centre on a blue background", "a blue sphere", 4.0), ("fog", "dark", 4.0)]
    assert np.array_equal(_png(out / "000-seed5.png"), _png(tmp_path / "neg.png"))


def test_turbo_warning_and_bad_input(tmp_path, capsys):
    from zopt.cli import main

    # a caption tiny learned (any other prompt draws a warning that it only knows shapes captions)
    common = ["generate", "tiny", "--steps", "1", "--resolution", "64x64", "--prompt", "a small red circle in the centre on a blue background"]
    assert main(common + ["--guidance", "2", "-o", str(tmp_path / "g.png")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("zopt: warning: guidance 2 on a Turbo checkpoint")
    assert main(common + ["-o", str(tmp_path / "t.png")]) == 0
    assert "warning" not in capsys.readouterr().err
    # a prompt longer than --max-sequence-length is cut by the pipeline: said once, in one line
    assert main(common[:-1] + ["a large orange square at the top right on a white and red background", "--max-sequence-length", "16", "-o", str(tmp_path / "c.png")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "only the first 16 are read" in err[0] and err[0].startswith("zopt: warning: prompt")
    for bad in (["--cfg-truncation", "2"], ["--sigmas", "1,x"], ["--max-sequence-length", "0"],
                ["--negative-prompt", "a", "--negative-prompt", "b"], ["--shift", "0"]):
        assert main(common + bad + ["-o", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("zopt: error: --"), err
    assert not (tmp_path / "bad").exists()


def test_planner_guidance_doubles_denoise_memory_and_guided_steps():
    from zopt.platform.fakes import PROFILES
    from zopt.runtime import planner

    hw = PROFILES["rtx4090-24gb"]
    key = ("bf16", "torch", "none", "device", False)

    def option(p):
        return next(o for o in p.options if (o.spec, o.backend, o.offload, o.text_encoder, o.vae_tiling) == key)

    plain, guided = planner.plan(hw, steps=28), planner.plan(hw, steps=28, guidance=4.0)
    cut = planner.plan(hw, steps=28, guidance=4.0, cfg_truncation=0.5)
    assert (plain.cfg_steps, guided.cfg_steps) == (0, 28) and 0 < cut.cfg_steps < 28
    a, b, c = option(plain), option(guided), option(cut)
    assert b.stages["denoise"] > a.stages["denoise"] and b.peak >= a.peak
    assert plain.attention == guided.attention  # a mask-capable kernel either way on this card
    # the extra is one more batch of activations (the fixed workspace is not doubled)
    assert b.stages["denoise"] - a.stages["denoise"] == pytest.approx(
        planner.activation_bytes(zimage.FULL_CONFIG, planner.shape_for(1024, 1024, 1), 2, plain.attention)
        - planner.ACT_FIXED, rel=1e-6)
    assert c.stages["denoise"] == b.stages["denoise"]  # any guided step needs the doubled batch
    assert a.image_s < c.image_s < b.image_s  # truncation saves the unguided steps' second forward
    assert b.step_s == pytest.approx(2 * a.step_s, rel=0.05)
