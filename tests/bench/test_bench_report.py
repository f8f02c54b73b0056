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
    # 2 prompts x (reference, bf16, Q4_K_M images + a difference map for each of the two formats)
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', text)) == 10
    assert len(re.findall(r'<img class="diff" [^>]*src="data:image/png;base64,', text)) == 4
    assert text.count('<div class="plot"') == 4 and text.count("<svg") == 4
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
    check_renders(report, tmp_path, n_images=10, n_plots=4)


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


def _full_size(recs: list[dict]) -> list[dict]:
    """Records as a full-size GPU sweep writes them: 6.15B parameters, total memory = the CUDA peak."""
    from zopt.families.zimage import FULL_NUM_PARAMS

    for r in recs:
        r["source"]["params"] = FULL_NUM_PARAMS
        r["source"]["spec"] = "Tongyi-MAI/Z-Image-Turbo@main"
        if r["status"] == "ok":
            r["metrics"]["memory"].update(kind="cuda", baseline_bytes=0)
    return recs


GIB = 2**30


def test_pick_per_memory_budget(tmp_path):
    """Best quality and fastest per budget, from the measured total memory: an answer known by construction."""
    from zopt.bench.pick import picks

    recs = _full_size([
        record("bf16", role="reference", psnr=None, peak=22 * GIB),
        record("bf16", psnr=100.0, peak=22 * GIB, step_ms=1000.0),
        record("fp8", backend="scaled-mm", psnr=45.0, peak=14 * GIB, step_ms=600.0),
        record("gguf:Q8_0", backend="torch-dequant", psnr=48.0, peak=int(14.5 * GIB), step_ms=1400.0),
        record("gguf:Q4_K_M", backend="torch-dequant", psnr=36.0, peak=10 * GIB, step_ms=1500.0),
        record("nf4", backend="bitsandbytes", psnr=33.0, peak=int(7.5 * GIB), step_ms=1700.0),
        record("int4", backend=None, status="failed"),
    ])
    found, scaled = picks(recs)
    assert not scaled
    answer = {p.budget_gib: (p.best and p.best["label"], p.fastest and p.fastest["label"], len(p.fits))
              for p in found}
    assert answer == {
        6: (None, None, 0),
        8: ("nf4@bitsandbytes", "nf4@bitsandbytes", 1),
        12: ("gguf:Q4_K_M@torch-dequant", "gguf:Q4_K_M@torch-dequant", 2),
        16: ("gguf:Q8_0@torch-dequant", "fp8@scaled-mm", 4),
        24: ("bf16@torch", "fp8@scaled-mm", 5),
    }
    text = render_html(recs, tmp_path)
    section = text[text.index("<h2 id='pick'>"):text.index("<h2>Results")]
    sub = "<br><span class='sub'>"
    assert (f"<td>16 GiB</td><td>4 of 5</td><td>gguf:Q8_0@torch-dequant{sub}PSNR 48.0 dB, 1400.0 ms/step</span></td>"
            f"<td>fp8@scaled-mm{sub}PSNR 45.0 dB, 600.0 ms/step</span></td>") in section
    assert f"<td>24 GiB</td><td>5 of 5</td><td>bf16@torch{sub}identical to the reference, 1000.0 ms/step" in section
    assert (f"<td>12 GiB</td><td>2 of 5</td><td>gguf:Q4_K_M@torch-dequant{sub}PSNR 36.0 dB, 1500.0 ms/step</span>"
            "</td><td>the same</td>") in section
    assert "<td>6 GiB</td><td>0 of 5</td><td>nothing measured fits" in section
    assert "relative ranking" not in section


