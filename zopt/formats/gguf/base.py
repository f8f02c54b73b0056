"""The GGML type base class, the registry the types fill, and the byte-packing helpers.

Every GGML type is one small class keyed by gguf's ``GGMLQuantizationType``; defining the class
registers it (:data:`TYPES`), and its block and byte sizes come from the single table
``gguf.constants.GGML_QUANT_SIZES``. The float and legacy types live in :mod:`.legacy`, the K types
in :mod:`.kquants`, the public functions in :mod:`.quants`. Decoding is not here: every type decodes
through zopt's one dequantizer, :mod:`zopt.ggml`.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ...ggml import DECODERS

TYPES: dict[GGMLQuantizationType, type[GGMLType]] = {}


class GGMLType:
    """One GGML tensor type: ``block_size`` weights are stored in ``type_size`` bytes.

    Subclasses implement ``quantize_blocks`` (float32 ``(n, block_size)`` -> uint8 ``(n, type_size)``).
    It also takes the optional importance of each weight ``qw`` (n, block_size) and the mean square
    of each block's row ``row_ms`` (n, 1): types ggml quantizes differently under an importance
    matrix use them, the others (floats, Q8_0) ignore them as ggml does. ``dequantize_blocks`` is
    the type's decoder in :data:`zopt.ggml.DECODERS`.
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
        TYPES[qtype] = cls

    @classmethod
    def quantize_blocks(cls, blocks: torch.Tensor, qw: torch.Tensor | None = None,
                        row_ms: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover - abstract
        raise TypeError(f"{cls.__name__} does not define quantize_blocks")

    @classmethod
    def dequantize_blocks(cls, blocks: torch.Tensor) -> torch.Tensor:
        """uint8 ``(n, type_size)`` -> float32 ``(n, block_size)``."""
        return DECODERS[cls.qtype](blocks)


# ---------------------------------------------------------------------------------------------
# Packing helpers shared by the quantizers


def f16_bytes(v: torch.Tensor) -> torch.Tensor:
    """float32 ``(n,)`` or ``(n, 1)`` -> its IEEE half bytes ``(n, 2)`` (round to nearest even, as ggml)."""
    return v.reshape(-1).to(torch.float16).view(torch.uint8).reshape(-1, 2)


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
