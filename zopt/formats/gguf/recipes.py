"""GGUF types and per-tensor recipes for Z-Image, as data.

A *subtype* (``--to gguf:Q4_K_M``) names a base GGML type plus the rules that raise some tensors
above it. :func:`plan` turns a source's tensor names and shapes into one GGML type per tensor,
before any data is read, so the whole GGUF header can be written first.

Whether a tensor is quantized at all is :mod:`zopt.policy`'s decision (the same for every format:
``--keep`` / ``--quantize`` patterns, ``zimage.SENSITIVE``), with one GGUF rule added: tensors
below ``SMALL_NUMEL`` elements are kept, quantizing them saves nothing. Then the recipe picks
the storage type:

* a kept tensor: F32 when it is 1-D, small, named F32 by the family's rules or the recipe is F32;
  a weight whose family rule names a GGUF type (Z-Image: adaLN, cap_embedder: Q8_0) is stored in
  it by every quantized recipe; else (``--keep``, float recipes, the other sensitive weights) BF16;
* a quantized tensor: the recipe's bump rules (attention qkv, ``feed_forward.w2``,
  ``attention.out`` in chosen blocks; not for tensors forced by ``--quantize``) -> a higher type,
  else the recipe's base type; if the row length is not a multiple of the chosen type's block
  size: :data:`ROW_FALLBACK`.

Names are the original (ComfyUI) layout the GGUF file is written in.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from ...errors import UnsupportedFormat
from ...families import zimage
from ...policy import Decision, Policy

# GGML type -> (block size, bytes per block), for the types zopt writes: gguf's table, never a copy.
TYPE_LAYOUT: dict[str, tuple[int, int]] = {
    name: GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    for name in ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0",
                 "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")
}
FLOAT_TYPES = ("F32", "F16", "BF16")

# Recipe -> llama.cpp's LLAMA_FTYPE (gguf's LlamaFileType), written to general.file_type so tools
# can name the file. zopt's names are llama.cpp's without the MOSTLY_ prefix, except:
_FILE_TYPE_NAME = {
    "F32": "ALL_F32",
    # uniform K types have no ftype of their own; the _S recipe is the closest (also nearly uniform)
    "Q3_K": "MOSTLY_Q3_K_S", "Q4_K": "MOSTLY_Q4_K_S", "Q5_K": "MOSTLY_Q5_K_S",
}

# Rows whose length is not a multiple of the block size: the closest type with 32-wide blocks,
# then (row not a multiple of 32 either) BF16 — never a silently wrong file.
ROW_FALLBACK: dict[str, str] = {
    "Q6_K": "Q8_0", "Q5_K": "Q5_1", "Q4_K": "Q5_0", "Q3_K": "Q4_1", "Q2_K": "Q4_0",
    "Q8_0": "BF16", "Q5_1": "BF16", "Q5_0": "BF16", "Q4_1": "BF16", "Q4_0": "BF16",
}

# quantized types from least to most precise (floors of gguf:auto and of the measured recipes)
PRECISION_ORDER = ("Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0", "BF16")

SMALL_NUMEL = 1 << 16  # below this a tensor is kept in float: quantizing it saves nothing
# ... unless it is not small beside the model: in a test-sized transformer (the 1.1M-parameter
# micro model, whose every block weight has fewer than 2^16 elements) a tensor over this share of all
# elements is quantized, or the file would be the float model under a GGUF type's name
SMALL_SHARE = 0.005

# Which main blocks count as "edge" blocks that get more bits: llama.cpp's use_more_bits (the
# first and last eighth, and every third block in between), which spreads the extra bits where
# errors compound; refiner blocks always count (they see raw, un-normalized inputs first).


def more_bits_block(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits(i_layer, n_layers)``."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def edge_block(i: int, n: int) -> bool:
    """The first and last eighth of the main blocks (at least the first and the last)."""
    k = max(1, n // 8)
    return i < k or i >= n - k


@dataclass(frozen=True)
class Bump:
    """Give tensors matching ``pattern`` type ``to`` in blocks chosen by ``where``."""

    pattern: str
    to: str
    where: str  # "all" | "more_bits" (llama.cpp's set, + refiners) | "edge" (+ refiners)
    why: str


@dataclass(frozen=True)
class Recipe:
    name: str
    base: str
    bumps: tuple[Bump, ...] = field(default=())
    summary: str = ""

    @property
    def measured(self) -> bool:
        """Whether ``allocation=measured`` (the default) re-spends this recipe's bytes by measured
        sensitivity (:func:`zopt.formats.gguf.auto.retune`): llama.cpp's mixture names (Q2_K and the
        _S/_M/_L recipes) and the 32-block types; the uniform K types (Q3_K, Q4_K, Q5_K, Q6_K), Q8_0
        and the float types keep one type, as their names say."""
        return self.name == "Q2_K" or self.name.endswith(("_S", "_M", "_L")) or self.base in ("Q4_0", "Q4_1", "Q5_0", "Q5_1")


QKV, W2, OUT = r"\.attention\.qkv\.weight$", r"\.feed_forward\.w2\.weight$", r"\.attention\.out\.weight$"
_V = "carries the values (llama.cpp raises attn_v / attn_qkv: the most quantization-sensitive projection)"
_D = "feed_forward.w2 is the FFN down-projection (llama.cpp's ffn_down): its errors sum over the wide hidden dim"

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("F32", "F32", summary="everything float32 (lossless from bf16, twice the size)"),
    Recipe("F16", "F16", summary="weights float16; sensitive tensors keep BF16/F32"),
    Recipe("BF16", "BF16", summary="weights bfloat16 (lossless from a bf16 source); norms/biases F32"),
    Recipe("Q8_0", "Q8_0", summary="8-bit, 32-weight blocks with one f16 scale"),
    Recipe("Q5_1", "Q5_1", summary="5-bit + scale and min per 32"),
    Recipe("Q5_0", "Q5_0", summary="5-bit, scale per 32"),
    Recipe("Q4_1", "Q4_1", summary="4-bit + scale and min per 32"),
    Recipe("Q4_0", "Q4_0", summary="4-bit, scale per 32"),
    Recipe("Q5_K", "Q5_K", summary="uniform 5-bit K-quant (256-blocks, 6-bit sub-scales)"),
    Recipe("Q4_K", "Q4_K", summary="uniform 4-bit K-quant"),
    Recipe("Q3_K", "Q3_K", summary="uniform 3-bit K-quant"),
    Recipe("Q6_K", "Q6_K", summary="6-bit K-quant everywhere (as llama.cpp's Q6_K)"),
    Recipe("Q5_K_M", "Q5_K", (
        Bump(QKV, "Q6_K", "more_bits", _V), Bump(W2, "Q6_K", "more_bits", _D),
    ), "Q5_K; qkv and w2 Q6_K in the first/last eighth, every third block and refiners"),
    Recipe("Q5_K_S", "Q5_K", summary="Q5_K everywhere quantized"),
    Recipe("Q4_K_M", "Q4_K", (
        Bump(QKV, "Q6_K", "more_bits", _V), Bump(W2, "Q6_K", "more_bits", _D),
        Bump(QKV, "Q5_K", "all", _V),
    ), "Q4_K; qkv Q5_K, and qkv/w2 Q6_K in the first/last eighth, every third block and refiners"),
    Recipe("Q4_K_S", "Q4_K", (
        Bump(W2, "Q5_K", "edge", _D),
    ), "Q4_K; w2 Q5_K in the first/last eighth and refiners"),
    Recipe("Q3_K_L", "Q3_K", (
        Bump(QKV, "Q5_K", "all", _V), Bump(W2, "Q5_K", "all", _D),
        Bump(OUT, "Q4_K", "all", "attention.out mixes all heads back into the stream"),
    ), "Q3_K; qkv and w2 Q5_K, attention.out Q4_K"),
    Recipe("Q3_K_M", "Q3_K", (
        Bump(QKV, "Q5_K", "edge", _V), Bump(QKV, "Q4_K", "all", _V),
        Bump(W2, "Q5_K", "edge", _D), Bump(W2, "Q4_K", "more_bits", _D),
        Bump(OUT, "Q4_K", "all", "attention.out mixes all heads back into the stream"),
    ), "Q3_K; qkv Q4_K (Q5_K at the edges), w2 Q4_K/Q5_K in chosen blocks, attention.out Q4_K"),
    Recipe("Q3_K_S", "Q3_K", summary="Q3_K everywhere quantized"),
    Recipe("Q2_K", "Q2_K", (
        Bump(QKV, "Q4_K", "edge", _V), Bump(QKV, "Q3_K", "all", _V), Bump(W2, "Q3_K", "all", _D),
        Bump(OUT, "Q3_K", "all", "attention.out mixes all heads back into the stream"),
    ), "Q2_K; qkv, w2 and attention.out Q3_K (qkv Q4_K at the edges)"),
)}

FILE_TYPE: dict[str, int] = {
    name: int(LlamaFileType[_FILE_TYPE_NAME.get(name, f"MOSTLY_{name}")]) for name in RECIPES
}


@dataclass(frozen=True)
class TensorPlan:
    name: str  # name in the GGUF file
    shape: tuple[int, ...]  # torch order (rows first)
    qtype: str  # GGML type name
    reason: str

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.qtype)


def tensor_nbytes(shape: tuple[int, ...], qtype: str) -> int:
    block, size = TYPE_LAYOUT[qtype]
    n = 1
    for s in shape:
        n *= s
    return n // block * size


def recipe(subtype: str | None) -> Recipe:
    key = (subtype or "Q8_0").upper()
    if key not in RECIPES:
        raise UnsupportedFormat(f"unknown GGUF type {subtype!r}; known: {', '.join(RECIPES)}")
    return RECIPES[key]


def _block_choice(where: str, name: str, n_layers: int) -> bool:
    if where == "all":
        return True
    b = zimage.block_index(name)
    if b is None:
        return False
    kind, i = b
    if kind != "layers":  # refiners always count as blocks that get more bits
        return True
    return more_bits_block(i, n_layers) if where == "more_bits" else edge_block(i, n_layers)


def too_small(shape: tuple[int, ...], min_elements: int = SMALL_NUMEL) -> str | None:
    """GGUF's say to the policy: a tensor this small is kept (quantizing it saves nothing)."""
    return "small tensor: quantizing saves nothing" if _numel(shape) < min_elements else None


