"""The procedural shapes dataset and the pixel adherence detector."""

import numpy as np
import pytest

from zopt.families.zimage.micro import adherence as A
from zopt.families.zimage.micro import shapes as S


def test_scene_is_deterministic_and_caption_round_trips():
    a, b = S.sample_scene(7), S.sample_scene(7)
    assert a == b
    assert np.array_equal(S.render(a), S.render(b))
    for seed in range(200):
        sc = S.sample_scene(seed)
        back = S.parse_caption(S.caption(sc))
        assert [(s.kind, s.colour, s.size, s.position) for s in sc.shapes] == \
               [(s.kind, s.colour, s.size, s.position) for s in back.shapes]
        assert back.background == sc.background
        colours = [s.colour for s in sc.shapes] + list(sc.background)
        assert len(set(colours)) == len(colours)  # shape colours never reused


def test_parse_caption_rejects_other_text():
    with pytest.raises(ValueError, match="not a procedural"):
        S.parse_caption("a red fox")


def test_detector_reads_ground_truth_and_rejects_noise():
    imgs, caps = S.dataset(range(5000, 5120))
    acc = A.score_many(imgs, caps).accuracy()
    assert acc["colour"] == 1.0 and acc["shape"] == 1.0 and acc["position"] == 1.0
    assert acc["size"] >= 0.98
    noise = np.random.default_rng(0).integers(0, 256, imgs.shape, dtype=np.uint8)
    assert max(A.score_many(noise, caps).accuracy().values()) <= 0.05
    # other scenes' images: colours sometimes match by chance, geometry rarely does
    wrong = A.score_many(imgs, caps[1:] + caps[:1]).accuracy()
    assert wrong["position"] < 0.2 and wrong["shape"] < 0.3


def test_largest_component_is_four_connected():
    m = np.zeros((6, 6), bool)
    m[0, 0:3] = True
    m[3:6, 3:6] = True
    m[2, 2] = True  # touches the first region only diagonally
    assert A.largest_component(m).sum() == 9


def test_prompt_adherence_only_for_shapes_prompts():
    imgs, caps = S.dataset(range(10, 14))
    assert A.prompt_adherence(list(imgs), ["a lighthouse at dawn"] * 4) is None
    mixed = A.prompt_adherence(list(imgs), caps[:2] + ["a cat", "a dog"])
    assert mixed["colour"] == 1.0 and mixed["position"] == 1.0 and mixed["mean"] >= 0.95
