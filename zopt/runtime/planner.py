"""Memory planner: which format, offload mode and attention kernel fit a memory budget.

The memory model (all figures in bytes; ``b`` = bytes per activation element: 2 for bf16/fp16, 4 for
fp32):

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
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from ..formats.registry import Candidate, planner_candidates
from ..platform.hardware import Hardware
from .offload import GIB, Footprint, choose, device_bytes

TEXT_ENCODER_PARAMS = 4_022_468_096  # Qwen3-4B, the Z-Image text encoder
VAE_PARAMS = 83_819_683  # the 16-channel autoencoder shared with FLUX
ACT_PER_DIM = 8.0
ACT_PER_FFN = 3.0
ACT_FIXED = 8 * 1024**2  # kernel workspaces and small buffers, independent of the token count
VAE_ACT = 6.0
DEFAULT_TEXT_TOKENS = 512  # the pipeline's max_sequence_length: the worst case for a prompt


# Backends that hold every quantized weight in a layout of their own, whatever the file's type:
# (format, backend) -> effective bits per weight. GGUF on int-mm-cpu keeps INT8 codes plus one
# float32 scale per output row (rows of 3,840 or more weights).
HELD_BITS = {("gguf", "int-mm-cpu"): 8.0 + 32 / 3840}


def held(cand: Candidate, backend: str | None) -> Candidate:
    """``cand`` as ``backend`` holds it in memory (see :data:`HELD_BITS`)."""
    import dataclasses

    bits = HELD_BITS.get((cand.spec.split(":")[0], backend))
    return cand if bits is None else dataclasses.replace(cand, bits=bits, transient=False)


# Quality order, best first (each format declares its candidates in the registry). Effective bits =
# nominal + scale overhead of the storage layout.
CANDIDATES: tuple[Candidate, ...] = planner_candidates()


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


@dataclass
class PlanRow:
    spec: str
    offload: str | None  # fastest mode that fits, None if nothing does
    device_bytes: int  # predicted peak in that mode (or with sequential offload when nothing fits)
    weights_bytes: int
    backend: str | None
    note: str


@dataclass
class Plan:
    hardware: Hardware
    budget: int
    shape: Shape
    width: int
    height: int
    attention: str
    attention_reason: str
    recommended: PlanRow | None
    rows: list[PlanRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        def row(r: PlanRow | None):
            return None if r is None else {**r.__dict__, "device_gib": round(r.device_bytes / GIB, 2),
                                           "weights_gib": round(r.weights_bytes / GIB, 2)}

        return {"device": self.hardware.device, "device_name": self.hardware.device_name,
                "budget_gib": round(self.budget / GIB, 2), "width": self.width, "height": self.height,
                "batch": self.shape.batch, "image_tokens": self.shape.image_tokens,
                "text_tokens": self.shape.text_tokens, "attention": self.attention,
                "attention_reason": self.attention_reason, "recommended": row(self.recommended),
                "rows": [row(r) for r in self.rows]}


def _backend_note(spec: str, hw: Hardware) -> tuple[str | None, str | None]:
    """(backend name, None) when ``spec`` runs on ``hw``; (None, why) when it cannot; a build note else."""
    from ..errors import UnsupportedFormat
    from ..formats.registry import select_backend, status

    fmt = spec.split(":")[0]
    if status(fmt) == "not in this build":
        return None, "format not in this build"
    try:
        return select_backend(fmt, hw).name, None
    except UnsupportedFormat as e:
        return None, f"cannot run: {e.problem}"


def plan(hw: Hardware, width: int = 1024, height: int = 1024, batch: int = 1,
         text_tokens: int = DEFAULT_TEXT_TOKENS, config: dict[str, Any] | None = None) -> Plan:
    """Recommend format + offload + attention for ``hw`` (its free memory is the budget).

    Rule: the fastest offload tier (none, model, group-stream/group, sequential) in which any format
    of 4 bits or more fits; within it, the highest-quality format that runs on ``hw``. Formats below
    4 bits are recommended only when nothing else fits. Formats whose module is not in this build
    are still planned, and flagged.
    """
    from ..families import zimage
    from .attention import choose as choose_attention
    from .offload import reserve

    config = config or zimage.FULL_CONFIG
    elem = 4 if hw.device == "cpu" else 2
    dtype = "fp32" if elem == 4 else "bf16"
    att = choose_attention("auto", hw, dtype, batch)
    shape = shape_for(width, height, batch, text_tokens)
    rows: list[PlanRow] = []
    tiers = ["none", "model", "group-stream", "group", "sequential", "disk"]
    best: tuple[tuple[int, int, int], PlanRow] | None = None
    for qi, cand in enumerate(CANDIDATES):
        backend, problem = _backend_note(cand.spec, hw)
        fp = footprint(config, held(cand, backend), shape, width, height, elem, att.name)
        try:
            ch = choose("auto", hw, fp)
            row = PlanRow(cand.spec, ch.mode, ch.device_bytes, fp.transformer, backend, problem or ch.reason)
        except Exception as e:  # ZoptError: does not fit at all
            row = PlanRow(cand.spec, None, device_bytes("sequential", fp), fp.transformer, backend,
                          problem or getattr(e, "problem", str(e)))
        rows.append(row)
        runnable = problem is None or problem == "format not in this build"
        if row.offload and runnable:
            key = (int(cand.fallback), tiers.index(row.offload), qi)
            if best is None or key < best[0]:
                best = (key, row)
    budget = hw.free_memory - reserve(hw)
    return Plan(hw, budget, shape, width, height, att.name, att.reason, best[1] if best else None, rows)


def budget_hardware(vram: int, base: Hardware | None = None) -> Hardware:
    """``base`` (default: a generic CUDA sm_89 GPU with the usual packages) with ``vram`` bytes free."""
    import dataclasses

    if base is None:
        base = Hardware("cuda", "CUDA GPU", (8, 9), "sm_89", vram, vram, fp8_matmul=True, int8_matmul=True,
                        cores=8, packages={"bitsandbytes": "?"}, system_memory=64 * GIB, system_free=48 * GIB)
    return dataclasses.replace(base, total_memory=vram, free_memory=vram)


def parse_size(text: str) -> int:
    """``"8GB"``, ``"7.5G"``, ``"8192MB"`` -> bytes (GB means GiB, as GPU makers' "8 GB" does)."""
    from ..errors import ZoptError

    t = text.strip().upper().replace("IB", "B")
    units = {"TB": 1024**4, "GB": GIB, "MB": 1024**2, "T": 1024**4, "G": GIB, "M": 1024**2}
    for u, mult in units.items():
        if t.endswith(u):
            try:
                v = float(t[: -len(u)])
            except ValueError:
                break
            if v <= 0:
                break
            return int(v * mult)
    raise ZoptError(f"memory size {text!r} is not like 8GB, 7.5G or 8192MB")
