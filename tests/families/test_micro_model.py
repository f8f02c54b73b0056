"""The trained micro Z-Image (the embedded ``tiny`` default): budget, and adherence to prompts."""

import json

import numpy as np
import pytest

from zopt.families.zimage.micro import adherence as A
from zopt.families.zimage.micro import model as M
from zopt.families.zimage.micro import shapes as S

HELD_OUT = 48  # prompts (one shape each, as trained); seeds the training set never used
FLOOR = {"colour": 0.90, "shape": 0.80, "position": 0.80}


def test_shipped_weights_fit_the_budget_and_record_their_training():
    files = [p for p in M.WEIGHTS_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 8 * 2**20
    meta = json.loads((M.WEIGHTS_DIR / "micro.json").read_text())
    assert meta["transformer_config"]["dim"] == M.TRANSFORMER_CONFIG["dim"]
    assert set(meta["held_out_adherence"]) >= set(FLOOR)


def test_embedded_sources_resolve_to_their_pipelines():
    from zopt import checkpoint
    from zopt.families import resolve_source, zimage
    from zopt.families.zimage.micro.model import micro_pipeline_dir
    from zopt.runtime.pipeline import resolve_base

    assert checkpoint.open(micro_pipeline_dir()).config["dim"] == M.TRANSFORMER_CONFIG["dim"]
    assert checkpoint.open(resolve_source("tiny-random")).config["dim"] == zimage.TINY_CONFIG["dim"]
    builtin = zimage.ZIMAGE.builtin_sources()
    derived = {"tiny-base": "tiny"}  # the same transformer: alone, it finds the pipeline it derives from
    for name in builtin:  # each name's transformer finds its own text encoder and VAE
        cfg = dict(checkpoint.open(resolve_source(name)).config)
        assert resolve_base("elsewhere/transformer", cfg, None) == builtin[derived.get(name, name)]()


@pytest.fixture(scope="module")
def bf16_images(tmp_path_factory):
    import torch

    from zopt.families.zimage.micro.model import micro_pipeline_dir
    from zopt.runtime import pipeline as P

    pipe = P.build_pipeline(micro_pipeline_dir(), device="cpu", dtype=torch.bfloat16)
    prompts = A.held_out_prompts(HELD_OUT)
    req = P.GenerateRequest(prompts, [0], steps=8, height=M.IMAGE_SIZE, width=M.IMAGE_SIZE, batch_size=8,
                            jobs=[(p, i) for i, p in enumerate(prompts)])
    res = P.run(pipe, req, tmp_path_factory.mktemp("micro"))
    from PIL import Image

    return prompts, [np.asarray(Image.open(r.path).convert("RGB")) for r in res]


def test_bf16_micro_model_reproduces_its_recorded_adherence(bf16_images):
    """zopt's pipeline in bf16 measures what training measured in fp32 on the same prompts."""
    prompts, images = bf16_images
    acc = A.score_many(images, prompts).accuracy()
    print("held-out adherence (bf16, 8 steps):", acc)
    recorded = json.loads((M.WEIGHTS_DIR / "micro.json").read_text())["held_out_adherence"]
    for k in FLOOR:
        assert abs(acc[k] - recorded[k]) <= 0.2, (k, acc, recorded)


def test_bf16_micro_model_draws_the_colour_at_the_place_the_prompt_says(bf16_images):
    prompts, images = bf16_images
    acc = A.score_many(images, prompts).accuracy()
    for k in ("colour", "position"):
        assert acc[k] >= FLOOR[k], (k, acc)
    # the same images scored against the wrong prompts fall well below
    wrong = A.score_many(images, prompts[1:] + prompts[:1]).accuracy()
    assert wrong["position"] < 0.5 and wrong["colour"] < 0.5


def test_bf16_micro_model_draws_the_shape_the_prompt_says(bf16_images):
    prompts, images = bf16_images
    assert A.score_many(images, prompts).accuracy()["shape"] >= FLOOR["shape"]
    # every kind, not rounded blobs that pass as circles: at least half of each kind's shapes read right
    for kind in S.SHAPES:
        pairs = [(im, p) for im, p in zip(images, prompts, strict=True) if S.parse_caption(p).shapes[0].kind == kind]
        got = A.score_many(*zip(*pairs, strict=True)).accuracy()["shape"] if pairs else 0.0
        print(f"{kind}: {got:.2f} of {len(pairs)}")
        assert got >= 0.5, kind
