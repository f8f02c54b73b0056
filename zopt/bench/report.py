"""The HTML report: one self-contained file (no network, no external files) that answers which format to
pick per memory budget, then shows the results table, the plots (inline SVG from ``plots``) and an image
grid: the reference next to every format at the same prompt and seed, each with its difference map
(PNG data URIs). Clicking an image shows reference, format and difference side by side, enlarged.

A tiny inline script counts, once the page has loaded, the images the browser decoded and the plots it
drew, and writes the counts onto ``<body>`` (``data-images-loaded`` ...): a headless browser's DOM dump
then shows whether the report really renders.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

from .display import columns, footnotes, is_noisy, latency_spread, ordered, table_rows
from .metrics import PSNR_CAP_DB
from .schema import get_path

THUMB_MAX = 512  # grid images are downscaled to this many pixels on the long side
DIFF_FULL_SCALE = 32  # a pixel differing by this many 8-bit levels (or more) is the brightest colour

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1400px;
color:#1d2330;padding:0 16px;line-height:1.45}
h1{font-size:24px;margin-bottom:4px} h2{font-size:19px;margin-top:32px;border-bottom:1px solid #dde;padding-bottom:4px}
.meta{color:#556;font-size:13px;line-height:1.5;overflow-wrap:anywhere}
.note{color:#445;font-size:13.5px;margin:6px 0;max-width:980px}
.scroll{overflow-x:auto}
table.results,table.pick{border-collapse:collapse;font-size:13.5px;margin-top:8px}
table.results th,table.results td,table.pick th,table.pick td{padding:5px 9px;border-bottom:1px solid #e6e8ef}
table.results th,table.results td{text-align:right;white-space:nowrap}
table.results th,table.pick th{background:#f3f5fa;vertical-align:bottom}
table.results td:nth-child(-n+3),table.results th:nth-child(-n+3){text-align:left}
table.pick td,table.pick th{text-align:left;vertical-align:top} table.pick td:first-child{white-space:nowrap;font-weight:600}
table.pick td:nth-child(2){white-space:nowrap} table.pick .sub{color:#556;font-weight:400;font-size:12.5px}
.ok{color:#18794e;font-weight:600} .bad{color:#c0392b;font-weight:600} .dim{color:#99a}
td.noisy{color:#b35c00;font-weight:600}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,560px),1fr));gap:20px}
.plot svg{width:100%;height:auto} .plot p{font-size:13px;color:#445;margin:2px 0 0}
.prompt{font-size:15px;margin:18px 0 8px;color:#334}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(210px,1fr));gap:12px}
figure.tile{margin:0;font-size:12.5px;color:#445;text-align:center}
figure.tile img{display:block;width:100%;height:auto;border:1px solid #ccd;cursor:zoom-in}
figure.tile img.diff{margin-top:4px;background:#000}
figure.tile .nodiff{margin-top:4px;aspect-ratio:1;display:flex;align-items:center;justify-content:center;
border:1px dashed #ccd;color:#778;font-size:12px;padding:6px}
figure.tile.ref img.shot{border:2px solid #2b59c3} figure.tile b{color:#1d2330;word-break:break-word}
.scale{display:inline-block;width:160px;height:11px;vertical-align:middle;border:1px solid #ccd;
background:linear-gradient(90deg,#000004,#3b0f70,#8c2981,#de4968,#fe9f6d,#fcfdbf)}
ul.fail li{font-size:13.5px;margin:2px 0}
#zoom{position:fixed;inset:0;background:#0c0e16;display:flex;flex-wrap:wrap;gap:14px;align-items:center;align-content:center;
justify-content:center;z-index:10;cursor:zoom-out;padding:16px;overflow:auto}
#zoom[hidden]{display:none}
#zoom figure{margin:0;color:#eef;text-align:center;font-size:14px} #zoom p{flex-basis:100%;text-align:center;color:#aab;margin:0}
#zoom img{width:min(calc((100vw - 90px) / 3),84vh,1024px);height:auto;image-rendering:pixelated;background:#000}
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
// click an image: reference, this format and its difference map side by side; click or Esc closes
var zoom = document.getElementById('zoom');
function closeZoom() { zoom.hidden = true; zoom.textContent = ''; }
function pane(src, caption) {
  var f = document.createElement('figure'), i = document.createElement('img'), c = document.createElement('figcaption');
  i.src = src; c.textContent = caption; f.appendChild(i); f.appendChild(c); zoom.appendChild(f);
}
document.addEventListener('click', function (e) {
  if (!zoom.hidden) { closeZoom(); return; }
  var fig = e.target.closest && e.target.closest('figure.tile');
  if (!fig || e.target.tagName !== 'IMG') { return; }
  var ref = fig.parentNode.querySelector('figure.ref img.shot');
  if (ref) { pane(ref.src, 'reference'); }
  if (!fig.classList.contains('ref')) {
    pane(fig.querySelector('img.shot').src, fig.getAttribute('data-label'));
    var d = fig.querySelector('img.diff');
    if (d) { pane(d.src, 'difference (' + d.getAttribute('data-stats') + ')'); }
  }
  var hint = document.createElement('p'); hint.textContent = 'click anywhere or press Esc to close';
  zoom.appendChild(hint); zoom.hidden = false;
});
document.addEventListener('keydown', function (e) { if (e.key === 'Escape') { closeZoom(); } });
"""


