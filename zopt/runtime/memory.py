"""The memory model of the whole pipeline: bytes per stage for a transformer format.

All figures in bytes (``b`` = bytes per activation element: 2 for bf16/fp16, 4 for fp32):

* **weights** per format: the tensors a format quantizes (2-D block weights not named
  precision-sensitive by :mod:`zopt.families.zimage`) at the format's effective bits per weight
  (nominal bits plus scale overhead: each format's candidates in :mod:`zopt.formats.registry`); every
  other tensor at 16 bits. Dequantizing backends add one transient BF16 copy of the largest matrix.
* **tokens**: image tokens ``ceil32(H/16 * W/16)`` (VAE /8, patch 2), text tokens
  ``ceil32(text_tokens)``; Z-Image pads both to multiples of 32 and attends over their sum ``L``.
* **transformer activations**: ``batch * L * (ACT_PER_DIM * dim + ACT_PER_FFN * ffn) * b + ACT_FIXED``:
  the peak sits in a block's feed-forward (SiLU(w1 x), w3 x and their product: 3 ffn-wide rows per
  token) on top of dim-wide rows held around it (residual stream, normed input, the joined
  caption/image sequence, refiner outputs, RoPE tables). The dim-wide count (8) and the fixed
  term were read off measured CPU peaks of the tiny config; the medium config checks them.
  Attention kernels that materialize the score matrix (``_native_math``) add
  ``batch * heads * L^2 * b * 2``.
* **text encoder / VAE**: Qwen3-4B (4.02B parameters) and the 16-channel VAE (83.8M) at the compute
  dtype (bf16 on GPUs, fp32 on CPU, as is the unquantized part of every format); VAE
  decode peak ``VAE_ACT * 128 * H * W * b`` (an estimate, not validated here).

``benchmarks/planner_validation.py`` compares the transformer part against measured peak RSS on CPU
(docs/runtime.md states the error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ..formats.registry import Candidate
from .offload import Footprint

TEXT_ENCODER_PARAMS = 4_022_468_096  # Qwen3-4B, the Z-Image text encoder
VAE_PARAMS = 83_819_683  # the 16-channel autoencoder shared with FLUX
ACT_PER_DIM = 8.0
ACT_PER_FFN = 3.0
ACT_FIXED = 8 * 1024**2  # kernel workspaces and small buffers, independent of the token count
VAE_ACT = 6.0
DEFAULT_TEXT_TOKENS = 512  # the pipeline's max_sequence_length: the worst case for a prompt


@dataclass(frozen=True)
class Shape:
    """Token counts for a request."""

    image_tokens: int
    text_tokens: int
    batch: int

    @property
    def tokens(self) -> int:
        return self.image_tokens + self.text_tokens


def _ceil32(n: int) -> int:
    return -(-int(n) // 32) * 32


def shape_for(width: int, height: int, batch: int = 1, text_tokens: int = DEFAULT_TEXT_TOKENS) -> Shape:
    """Image and text token counts Z-Image attends over for a ``width`` x ``height`` image."""
    return Shape(_ceil32((height // 16) * (width // 16)), _ceil32(max(1, text_tokens)), max(1, batch))


@lru_cache(maxsize=8)
def _param_split(config_key: tuple) -> tuple[int, int, int, int, int]:
    """(quantizable, other, largest block, non-block, largest matrix) parameter counts of a config."""
    from ..families import zimage

    config = dict(config_key)
    shapes = zimage.expected_shapes(config)
    quant = other = nonblock = largest = 0
    blocks: dict[Any, int] = {}
    for name, shape in shapes.items():
        n = math.prod(shape)
        if len(shape) == 2 and zimage.sensitive_reason(name) is None:
            quant += n
            largest = max(largest, n)
        else:
            other += n
        b = zimage.block_index(name)
        if b is None:
            nonblock += n
        else:
            blocks[b] = blocks.get(b, 0) + n
    return quant, other, max(blocks.values()), nonblock, largest


@lru_cache(maxsize=16)
def quant_io(config_key: tuple) -> int:
    """Sum of (inputs + outputs) over the quantizable Linear layers of a config: the activation
    elements per token that a kernel quantizing its inputs reads and whose outputs it rescales."""
    from ..families import zimage

    return sum(shape[0] + shape[1] for name, shape in zimage.expected_shapes(dict(config_key)).items()
               if len(shape) == 2 and zimage.sensitive_reason(name) is None)


def _key(config: dict[str, Any]) -> tuple:
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in config.items()))


def weight_bytes(config: dict[str, Any], bits: float, other_bits: float = 16.0) -> int:
    """Transformer weight bytes: quantizable tensors at ``bits``, the rest at ``other_bits``."""
    quant, other, *_ = _param_split(_key(config))
    return int(quant * bits / 8 + other * other_bits / 8)


def activation_bytes(config: dict[str, Any], shape: Shape, elem_bytes: int = 2, attention: str = "native") -> int:
    """Peak transformer-forward activation bytes for ``shape`` (see the module docstring)."""
    from .attention import ATTENTION

    dim = int(config["dim"])
    ffn = int(dim / 3 * 8)
    act = shape.batch * shape.tokens * (ACT_PER_DIM * dim + ACT_PER_FFN * ffn) * elem_bytes + ACT_FIXED
    if ATTENTION.get(attention) is not None and ATTENTION[attention].memory == "quadratic":
        act += shape.batch * int(config["n_heads"]) * shape.tokens**2 * elem_bytes * 2
    return int(act)


def footprint(config: dict[str, Any], cand: Candidate, shape: Shape, width: int, height: int,
              elem_bytes: int = 2, attention: str = "native", text_encoder: bool = True) -> Footprint:
    """The :class:`Footprint` of a full pipeline with the transformer stored as ``cand``."""
    quant, other, block, nonblock, largest = _param_split(_key(config))
    # unquantized tensors (and whole plain formats) are held at the compute dtype: fp32 on CPU
    bits = elem_bytes * 8 if not cand.dequant else cand.bits
    ratio = bits / 16
    transient = largest * elem_bytes if cand.dequant and cand.transient else 0
    tr = weight_bytes(config, bits, elem_bytes * 8) + transient
    act = activation_bytes(config, shape, elem_bytes, attention)
    vae_act = int(VAE_ACT * 128 * height * width * elem_bytes * shape.batch)
    return Footprint(
        transformer=tr,
        text_encoder=TEXT_ENCODER_PARAMS * elem_bytes if text_encoder else 0,
        vae=VAE_PARAMS * elem_bytes,
        activations=max(act, vae_act),
        largest_block=int(block * 2 * ratio) + transient,
        non_block=nonblock * elem_bytes,
        largest_leaf=int(largest * 2 * ratio) + transient,
    )
