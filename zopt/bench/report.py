"""The HTML report: one self-contained file (no network, no external files) with the results
table, plots (size vs quality, latency vs memory, per-step error) as inline SVG from matplotlib,
and an image grid: the reference next to every format at the same prompt and seed (PNG, base64).

A tiny inline script counts, once the page has loaded, the images the browser decoded and the
plots it drew, and writes the counts onto ``<body>`` (``data-images-loaded`` ...): a headless
browser's DOM dump then shows whether the report really renders.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
from pathlib import Path
from typing import Any

from .display import COLUMNS, table_rows
from .metrics import PSNR_CAP_DB
from .schema import get_path

THUMB_MAX = 384  # grid images are downscaled to this many pixels on the long side

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1400px;
color:#1d2330;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #dde;padding-bottom:4px}
.meta{color:#556;font-size:13px;line-height:1.5}
table.results{border-collapse:collapse;font-size:13px;margin-top:8px}
table.results th,table.results td{padding:4px 8px;border-bottom:1px solid #e6e8ef;text-align:right;white-space:nowrap}
table.results th{background:#f3f5fa;position:sticky;top:0}
table.results td:nth-child(-n+3),table.results th:nth-child(-n+3){text-align:left}
.ok{color:#18794e;font-weight:600} .bad{color:#c0392b;font-weight:600} .dim{color:#99a}
.plots{display:flex;flex-wrap:wrap;gap:16px} .plot{flex:1 1 420px;max-width:660px}
.plot svg{width:100%;height:auto}

.prompt{font-size:14px;margin:14px 0 6px;color:#334}
.tiles{display:flex;flex-wrap:wrap;gap:10px}
figure.tile{margin:0;width:200px;font-size:11.5px;color:#556;text-align:center}
figure.tile img{display:block;width:200px;height:auto;border:1px solid #ccd}
figure.tile.ref img{border:2px solid #2b59c3} figure.tile b{color:#1d2330;word-break:break-word}
ul.fail li{font-size:13px;margin:2px 0}
"""

SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.querySelectorAll('img'));
  var loaded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var plots = document.querySelectorAll('.plot svg');
  var marks = document.querySelectorAll('.plot svg path, .plot svg use').length;
  document.body.setAttribute('data-images-total', String(imgs.length));
  document.body.setAttribute('data-images-loaded', String(loaded));
  document.body.setAttribute('data-plots', String(plots.length));
  document.body.setAttribute('data-plot-marks', String(marks));
});
"""


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _png_data_uri(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((THUMB_MAX, THUMB_MAX))
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
    except OSError:
        return None
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    text = re.sub(r"<metadata>.*?</metadata>", "", text, flags=re.S)  # creator/date RDF: noise here
    return text[text.index("<svg"):]  # drop the XML prolog and doctype: inline SVG in HTML


def _ok_variants(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["role"] == "variant" and r["status"] == "ok"]


ANNOTATE_MAX = 5  # up to this many points carry their label; more get a legend (labels would collide)
MARKERS = "osD^vP*Xh<>p"


def _style(labels: list[str]):
    """One colour and marker per run label, the same in every plot."""
    import matplotlib

    cmap = matplotlib.colormaps["tab20" if len(labels) > 10 else "tab10"]
    return {lbl: (cmap(i % cmap.N), MARKERS[i % len(MARKERS)]) for i, lbl in enumerate(labels)}


def _finish(ax, title: str, n_points: int) -> None:
    ax.set_title(title)
    ax.grid(True, alpha=0.3, which="both")
    if n_points > ANNOTATE_MAX or title.startswith("Per-step"):
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)


def plots(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(title, inline SVG) for each plot that has data to show."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: small and searchable
    matplotlib.rcParams["svg.hashsalt"] = "zopt-bench"
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out = []
    ok = _ok_variants(records)
    style = _style([r["label"] for r in records if r["status"] == "ok"])

    def point(ax, label, x, y, n, yerr=None):
        color, marker = style[label]
        ax.errorbar([x], [y], yerr=yerr, fmt=marker, color=color, capsize=3, markersize=7, zorder=3, label=label)
        if n <= ANNOTATE_MAX:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(6, 4), fontsize=8)

    pts = [(r["label"], get_path(r, "metrics.bits_per_weight"), get_path(r, "metrics.quality.psnr_db")) for r in ok]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(6.2, 4.0))
        for label, bits, ps in pts:
            point(ax, label, bits, ps, len(pts))
        ax.set_xlabel("effective bits per weight (artifact bytes x 8 / params)")
        ax.set_ylabel(f"PSNR vs reference, dB ({PSNR_CAP_DB:g} = identical)")
        ax.margins(0.15)
        _finish(ax, "Size vs quality", len(pts))
        out.append(("Size vs quality", _svg(fig)))
    lat = [(r["label"], get_path(r, "metrics.memory.peak_bytes"), get_path(r, "metrics.latency.step_ms.median"),
            get_path(r, "metrics.latency.step_ms.p90")) for r in records if r["status"] == "ok"]
    lat = [p for p in lat if p[1] is not None and p[2] is not None]
    if lat:
        fig, ax = plt.subplots(figsize=(6.2, 4.0))
        for label, mem, med, p90 in lat:
            point(ax, label, mem / 1e6, med, len(lat), yerr=[[0], [max(0.0, (p90 or med) - med)]])
        ax.set_xlabel("peak memory above baseline, MB")
        ax.set_ylabel("ms per denoising step (median, bar to p90)")
        ax.margins(0.15)
        _finish(ax, "Latency vs memory", len(lat))
        out.append(("Latency vs memory", _svg(fig)))
    curves = [(r["label"], get_path(r, "metrics.quality.per_step") or []) for r in ok]
    curves = [(lbl, c) for lbl, c in curves if c]
    if curves:
        fig, ax = plt.subplots(figsize=(6.2, 4.0))
        floor = 1e-8  # log axis: an exact match (0) is drawn at the floor
        for label, c in curves:
            color, marker = style[label]
            ax.plot([s["step"] + 1 for s in c], [max(floor, s["rel_l2"]) for s in c], marker=marker, color=color,
                    label=label)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("denoising step")
        ax.set_ylabel("relative L2 of transformer output")
        _finish(ax, "Per-step error vs reference (same inputs)", len(curves))
        out.append(("Per-step error", _svg(fig)))
    return out


def _table_html(records: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{_esc(c)}</th>" for c in COLUMNS)
    by_label = {r["label"]: r for r in records}
    body = []
    for row in table_rows(records):
        status = by_label[row[0]]["status"]
        cls = "ok" if status == "ok" else ("dim" if status in ("skipped", "unsupported") else "bad")
        cells = [f"<td>{_esc(v)}</td>" for v in row]
        cells[2] = f'<td class="{cls}">{_esc(row[2])}</td>'
        body.append(f'<tr class="{"dim" if cls == "dim" else ""}">{"".join(cells)}</tr>')
    return f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _grid_html(records: list[dict[str, Any]], root: Path) -> str:
    ref = next((r for r in records if r["role"] == "reference" and r["status"] == "ok"), None)
    if ref is None or not ref["images"]:
        return "<p>No reference images (the reference run did not succeed).</p>"
    cols = [ref] + [r for r in _ok_variants(records) if r["images"]]
    sections = []
    for k, im in enumerate(ref["images"]):
        tiles = []
        for c in cols:
            if k >= len(c["images"]):
                continue
            uri = _png_data_uri(root / c["images"][k]["path"])
            per = get_path(c, "metrics.quality.per_image") or []
            cap = "reference" if c is ref else ""
            if k < len(per) and per[k].get("psnr_db") is not None:
                p = per[k]["psnr_db"]
                cap = "identical" if p >= PSNR_CAP_DB else f"PSNR {p:.1f} dB · SSIM {per[k]['ssim']:.3f}"
                if per[k].get("adherence") is not None:
                    cap += f" · adherence {per[k]['adherence']:.2f}"
            img = f'<img alt="{_esc(c["label"])}, seed {_esc(im["seed"])}" src="{uri}">' if uri else "(missing)"
            tiles.append(f'<figure class="tile{" ref" if c is ref else ""}">{img}<figcaption><b>{_esc(c["label"])}'
                         f'</b><br>{_esc(cap)}</figcaption></figure>')
        sections.append(f'<div class="prompt">“{_esc(im["prompt"])}” · seed {_esc(im["seed"])}</div>'
                        f'<div class="tiles">{"".join(tiles)}</div>')
    return "".join(sections)


def render_html(records: list[dict[str, Any]], root: str | os.PathLike) -> str:
    """The report as one HTML string; image paths in records are relative to ``root``."""
    root = Path(root)
    first = records[0] if records else {}
    hw, sw, s = first.get("hardware", {}), first.get("software", {}), first.get("settings", {})
    src = first.get("source", {})
    meta = [
        f"run <b>{_esc(first.get('run_id', '?'))}</b> · {_esc(first.get('created', ''))}",
        f"hardware: {_esc(hw.get('device_name', '?'))} ({_esc(hw.get('device', '?'))}, {_esc(hw.get('cores', '?'))} cores, "
        f"{(hw.get('total_memory') or 0) / 2**30:.1f} GiB) · fingerprint <code>{_esc(first.get('hardware_fingerprint', ''))}</code>",
        "software: " + ", ".join(f"{_esc(k)} {_esc(v)}" for k, v in sw.items() if k != "platform" and v),
        f"source: <code>{_esc(src.get('spec', '?'))}</code> ({_esc(src.get('params', '?'))} params, sha256 "
        f"{_esc(str(src.get('sha256'))[:16])}…)",
        f"settings: {_esc(s.get('steps'))} steps at {_esc(s.get('width'))}x{_esc(s.get('height'))}, "
        f"{len(s.get('prompts', []))} prompts x {len(s.get('seeds', []))} seeds, warmup {_esc(s.get('warmup'))}, "
        f"repeats {_esc(s.get('repeats'))}, device {_esc(s.get('device'))}",
    ]
    plot_html = "".join(f'<div class="plot" data-title="{_esc(t)}">{svg}</div>' for t, svg in plots(records))
    fails = [r for r in records if r["status"] != "ok"]
    fail_html = "".join(f"<li><b>{_esc(r['label'])}</b>: {_esc(r['status'])} — {_esc(r.get('message') or '')}</li>"
                        for r in fails)
    lp = next((get_path(r, "metrics.quality.lpips_status") for r in records
               if get_path(r, "metrics.quality.lpips_status")), None)
    notes = f"<p class='meta'>LPIPS: {_esc(lp)}</p>" if lp and lp != "ok" else ""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>zopt bench {_esc(first.get('run_id', ''))}</title><style>{CSS}</style></head><body>"
        f"<h1>zopt bench</h1><div class='meta'>{'<br>'.join(meta)}</div>"
        f"<h2>Results</h2>{_table_html(records)}{notes}"
        f"<h2>Plots</h2><div class='plots'>{plot_html or '<p>No successful runs to plot.</p>'}</div>"
        f"<h2>Images (same prompt, seed and initial noise)</h2>{_grid_html(records, root)}"
        + (f"<h2>Runs that did not complete</h2><ul class='fail'>{fail_html}</ul>" if fails else "")
        + f"<script>{SCRIPT}</script></body></html>\n"
    )


def write_html(records: list[dict[str, Any]], root: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the report atomically to ``out`` and return its path."""
    from .._io import atomic_path

    out = Path(out)
    text = render_html(records, root)
    with atomic_path(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # a report is meant to be shared, unlike a private temp file
    return out
