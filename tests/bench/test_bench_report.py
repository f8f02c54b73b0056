"""The HTML report: self-contained, and it really renders (headless Chromium when installed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from bench_helpers import record
from PIL import Image

from zopt.bench.report import render_html, write_html

CHROMIUM = Path("/usr/bin/chromium")


def _images(folder: Path, shift: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:64, 0:64]
    names = []
    for k in range(2):
        rgb = np.stack([(xx * 4 + shift) % 256, (yy * 4 + 40 * k) % 256, ((xx + yy) * 2) % 256], -1).astype(np.uint8)
        Image.fromarray(rgb).save(folder / f"{k:03d}-seed0.png")
        names.append(f"{folder.name}/{k:03d}-seed0.png")
    return names


def make_run(tmp_path: Path) -> list[dict]:
    recs = [record("fp32", role="reference", psnr=None, bits=32, out=tmp_path, images=_images(tmp_path / "ref", 0))]
    recs.append(record("bf16", psnr=60.0, bits=16, step_ms=90.0, out=tmp_path, images=_images(tmp_path / "bf16", 1)))
    recs.append(record("gguf:Q4_K_M", backend="ggml", psnr=31.0, bits=4.8, step_ms=140.0, rel_l2=2e-2, peak=90_000_000,
                       out=tmp_path, images=_images(tmp_path / "q4", 9)))
    recs.append(record("tensorrt", backend=None, status="skipped"))
    for r in recs:  # record() stores paths relative to tmp_path already when out is given
        for im in r["images"]:
            assert (tmp_path / im["path"]).exists()
    return recs


def chromium(args: list[str], url: str, tmp_path: Path) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'chrome-profile'}"]
    return subprocess.run([str(CHROMIUM), *flags, *args, url], capture_output=True, text=True, timeout=120)


def check_renders(report: Path, tmp_path: Path, n_images: int, n_plots: int) -> None:
    """Chromium loads the file offline; every <img> decodes, every plot SVG has drawn marks."""
    res = chromium(["--dump-dom"], report.resolve().as_uri(), tmp_path)
    body = re.search(r"<body([^>]*)>", res.stdout)
    assert body, res.stderr[-500:]
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    assert int(attrs["images-total"]) == n_images
    assert int(attrs["images-loaded"]) == n_images  # decoded by the browser (naturalWidth > 0)
    assert int(attrs["plots"]) == n_plots and int(attrs["plot-marks"]) > 10 * n_plots
    shot = tmp_path / "report.png"
    chromium(["--window-size=1400,1600", f"--screenshot={shot}"], report.resolve().as_uri(), tmp_path)
    with Image.open(shot) as im:
        px = np.asarray(im.convert("L"), dtype=np.float32)
    assert px.std() > 10  # not a blank page


def test_report_is_one_offline_file(tmp_path):
    recs = make_run(tmp_path)
    text = render_html(recs, tmp_path)
    # no external resource of any kind: images are data URIs, plots inline SVG, no links to fetch
    assert not re.search(r'(src|href)="(?!data:|#)', text)
    assert not re.findall(r"(?<!xmlns=\")(?<!xmlns:xlink=\")https?://", text)  # namespace names only
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', text)) == 6
    assert text.count('<div class="plot"') == 3 and text.count("<svg") == 3
    for label in ("reference", "bf16@torch", "gguf:Q4_K_M@ggml"):
        assert f"<b>{label}</b>" in text
    assert "tensorrt" in text and "something went wrong" in text  # the skipped run is listed with its reason
    out = write_html(recs, tmp_path, tmp_path / "sub" / "report.html")
    assert out.read_text() == text


def test_report_without_successful_runs(tmp_path):
    text = render_html([record("fp32", role="reference", status="crashed")], tmp_path)
    assert "No successful runs to plot" in text and "crashed" in text


@pytest.mark.skipif(not CHROMIUM.exists() or shutil.which("chromium") is None,
                    reason="Debian's chromium is not installed (/usr/bin/chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    recs = make_run(tmp_path)
    report = write_html(recs, tmp_path, tmp_path / "report.html")
    check_renders(report, tmp_path, n_images=6, n_plots=3)


def test_terminal_table(tmp_path):
    from rich.console import Console

    from zopt.bench.display import print_table

    recs = make_run(tmp_path)
    con = Console(record=True, width=220)
    print_table(recs, con)
    text = con.export_text()
    lines = text.splitlines()
    row = next(ln for ln in lines if "gguf:Q4_K_M@ggml" in ln)
    # bits/w, step ms, PSNR, peak MiB in total (90 MB above a 300 MB baseline), mean rel L2
    for cell in ("ok", "4.80", "140.0", "31.0", f"{390e6 / 2**20:.1f}", "3.00e-02"):
        assert cell in row, (cell, row)
    assert text.index("reference") < text.index("bf16@torch") < text.index("tensorrt")  # ok runs first
    assert "tensorrt: skipped — something went wrong" in text
    assert "LPIPS not available: package lpips is not installed" in text
