"""ggml's per-group quantization searches, vectorized over groups (one group per column).

``make_qkx2`` (also ggml's ``make_qkx3_quants``, which differs only in its parameters), ``make_qx``,
``make_q3`` and ``make_qp`` follow the C functions of the same names in ggml-quants.c step by step, in
float32 and in the C code's operation order, except where a docstring says otherwise. Inputs are
``(n, G)``: G groups of n values each. Per-group sums become row additions, and per-group scalars
broadcast along rows; both vectorize well in torch.
"""

from __future__ import annotations

import numpy as np
import torch

from .compile import kernel

EPS = 1e-15  # GROUP_MAX_EPS: a group whose largest magnitude is below this is all zero


def _f32(v: float) -> float:
    """A Python float holding exactly the float32 value C would compute."""
    return float(np.float32(v))


def colsum(t: torch.Tensor) -> torch.Tensor:
    """Sum over rows in order, one row at a time, like the C loops. torch's own reductions pick their
    summation order by tensor width, which would make a group's result depend on how many groups are
    quantized together."""
    acc = t[0].clone()
    for row in t[1:]:
        acc += row
    return acc


def rne_(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """In place: round half to even (what ggml's nearest_int does) and clamp to [lo, hi] (integers)."""
    return t.round_().clamp_(lo, hi)


@kernel
def _qkx2_start(x: torch.Tensor, w: torch.Tensor, nmax: int, use_mad: bool):
    """make_qkx2's set-up: the plain min/max rounding and its error, and the per-group sums."""
    mn = x.amin(0).clamp(max=0)
    mx = x.amax(0)
    wx = w * x
    sum_w, sum_x = colsum(w), colsum(wx)
    flat = mx == mn
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)  # flat groups are zeroed at the end
    iscale = torch.reciprocal(rng) * nmax  # = eager ``nmax / rng``
    scale = torch.reciprocal(iscale)
    L = rne_(iscale * (x - mn), 0, nmax)
    diff = scale * L + mn - x
    best_err = colsum((diff.abs() if use_mad else diff.square()) * w)
    # Squared error of a candidate from its sums alone, in float64 so the expansion's cancellation
    # stays harmless (C sums the squared differences; near-ties can resolve differently).
    sum_wx2 = colsum(wx * x).double()
    return mn, mx, flat, rng, iscale, scale, best_err, sum_w, sum_x, sum_wx2


@kernel
def _qkx2_step(x, w, num, nmax: int, use_mad: bool, mn, mx, flat, rng, scale, best_err, won_mn,
               won_iscale, sum_w, sum_x, sum_wx2):
    """One candidate of make_qkx2: inverse scale ``num / rng`` (num a 0-d tensor); returns the
    updated (mn, rng, scale, best_err, won_mn, won_iscale)."""
    cand = torch.reciprocal(rng) * num  # as eager ``float / tensor`` computes it
    laux = rne_((x - mn) * cand, 0, nmax)
    wl = w * laux
    sum_l = colsum(wl)
    sum_xl = colsum(wl * x)
    sum_l2 = colsum(wl * laux)
    D = sum_w * sum_l2 - sum_l * sum_l
    this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
    this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
    pos = this_min > 0
    this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
    this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
    if use_mad:
        err = colsum(((laux * this_scale + this_min) - x).abs() * w)
    else:
        s, m = this_scale.double(), this_min.double()
        err = (s * s * sum_l2.double() + 2 * s * m * sum_l.double() - 2 * s * sum_xl.double()
               + m * m * sum_w.double() - 2 * m * sum_x.double() + sum_wx2).float()
    better = (D > 0) & (err < best_err) & ~flat
    best_err = torch.where(better, err, best_err)
    won_mn = torch.where(better, mn, won_mn)
    won_iscale = torch.where(better, cand, won_iscale)
    scale = torch.where(better, this_scale, scale)
    # ggml moves the group's min as soon as a better fit is found; later candidates use it
    mn = torch.where(better, this_min, mn)
    rng = torch.where(better, mx - mn, rng)
    return mn, rng, scale, best_err, won_mn, won_iscale


