"""GGML block decoding: stored GGUF tensor bytes -> float, in torch, one table keyed by type.

This is zopt's one GGML dequantizer. The checkpoint read path (a GGUF file used as a conversion
source), the GGUF format's quantizers (``formats.gguf.quants.dequantize``, ``dequantize_bytes``)
and its loader (layers kept as GGUF blocks) all decode through :func:`dequantize`. It sits here,
beside ``checkpoint.py`` and not inside ``formats/gguf``, because the read path is a lower layer
than the formats and must not import them; the format modules import it downwards.

Block and type sizes come only from ``gguf.constants.GGML_QUANT_SIZES``. Each decoder takes
``(n, type_size)`` uint8 blocks and returns ``(n, block_size)`` float32, in the operation order of
gguf-py's numpy reference (which follows ggml's C code), so the values are identical to
``gguf.quants.dequantize``. Types without a decoder here (the IQ types, say) are decoded by gguf-py.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from .errors import ShapeMismatch, UnsupportedFormat

T = GGMLQuantizationType
FLOAT_DTYPES: dict[GGMLQuantizationType, torch.dtype] = {
    T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16,
}

# On CPU, decode this many weights per pass: the few temporaries per pass then stay in cache and are
# not page-faulted in afresh, which made whole-tensor decoding 2-3x slower (measured 4096x4096 Q4_K).
DEQUANT_CHUNK = 1 << 17


def qtype_of(qtype: str | int | GGMLQuantizationType) -> GGMLQuantizationType:
    """``"Q4_K"`` (any case), a ``GGMLQuantizationType`` or its int -> the enum member."""
    try:
        if isinstance(qtype, str):
            return T[qtype.strip().upper()]
        return T(int(qtype))
    except (KeyError, ValueError):
        raise UnsupportedFormat(f"unknown GGML type {qtype!r}") from None


def layout(qtype: str | int | GGMLQuantizationType) -> tuple[int, int]:
    """(weights per block, bytes per block) from gguf's table."""
    return GGML_QUANT_SIZES[qtype_of(qtype)]


# ---------------------------------------------------------------------------------------------
# Field decoding shared by the decoders, the quantizers and the loader's fast layouts


def f16_value(b: torch.Tensor) -> torch.Tensor:
    """uint8 ``(..., 2)`` little-endian halves -> float32 ``(..., 1)``."""
    return b.contiguous().view(torch.float16).float()


def unpack_bits_le(packed: torch.Tensor) -> torch.Tensor:
    """``(n, k)`` bytes -> ``(n, 8k)`` uint8 0/1, element ``j`` from bit ``j % 8`` of byte ``j // 8``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(-1) >> shifts) & 1).reshape(packed.shape[0], -1)


def unpack_2bit(qs: torch.Tensor) -> torch.Tensor:
    """K-quant 2-bit planes (B, 64) -> (B, 256) uint8: byte 32c+l holds weight 128c + 32k + l in bits 2k..2k+1."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=qs.device).view(1, 1, 4, 1)
    return ((qs.reshape(-1, 2, 1, 32) >> shifts) & 3).reshape(-1, 256)


def unbits_over_32(packed: torch.Tensor, nplanes: int) -> torch.Tensor:
    """(B, 32) bytes -> (B, nplanes*32) uint8 0/1: weight 32p + l from bit p of byte l."""
    shifts = torch.arange(nplanes, dtype=torch.uint8, device=packed.device).view(1, nplanes, 1)
    return ((packed.unsqueeze(1) >> shifts) & 1).reshape(packed.shape[0], -1)