def test_pick_on_a_small_model_is_a_relative_ranking(tmp_path):
    """On the tiny model budgets scale with its size and compare with the weights: the order formats drop out."""
    from zopt.bench.pick import picks
    from zopt.families.zimage import FULL_NUM_PARAMS

    recs = [record("fp32", role="reference", psnr=None, bits=32),
            record("bf16", psnr=100.0, bits=16.0), record("gguf:Q8_0", psnr=41.7, bits=10.2),
            record("gguf:Q4_K_M", psnr=32.9, bits=8.37)]
    params = recs[0]["source"]["params"]
    found, scaled = picks(recs)
    assert scaled
    for p in found:  # the limit is the budget times the parameter ratio; the weights decide what fits
        assert p.limit_bytes == int(p.budget_gib * GIB * params / FULL_NUM_PARAMS)
        assert all(r["metrics"]["artifact_bytes"] <= p.limit_bytes for r in recs if r["label"] in p.fits)
    assert [p.best["label"] if p.best else None for p in found] == \
        ["gguf:Q4_K_M@torch", "gguf:Q8_0@torch", "bf16@torch", "bf16@torch", "bf16@torch"]
    text = render_html(recs, tmp_path)
    assert "relative ranking" in text[text.index("<h2 id='pick'>"):text.index("<h2>Results")]


def test_pareto_frontier():
    from zopt.bench.plots import pareto

    pts = [(1, 10, "a"), (2, 5, "b"), (3, 20, "c"), (3, 15, "d"), (0.5, 1, "e"), (4, 20, "f")]
    assert [p[2] for p in pareto(pts)] == ["e", "a", "c"]  # b, d, f are beaten on both axes (or tied and larger)


def test_lossless_runs_get_their_own_row(tmp_path):
    """Identical images and exactly-zero per-step error are named rows, not values at an arbitrary floor."""
    from zopt.bench.plots import plots

    recs = make_run(tmp_path)
    recs[1]["metrics"]["quality"]["psnr_db"] = 100.0  # bf16 identical to the reference
    for s in recs[1]["metrics"]["quality"]["per_step"]:
        s["rel_l2"] = 0.0
    svgs = {title: svg for title, svg, _ in plots(recs)}
    assert ">identical<" in svgs["Quality vs size"] and ">identical<" in svgs["Quality vs latency"]
    assert ">exact (0)<" in svgs["Per-step error vs reference (same inputs)"]
    assert "1e-08" not in "".join(svgs.values()) and ">100<" not in svgs["Quality vs size"]


def test_labels_do_not_overlap():
    """Direct point labels in a crowded plot are placed clear of each other."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from zopt.bench.plots import FIGSIZE, place_labels, text_box

    fig, ax = plt.subplots(figsize=FIGSIZE)
    pts = [(x, y, f"gguf:Q{k}_K_M", "#000") for k, (x, y) in
           enumerate([(1, 1), (1.1, 1.05), (1.2, 0.95), (1.05, 1.1), (3, 3), (3.1, 3.05), (5, 1), (5, 1.1)])]
    ax.scatter([p[0] for p in pts], [p[1] for p in pts])
    ax.margins(0.2)
    place_labels(ax, pts)
    renderer = fig.canvas.get_renderer()
    boxes = [text_box(t, renderer) for t in ax.texts]
    assert len(boxes) == len(pts)
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b), (a, b)
    plt.close(fig)


def test_difference_map():
    import matplotlib

    from zopt.bench.report import DIFF_FULL_SCALE, difference_map

    a = np.zeros((8, 8, 3), np.uint8)
    b = a.copy()
    b[2, 3, 1] = 20
    b[5, 5, 0] = 3
    heat, peak, mean = difference_map(Image.fromarray(b), Image.fromarray(a))
    assert peak == 20 and abs(mean - 23 / 64) < 1e-9
    px = np.asarray(heat)
    assert px[2, 3].sum() > px[5, 5].sum() > px[0, 0].sum()  # brighter where the difference is larger
    assert len({tuple(v) for v in px.reshape(-1, 3)}) == 3  # every unchanged pixel has the same colour
    full = difference_map(Image.fromarray(a + DIFF_FULL_SCALE * 2), Image.fromarray(a))[0]
    top = np.round(np.array(matplotlib.colormaps["magma"](1.0)[:3]) * 255)
    assert (np.asarray(full) == top).all()  # at or beyond the full scale: the brightest colour
    assert difference_map(Image.fromarray(a), Image.fromarray(np.zeros((4, 4, 3), np.uint8))) is None