def make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
              use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml ``make_qkx2_quants`` on every column: (scale (G,), min (G,) >= 0, L (n, G) in 0..nmax).

    A group is approximated by ``scale * L - min``; candidate inverse scales
    ``(nmax + rmin + rdelta*i) / (max - min)`` are tried and the weighted least-squares (scale, min)
    kept when it lowers the weighted squared (or absolute, ``use_mad``) error.
    """
    mn, mx, flat, rng, iscale, scale, best_err, sum_w, sum_x, sum_wx2 = _qkx2_start(x, w, nmax, use_mad)
    # what the winning candidate rounded with (copies: aliased inputs would make dynamo recompile)
    won_mn, won_iscale = mn.clone(), iscale.clone()
    for step in range(nstep + 1):
        num = torch.tensor(_f32(_f32(rmin + _f32(_f32(rdelta) * step)) + nmax), dtype=torch.float32)
        mn, rng, scale, best_err, won_mn, won_iscale = _qkx2_step(
            x, w, num, nmax, use_mad, mn, mx, flat, rng, scale, best_err, won_mn, won_iscale,
            sum_w, sum_x, sum_wx2)
    return _qkx2_finish(x, nmax, flat, scale, mn, won_mn, won_iscale)


@kernel
def _qkx2_finish(x, nmax: int, flat, scale, mn, won_mn, won_iscale):
    # Re-derive the winner's rounding once instead of carrying L through every step.
    L = rne_((x - won_mn) * won_iscale, 0, nmax).masked_fill(flat, 0)
    return scale.masked_fill(flat, 0), -mn, L


def make_qx(x: torch.Tensor, nmax: int, w: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml ``make_qx_quants(rmse_type=1)``: symmetric ``x ~ scale * L``, L in -nmax..nmax-1 per column.

    Tries inverse scales ``-(nmax + 0.1 i)/max`` for i in -9..9 and keeps the weighted least-squares
    scale that fits best (weights ``w``, default x^2). Returns (scale (G,), L + nmax (n, G)).
    """
    zero, rmx, w, wx, L, scale, best = _qx_start(x, nmax, x * x if w is None else w)
    for i in range(-9, 10):
        if i == 0:
            continue
        num = torch.tensor(-_f32(nmax + _f32(_f32(0.1) * i)), dtype=torch.float32)
        L, scale, best = _qx_step(x, w, wx, rmx, num, nmax, L, scale, best)
    return _qx_finish(zero, scale, L, nmax)


def _qx_fit(x, w, wx, iscale, nmax):
    lv = rne_(x * iscale, -nmax, nmax - 1)
    return lv, colsum(wx * lv), colsum(w * lv * lv)


@kernel
def _qx_start(x, nmax: int, w):
    mx = abs_max_signed(x, dim=0)
    zero = mx.abs() < EPS
    rmx = torch.reciprocal(torch.where(zero, torch.ones_like(mx), mx))
    wx = w * x
    L, sumlx, suml2 = _qx_fit(x, w, wx, rmx * -nmax, nmax)  # eager ``-nmax / mx``
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    return zero, rmx, w, wx, L, scale, scale * sumlx


@kernel
def _qx_step(x, w, wx, rmx, num, nmax: int, L, scale, best):
    """One candidate inverse scale ``num / max`` (num a 0-d tensor) of make_qx."""
    lv, slx, sl2 = _qx_fit(x, w, wx, rmx * num, nmax)
    better = (sl2 > 0) & (slx * slx > best * sl2)
    scale = torch.where(better, slx / sl2, scale)
    return torch.where(better, lv, L), scale, torch.where(better, scale * slx, best)


@kernel
def _qx_finish(zero, scale, L, nmax: int):
    return scale.masked_fill(zero, 0), L.masked_fill(zero, -nmax) + nmax


