"""GGML K-quants (256-weight super-blocks) in torch, following ggml's reference quantizers.

ggml's ``quantize_row_*_K_ref`` loop over blocks in C; here every step of their per-block searches
runs on all blocks of a tensor at once (the loops that remain are over search steps or the 16
positions of a sub-block, never over blocks):

* Q4_K, Q5_K: 8 sub-blocks of 32 with a scale and a min each, fitted by ``make_qkx2_quants``
  (weighted least squares over a grid of candidate scales); 6-bit sub-scales/mins against fp16
  super-block ``d``/``dmin``, then the weights are re-rounded against the stored scales.
* Q2_K: 16 sub-blocks of 16, 2-bit weights, ``make_qkx2_quants`` with absolute-error search; 4-bit
  sub-scales/mins.
* Q6_K: 16 sub-blocks of 16, symmetric 6-bit weights, scale from ``make_qx_quants`` (x^2-weighted
  fit over 19 candidate scales); int8 sub-scales.
* Q3_K: 16 sub-blocks of 16, symmetric 3-bit weights, scale from ``make_q3_quants`` (coordinate
  descent on the x^2-weighted fit); 6-bit sub-scales.

Float arithmetic is float32 in the C code's operation order, except where noted.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf.constants import GGMLQuantizationType

from .ggml_quants import GGMLType, abs_max_signed, f16_bytes, f16_value, pack_nibbles

_EPS = 1e-15  # GROUP_MAX_EPS: a group whose largest magnitude is below this is all zero


def _f32(v: float) -> float:
    """A Python float holding exactly the float32 value C would compute."""
    return float(np.float32(v))


# ---------------------------------------------------------------------------------------------
# The per-group searches. Groups are columns: x is (n, G) with one group of n weights per column, so
# per-group sums are row additions and per-group scalars broadcast along rows (both vectorize well).

def rne_(t: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """In place: round half to even (what ggml's nearest_int does) and clamp to [lo, hi] (integers)."""
    return t.round_().clamp_(lo, hi)


def make_qkx2(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int,
              use_mad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml ``make_qkx2_quants`` on every column: (scale (G,), min (G,) >= 0, L (n, G) in 0..nmax).

    A group is approximated by ``scale * L - min``; candidate inverse scales
    ``(nmax + rmin + rdelta*i) / (max - min)`` are tried and the weighted least-squares (scale, min)
    kept when it lowers the weighted squared (or absolute, ``use_mad``) error.
    """
    mn = x.amin(0).clamp_(max=0)
    mx = x.amax(0)
    wx = w * x
    sum_w, sum_x = w.sum(0), wx.sum(0)
    flat = mx == mn
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)  # flat groups are zeroed at the end

    iscale = nmax / rng
    scale = 1 / iscale
    L = rne_(iscale * (x - mn), 0, nmax)
    diff = (scale * L).add_(mn).sub_(x)
    best_err = (diff.abs_() if use_mad else diff.square_()).mul_(w).sum(0)
    if not use_mad:
        # Squared error from the sums alone, in float64 so the expansion's cancellation stays harmless.
        sum_wx2 = (wx * x).sum(0).double()
        sw64, sx64 = sum_w.double(), sum_x.double()
    won_mn, won_iscale = mn.clone(), iscale.clone()  # what the winning candidate rounded with
    laux, tmp = torch.empty_like(x), torch.empty_like(x)

    for step in range(nstep + 1):
        cand = _f32(_f32(rmin + _f32(_f32(rdelta) * step)) + nmax) / rng
        rne_(torch.sub(x, mn, out=laux).mul_(cand), 0, nmax)
        wl = torch.mul(w, laux, out=tmp)
        sum_l = wl.sum(0)
        sum_xl = (wl * x).sum(0)
        sum_l2 = wl.mul_(laux).sum(0)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        if use_mad:
            err = torch.mul(laux, this_scale, out=tmp).add_(this_min).sub_(x).abs_().mul_(w).sum(0)
        else:
            s, m = this_scale.double(), this_min.double()
            err = (s * s * sum_l2.double() + 2 * s * m * sum_l.double() - 2 * s * sum_xl.double()
                   + m * m * sw64 - 2 * m * sx64 + sum_wx2).float()
        better = (D > 0) & (err < best_err) & ~flat
        best_err = torch.where(better, err, best_err)
        won_mn = torch.where(better, mn, won_mn)
        won_iscale = torch.where(better, cand, won_iscale)
        scale = torch.where(better, this_scale, scale)
        # ggml moves the group's min as soon as a better fit is found; later candidates use it
        mn = torch.where(better, this_min, mn)
        rng = torch.where(better, mx - mn, rng)

    # Re-derive the winner's rounding once instead of carrying L through every step.
    L = rne_(torch.sub(x, won_mn, out=laux).mul_(won_iscale), 0, nmax)
    L.masked_fill_(flat, 0)
    scale = scale.masked_fill(flat, 0)
    return scale, -mn, L


def make_qx(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml ``make_qx_quants(rmse_type=1)``: symmetric ``x ~ scale * L``, L in -nmax..nmax-1 per column.

    Tries inverse scales ``-(nmax + 0.1 i)/max`` for i in -9..9 and keeps the x^2-weighted
    least-squares scale that fits best. Returns (scale (G,), L + nmax (n, G)).
    """
    mx = abs_max_signed(x, dim=0)
    zero = mx.abs() < _EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x
    wx = w * x
    lv, tmp = torch.empty_like(x), torch.empty_like(x)

    def fit(iscale):
        rne_(torch.mul(x, iscale, out=lv), -nmax, nmax - 1)
        sumlx = torch.mul(wx, lv, out=tmp).sum(0)
        suml2 = torch.mul(w, lv, out=tmp).mul_(lv).sum(0)
        return sumlx, suml2

    L = torch.empty_like(x)
    sumlx, suml2 = fit(-nmax / mx)
    L.copy_(lv)
    scale = torch.where(suml2 != 0, sumlx / suml2, torch.zeros_like(sumlx))
    best = scale * sumlx
    for i in range(-9, 10):
        if i == 0:
            continue
        slx, sl2 = fit(-_f32(nmax + _f32(_f32(0.1) * i)) / mx)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        if bool(better.any()):
            L = torch.where(better, lv, L)
            scale = torch.where(better, slx / sl2, scale)
            best = torch.where(better, scale * slx, best)
    L.masked_fill_(zero, -nmax)
    return scale.masked_fill(zero, 0), L.add_(nmax)


def make_q3(x: torch.Tensor, nmax: int, max_passes: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml ``make_q3_quants(do_rmse=true)`` per column: round at -nmax/max, then up to 5 passes of
    coordinate descent, each position in turn moving to its best level if that raises the x^2-weighted
    fit ``sumlx^2/suml2``. Returns (scale (G,), L + nmax (n, G))."""
    mx = abs_max_signed(x, dim=0)
    zero = mx.abs() < _EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)
    L = rne_(x * (-nmax / mx), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = (wx * L).sum(0)
    suml2 = (w * L * L).sum(0)
    for _ in range(max_passes):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[0]):
            xi, wi, wxi, li = x[i], w[i], wx[i], L[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new_l = rne_(xi * sl2 / slx, -nmax, nmax - 1)
            slx_new = slx + wxi * new_l
            sl2_new = sl2 + wi * new_l * new_l
            ok = (slx > 0) & (new_l != li) & (sl2_new > 0) & (slx_new * slx_new * suml2 > sumlx * sumlx * sl2_new)
            L[i] = torch.where(ok, new_l, li)
            sumlx = torch.where(ok, slx_new, sumlx)
            suml2 = torch.where(ok, sl2_new, suml2)
            changed |= ok
        # A pass without changes is a fixed point for that group; stop once every group reached one.
        if not bool(changed.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    L.add_(nmax).masked_fill_(zero, 0)
    return scale.masked_fill(zero, 0), L


def _columns(blocks: torch.Tensor, sub: int) -> torch.Tensor:
    """(B, 256) -> (sub, B * 256/sub): one sub-block per column."""
    return blocks.reshape(-1, sub).t().contiguous()


def _rows(cols: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_columns`, as uint8 (B, 256)."""
    return cols.t().to(torch.uint8).reshape(-1, 256)


# ---------------------------------------------------------------------------------------------
# Bit packing shared by the K types


def _pack_2bit(L: torch.Tensor) -> torch.Tensor:
    """(B, 256) values 0..3 -> (B, 64): byte 32c+l holds L[128c + 32k + l] in bits 2k..2k+1."""
    q = L.reshape(-1, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(-1, 64)


def _unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_2bit`: (B, 64) -> (B, 256) uint8."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device).view(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 256)


def _bits_over_32(bits: torch.Tensor, nplanes: int) -> torch.Tensor:
    """(B, nplanes*32) 0/1 -> (B, 32): byte l holds bit (32p + l) in bit p."""
    b = bits.reshape(-1, nplanes, 32)
    out = b[:, 0].clone()
    for p in range(1, nplanes):
        out |= b[:, p] << p
    return out


def _unbits_over_32(packed: torch.Tensor, nplanes: int) -> torch.Tensor:
    """Inverse of :func:`_bits_over_32`: (B, 32) -> (B, nplanes*32) uint8 0/1."""
    shifts = torch.arange(nplanes, dtype=torch.uint8, device=packed.device).view(1, nplanes, 1)
    return ((packed.unsqueeze(1) >> shifts) & 1).reshape(packed.shape[0], -1)


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins (B, 8) -> the 12-byte Q4_K/Q5_K layout (get_scale_min_k4)."""
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    return torch.cat([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), pack_nibbles(hi_s, hi_m)], dim=1)


def _unpack_scales_k4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes (B, 12) -> (scales (B, 8), mins (B, 8)) as uint8."""
    d, m, md = b[:, 0:4], b[:, 4:8], b[:, 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return sc, mn


def _requantize(x, d_sub, L_search, lo, hi, offset=None):
    """Round columns x against the stored sub-scales d_sub (G,); columns whose scale is zero keep the
    search's L (ggml skips them)."""
    v = x if offset is None else x + offset
    L = rne_(v.div_(d_sub) if offset is not None else x / d_sub, lo, hi)
    return torch.where(d_sub == 0, L_search, L)


# ---------------------------------------------------------------------------------------------
# Types with a scale and a min per sub-block: Q4_K, Q5_K, Q2_K


def _scale_min_superblock(blocks, sub, nmax, rmin, rdelta, nstep, use_mad, weights, scale_bits):
    """Shared Q4_K/Q5_K/Q2_K path. Returns d bytes, dmin bytes, scale codes, min codes, L (B, 256)."""
    B = blocks.shape[0]
    xc = _columns(blocks, sub)
    scales, mins, L = make_qkx2(xc, weights(xc), nmax, rmin, rdelta, nstep, use_mad)
    scales, mins = scales.reshape(B, -1), mins.reshape(B, -1)
    qmax = (1 << scale_bits) - 1
    max_scale = scales.amax(-1, keepdim=True).clamp(min=0)
    max_min = mins.amax(-1, keepdim=True).clamp(min=0)
    inv_s = torch.where(max_scale > 0, qmax / max_scale, torch.zeros_like(max_scale))
    inv_m = torch.where(max_min > 0, qmax / max_min, torch.zeros_like(max_min))
    ls = rne_(inv_s * scales, 0, qmax)
    lm = rne_(inv_m * mins, 0, qmax)
    d_b, dmin_b = f16_bytes(max_scale / qmax), f16_bytes(max_min / qmax)
    d_sub = (f16_value(d_b) * ls).reshape(-1)
    m_sub = (f16_value(dmin_b) * lm).reshape(-1)
    L = _rows(_requantize(xc, d_sub, L, 0, nmax, offset=m_sub))
    return d_b, dmin_b, ls.to(torch.uint8), lm.to(torch.uint8), L


def _weights_rms_plus_abs(xc):
    # Q4_K/Q5_K reference: w = rms(sub-block) + |x|
    return torch.sqrt((xc * xc).sum(0) / xc.shape[0]) + xc.abs()


class Q4_K(GGMLType, qtype=GGMLQuantizationType.Q4_K):
    """d, dmin (fp16), 12 bytes of 6-bit sub-scales/mins, 128 bytes of 4-bit weights: 4.5 bits/weight."""

    @classmethod
    def quantize_blocks(cls, blocks):
        d, dmin, ls, lm, L = _scale_min_superblock(blocks, 32, 15, -1.0, 0.1, 20, False, _weights_rms_plus_abs, 6)
        q = L.reshape(-1, 4, 2, 32)
        return torch.cat([d, dmin, _pack_scales_k4(ls, lm), pack_nibbles(q[:, :, 0], q[:, :, 1]).reshape(-1, 128)], 1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        sc, mn = _unpack_scales_k4(blocks[:, 4:16])
        qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
        q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)
        d = (f16_value(blocks[:, 0:2]) * sc.float()).unsqueeze(-1)
        m = (f16_value(blocks[:, 2:4]) * mn.float()).unsqueeze(-1)
        return (d * q.float() - m).reshape(-1, 256)


class Q5_K(GGMLType, qtype=GGMLQuantizationType.Q5_K):
    """As Q4_K with a fifth bit per weight in 32 bytes of bit planes (bit s = sub-block s): 5.5 bits/weight."""

    @classmethod
    def quantize_blocks(cls, blocks):
        d, dmin, ls, lm, L = _scale_min_superblock(blocks, 32, 31, -0.5, 0.1, 15, False, _weights_rms_plus_abs, 6)
        qh = _bits_over_32(L >> 4, 8)
        q = (L & 0x0F).reshape(-1, 4, 2, 32)
        ql = pack_nibbles(q[:, :, 0], q[:, :, 1]).reshape(-1, 128)
        return torch.cat([d, dmin, _pack_scales_k4(ls, lm), qh, ql], 1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        sc, mn = _unpack_scales_k4(blocks[:, 4:16])
        qs = blocks[:, 48:].reshape(-1, 4, 1, 32)
        q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 256) | (_unbits_over_32(blocks[:, 16:48], 8) << 4)
        d = (f16_value(blocks[:, 0:2]) * sc.float()).unsqueeze(-1)
        m = (f16_value(blocks[:, 2:4]) * mn.float()).unsqueeze(-1)
        return (d * q.reshape(-1, 8, 32).float() - m).reshape(-1, 256)


class Q2_K(GGMLType, qtype=GGMLQuantizationType.Q2_K):
    """16 bytes of 4-bit scale|min codes, 64 bytes of 2-bit weights, d, dmin (fp16): 2.625 bits/weight."""

    @classmethod
    def quantize_blocks(cls, blocks):
        d, dmin, ls, lm, L = _scale_min_superblock(blocks, 16, 3, -0.5, 0.1, 15, True, torch.abs, 4)
        return torch.cat([ls | (lm << 4), _pack_2bit(L), d, dmin], 1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        sc = blocks[:, :16]
        d = (f16_value(blocks[:, 80:82]) * (sc & 0x0F).float()).unsqueeze(-1)
        m = (f16_value(blocks[:, 82:84]) * (sc >> 4).float()).unsqueeze(-1)
        q = _unpack_2bit(blocks[:, 16:80]).reshape(-1, 16, 16).float()
        return (d * q - m).reshape(-1, 256)


# ---------------------------------------------------------------------------------------------
# Symmetric types: Q6_K, Q3_K


class Q6_K(GGMLType, qtype=GGMLQuantizationType.Q6_K):
    """128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 sub-scales, fp16 d: 6.5625 bits/weight."""

    @classmethod
    def quantize_blocks(cls, blocks):
        B = blocks.shape[0]
        xc = _columns(blocks, 16)
        scales, L = make_qx(xc, 32)
        scales = scales.reshape(B, 16)
        max_scale = abs_max_signed(scales)
        zero = max_scale.abs() < _EPS
        iscale = -128 / torch.where(zero, torch.ones_like(max_scale), max_scale)
        d_b = f16_bytes(1 / iscale)
        sc = rne_(iscale * scales, -128, 127)
        d_sub = (f16_value(d_b) * sc).reshape(-1)
        L = _rows(_requantize(xc, d_sub, L.sub_(32), -32, 31).add_(32))
        q = L.reshape(B, 2, 4, 32)
        ql = pack_nibbles(q[:, :, 0:2], q[:, :, 2:4]).reshape(B, 128)
        qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
        out = torch.cat([ql, qh.reshape(B, 64), sc.to(torch.int8).view(torch.uint8), d_b], 1)
        return out.masked_fill_(zero, 0)  # ggml memsets all-zero blocks

    @classmethod
    def dequantize_blocks(cls, blocks):
        ql = blocks[:, :128].reshape(-1, 2, 1, 64)
        lo = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(-1, 2, 4, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).view(1, 1, 4, 1)
        hi = (blocks[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3
        q = ((lo | (hi << 4)).to(torch.int8) - 32).reshape(-1, 16, 16).float()
        d = (f16_value(blocks[:, 208:210]) * blocks[:, 192:208].view(torch.int8).float()).unsqueeze(-1)
        return (d * q).reshape(-1, 256)


class Q3_K(GGMLType, qtype=GGMLQuantizationType.Q3_K):
    """32 bytes high-bit mask, 64 bytes 2-bit low parts, 12 bytes 6-bit sub-scales, fp16 d: 3.4375 bits/weight."""

    @classmethod
    def quantize_blocks(cls, blocks):
        B = blocks.shape[0]
        xc = _columns(blocks, 16)
        scales, L = make_q3(xc, 4)
        scales = scales.reshape(B, 16)
        max_scale = abs_max_signed(scales)
        nonzero = max_scale != 0
        iscale = -32 / torch.where(nonzero, max_scale, torch.ones_like(max_scale))
        codes = (rne_(iscale * scales, -32, 31) + 32).masked_fill_(~nonzero, 0)
        d_b = f16_bytes(torch.where(nonzero, 1 / iscale, torch.zeros_like(iscale)))
        d_sub = (f16_value(d_b) * (codes - 32)).reshape(-1)
        L = _rows(_requantize(xc, d_sub, L.sub_(4), -4, 3).add_(4))
        high = L >> 2  # L in 0..7: bit 2 goes to the mask, the low two bits to qs
        hmask = _bits_over_32(high, 8)
        qs = _pack_2bit(L & 3)
        c = codes.to(torch.uint8)
        ch = (c >> 4).reshape(B, 4, 4)
        sb = torch.cat([pack_nibbles(c[:, :8], c[:, 8:]),
                        ch[:, 0] | (ch[:, 1] << 2) | (ch[:, 2] << 4) | (ch[:, 3] << 6)], 1)
        return torch.cat([hmask, qs, sb, d_b], 1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        sb = blocks[:, 96:108]
        lo = torch.cat([sb[:, :8] & 0x0F, sb[:, :8] >> 4], dim=1)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).view(1, 4, 1)
        hi = ((sb[:, 8:12].unsqueeze(1) >> shifts) & 3).reshape(-1, 16)
        sc = ((lo | (hi << 4)).to(torch.int8) - 32).float()
        d = (f16_value(blocks[:, 108:110]) * sc).unsqueeze(-1)
        high = _unbits_over_32(blocks[:, :32], 8)
        q = (_unpack_2bit(blocks[:, 32:96]) | (high << 2)).to(torch.int8) - 4
        return (d * q.reshape(-1, 16, 16).float()).reshape(-1, 256)