def policy_for(keep: Iterable[str] = (), quantize: Iterable[str] = (), min_elements: int = SMALL_NUMEL) -> Policy:
    """The tensor policy of a GGUF conversion with these ``--keep`` / ``--quantize`` patterns;
    tensors under ``min_elements`` elements are kept."""
    if min_elements == SMALL_NUMEL:
        return Policy(tuple(keep), tuple(quantize), too_small)
    return Policy(tuple(keep), tuple(quantize), lambda shape: too_small(shape, min_elements))


def choose(name: str, shape: tuple[int, ...], rec: Recipe, n_layers: int,
           keep: Iterable[str] = (), quantize: Iterable[str] = ()) -> tuple[str, str]:
    """(GGML type, reason) for one tensor named ``name`` (original layout) of ``shape``."""
    return storage_type(name, shape, policy_for(keep, quantize).decide(name, shape), rec, n_layers)


def storage_type(name: str, shape: tuple[int, ...], dec: Decision, rec: Recipe, n_layers: int,
                 min_elements: int = SMALL_NUMEL) -> tuple[str, str]:
    """(GGML type, reason) of one tensor once the policy decided ``dec`` for it (a sensitive weight
    under ``min_elements`` elements stays BF16, as any small tensor)."""
    if not dec.quantize:
        # 1-D tensors (and the 2-D pad tokens, via the family's rule) stay F32: loaders such as
        # diffusers' only decode F32/F16 outside Linear layers, and they are too small to matter
        f32 = rec.base == "F32" or len(shape) < 2 or dec.floor == "F32" or dec.unsupported
        if f32:
            return "F32", dec.reason
        rule = zimage.sensitive_reason(name) if dec.sensitive and rec.base not in FLOAT_TYPES else None
        if rule is not None and rule.gguf and len(shape) == 2 and shape[-1] % TYPE_LAYOUT[rule.gguf][0] == 0 \
                and _numel(shape) >= min_elements:
            return rule.gguf, f"{dec.reason} ({rule.gguf}: within ~0.4% of BF16, half its bytes)"
        return "BF16", dec.reason
    qtype, reason = rec.base, f"{rec.name} base type"
    if not dec.forced:
        for b in rec.bumps:
            if re.search(b.pattern, name) and _block_choice(b.where, name, n_layers):
                qtype, reason = b.to, f"{rec.name} bump ({b.where}): {b.why}"
                break
    fitted = row_type(qtype, shape[-1]) if len(shape) >= 1 else qtype
    if fitted != qtype:
        reason = f"row length {shape[-1]} not a multiple of {TYPE_LAYOUT[qtype][0]}: {qtype} -> {fitted}"
    return fitted, reason