def _esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _uri(im) -> str:
    im.thumbnail((THUMB_MAX, THUMB_MAX))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _read_rgb(path: Path):
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except OSError:
        return None


def difference_map(image, reference) -> tuple[Any, int, float] | None:
    """(heat map image, max and mean absolute difference in 8-bit levels) of two same-size RGB images.

    The largest difference over the channels of each pixel is coloured on a fixed square-root scale (magma,
    black = identical, brightest = DIFF_FULL_SCALE levels or more), so maps of different formats compare
    directly.
    """
    import matplotlib
    import numpy as np
    from PIL import Image

    if image is None or reference is None or image.size != reference.size:
        return None
    d = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(reference, dtype=np.int16)).max(axis=-1)
    # square root: a difference of one level is already visible, large ones still stand out
    rgb = matplotlib.colormaps["magma"](np.sqrt(np.clip(d / DIFF_FULL_SCALE, 0.0, 1.0)))[..., :3]
    return Image.fromarray((rgb * 255).round().astype(np.uint8)), int(d.max()), float(d.mean())


def _ok_variants(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["role"] == "variant" and r["status"] == "ok"]


def _table_html(records: list[dict[str, Any]]) -> str:
    heads = [h for h, _ in columns(records, wide=True)]
    head = "".join(f"<th>{_esc(h)}</th>".replace("\n", "<br>") for h in heads)
    step = heads.index("step\nms")
    body = []
    for rec, row in zip(ordered(records), table_rows(records, wide=True), strict=True):
        status = rec["status"]
        cls = "ok" if status == "ok" else ("dim" if status in ("skipped", "unsupported") else "bad")
        cells = [f"<td>{_esc(v)}</td>" for v in row]
        cells[2] = f'<td class="{cls}">{_esc(row[2])}</td>'
        if is_noisy(rec):
            cells[step] = (f'<td class="noisy" title="noisy: p90 is {latency_spread(rec):.1f}x the median">'
                           f"{_esc(row[step])}</td>")
        body.append(f'<tr class="{"dim" if cls == "dim" else ""}">{"".join(cells)}</tr>')
    notes = "".join(f"<p class='note'>{_esc(n)}</p>" for n in footnotes(records))
    return (f'<div class="scroll"><table class="results"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>{notes}')


def _pick_html(records: list[dict[str, Any]]) -> str:
    from .pick import candidates, full_size_params, pick_rows

    if not candidates(records):
        return "<p>No format ran successfully with a quality measurement: nothing to choose from.</p>"
    rows, scaled = pick_rows(records)
    device = get_path(records[0], "settings.device") or "?"
    if scaled:
        params = next((get_path(r, "source.params") for r in records if get_path(r, "source.params")), 0) or 0
        basis = (f"This is a {params / 1e6:.1f}M-parameter test model, so its memory is mostly Python, text "
                 f"encoder and VAE. Each budget is scaled by its size relative to the full "
                 f"{full_size_params() / 1e9:.2f}B-parameter transformer and compared with the transformer's "
                 "weights alone. Read it as a relative ranking (the order in which formats drop out as memory "
                 "shrinks), not as a measurement of the full-size model.")
    else:
        basis = (f"Each budget is compared with the memory each run needed in total on this machine ({device}; "
                 "the peak column of the table).")
    basis += (" Best quality: highest PSNR against the reference (ties: smaller, then faster). Fastest: lowest "
              "median ms per denoising step among the formats that fit (~ marks a noisy figure).")
    body = "".join("<tr>" + "".join("<td>" + "<br><span class='sub'>".join(map(_esc, c.split("\n", 1)))
                                    + ("</span>" if "\n" in c else "") + "</td>" for c in row) + "</tr>"
                   for row in rows)
    return (f"<p class='note'>{_esc(basis)}</p><div class='scroll'><table class='pick'><thead><tr><th>budget</th>"
            "<th>fits</th><th>best quality</th><th>fastest</th></tr></thead>"
            f"<tbody>{body}</tbody></table></div>")


