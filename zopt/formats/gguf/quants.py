"""GGML block quantizers and dequantizers in torch, vectorized over all blocks at once.

Every GGML type is one small class keyed by gguf's ``GGMLQuantizationType``; block and byte sizes
come from the single table ``gguf.constants.GGML_QUANT_SIZES``. The legacy types (Q8_0, Q5_1, Q5_0,
Q4_1, Q4_0) and the float types live here; the K types (Q6_K ... Q2_K) in ``ggml_kquants``; ggml's
per-group searches in ``ggml_search``.

Public API::

    quantize(x, qtype, importance=None) -> uint8 tensor (*x.shape[:-1], row_bytes(qtype, x.shape[-1]))
    dequantize(data, qtype, shape, dtype=torch.float32) -> float tensor of ``shape``
    block_size(qtype), type_size(qtype), bits_per_weight(qtype), row_bytes(qtype, n_cols)

Arithmetic is float32 in the same operation order as ggml's reference C code (and gguf-py, which
mimics it), so the legacy types and BF16/F16 give the same bytes as ``gguf.quants.quantize``.
Everything runs on the tensor's own device (CPU or CUDA). Work proceeds in fixed-size chunks of
blocks (bounded temporaries, cache-sized passes); results do not depend on the chunking.
See docs/ggml-quants.md for layouts and what was verified against what.
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ...errors import ShapeMismatch, UnsupportedFormat
from .compile import enabled as compiling
from .compile import kernel
from .search import abs_max_signed, make_qkx2, make_qx

SUPPORTED: tuple[str, ...] = (
    "F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K",
)

_TYPES: dict[GGMLQuantizationType, type[GGMLType]] = {}
COMPILED_CHUNK_WEIGHTS = 1 << 20  # weights per kernel call when compiled (measured best of 2^18..2^21)


class GGMLType:
    """One GGML tensor type: ``block_size`` weights are stored in ``type_size`` bytes.

    Subclasses implement ``quantize_blocks`` (float32 ``(n, block_size)`` -> uint8 ``(n, type_size)``)
    and ``dequantize_blocks`` (the inverse, returning float32). ``quantize_blocks`` also takes the
    optional importance of each weight ``qw`` (n, block_size) and the mean square of each block's row
    ``row_ms`` (n, 1): types ggml quantizes differently under an importance matrix use them, the
    others (floats, Q8_0) ignore them as ggml does.
    """

    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]
    # Weights quantized per pass: the K-quant searches make ~250 passes over their temporaries, which
    # run several times faster while those fit in cache; ops stay large enough to use every core.
    chunk_weights: ClassVar[int] = 1 << 18

    def __init_subclass__(cls, qtype: GGMLQuantizationType, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.qtype = qtype
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        _TYPES[qtype] = cls

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor, qw: torch.Tensor | None = None,
                        row_ms: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover - abstract
        raise TypeError(f"{cls.__name__} does not define quantize_blocks")

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise TypeError(f"{cls.__name__} does not define dequantize_blocks")


# ---------------------------------------------------------------------------------------------
# Small helpers shared with ggml_kquants


def f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 ``(n,)`` or ``(n, 1)`` -> its IEEE half bytes ``(n, 2)`` (round to nearest even, as ggml)."""
    return v.reshape(-1).to(torch.float16).view(torch.uint8).reshape(-1, 2)


def f16_value(b: torch.Tensor) -> torch.Tensor:
    """uint8 ``(n, 2)`` (little-endian half) -> float32 ``(n, 1)``."""
    return b.contiguous().view(torch.float16).float().reshape(-1, 1)


def safe_inverse(d: torch.Tensor) -> torch.Tensor:
    """``1/d``, with 0 where d == 0 (ggml: ``id = d ? 1.0f/d : 0.0f``)."""
    return torch.where(d == 0, torch.zeros_like(d), torch.reciprocal(d))