@kernel
def _descent_pass(x, w, wx, L, sumlx, suml2, lo: int, hi: int, guard_new: bool):
    """One pass of ggml's per-position refinement (make_q3 / make_qp): each position in turn moves
    to its best level in lo..hi if that raises the weighted fit ``sumlx^2/suml2``. Returns the new
    (L, sumlx, suml2) and whether any group changed. ``guard_new`` checks the new suml2 (make_q3)
    rather than the one without the position (make_qp), as the two C functions do."""
    changed = torch.zeros_like(sumlx, dtype=torch.bool)
    rows = []
    for i in range(x.shape[0]):
        xi, wi, wxi, li = x[i], w[i], wx[i], L[i]
        slx = sumlx - wxi * li
        sl2 = suml2 - wi * li * li
        new_l = rne_(xi * sl2 / slx, lo, hi)
        slx_new = slx + wxi * new_l
        sl2_new = sl2 + wi * new_l * new_l
        ok = (slx > 0) & (new_l != li) & ((sl2_new if guard_new else sl2) > 0)
        ok &= slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new
        rows.append(torch.where(ok, new_l, li))
        sumlx = torch.where(ok, slx_new, sumlx)
        suml2 = torch.where(ok, sl2_new, suml2)
        changed |= ok
    return torch.stack(rows), sumlx, suml2, changed.any()


def _coordinate_descent(x, w, wx, L, lo: int, hi: int, passes: int, guard_new: bool):
    """Up to ``passes`` passes of :func:`_descent_pass`; returns (L, sumlx, suml2)."""
    sumlx = colsum(wx * L)
    suml2 = colsum(w * L * L)
    for _ in range(passes):
        L, sumlx, suml2, changed = _descent_pass(x, w, wx, L, sumlx, suml2, lo, hi, guard_new)
        # A pass without changes is a fixed point for that group; stop once every group reached one.
        if not bool(changed):
            break
    return L, sumlx, suml2


def make_q3(x: torch.Tensor, nmax: int, max_passes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml ``make_q3_quants(do_rmse=true)`` per column: round at -nmax/max, then up to 5 passes of
    coordinate descent, each position in turn moving to its best level if that raises the x^2-weighted
    fit ``sumlx^2/suml2``. Returns (scale (G,), L + nmax (n, G))."""
    mx = abs_max_signed(x, dim=0)
    zero = mx.abs() < EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    L = rne_(x * (-nmax / mx), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    L, sumlx, suml2 = _coordinate_descent(x, w, wx, L, -nmax, nmax - 1, max_passes, guard_new=True)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    L = L.add_(nmax).masked_fill_(zero, 0)
    return scale.masked_fill(zero, 0), L


def make_qp(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml ``make_qp_quants`` per column: non-negative ``x ~ scale * L``, L in 0..nmax (used for the
    sub-block scales and mins of the importance-weighted K quantizers). Tries 8 inverse scales around
    nmax/max, then up to 5 coordinate-descent passes on the w-weighted fit. Returns (scale (G,), L)."""
    mx = x.amax(0).clamp(min=0)
    zero = mx < EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    iscale = nmax / mx

    def mse(isc, clamp_hi):
        lv = torch.round(isc * x)
        lv = lv.clamp(0, nmax) if clamp_hi else lv.clamp(min=0)
        return lv, colsum((x - (1 / isc) * lv).square_().mul_(w))

    _, best = mse(iscale, False)
    for i in range(-4, 5):
        if i == 0:
            continue
        cand = _f32(_f32(_f32(0.1) * i) + nmax) / mx
        _, err = mse(cand, True)
        better = err < best
        best = torch.where(better, err, best)
        iscale = torch.where(better, cand, iscale)
    L = rne_(iscale * x, 0, nmax)
    wx = w * x
    L, sumlx, suml2 = _coordinate_descent(x, w, wx, L, 0, nmax, 5, guard_new=False)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    return scale.masked_fill(zero, 0), L.masked_fill_(zero, 0)


def abs_max_signed(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """The value with the largest magnitude along ``dim`` (the first on ties, as ggml's loops).

    ``dim=-1``: (n, k) -> (n, 1). ``dim=0``: (n, G) -> (G,), scanned row by row because argmax across
    rows is slow in torch."""
    if dim == -1:
        return x.gather(-1, x.abs().argmax(-1, keepdim=True))
    best, best_abs = x[0].clone(), x[0].abs()
    for row in x[1:]:
        a = row.abs()
        take = a > best_abs
        best = torch.where(take, row, best)
        best_abs = torch.maximum(a, best_abs)
    return best