def _caption(c: dict[str, Any], k: int) -> str:
    per = get_path(c, "metrics.quality.per_image") or []
    if k < len(per) and per[k].get("psnr_db") is not None:
        p = per[k]["psnr_db"]
        ssim = per[k].get("ssim")
        cap = "identical" if p >= PSNR_CAP_DB else f"PSNR {p:.1f} dB" + (f" · SSIM {ssim:.4f}" if ssim else "")
        if per[k].get("adherence") is not None:
            cap += f" · adherence {per[k]['adherence']:.2f}"
        return cap
    return ""


def _grid_html(records: list[dict[str, Any]], root: Path) -> str:
    ref = next((r for r in records if r["role"] == "reference" and r["status"] == "ok"), None)
    if ref is None:
        return "<p>No images: the reference run did not succeed.</p>"
    if not ref["images"]:
        return "<p>No images: the reference run saved none.</p>"
    cols = [ref] + [r for r in _ok_variants(records) if r["images"]]
    sections = [f"<p class='note'>Under each image, its difference from the reference: <span class='scale'></span> "
                f"black = same pixel, brightest = {DIFF_FULL_SCALE} or more of 255 levels in some channel (square-root "
                "scale: a difference of one level already shows). Click any "
                "image to compare reference, format and difference enlarged.</p>"]
    for k, im in enumerate(ref["images"]):
        ref_rgb = _read_rgb(root / im["path"])
        tiles = []
        for c in cols:
            if k >= len(c["images"]):
                continue
            rgb = ref_rgb if c is ref else _read_rgb(root / c["images"][k]["path"])
            alt = f'{_esc(c["label"])}, seed {_esc(im["seed"])}'
            shot = f'<img class="shot" alt="{alt}" src="{_uri(rgb.copy())}">' if rgb is not None else "(missing)"
            if c is ref:
                diff, cap = '<div class="nodiff">below each format: where it differs from this image</div>', ["reference"]
            else:
                dm = difference_map(rgb, ref_rgb)
                cap = [t for t in [_caption(c, k)] if t]
                if dm is None:
                    diff = '<div class="nodiff">no difference map (image missing or of another size)</div>'
                else:
                    stats = "no pixel differs" if dm[1] == 0 else f"max {dm[1]}, mean {dm[2]:.1f} of 255"
                    diff = (f'<img class="diff" alt="difference of {alt} from the reference" '
                            f'data-stats="{_esc(stats)}" src="{_uri(dm[0])}">')
                    cap.append(f"Δ {stats}")
            tiles.append(f'<figure class="tile{" ref" if c is ref else ""}" data-label="{_esc(c["label"])}">{shot}'
                         f'{diff}<figcaption><b>{_esc(c["label"])}</b><br>{"<br>".join(map(_esc, cap))}'
                         "</figcaption></figure>")
        sections.append(f'<div class="prompt">“{_esc(im["prompt"])}” · seed {_esc(im["seed"])}</div>'
                        f'<div class="tiles">{"".join(tiles)}</div>')
    return "".join(sections)


def _plots_html(records: list[dict[str, Any]]) -> str:
    from .plots import plots

    out = []
    for title, svg, front in plots(records):
        cap = (f"<p>Dotted line: the Pareto frontier, runs that no other run beats on both axes: "
               f"{_esc(', '.join(front))}.</p>" if len(front) > 1 else "")
        out.append(f'<div class="plot" data-title="{_esc(title)}">{svg}{cap}</div>')
    return "".join(out)


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
    plot_html = _plots_html(records)
    fails = [r for r in records if r["status"] != "ok"]
    fail_html = "".join(f"<li><b>{_esc(r['label'])}</b>: {_esc(r['status'])} — {_esc(r.get('message') or '')}</li>"
                        for r in fails)
    lp = next((get_path(r, "metrics.quality.lpips_status") for r in records
               if get_path(r, "metrics.quality.lpips_status")), None)
    notes = f"<p class='note'>LPIPS: {_esc(lp)}</p>" if lp and lp != "ok" else ""
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>zopt bench {_esc(first.get('run_id', ''))}</title><style>{CSS}</style></head><body>"
        f"<h1>zopt bench</h1><div class='meta'>{'<br>'.join(meta)}</div>"
        f"<h2 id='pick'>Which to pick</h2>{_pick_html(records)}"
        f"<h2>Results</h2>{_table_html(records)}{notes}"
        f"<h2>Plots</h2><div class='plots'>{plot_html or '<p>No successful runs to plot.</p>'}</div>"
        f"<h2>Images (same prompt, seed and initial noise)</h2>{_grid_html(records, root)}"
        + (f"<h2>Runs that did not complete</h2><ul class='fail'>{fail_html}</ul>" if fails else "")
        + f"<div id='zoom' hidden></div><script>{SCRIPT}</script></body></html>\n"
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