def pack_nibbles(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Two uint8 tensors of 4-bit values -> one byte each: ``lo | hi << 4``."""
    return (lo & 0x0F) | ((hi & 0x0F) << 4)


def pack_bits_le(bits: torch.Tensor) -> torch.Tensor:
    """uint8 0/1 ``(n, 8k)`` -> ``(n, k)`` bytes, element ``j`` in bit ``j % 8`` of byte ``j // 8``."""
    b = bits.reshape(bits.shape[0], -1, 8)
    out = b[..., 0].clone()
    for i in range(1, 8):
        out |= b[..., i] << i
    return out


def unpack_bits_le(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_bits_le`: ``(n, k)`` bytes -> ``(n, 8k)`` uint8 0/1."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(packed.shape[0], -1)


# ---------------------------------------------------------------------------------------------
# Float types


class F32(GGMLType, qtype=GGMLQuantizationType.F32):
    @classmethod
    def quantize_blocks(cls, blocks, qw=None, row_ms=None):
        return blocks.float().contiguous().view(torch.uint8).reshape(-1, 4)

    @classmethod
    def dequantize_blocks(cls, blocks):
        return blocks.contiguous().view(torch.float32).reshape(-1, 1)


class F16(GGMLType, qtype=GGMLQuantizationType.F16):
    @classmethod
    def quantize_blocks(cls, blocks, qw=None, row_ms=None):
        return f16_bytes(blocks)

    @classmethod
    def dequantize_blocks(cls, blocks):
        return f16_value(blocks)


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

    @classmethod
    def dequantize_blocks(cls, blocks):
        return blocks.contiguous().view(torch.bfloat16).float().reshape(-1, 1)


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

    @classmethod
    def dequantize_blocks(cls, blocks):
        return blocks[:, 2:].view(torch.int8).float() * f16_value(blocks[:, :2])


class Q4_0(GGMLType, qtype=GGMLQuantizationType.Q4_0):
    """fp16 d = (value of largest magnitude)/-8; q = trunc(x/d + 8.5) in 0..15; first half in low nibbles."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, row_ms=None):
        if qw is None:
            return _q4_0(blocks)
        d, q = _weighted_symmetric(blocks, qw, row_ms, 8)
        return torch.cat([f16_bytes(d), pack_nibbles(q[:, :16], q[:, 16:])], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        qs = blocks[:, 2:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1).to(torch.int8) - 8
        return f16_value(blocks[:, :2]) * q.float()


class Q4_1(GGMLType, qtype=GGMLQuantizationType.Q4_1):
    """fp16 d = (max-min)/15 and m = min; q = trunc((x-min)/d + 0.5) in 0..15."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, row_ms=None):
        if qw is None:
            return _q4_1(blocks)
        d, mn, q = _weighted_min_max(blocks, qw, row_ms, 15)
        return torch.cat([f16_bytes(d), f16_bytes(mn), pack_nibbles(q[:, :16], q[:, 16:])], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        qs = blocks[:, 4:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()
        return (f16_value(blocks[:, :2]) * q).add_(f16_value(blocks[:, 2:4]))


class Q5_0(GGMLType, qtype=GGMLQuantizationType.Q5_0):
    """Like Q4_0 with 5 bits: d = max/-16, q in 0..31; the 32 fifth bits form a little-endian uint32."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, row_ms=None):
        if qw is None:
            return _q5_0(blocks)
        d, q = _weighted_symmetric(blocks, qw, row_ms, 16)
        return torch.cat([f16_bytes(d), pack_bits_le(q >> 4), pack_nibbles(q[:, :16], q[:, 16:])], dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        qs = blocks[:, 6:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1) | (unpack_bits_le(blocks[:, 2:6]) << 4)
        return f16_value(blocks[:, :2]) * (q.to(torch.int8) - 16).float()


class Q5_1(GGMLType, qtype=GGMLQuantizationType.Q5_1):
    """Like Q4_1 with 5 bits: d = (max-min)/31, m = min, fifth bits in a little-endian uint32."""

    @classmethod
    def quantize_blocks(cls, blocks, qw=None, row_ms=None):
        if qw is None:
            return _q5_1(blocks)
        d, mn, q = _weighted_min_max(blocks, qw, row_ms, 31)
        return torch.cat([f16_bytes(d), f16_bytes(mn), pack_bits_le(q >> 4), pack_nibbles(q[:, :16], q[:, 16:])],
                         dim=1)

    @classmethod
    def dequantize_blocks(cls, blocks):
        qs = blocks[:, 8:]
        q = torch.cat([qs & 0x0F, qs >> 4], dim=1) | (unpack_bits_le(blocks[:, 4:8]) << 4)
        return (f16_value(blocks[:, :2]) * q.float()).add_(f16_value(blocks[:, 2:4]))


# ---------------------------------------------------------------------------------------------
# Public API


def ggml_type(qtype: str | int | GGMLQuantizationType) -> type[GGMLType]:
    """The class for a type given as ``"Q4_K"`` (any case), a ``GGMLQuantizationType`` or its int."""
    try:
        if isinstance(qtype, str):
            key = GGMLQuantizationType[qtype.strip().upper()]
        else:
            key = GGMLQuantizationType(int(qtype))
    except (KeyError, ValueError):
        raise UnsupportedFormat(f"unknown GGML type {qtype!r}; supported: {', '.join(SUPPORTED)}") from None
    if key not in _TYPES:
        raise UnsupportedFormat(f"GGML type {key.name} is not supported; supported: {', '.join(SUPPORTED)}")
    return _TYPES[key]


def block_size(qtype) -> int:
    """Weights per block (1 for the float types, 32 legacy, 256 K types)."""
    return ggml_type(qtype).block_size


def type_size(qtype) -> int:
    """Bytes per block."""
    return ggml_type(qtype).type_size


def bits_per_weight(qtype) -> float:
    """Storage bits per weight, scales included (e.g. Q4_K 4.5, Q8_0 8.5)."""
    t = ggml_type(qtype)
    return 8.0 * t.type_size / t.block_size


def row_bytes(qtype, n_cols: int) -> int:
    """Bytes of one row of ``n_cols`` weights; raises ShapeMismatch if not a whole number of blocks."""
    t = ggml_type(qtype)
    if n_cols % t.block_size:
        raise ShapeMismatch(f"row length {n_cols} is not a multiple of the {t.qtype.name} block size {t.block_size}")
    return n_cols // t.block_size * t.type_size


def quantize(x: torch.Tensor, qtype: str | GGMLQuantizationType,
             importance: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize a float tensor whose last dim is a multiple of the block size.

    Returns a uint8 tensor of shape ``(*x.shape[:-1], row_bytes)`` on x's device, laid out exactly
    as a GGUF tensor payload. Without ``importance`` this follows ggml's reference quantizers (what
    llama.cpp writes without an imatrix). ``importance`` (one non-negative weight per column,
    ``(x.shape[-1],)``, like llama.cpp's imatrix) switches to ggml's importance-weighted searches;
    all ones reproduces what stable-diffusion.cpp's converter writes.
    """
    t = ggml_type(qtype)
    if x.ndim == 0:
        raise ShapeMismatch("cannot quantize a 0-d tensor")
    if not (x.is_floating_point()):
        raise ShapeMismatch(f"quantize expects a float tensor, got {x.dtype}")
    n_cols = x.shape[-1]
    nbytes = row_bytes(t.qtype, n_cols)
    blocks = x.detach().reshape(-1, t.block_size)
    n = blocks.shape[0]
    per_row = n_cols // t.block_size
    if importance is not None:
        if importance.numel() != n_cols:
            raise ShapeMismatch(f"importance has {importance.numel()} values for rows of {n_cols}")
        imp = importance.detach().to(device=x.device, dtype=torch.float32).reshape(per_row, t.block_size)
        row_ms = x.detach().reshape(-1, n_cols).float().square().mean(-1)
    out = torch.empty((n, t.type_size), dtype=torch.uint8, device=x.device)
    # compiled kernels keep few temporaries, so larger chunks (fewer calls) win there
    step = max(1, (max(t.chunk_weights, COMPILED_CHUNK_WEIGHTS) if compiling() else t.chunk_weights) // t.block_size)
    with torch.no_grad():
        for s in range(0, n, step):
            chunk = blocks[s:s + step].float()
            if importance is None:
                out[s:s + step] = t.quantize_blocks(chunk)
            else:
                idx = torch.arange(s, s + chunk.shape[0], device=x.device)
                out[s:s + step] = t.quantize_blocks(chunk, imp[idx % per_row], row_ms[idx // per_row].unsqueeze(1))
    return out.reshape(*x.shape[:-1], nbytes)


def _as_uint8_tensor(data) -> torch.Tensor:
    if isinstance(data, np.ndarray):
        arr = np.ascontiguousarray(data).view(np.uint8)
        with warnings.catch_warnings():  # read-only memmaps are fine: we never write into them
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)
    if not isinstance(data, torch.Tensor):
        raise ShapeMismatch(f"dequantize expects a uint8 tensor or numpy array, got {type(data).__name__}")
    if data.dtype != torch.uint8:
        data = data.contiguous().view(torch.uint8)
    return data


# On CPU, decode this many weights per pass: the few temporaries per pass then stay in cache and are
# not page-faulted in afresh, which made whole-tensor decoding 2-3x slower (measured 4096x4096 Q4_K).
_DEQUANT_CHUNK = 1 << 17


def dequantize(data, qtype, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode GGML bytes to a float tensor of ``shape`` (logical shape, last dim = row length).

    ``data`` is a uint8 tensor (or numpy array) of any shape holding exactly the payload's bytes;
    the result is on data's device, in ``dtype``.
    """
    t = ggml_type(qtype)
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ShapeMismatch("dequantize needs a non-empty shape")
    nbytes = math.prod(shape[:-1]) * row_bytes(t.qtype, shape[-1])
    raw = _as_uint8_tensor(data)
    if raw.numel() != nbytes:
        raise ShapeMismatch(
            f"{t.qtype.name} tensor of shape {shape} needs {nbytes} bytes, got {raw.numel()}")
    blocks = raw.reshape(-1, t.type_size)
    n = blocks.shape[0]
    step = n if raw.device.type != "cpu" or t.block_size == 1 else max(1, _DEQUANT_CHUNK // t.block_size)
    with torch.no_grad():
        if step >= n:
            return t.dequantize_blocks(blocks).to(dtype).reshape(shape)
        out = torch.empty((n, t.block_size), dtype=dtype, device=raw.device)
        for s in range(0, n, step):
            out[s:s + step] = t.dequantize_blocks(blocks[s:s + step])
    return out.reshape(shape)


# The K types register themselves in _TYPES on import.
from . import kquants as _ggml_kquants  # noqa: E402,F401
