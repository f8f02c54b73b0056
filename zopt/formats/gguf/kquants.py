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

import torch
from gguf.constants import GGMLQuantizationType

from ...ggml import f16_value
from .base import GGMLType, f16_bytes, pack_nibbles
from .compile import kernel
from .search import EPS, abs_max_signed, colsum, make_q3, make_qkx2, make_qp, make_qx, rne_


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


def _bits_over_32(bits: torch.Tensor, nplanes: int) -> torch.Tensor:
    """(B, nplanes*32) 0/1 -> (B, 32): byte l holds bit (32p + l) in bit p."""
    b = bits.reshape(-1, nplanes, 32)
    out = b[:, 0].clone()
    for p in range(1, nplanes):
        out |= b[:, p] << p
    return out


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and mins (B, 8) -> the 12-byte Q4_K/Q5_K layout (get_scale_min_k4)."""
    lo_s, hi_s, lo_m, hi_m = ls[:, :4], ls[:, 4:], lm[:, :4], lm[:, 4:]
    return torch.cat([lo_s | ((hi_s >> 4) << 6), lo_m | ((hi_m >> 4) << 6), pack_nibbles(hi_s, hi_m)], dim=1)


def _requantize(x, d_sub, L_search, lo, hi, offset=None):
    """Round columns x against the stored sub-scales d_sub (G,); columns whose scale is zero keep the
    search's L (ggml skips them)."""
    v = x if offset is None else x + offset
    L = rne_(v.div_(d_sub) if offset is not None else x / d_sub, lo, hi)
    return torch.where(d_sub == 0, L_search, L)


# ---------------------------------------------------------------------------------------------
# Types with a scale and a min per sub-block: Q4_K, Q5_K, Q2_K