def row_type(qtype: str, cols: int) -> str:
    """``qtype``, or its :data:`ROW_FALLBACK` chain's first type whose block divides a row of ``cols``."""
    while cols % TYPE_LAYOUT[qtype][0] != 0:
        qtype = ROW_FALLBACK[qtype]
    return qtype


def plan(shapes: dict[str, tuple[int, ...]], subtype: str | None, keep: Iterable[str] = (),
         quantize: Iterable[str] = (), min_elements: int = SMALL_NUMEL) -> list[TensorPlan]:
    """One :class:`TensorPlan` per tensor of ``shapes`` (original-layout names, file order)."""
    rec = recipe(subtype)
    layers = [b[1] for n in shapes if (b := zimage.block_index(n)) and b[0] == "layers"]
    n_layers = max(layers) + 1 if layers else 1
    if min_elements == SMALL_NUMEL:  # the default: small in elements and as a share of the model
        total = sum(_numel(tuple(v)) for v in shapes.values())
        min_elements = min(SMALL_NUMEL, max(1, int(SMALL_SHARE * total)))
    policy = policy_for(keep, quantize, min_elements)
    out = []
    for n, s in shapes.items():
        qtype, why = storage_type(n, tuple(s), policy.decide(n, tuple(s)), rec, n_layers, min_elements)
        out.append(TensorPlan(n, tuple(s), qtype, why))
    return out


