"""Measurement primitives against independent computations (numpy, closed forms)."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from zopt.bench import metrics as M


def test_latency_stats_match_numpy():
    rng = np.random.default_rng(0)
    xs = list(rng.uniform(0.01, 0.2, size=37))
    st = M.latency_stats(xs, scale=1000.0, digits=9)
    assert st["n"] == 37
    assert st["median"] == pytest.approx(np.median(xs) * 1000)
    assert st["p90"] == pytest.approx(np.percentile(xs, 90) * 1000)
    assert st["min"] == pytest.approx(min(xs) * 1000) and st["max"] == pytest.approx(max(xs) * 1000)
    assert M.latency_stats([])["median"] is None
    assert M.percentile([3.0], 90) == 3.0


def test_rel_l2_and_cosine():
    import torch

    g = torch.Generator().manual_seed(0)
    ref = [torch.randn(16, 1, 8, 8, generator=g), torch.randn(16, 1, 4, 4, generator=g)]
    noise = [0.01 * torch.randn(t.shape, generator=g) for t in ref]
    out = [r + n for r, n in zip(ref, noise, strict=True)]
    a, b = np.concatenate([o.numpy().ravel() for o in out]), np.concatenate([r.numpy().ravel() for r in ref])
    assert M.rel_l2(out, ref) == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(b), rel=1e-5)
    assert M.cosine(out, ref) == pytest.approx(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)), rel=1e-6)
    assert M.rel_l2(ref, ref) == 0.0 and M.cosine(ref, ref) == pytest.approx(1.0)
    assert M.cosine([-t for t in ref], ref) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        M.rel_l2(ref[0], ref[1])


def test_psnr_closed_form_and_cap():
    ref = np.full((16, 16, 3), 100, np.uint8)
    img = ref + 2  # every pixel off by 2: MSE 4
    assert M.psnr(img, ref) == pytest.approx(10 * math.log10(255**2 / 4))
    assert M.psnr(ref, ref) == M.PSNR_CAP_DB
    with pytest.raises(ValueError):
        M.psnr(ref[:8], ref)


def test_ssim_orders_degradation():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:64, 0:64]
    ref = np.stack([(xx * 4) % 256, (yy * 4) % 256, ((xx + yy) * 2) % 256], -1).astype(np.uint8)

    def noisy(sigma):
        return np.clip(ref + rng.normal(0, sigma, ref.shape), 0, 255).astype(np.uint8)

    assert M.ssim(ref, ref) == pytest.approx(1.0)
    s_small, s_big = M.ssim(noisy(3), ref), M.ssim(noisy(30), ref)
    assert 1.0 > s_small > s_big > 0.0
    assert M.ssim(ref[:8, :8], ref[:8, :8]) == pytest.approx(1.0)  # tiny images still work


@pytest.mark.skipif(importlib.util.find_spec("lpips") is not None, reason="lpips is installed here")
def test_lpips_says_not_available_and_never_downloads():
    lp = M.Lpips()
    assert not lp.available and lp.status.startswith("not available: package lpips")
    assert lp(np.zeros((8, 8, 3), np.uint8), np.zeros((8, 8, 3), np.uint8)) is None


def test_peak_memory_counts_only_the_block():
    held = np.ones(60_000_000 // 8)  # 60 MB allocated before: part of the baseline, not the peak
    with M.PeakMemory("cpu") as pm:
        pass
    assert pm.as_dict()["peak_bytes"] < 30_000_000
    with M.PeakMemory("cpu") as pm:
        big = np.ones(150_000_000 // 8)  # 150 MB, touched
        big[::512] += 1
        del big
    d = pm.as_dict()
    assert d["kind"] == "cpu_rss" and 140_000_000 <= d["peak_bytes"] < 400_000_000
    assert d["baseline_bytes"] > 60_000_000
    del held


def test_bits_per_weight_and_artifact_bytes(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "w.bin").write_bytes(b"x" * 1000)
    (tmp_path / "a" / "sub").mkdir()
    (tmp_path / "a" / "sub" / "c.json").write_bytes(b"y" * 24)
    assert M.artifact_bytes(tmp_path / "a") == 1024
    assert M.artifact_bytes(tmp_path / "a" / "w.bin") == 1000
    assert M.bits_per_weight(1024, 2048) == 4.0
    assert M.bits_per_weight(None, 10) is None


def test_summarize_steps():
    s = M.summarize_steps([{"step": 0, "rel_l2": 0.01, "cosine": 0.999}, {"step": 1, "rel_l2": 0.03, "cosine": 0.99}])
    assert s == {"rel_l2_mean": 0.02, "rel_l2_max": 0.03, "cosine_min": 0.99, "cosine_mean": 0.9945}
