"""How sure a slowdown is: step-time samples of two runs -> a ratio with confidence bounds.

The gate's latency verdict rests on :func:`slowdown`: the Hodges-Lehmann estimate of how much
slower the new run's steps are than the baseline's (the median of all pairwise ratios new/old), and
its distribution-free one-sided 95 % bounds from the Mann-Whitney statistic (the k-th smallest and
largest pairwise ratios, k from the normal approximation). The gate counts a run as slower than the
limit when the estimate is past the limit and the lower bound is above 1, so the scatter of the
steps themselves (a loaded machine gives some steps 2-3x longer) does not raise the alarm and a
clear slowdown does. No randomness: the same records give the same verdict every time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_SAMPLES = 8  # step samples per run needed before a confidence bound is estimated
CONFIDENCE = 0.95  # one-sided
Z = 1.6449  # the standard normal quantile of CONFIDENCE


def median(xs: list[float]) -> float:
    """Median of a non-empty list."""
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


def robust_spread(xs: list[float]) -> float:
    """1.4826 x median absolute deviation / median: a relative spread that outliers do not move."""
    med = median(xs)
    return 1.4826 * median([abs(x - med) for x in xs]) / med if med > 0 else float("inf")


@dataclass(frozen=True)
class Slowdown:
    ratio: float  # Hodges-Lehmann estimate of new/old
    lower: float  # one-sided lower confidence bound on the ratio
    upper: float  # one-sided upper confidence bound on the ratio
    n_old: int
    n_new: int

    def text(self) -> str:
        return f"x{self.ratio:.3f}, {CONFIDENCE * 100:.0f}% bounds x{self.lower:.3f}..x{self.upper:.3f}"


def slowdown(old: list[float], new: list[float]) -> Slowdown | None:
    """How much slower ``new`` steps are than ``old`` ones, with bounds; None when either side has
    fewer than :data:`MIN_SAMPLES` positive samples."""
    a = [math.log(x) for x in old if x and x > 0]
    b = [math.log(y) for y in new if y and y > 0]
    n, m = len(a), len(b)
    if n < MIN_SAMPLES or m < MIN_SAMPLES:
        return None
    diffs = sorted(y - x for x in a for y in b)
    k = max(0, math.floor(n * m / 2 - Z * math.sqrt(n * m * (n + m + 1) / 12)))
    return Slowdown(math.exp(median(diffs)), math.exp(diffs[k]), math.exp(diffs[-1 - k]), n, m)