def bits_per_weight(plans: list[TensorPlan]) -> float:
    """Effective bits per parameter of a plan (all tensors, float ones included)."""
    params = sum(_numel(p.shape) for p in plans)
    return 8 * sum(p.nbytes for p in plans) / max(1, params)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def full_size_shapes() -> dict[str, tuple[int, ...]]:
    """Original-layout names and shapes of the full 6.15B model, from its config (no weights)."""
    shapes = zimage.expected_shapes(zimage.FULL_CONFIG)
    out: dict[str, tuple[int, ...]] = {}
    for n, s in shapes.items():
        if ".attention.to_k." in n or ".attention.to_v." in n:
            continue
        if ".attention.to_q." in n:
            out[zimage.to_original_name(n.replace(".to_q.", ".qkv."))] = (3 * s[0], *s[1:])
            continue
        out[zimage.to_original_name(n)] = s
    return out


def list_types() -> list[tuple[str, float, str]]:
    """(subtype, effective bits per weight on the full-size model, summary) for every recipe."""
    shapes = full_size_shapes()
    note = "; by default re-tuned by measurement within these bytes (--option allocation=rule: as written)"
    return [(name, bits_per_weight(plan(shapes, name)), r.summary + (note if r.measured else ""))
            for name, r in RECIPES.items()]
