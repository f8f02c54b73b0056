"""Which format to pick for a memory budget, computed from the measured records.

On a full-size source the budget is compared with the memory each run needed in total (see
``display.need_bytes``). On a test-sized model total memory is mostly Python, text encoder and VAE, which
do not shrink with the transformer, so the budget is scaled by the parameter ratio to the full model and
compared with the transformer's weights alone: the answer is then a relative ranking of the formats
(which drop out first as memory shrinks), not a statement about the full-size model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .display import GIB, is_noisy, is_small_model, need_bytes
from .schema import get_path

BUDGETS_GIB = (6, 8, 12, 16, 24)


@dataclass(frozen=True)
class Pick:
    """The answer for one budget: what fits, the best quality among it, and the fastest among it."""

    budget_gib: float
    limit_bytes: int  # what the budget means for these records (scaled down on a small model)
    fits: list[str] = field(default_factory=list)  # labels of the runs that fit, best quality first
    best: dict[str, Any] | None = None
    fastest: dict[str, Any] | None = None


def full_size_params() -> int:
    from ..families.zimage import FULL_NUM_PARAMS

    return FULL_NUM_PARAMS


def footprint(rec: dict[str, Any], scaled: bool) -> int | None:
    """Bytes compared with a budget: the weights on a small model, the total memory needed otherwise."""
    return get_path(rec, "metrics.artifact_bytes") if scaled else need_bytes(rec)


def quality_key(rec: dict[str, Any]) -> tuple:
    """Sort key, best first: higher PSNR, then lower per-step error, then smaller and faster."""
    psnr = get_path(rec, "metrics.quality.psnr_db")
    rel = get_path(rec, "metrics.quality.rel_l2_mean")
    return (-(psnr if psnr is not None else float("-inf")), rel if rel is not None else float("inf"),
            get_path(rec, "metrics.artifact_bytes") or 0, get_path(rec, "metrics.latency.step_ms.median") or 0.0)


def candidates(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Successful variants with a quality measurement and a latency (the reference is the yardstick)."""
    return [r for r in records if r["role"] == "variant" and r["status"] == "ok"
            and get_path(r, "metrics.quality.psnr_db") is not None
            and get_path(r, "metrics.latency.step_ms.median") is not None]


def picks(records: list[dict[str, Any]], budgets_gib=BUDGETS_GIB) -> tuple[list[Pick], bool]:
    """One Pick per budget and whether budgets were scaled to a small model's size."""
    scaled = is_small_model(records)
    params = next((get_path(r, "source.params") for r in records if get_path(r, "source.params")), None)
    scale = params / full_size_params() if scaled and params else 1.0
    runs = sorted(candidates(records), key=quality_key)
    out = []
    for b in budgets_gib:
        limit = int(b * GIB * scale)
        fit = [r for r in runs if footprint(r, scaled) is not None and footprint(r, scaled) <= limit]
        fastest = min(fit, key=lambda r: get_path(r, "metrics.latency.step_ms.median"), default=None)
        out.append(Pick(b, limit, [r["label"] for r in fit], fit[0] if fit else None, fastest))
    return out, scaled


def _describe(rec: dict[str, Any]) -> str:
    from .metrics import PSNR_CAP_DB

    psnr = get_path(rec, "metrics.quality.psnr_db")
    q = "identical to the reference" if psnr >= PSNR_CAP_DB else f"PSNR {psnr:.1f} dB"
    ms = get_path(rec, "metrics.latency.step_ms.median")
    return f"{q}, {'~' if is_noisy(rec) else ''}{ms:.1f} ms/step"


def pick_rows(records: list[dict[str, Any]]) -> tuple[list[list[str]], bool]:
    """Display rows (budget, fits, best quality, fastest; a cell's second line after "\\n") and whether
    budgets were scaled."""
    found, scaled = picks(records)
    n = len(candidates(records))
    rows = []
    for p in found:
        budget = f"{p.budget_gib:g} GiB" + (f"\nweights ≤ {p.limit_bytes / 2**20:.1f} MiB here" if scaled else "")
        if p.best is None:
            rows.append([budget, f"0 of {n}", "nothing measured fits: try offloading (zopt plan --vram)", ""])
            continue
        fast = "the same" if p.fastest is p.best else f"{p.fastest['label']}\n{_describe(p.fastest)}"
        rows.append([budget, f"{len(p.fits)} of {n}", f"{p.best['label']}\n{_describe(p.best)}", fast])
    return rows, scaled
