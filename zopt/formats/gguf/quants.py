"""GGML block quantizers and dequantizers in torch, vectorized over all blocks at once.

Every GGML type is one small class keyed by gguf's ``GGMLQuantizationType`` (:mod:`.base`); block
and byte sizes come from the single table ``gguf.constants.GGML_QUANT_SIZES``. The float and legacy
types (Q8_0, Q5_1, Q5_0, Q4_1, Q4_0) are in :mod:`.legacy`, the K types (Q6_K ... Q2_K) in
:mod:`.kquants`, ggml's per-group searches in :mod:`.search`; decoding is zopt's one dequantizer,
:mod:`zopt.ggml`. This module is their public face.

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

import torch
from gguf.constants import GGMLQuantizationType

from ... import ggml
from ...errors import ShapeMismatch, UnsupportedFormat
from . import kquants, legacy  # noqa: F401  (defining their classes registers the types)
from .base import TYPES, GGMLType
from .compile import enabled as compiling

SUPPORTED: tuple[str, ...] = (
    "F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K",
)
COMPILED_CHUNK_WEIGHTS = 1 << 20  # weights per kernel call when compiled (measured best of 2^18..2^21)


def ggml_type(qtype: str | int | GGMLQuantizationType) -> type[GGMLType]:
    """The class for a type given as ``"Q4_K"`` (any case), a ``GGMLQuantizationType`` or its int."""
    try:
        if isinstance(qtype, str):
            key = GGMLQuantizationType[qtype.strip().upper()]
        else:
            key = GGMLQuantizationType(int(qtype))
    except (KeyError, ValueError):
        raise UnsupportedFormat(f"unknown GGML type {qtype!r}; supported: {', '.join(SUPPORTED)}") from None
    if key not in TYPES:
        raise UnsupportedFormat(f"GGML type {key.name} is not supported; supported: {', '.join(SUPPORTED)}")
    return TYPES[key]


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


def dequantize(data, qtype, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decode GGML bytes to a float tensor of ``shape`` (logical shape, last dim = row length).

    ``data`` is a uint8 tensor (or numpy array) of any shape holding exactly the payload's bytes;
    the result is on data's device, in ``dtype``. The decoding is :func:`zopt.ggml.dequantize`'s.
    """
    return ggml.dequantize(data, ggml_type(qtype).qtype, shape, dtype)
