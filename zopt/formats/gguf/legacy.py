"""GGML float and legacy types (F32, F16, BF16; Q8_0, Q5_1, Q5_0, Q4_1, Q4_0): the quantizers.

Arithmetic is float32 in the same operation order as ggml's reference C code (and gguf-py, which
mimics it), so these give the same bytes as ``gguf.quants.quantize``. Defining a class registers it
(:mod:`.base`); decoding is :mod:`zopt.ggml`'s.
"""

from __future__ import annotations

import torch
from gguf.constants import GGMLQuantizationType

from .base import GGMLType, f16_bytes, pack_bits_le, pack_nibbles, safe_inverse
from .compile import kernel
from .search import abs_max_signed, make_qkx2, make_qx

# ---------------------------------------------------------------------------------------------
# Float types


class F32(GGMLType, qtype=GGMLQuantizationType.F32):
    @classmethod
    def quantize_blocks(cls, blocks, qw=None, row_ms=None):
        return blocks.float().contiguous().view(torch.uint8).reshape(-1, 4)


class F16(GGMLType, qtype=GGMLQuantizationType.F16):
    @classmethod
    def quantize_blocks(cls, blocks, qw=None, row_ms=None):
        return f16_bytes(blocks)


class BF16(GGMLType, qtype=GGMLQuantizationType.BF16):
    @classmethod
    def quantize_blocks(cls, blocks, qw=None, row_ms=None):
        # ggml_compute_fp32_to_bf16: NaN forced quiet (sign and top mantissa bits kept), else round to
        # nearest even on the upper 16 bits. int32 cannot overflow here: non-NaN magnitudes stop at
        # 0x7F800000 and at most 0x8000 is added; the low 16 bits of an arithmetic shift are exact.
        n = blocks.float().contiguous().view(torch.int32)
        nan = (n & 0x7FFFFFFF) > 0x7F800000
        n = torch.where(nan, (n & -65536) | (64 << 16), n)
        n = (n + (0x7FFF + ((n >> 16) & 1))) >> 16
        return n.to(torch.int16).view(torch.uint8).reshape(-1, 2)


# ---------------------------------------------------------------------------------------------
# Legacy round-to-nearest types (32 weights per block)
#
# Under an importance matrix ggml replaces rounding by weighted searches (weights
# qw * sqrt(mean square of the row + x^2)): make_qx_quants for Q4_0/Q5_0, make_qkx3_quants for Q4_1/Q5_1.


def _weighted_symmetric(blocks, qw, row_ms, nmax):
    w = qw * torch.sqrt(row_ms + blocks * blocks)
    d, L = make_qx(blocks.t().contiguous(), nmax, w.t().contiguous())
    return d.reshape(-1, 1), L.t().to(torch.uint8)


def _weighted_min_max(blocks, qw, row_ms, nmax):
    w = qw * torch.sqrt(row_ms + blocks * blocks)
    d, the_min, L = make_qkx2(blocks.t().contiguous(), w.t().contiguous(), nmax, -0.9, 0.05, 36, False)
    return d.reshape(-1, 1), -the_min.reshape(-1, 1), L.t().to(torch.uint8)


# The round-to-nearest quantizers, one fused kernel each when compiled (see ggml_compile).


@kernel
def _q8_0(blocks):
    d = blocks.abs().amax(-1, keepdim=True) / 127
    v = blocks * safe_inverse(d)
    a = v.abs()
    fl = a.floor()
    # roundf without the float error of floor(a + 0.5): add 1 when the fraction is >= 0.5
    q = torch.sign(v) * (fl + (2 * (a - fl)).floor())
    return torch.cat([f16_bytes(d), q.to(torch.int8).view(torch.uint8)], dim=1)


@kernel
def _q4_0(blocks):
    d = abs_max_signed(blocks) / -8
    q = torch.trunc(blocks * safe_inverse(d) + 8.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([f16_bytes(d), pack_nibbles(q[:, :16], q[:, 16:])], dim=1)


@kernel
def _q4_1(blocks):
    mn = blocks.amin(-1, keepdim=True)
    d = (blocks.amax(-1, keepdim=True) - mn) / 15
    q = torch.trunc((blocks - mn) * safe_inverse(d) + 0.5).clamp(0, 15).to(torch.uint8)
    return torch.cat([f16_bytes(d), f16_bytes(mn), pack_nibbles(q[:, :16], q[:, 16:])], dim=1)


@kernel
def _q5_0(blocks):
    d = abs_max_signed(blocks) / -16
    q = torch.trunc(blocks * safe_inverse(d) + 16.5).clamp(0, 31).to(torch.uint8)
    return torch.cat([f16_bytes(d), pack_bits_le(q >> 4), pack_nibbles(q[:, :16], q[:, 16:])], dim=1)


@kernel
def _q5_1(blocks):
    mn = blocks.amin(-1, keepdim=True)
    d = (blocks.amax(-1, keepdim=True) - mn) / 31
    q = torch.trunc((blocks - mn) * safe_inverse(d) + 0.5).clamp(0, 31).to(torch.uint8)
    return torch.cat([f16_bytes(d), f16_bytes(mn), pack_bits_le(q >> 4), pack_nibbles(q[:, :16], q[:, 16:])],
                     dim=1)


class Q8_0(GGMLType, qtype=GGMLQuantizationType.Q8_0):
    """fp16 scale d = amax/127, then 32 int8 values round(x/d) (half away from zero, like roundf)."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, row_ms=None):
        return _q8_0(blocks)


class Q4_0(GGMLType, qtype=GGMLQuantizationType.Q4_0):
    """fp16 d = (value of largest magnitude)/-8; q = trunc(x/d + 8.5) in 0..15; first half in low nibbles."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, row_ms=None):
        if qw is None:
            return _q4_0(blocks)
        d, q = _weighted_symmetric(blocks, qw, row_ms, 8)
        return torch.cat([f16_bytes(d), pack_nibbles(q[:, :16], q[:, 16:])], dim=1)


class Q4_1(GGMLType, qtype=GGMLQuantizationType.Q4_1):
    """fp16 d = (max-min)/15 and m = min; q = trunc((x-min)/d + 0.5) in 0..15."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, row_ms=None):
        if qw is None:
            return _q4_1(blocks)
        d, mn, q = _weighted_min_max(blocks, qw, row_ms, 15)
        return torch.cat([f16_bytes(d), f16_bytes(mn), pack_nibbles(q[:, :16], q[:, 16:])], dim=1)


class Q5_0(GGMLType, qtype=GGMLQuantizationType.Q5_0):
    """Like Q4_0 with 5 bits: d = max/-16, q in 0..31; the 32 fifth bits form a little-endian uint32."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, row_ms=None):
        if qw is None:
            return _q5_0(blocks)
        d, q = _weighted_symmetric(blocks, qw, row_ms, 16)
        return torch.cat([f16_bytes(d), pack_bits_le(q >> 4), pack_nibbles(q[:, :16], q[:, 16:])], dim=1)


class Q5_1(GGMLType, qtype=GGMLQuantizationType.Q5_1):
    """Like Q4_1 with 5 bits: d = (max-min)/31, m = min, fifth bits in a little-endian uint32."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, row_ms=None):
        if qw is None:
            return _q5_1(blocks)
        d, mn, q = _weighted_min_max(blocks, qw, row_ms, 31)
        return torch.cat([f16_bytes(d), f16_bytes(mn), pack_bits_le(q >> 4), pack_nibbles(q[:, :16], q[:, 16:])],
                         dim=1)
