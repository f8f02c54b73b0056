"""The report's plots (matplotlib, inline SVG): quality against size and latency with their Pareto
frontiers, latency against the memory a run needs, and the per-step error of the transformer.

Every point carries its label next to it (placed where it overlaps no other label or point), colours and
markers are fixed per run across plots, and text is at reading size. Runs whose images are identical to
the reference (PSNR capped at 100 dB) and steps with exactly zero error are drawn on a separate row
named "identical" / "exact (0)" rather than at an arbitrary number.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

from .display import byte_unit, is_noisy, need_bytes
from .metrics import PSNR_CAP_DB
from .schema import get_path

# distinct at a glance on white (no yellow); markers repeat the distinction for colour-blind readers
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#8C564B",
           "#7F7F7F", "#9467BD", "#BCBD22", "#17BECF", "#A50026", "#1B7837")
MARKERS = "osD^vP*Xh<>pd8"
FIGSIZE = (7.0, 4.6)
LABEL_PT = 9.5


def _rc() -> None:
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams.update({
        "svg.fonttype": "none",  # text stays text: small and searchable
        "svg.hashsalt": "zopt-bench",
        "font.size": 11, "axes.titlesize": 13, "axes.labelsize": 11, "legend.fontsize": 10,
        "xtick.labelsize": 10, "ytick.labelsize": 10,
    })


def svg(fig) -> str:
    """The figure as an inline <svg> element (no XML prolog, no creator metadata)."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = re.sub(r"<metadata>.*?</metadata>", "", buf.getvalue(), flags=re.S)
    return text[text.index("<svg"):]


def short_labels(records: list[dict[str, Any]]) -> dict[str, str]:
    """Plot labels: the format spec alone when only one backend ran it, else SPEC@BACKEND."""
    specs = [r["format"]["spec"] for r in records if r["role"] == "variant" and r["status"] == "ok"]
    return {r["label"]: (r["format"]["spec"] if r["role"] == "variant" and specs.count(r["format"]["spec"]) == 1
                         else r["label"]) for r in records}