def _scale_min_superblock(blocks, sub, nmax, scale_bits, params, weights, qw=None, sigma_factor=2):
    """Shared Q4_K/Q5_K/Q2_K path. Returns d bytes, dmin bytes, scale codes, min codes, L (B, 256).

    Without importance ``qw`` this is ggml's reference quantizer: ``make_qkx2_quants`` with ``params``
    (rmin, rdelta, nstep, use_mad) and ``weights(x)``; sub-scales/mins rounded against their maxima.
    With ``qw`` (B, 256) it is ggml's importance-matrix quantizer: weights ``qw*sqrt(sigma2 + x^2)``,
    ``make_qkx3_quants`` (-0.9, 0.05, 36 steps, squared error) and ``make_qp_quants`` for the 6-/4-bit
    sub-scales and mins."""
    B = blocks.shape[0]
    xc = _columns(blocks, sub)
    qmax = (1 << scale_bits) - 1
    if qw is None:
        scales, mins, L = make_qkx2(xc, weights(xc), nmax, *params)
        return _codes_and_requantize(xc, scales, mins, L, 256 // sub, nmax, qmax)
    wc = _columns(_sigma_weights(blocks, qw, sigma_factor), sub)
    scales, mins, L = make_qkx2(xc, wc, nmax, -0.9, 0.05, 36, False)
    sw = colsum(wc).reshape(B, -1).t()
    d_block, ls = make_qp(scales.reshape(B, -1).t().contiguous(), sw, qmax)
    m_block, lm = make_qp(mins.reshape(B, -1).t().contiguous(), sw, qmax)
    ls, lm = ls.t(), lm.t()
    d_b, dmin_b = f16_bytes(d_block), f16_bytes(m_block)
    d_sub = (f16_value(d_b) * ls).reshape(-1)
    m_sub = (f16_value(dmin_b) * lm).reshape(-1)
    L = _rows(_requantize(xc, d_sub, L, 0, nmax, offset=m_sub))
    return d_b, dmin_b, ls.to(torch.uint8), lm.to(torch.uint8), L


def _codes_and_requantize(xc, scales, mins, L, per: int, nmax: int, qmax: int):
    """ggml's reference path after the search: sub-scales/mins rounded against their maxima to
    ``qmax`` codes, fp16 super-block d/dmin, weights re-rounded against the stored values."""
    dh, mh, ls, lm, d_sub, m_sub = _scale_min_codes(scales, mins, per, qmax)
    L = _rows(_requantize_kernel(xc, d_sub, L, 0, nmax, m_sub))
    return f16_bytes(dh), f16_bytes(mh), ls.to(torch.uint8), lm.to(torch.uint8), L


@kernel
def _scale_min_codes(scales, mins, per: int, qmax: int):
    # Two kernels, not one: per-block work on (B, per) and per-weight work on (n, G) each vectorize;
    # fused, the index arithmetic between the two layouts made inductor emit scalar loops.
    scales, mins = scales.reshape(-1, per), mins.reshape(-1, per)
    # ggml's running maxima start at +0: an all-zero block stores +0, never -0 (clamp would keep -0)
    max_scale, max_min = scales.amax(-1, keepdim=True), mins.amax(-1, keepdim=True)
    max_scale = torch.where(max_scale > 0, max_scale, torch.zeros_like(max_scale))
    max_min = torch.where(max_min > 0, max_min, torch.zeros_like(max_min))
    # torch.reciprocal(m) * qmax is what eager ``qmax / m`` computes
    inv_s = torch.where(max_scale > 0, torch.reciprocal(max_scale) * qmax, torch.zeros_like(max_scale))
    inv_m = torch.where(max_min > 0, torch.reciprocal(max_min) * qmax, torch.zeros_like(max_min))
    ls = rne_(inv_s * scales, 0, qmax)
    lm = rne_(inv_m * mins, 0, qmax)
    # (round to half and use .float() rather than re-reading stored bytes: a dtype view of a
    # computed uint8 tensor is not reliably compiled)
    dh, mh = (max_scale / qmax).to(torch.float16), (max_min / qmax).to(torch.float16)
    return dh, mh, ls, lm, (dh.float() * ls).reshape(-1), (mh.float() * lm).reshape(-1)


@kernel
def _requantize_kernel(x, d_sub, L_search, lo: int, hi: int, offset=None):
    return _requantize(x, d_sub, L_search, lo, hi, offset)


def _sigma_weights(blocks, qw, factor):
    # ggml's importance weighting: qw * sqrt(sigma2 + x^2), sigma2 = factor * mean(x^2) of the super-block
    sigma2 = factor * (blocks * blocks).sum(-1, keepdim=True) / blocks.shape[1]
    return qw * torch.sqrt(sigma2 + blocks * blocks)


@kernel
def _weights_rms_plus_abs(xc):
    # Q4_K/Q5_K reference: w = rms(sub-block) + |x|
    return torch.sqrt(colsum(xc * xc) / xc.shape[0]) + xc.abs()


@kernel
def _q4_k_pack(d, dmin, ls, lm, L):
    q = L.reshape(-1, 4, 2, 32)
    return torch.cat([d, dmin, _pack_scales_k4(ls, lm), pack_nibbles(q[:, :, 0], q[:, :, 1]).reshape(-1, 128)], 1)


@kernel
def _q5_k_pack(d, dmin, ls, lm, L):
    qh = _bits_over_32(L >> 4, 8)
    q = (L & 0x0F).reshape(-1, 4, 2, 32)
    ql = pack_nibbles(q[:, :, 0], q[:, :, 1]).reshape(-1, 128)
    return torch.cat([d, dmin, _pack_scales_k4(ls, lm), qh, ql], 1)


@kernel
def _q2_k_pack(d, dmin, ls, lm, L):
    return torch.cat([ls | (lm << 4), _pack_2bit(L), d, dmin], 1)


class Q4_K(GGMLType, qtype=GGMLQuantizationType.Q4_K):
    """d, dmin (fp16), 12 bytes of 6-bit sub-scales/mins, 128 bytes of 4-bit weights: 4.5 bits/weight."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, row_ms=None):
        return _q4_k_pack(*_scale_min_superblock(blocks, 32, 15, 6, (-1.0, 0.1, 20, False), _weights_rms_plus_abs, qw))


class Q5_K(GGMLType, qtype=GGMLQuantizationType.Q5_K):
    """As Q4_K with a fifth bit per weight in 32 bytes of bit planes (bit s = sub-block s): 5.5 bits/weight."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, row_ms=None):
        return _q5_k_pack(*_scale_min_superblock(blocks, 32, 31, 6, (-0.5, 0.1, 15, False), _weights_rms_plus_abs, qw))


class Q2_K(GGMLType, qtype=GGMLQuantizationType.Q2_K):
    """16 bytes of 4-bit scale|min codes, 64 bytes of 2-bit weights, d, dmin (fp16): 2.625 bits/weight."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, row_ms=None):
        return _q2_k_pack(*_scale_min_superblock(blocks, 16, 3, 4, (-0.5, 0.1, 15, True), torch.abs, qw, 1))


# ---------------------------------------------------------------------------------------------
# Symmetric types: Q6_K, Q3_K


def _q6_k_pack(xc, scales, L):
    """Q6_K after the search: int8 sub-scales against the largest, fp16 d, re-rounding, packing
    (three kernels: per-block, per-weight in the column layout, per-block packing)."""
    dh, sc, zero, d_sub = _q6_k_scales(scales)
    L = _rows(_requantize_kernel(xc, d_sub, L - 32, -32, 31) + 32)
    return _q6_k_bytes(L, dh, sc, zero)


@kernel
def _q6_k_scales(scales):
    scales = scales.reshape(-1, 16)
    max_scale = abs_max_signed(scales)
    zero = max_scale.abs() < EPS
    iscale = torch.reciprocal(torch.where(zero, torch.ones_like(max_scale), max_scale)) * -128  # -128 / max
    dh = torch.reciprocal(iscale).to(torch.float16)
    sc = rne_(iscale * scales, -128, 127)
    return dh, sc, zero, (dh.float() * sc).reshape(-1)


@kernel
def _q6_k_bytes(L, dh, sc, zero):
    B = L.shape[0]
    q = L.reshape(B, 2, 4, 32)
    ql = pack_nibbles(q[:, :, 0:2], q[:, :, 2:4]).reshape(B, 128)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    out = torch.cat([ql, qh.reshape(B, 64), sc.to(torch.int8).view(torch.uint8), f16_bytes(dh)], 1)
    return out.masked_fill(zero, 0)  # ggml memsets all-zero blocks


class Q6_K(GGMLType, qtype=GGMLQuantizationType.Q6_K):
    """128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 sub-scales, fp16 d: 6.5625 bits/weight."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, row_ms=None):
        # With importance, ggml fits each sub-block with qw itself as the weights (instead of x^2).
        xc = _columns(blocks, 16)
        scales, L = make_qx(xc, 32, None if qw is None else _columns(qw, 16))
        return _q6_k_pack(xc, scales, L)


@kernel
def _q3_k_codes(scales):
    """Q3_K reference path: 6-bit sub-scale codes against the largest sub-scale, and fp16 d."""
    scales = scales.reshape(-1, 16)
    max_scale = abs_max_signed(scales)
    nonzero = max_scale != 0
    iscale = torch.reciprocal(torch.where(nonzero, max_scale, torch.ones_like(max_scale))) * -32  # -32 / max
    codes = (rne_(iscale * scales, -32, 31) + 32).masked_fill(~nonzero, 0)
    return codes, torch.where(nonzero, torch.reciprocal(iscale), torch.zeros_like(iscale)).to(torch.float16)


def _q3_k_pack(xc, L, codes, dh):
    """Q3_K after the scales (``dh``: fp16 d (B, 1)): re-round against the stored sub-scales, pack."""
    d_sub = (dh.float() * (codes - 32)).reshape(-1)
    return _q3_k_bytes(_rows(_requantize_kernel(xc, d_sub, L - 4, -4, 3) + 4), codes, dh)


@kernel
def _q3_k_bytes(L, codes, dh):
    B = codes.shape[0]
    high = L >> 2  # L in 0..7: bit 2 goes to the mask, the low two bits to qs
    hmask = _bits_over_32(high, 8)
    qs = _pack_2bit(L & 3)
    c = codes.to(torch.uint8)
    ch = (c >> 4).reshape(B, 4, 4)
    sb = torch.cat([pack_nibbles(c[:, :8], c[:, 8:]),
                    ch[:, 0] | (ch[:, 1] << 2) | (ch[:, 2] << 4) | (ch[:, 3] << 6)], 1)
    return torch.cat([hmask, qs, sb, f16_bytes(dh)], 1)


class Q3_K(GGMLType, qtype=GGMLQuantizationType.Q3_K):
    """32 bytes high-bit mask, 64 bytes 2-bit low parts, 12 bytes 6-bit sub-scales, fp16 d: 3.4375 bits/weight."""

    chunk_weights = 1 << 20  # the coordinate descent works on one value per sub-block: larger passes pay

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, row_ms=None):
        B = blocks.shape[0]
        xc = _columns(blocks, 16)
        if qw is None:
            scales, L = make_q3(xc, 4)
            codes, dh = _q3_k_codes(scales)
        else:
            # ggml's importance path: weighted make_qx_quants for the weights and for the 16 sub-scales
            wc = _columns(_sigma_weights(blocks, qw, 2), 16)
            scales, L = make_qx(xc, 4, wc)
            sw = colsum(wc).reshape(B, 16).t()
            d_block, codes = make_qx(scales.reshape(B, 16).t().contiguous(), 32, sw)
            codes = codes.t()
            dh = d_block.reshape(-1, 1).to(torch.float16)
        return _q3_k_pack(xc, L, codes, dh)