def unpack_scales_k4(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12-byte 6-bit (scale, min) pairs of Q4_K/Q5_K ``(..., 12)`` -> (scales, mins), each ``(..., 8)`` uint8."""
    d, m, md = b[..., 0:4], b[..., 4:8], b[..., 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


# ---------------------------------------------------------------------------------------------
# One decoder per type: (n, type_size) uint8 -> (n, block_size) float32


def _f32(blocks):
    return blocks.contiguous().view(torch.float32).reshape(-1, 1)


def _f16(blocks):
    return f16_value(blocks)


def _bf16(blocks):
    return blocks.contiguous().view(torch.bfloat16).float().reshape(-1, 1)


def _q8_0(blocks):
    return blocks[:, 2:].view(torch.int8).float() * f16_value(blocks[:, :2])


def _q4_0(blocks):
    qs = blocks[:, 2:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).to(torch.int8) - 8
    return f16_value(blocks[:, :2]) * q.float()


def _q4_1(blocks):
    qs = blocks[:, 4:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1).float()
    return (f16_value(blocks[:, :2]) * q).add_(f16_value(blocks[:, 2:4]))


def _q5_0(blocks):
    qs = blocks[:, 6:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1) | (unpack_bits_le(blocks[:, 2:6]) << 4)
    return f16_value(blocks[:, :2]) * (q.to(torch.int8) - 16).float()


def _q5_1(blocks):
    qs = blocks[:, 8:]
    q = torch.cat([qs & 0x0F, qs >> 4], dim=1) | (unpack_bits_le(blocks[:, 4:8]) << 4)
    return (f16_value(blocks[:, :2]) * q.float()).add_(f16_value(blocks[:, 2:4]))


def _q4_k(blocks):
    sc, mn = unpack_scales_k4(blocks[:, 4:16])
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)
    d = (f16_value(blocks[:, 0:2]) * sc.float()).unsqueeze(-1)
    m = (f16_value(blocks[:, 2:4]) * mn.float()).unsqueeze(-1)
    return (d * q.float()).sub_(m).reshape(-1, 256)


def _q5_k(blocks):
    sc, mn = unpack_scales_k4(blocks[:, 4:16])
    qs = blocks[:, 48:].reshape(-1, 4, 1, 32)
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 256) | (unbits_over_32(blocks[:, 16:48], 8) << 4)
    d = (f16_value(blocks[:, 0:2]) * sc.float()).unsqueeze(-1)
    m = (f16_value(blocks[:, 2:4]) * mn.float()).unsqueeze(-1)
    return (d * q.reshape(-1, 8, 32).float()).sub_(m).reshape(-1, 256)


def _q2_k(blocks):
    sc = blocks[:, :16]
    d = (f16_value(blocks[:, 80:82]) * (sc & 0x0F).float()).unsqueeze(-1)
    m = (f16_value(blocks[:, 82:84]) * (sc >> 4).float()).unsqueeze(-1)
    q = unpack_2bit(blocks[:, 16:80]).reshape(-1, 16, 16).float()
    return (d * q).sub_(m).reshape(-1, 256)


def _q6_k(blocks):
    ql = blocks[:, :128].reshape(-1, 2, 1, 64)
    lo = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(-1, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).view(1, 1, 4, 1)
    hi = (blocks[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 3
    q = ((lo | (hi << 4)).to(torch.int8) - 32).reshape(-1, 16, 16).float()
    d = (f16_value(blocks[:, 208:210]) * blocks[:, 192:208].view(torch.int8).float()).unsqueeze(-1)
    return (d * q).reshape(-1, 256)


def _q3_k(blocks):
    sb = blocks[:, 96:108]
    lo = torch.cat([sb[:, :8] & 0x0F, sb[:, :8] >> 4], dim=1)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=blocks.device).view(1, 4, 1)
    hi = ((sb[:, 8:12].unsqueeze(1) >> shifts) & 3).reshape(-1, 16)
    sc = ((lo | (hi << 4)).to(torch.int8) - 32).float()
    d = (f16_value(blocks[:, 108:110]) * sc).unsqueeze(-1)
    high = unbits_over_32(blocks[:, :32], 8)
    q = (unpack_2bit(blocks[:, 32:96]) | (high << 2)).to(torch.int8) - 4
    return (d * q.reshape(-1, 16, 16).float()).reshape(-1, 256)


DECODERS: dict[GGMLQuantizationType, Callable[[torch.Tensor], torch.Tensor]] = {
    T.F32: _f32, T.F16: _f16, T.BF16: _bf16,
    T.Q8_0: _q8_0, T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q5_0: _q5_0, T.Q5_1: _q5_1,
    T.Q6_K: _q6_k, T.Q5_K: _q5_k, T.Q4_K: _q4_k, T.Q3_K: _q3_k, T.Q2_K: _q2_k,
}


# ---------------------------------------------------------------------------------------------
# The dequantizer


def as_uint8(data) -> torch.Tensor:
    """A uint8 torch view of a numpy array or tensor of any dtype (no copy when contiguous)."""
    if isinstance(data, np.ndarray):
        arr = np.ascontiguousarray(data).view(np.uint8)
        with warnings.catch_warnings():  # read-only memmaps are fine: they are never written into
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(arr)
    if not isinstance(data, torch.Tensor):
        raise ShapeMismatch(f"dequantize expects a uint8 tensor or numpy array, got {type(data).__name__}")
    if data.dtype != torch.uint8:
        data = data.contiguous().view(torch.uint8)
    return data


def dequantize(data, qtype: str | int | GGMLQuantizationType, shape: tuple[int, ...],
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode the stored bytes of a GGML tensor to a float tensor of ``shape`` (torch order, last
    dim = row length) in ``dtype``, on data's device.

    ``data`` is a uint8 tensor or numpy array (any shape) holding exactly the tensor's bytes; a
    tensor whose rows are not whole blocks, or a byte count that does not match, is a ShapeMismatch.
    """
    t = qtype_of(qtype)
    block, size = GGML_QUANT_SIZES[t]
    shape = tuple(int(s) for s in shape)
    if not shape:
        raise ShapeMismatch("dequantize needs a non-empty shape")
    if shape[-1] % block:
        raise ShapeMismatch(f"row length {shape[-1]} is not a multiple of the {t.name} block size {block}")
    nbytes = math.prod(shape) // block * size
    raw = as_uint8(data).reshape(-1)
    if raw.numel() != nbytes:
        raise ShapeMismatch(f"{t.name} tensor of shape {shape} needs {nbytes} bytes, got {raw.numel()}")
    if t in FLOAT_DTYPES:  # a reinterpretation, then one conversion straight to dtype
        return raw.view(FLOAT_DTYPES[t]).reshape(shape).to(dtype)
    decode = DECODERS.get(t)
    if decode is None:
        return _gguf_py_dequantize(raw, t, shape, dtype)
    blocks = raw.reshape(-1, size)
    n = blocks.shape[0]
    step = n if raw.device.type != "cpu" else max(1, DEQUANT_CHUNK // block)
    with torch.no_grad():
        if step >= n:
            return decode(blocks).to(dtype).reshape(shape)
        out = torch.empty((n, block), dtype=dtype, device=raw.device)
        for s in range(0, n, step):
            out[s:s + step] = decode(blocks[s:s + step])
    return out.reshape(shape)


def _gguf_py_dequantize(raw: torch.Tensor, t: GGMLQuantizationType, shape: tuple[int, ...],
                        dtype: torch.dtype) -> torch.Tensor:
    """Types zopt has no torch decoder for (IQ and ternary types): gguf-py's numpy reference."""
    from gguf.quants import dequantize as reference

    try:
        arr = reference(raw.cpu().numpy(), t)
    except NotImplementedError:
        raise UnsupportedFormat(f"cannot decode GGML type {t.name}") from None
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).reshape(shape).to(dtype).to(raw.device)