def styles(records: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """One (colour, marker) per run label, the same in every plot."""
    labels = sorted(r["label"] for r in records if r["status"] == "ok")
    return {lbl: (COLOURS[i % len(COLOURS)], MARKERS[i % len(MARKERS)]) for i, lbl in enumerate(labels)}


def pareto(points: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Points not beaten on both axes (x lower is better, y higher is better), by increasing x."""
    front, best_y = [], -math.inf
    for x, y, lbl in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best_y:
            front.append((x, y, lbl))
            best_y = y
    return front


# label offsets in points, tried in order: beside, above/below, then further out with a leader line
NEAR = [(7, 5), (7, -5), (-7, 5), (-7, -5), (0, 10), (0, -10), (10, 0), (-10, 0)]
OFFSETS = NEAR + [(sx * dx, sy * d) for d in (16, 26, 38, 52) for dx in (12, 0) for sx in (1, -1) for sy in (1, -1)
                  if dx or sx == 1] + [(sx * (d + 14), 0) for d in (16, 38) for sx in (1, -1)]


def text_box(annotation, renderer):
    """The box of an annotation's text alone (its leader line may cross other things)."""
    from matplotlib.text import Text

    annotation.update_positions(renderer)
    return Text.get_window_extent(annotation, renderer)


def place_labels(ax, points: list[tuple[float, float, str, str]], offsets=OFFSETS) -> None:
    """Write each (x, y, text, colour) next to its point where it overlaps no other label or marker."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axbox = ax.get_window_extent(renderer)
    taken = []
    for x, y, _, _ in points:  # the markers themselves
        px, py = ax.transData.transform((x, y))
        taken.append((px - 5, py - 5, px + 5, py + 5))

    def cost(b) -> float:
        over = sum(max(0.0, min(b.x1, t[2]) - max(b.x0, t[0])) * max(0.0, min(b.y1, t[3]) - max(b.y0, t[1]))
                   for t in taken)
        outside = max(0.0, axbox.x0 - b.x0) + max(0.0, b.x1 - axbox.x1) + max(0.0, axbox.y0 - b.y0) \
            + max(0.0, b.y1 - axbox.y1)
        return over + 50.0 * outside

    for x, y, text, colour in points:
        best = None
        for k, (dx, dy) in enumerate(offsets):
            ha = "left" if dx > 0 else ("right" if dx < 0 else "center")
            va = "bottom" if dy > 0 else ("top" if dy < 0 else "center")
            far = k >= len(NEAR)
            t = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va,
                            fontsize=LABEL_PT, color=colour,
                            arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.6, "alpha": 0.6} if far else None)
            b = text_box(t, renderer)
            c = cost(b)
            if best is None or c < best[0]:
                if best is not None:
                    best[1].remove()
                best = (c, t, b)
            else:
                t.remove()
            if c == 0:
                break
        taken.append((best[2].x0 - 1, best[2].y0 - 1, best[2].x1 + 1, best[2].y1 + 1))


def label_line_ends(ax, ends: list[tuple[float, float, str, str]], gap_pt: float = 8.0) -> None:
    """Write each (x, y, text, colour) right of its line's last point, moved up or down just enough that
    no two labels overlap, with a thin leader where a label had to move."""
    fig = ax.figure
    fig.canvas.draw()
    px_per_pt = fig.dpi / 72.0
    height = LABEL_PT * 1.25 * px_per_pt
    pts = sorted((ax.transData.transform((x, y))[1], k) for k, (x, y, _, _) in enumerate(ends))
    want = [p[0] for p in pts]
    pos = list(want)
    for i in range(1, len(pos)):  # push up what overlaps the label below it
        pos[i] = max(pos[i], pos[i - 1] + height)
    box = ax.get_window_extent()
    top = box.y1 - height / 2
    if pos and pos[-1] > top:  # then down from the top edge, keeping the order
        pos[-1] = top
        for i in range(len(pos) - 2, -1, -1):
            pos[i] = min(pos[i], pos[i + 1] - height)
    for (y_disp, k), y_lab in zip(pts, pos, strict=True):
        x, y, text, colour = ends[k]
        dy = (y_lab - y_disp) / px_per_pt
        ax.annotate(text, (x, y), xytext=(gap_pt + (6 if abs(dy) > 2 else 0), dy), textcoords="offset points",
                    ha="left", va="center", fontsize=LABEL_PT, color=colour,
                    arrowprops={"arrowstyle": "-", "color": colour, "lw": 0.6, "alpha": 0.6} if abs(dy) > 2 else None)


def _log_if_wide(ax, xs: list[float], axis: str = "x") -> None:
    """A log axis when values span more than a decade: one slow run must not squash all others together."""
    xs = [x for x in xs if x and x > 0]
    if xs and max(xs) / min(xs) > 10:
        import matplotlib.ticker

        (ax.set_xscale if axis == "x" else ax.set_yscale)("log")
        which = ax.xaxis if axis == "x" else ax.yaxis
        which.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))  # 100, not 10^2


def _lossless_axis(ax, finite: list[float], row: float | None) -> None:
    """Put the "identical" row above the measured PSNRs, behind a dashed rule, with its own tick."""
    if row is None:
        return
    lo, hi = (min(finite), max(finite)) if finite else (row - 10, row - 4)
    sep = (hi + row) / 2
    ax.set_ylim(lo - 0.12 * (row - lo), row + 0.08 * (row - lo))
    ticks = [t for t in ax.get_yticks() if lo - 0.12 * (row - lo) <= t < sep - 0.02 * (row - lo)]
    ax.axhline(sep, color="#99a", lw=0.8, ls="--", zorder=1)
    ax.set_yticks(ticks + [row], [f"{t:g}" for t in ticks] + ["identical"])


def _quality_points(ok: list[dict[str, Any]], xpath) -> tuple[list, list[float], float | None]:
    """(label, x, y, record) with y = PSNR, identical runs lifted to a separate row above the rest."""
    pts = [(r, xpath(r), get_path(r, "metrics.quality.psnr_db")) for r in ok]
    pts = [p for p in pts if p[1] is not None and p[2] is not None]
    finite = [p[2] for p in pts if p[2] < PSNR_CAP_DB]
    row = None
    if any(p[2] >= PSNR_CAP_DB for p in pts):
        row = (max(finite) + max(6.0, 0.25 * (max(finite) - min(finite)))) if finite else PSNR_CAP_DB
    return [(r, x, row if y >= PSNR_CAP_DB else y) for r, x, y in pts], finite, row


def _quality_plot(ok, style, names, title, xlabel, xpath, xerr=None) -> tuple[str, str, list[str]] | None:
    import matplotlib.pyplot as plt

    pts, finite, row = _quality_points(ok, xpath)
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for r, x, y in pts:
        colour, marker = style[r["label"]]
        hollow = is_noisy(r) and xerr is not None
        ax.errorbar([x], [y], xerr=xerr(r) if xerr else None, fmt=marker, color=colour, markersize=8, capsize=3,
                    elinewidth=0.8, zorder=3, markerfacecolor="white" if hollow else colour)
    front = pareto([(x, y, r["label"]) for r, x, y in pts])
    if len(front) > 1:  # the caption under the plot names the dotted line and the runs on it
        ax.step([p[0] for p in front], [p[1] for p in front], where="post", color="#555", lw=1.2, ls=":", zorder=2)
    _log_if_wide(ax, [x for _, x, _ in pts])
    ax.set_xlabel(xlabel)
    ax.set_ylabel("PSNR vs reference, dB (higher is better)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.margins(x=0.12, y=0.1)
    _lossless_axis(ax, finite, row)
    place_labels(ax, [(x, y, names[r["label"]] + ("~" if xerr and is_noisy(r) else ""), style[r["label"]][0])
                      for r, x, y in pts])
    return title, svg(fig), [names[p[2]] for p in front]


def _latency_memory_plot(records, style, names) -> tuple[str, str, list[str]] | None:
    import matplotlib.pyplot as plt

    runs = [r for r in records if r["status"] == "ok" and need_bytes(r) is not None
            and get_path(r, "metrics.latency.step_ms.median") is not None]
    if not runs:
        return None
    name, div = byte_unit([need_bytes(r) for r in runs])
    fig, ax = plt.subplots(figsize=FIGSIZE)
    pts = []
    for r in runs:
        colour, marker = style[r["label"]]
        med = get_path(r, "metrics.latency.step_ms.median")
        p90 = get_path(r, "metrics.latency.step_ms.p90") or med
        x = need_bytes(r) / div
        ax.errorbar([x], [med], yerr=[[0], [max(0.0, p90 - med)]], fmt=marker, color=colour, markersize=8,
                    capsize=3, elinewidth=0.8, zorder=3, markerfacecolor="white" if is_noisy(r) else colour)
        pts.append((x, med, names[r["label"]] + ("~" if is_noisy(r) else ""), colour))
    _log_if_wide(ax, [p[1] for p in pts], axis="y")
    ax.set_xlabel(f"memory the run needed (peak total), {name}")
    ax.set_ylabel("ms per denoising step (median; bar to p90)")
    title = "Latency vs memory needed"
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.margins(0.15)
    place_labels(ax, pts)
    return title, svg(fig), []


def _per_step_plot(ok, style, names) -> tuple[str, str, list[str]] | None:
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    curves = [(r, get_path(r, "metrics.quality.per_step") or []) for r in ok]
    curves = [(r, c) for r, c in curves if c]
    if not curves:
        return None
    nonzero = [s["rel_l2"] for _, c in curves for s in c if s["rel_l2"] > 0]
    # an exact match (0) has no place on a log axis: it gets its own row a decade below the smallest error
    zero_row = 10 ** (math.floor(math.log10(min(nonzero))) - 1) if nonzero else 1e-6
    fig, ax = plt.subplots(figsize=FIGSIZE)
    ends = []
    for r, c in curves:
        colour, marker = style[r["label"]]
        xs = [s["step"] + 1 for s in c]
        ys = [s["rel_l2"] if s["rel_l2"] > 0 else zero_row for s in c]
        ax.plot(xs, ys, marker=marker, color=colour, markersize=6, lw=1.4)
        ends.append((xs[-1], ys[-1], names[r["label"]], colour))
    ax.set_yscale("log")
    last = max(e[0] for e in ends)
    ax.set_xticks(range(1, last + 1) if last <= 12 else range(1, last + 1, max(1, last // 8)))
    ax.set_xlim(0.8, last + 0.35 * max(1, last - 1) + 0.6)  # room on the right for the line labels
    if any(s["rel_l2"] == 0 for _, c in curves for s in c):
        top = max(nonzero) * 3 if nonzero else 1e-5
        ax.set_ylim(zero_row / 2, top)
        ax.axhline(zero_row * 3.2, color="#99a", lw=0.8, ls="--")
        ticks = [t for t in ax.get_yticks() if zero_row * 5 < t <= top]
        ax.set_yticks(ticks + [zero_row], [f"{t:.0e}" for t in ticks] + ["exact (0)"])
        ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("denoising step")
    ax.set_ylabel("relative L2 of transformer output")
    title = "Per-step error vs reference (same inputs)"
    ax.set_title(title)
    ax.grid(True, alpha=0.3, which="both")
    if not any(s["rel_l2"] == 0 for _, c in curves for s in c):
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    label_line_ends(ax, ends)
    return title, svg(fig), []


def plots(records: list[dict[str, Any]]) -> list[tuple[str, str, list[str]]]:
    """(title, inline SVG, labels on the Pareto frontier) for each plot that has data to show."""
    _rc()
    ok = [r for r in records if r["role"] == "variant" and r["status"] == "ok"]
    style, names = styles(records), short_labels(records)
    size_name, size_div = byte_unit([get_path(r, "metrics.artifact_bytes") for r in ok])

    def size(r):
        b = get_path(r, "metrics.artifact_bytes")
        return None if b is None else b / size_div

    def latency_err(r):
        med, p90 = get_path(r, "metrics.latency.step_ms.median"), get_path(r, "metrics.latency.step_ms.p90")
        return [[0], [max(0.0, (p90 or med) - med)]]

    out = [
        _quality_plot(ok, style, names, "Quality vs size", f"file size, {size_name} (smaller is better)",
                      size),
        _quality_plot(ok, style, names, "Quality vs latency",
                      "ms per denoising step, median; bar to p90 (lower is better)",
                      lambda r: get_path(r, "metrics.latency.step_ms.median"), xerr=latency_err),
        _latency_memory_plot(records, style, names),
        _per_step_plot(ok, style, names),
    ]
    return [p for p in out if p is not None]
