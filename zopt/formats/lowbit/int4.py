"""INT4 weights: group-wise (64 or 128 along the input dimension), asymmetric, two codes per byte.

A quantized Linear stores

* ``<name>.weight`` — U8 ``(out, in/2)``: code of column ``2j`` in the low nibble, ``2j+1`` in
  the high nibble;
* ``<name>.weight_scale`` — F16 ``(out, in/group)``;
* ``<name>.weight_zero`` — U8 ``(out, in/group)``, integer zero point in [0, 15];

and ``w ~= (code - zero) * scale``. Each group's range is chosen by a **clipping search**: the
group's min and max are shrunk by factors 1.0, 0.95, ... and the factor with the least squared
reconstruction error is kept (1.0 is plain round-to-nearest, so the search never does worse).
With ``--imatrix FILE`` (``zopt calibrate``) the search weighs each column's squared error by its
input's mean square ``E[x_j^2]``, so it minimizes the error of the layer's output rather than of the
weight. With ``--option rank=R`` (``int4:r32``, ``int4:g64r32``) the weight also keeps a rank-R BF16
branch and INT4 stores the residual (:mod:`.lowrank`).

Kernels: ``torch-dequant`` (unpack and dequantize one layer at a time, matmul in the activation
dtype) and ``int-mm-cpu`` (dequantized once at load to per-row INT8 codes, integer matmul with
per-token INT8 activations: :func:`.int8.as_int8`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...checkpoint import TensorSource
from ...errors import ZoptError
from ..options import Options
from . import common as C
from .int8 import as_int8
from .lowrank import LISTED_RANKS, check_rank, overhead_bits, with_rank, with_subtype

GROUP_SIZES = (64, 128)
DEFAULT_GROUP = 128
CLIP_FACTORS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


@dataclass(frozen=True)
class Int4Options(Options):
    group_size: int = field(default=DEFAULT_GROUP, metadata={"choices": GROUP_SIZES})  # weights per scale/zero
    clip_search: bool = True  # search shrunken ranges per group (never worse than round-to-nearest)
    rank: int = 0  # rank of the BF16 low-rank branch beside each weight (0: none)
    # importance matrix (zopt calibrate): weights the clipping search by each input channel's E[x^2]
    imatrix: str | None = field(default=None, metadata={"record": False})


def _grid(mn, mx):
    """Scale (rounded to F16, as stored) and integer zero point for ranges [mn, mx]."""
    import torch

    scale = ((mx - mn) / 15).clamp_min(1e-8).to(torch.float16).float()
    zero = torch.round(-mn / scale).clamp(0, 15)
    return scale, zero


def _codes(g, scale, zero):
    import torch

    return torch.round(g / scale[..., None] + zero[..., None]).clamp(0, 15)


def _sq_error(g, scale, zero, buf, weight=None):
    """Per-group squared reconstruction error of ``g`` on grid (scale, zero), each column's weighted
    by ``weight`` (broadcast over ``g``) when given; ``buf`` is scratch."""
    import torch

    s, z = scale[..., None], zero[..., None]
    torch.div(g, s, out=buf)
    buf.add_(z).round_().clamp_(0, 15).sub_(z).mul_(s).sub_(g)
    buf.square_()
    return (buf.mul_(weight) if weight is not None else buf).sum(-1)


def quantize_int4(w, group: int = DEFAULT_GROUP, clip_search: bool = True, importance=None):
    """Float ``(out, in)`` -> (packed U8 ``(out, in/2)``, F16 scales, U8 zeros), groups of ``group``;
    ``importance`` (``(in,)``, e.g. an imatrix's ``E[x^2]``) weights the clipping search's error."""
    import torch

    rows, cols = w.shape
    g = w.detach().float().reshape(rows, cols // group, group)
    mn, mx = g.amin(-1), g.amax(-1)
    best_f = torch.ones_like(mn)
    weight = None if importance is None else torch.as_tensor(importance, dtype=torch.float32).reshape(
        1, cols // group, group)
    if clip_search:
        buf = torch.empty_like(g)
        best_err = None
        for f in CLIP_FACTORS:
            err = _sq_error(g, *_grid(mn * f, mx * f), buf, weight)
            if best_err is None:
                best_err = err
                continue
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_f = torch.where(better, torch.full_like(best_f, f), best_f)
        del buf
    scale, zero = _grid(mn * best_f, mx * best_f)
    q = _codes(g, scale, zero).to(torch.uint8).reshape(rows, cols)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed.contiguous(), scale.to(torch.float16), zero.to(torch.uint8)


def dequantize_int4(packed, scale, zero, dtype=None):
    """Inverse of :func:`quantize_int4`: the dense ``(out, in)`` weight in ``dtype`` (default F32)."""
    import torch

    rows = packed.shape[0]
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(rows, scale.shape[1], -1)
    dt = dtype or torch.float32
    w = (codes.to(dt) - zero.to(dt)[..., None]) * scale.to(dt)[..., None]
    return w.reshape(rows, -1)


def _int4_linear_class():
    import torch.nn.functional as F

    Base = C.lowbit_linear_base()

    def dequant_kernel(m, x):
        return F.linear(x, dequantize_int4(m.weight, m.weight_scale, m.weight_zero, x.dtype))

    class Int4Linear(Base):
        KERNELS = {"torch-dequant": dequant_kernel}

        def __init__(self, packed, scale, zero, backend: str):
            super().__init__(packed.shape[1] * 2, packed.shape[0], backend)
            self.register_buffer("weight", packed.contiguous())
            self.register_buffer("weight_scale", scale.contiguous())
            self.register_buffer("weight_zero", zero.contiguous())

        def dequantize(self, dtype=None):
            return dequantize_int4(self.weight, self.weight_scale, self.weight_zero, dtype)

    return Int4Linear


_CLS = None


def int4_linear(packed, scale, zero, backend: str = "torch-dequant"):
    global _CLS
    _CLS = _CLS or _int4_linear_class()
    return _CLS(packed, scale, zero, backend)


class Int4Scheme(C.Scheme):
    format = "int4"
    storage = "INT4"

    def __init__(self, group: int = DEFAULT_GROUP, clip_search: bool = True, imatrix=None):
        if group not in GROUP_SIZES:
            raise ZoptError(f"int4 group_size (--option group_size=N or int4:gN) must be one of {GROUP_SIZES}, "
                            f"not {group!r}")
        self.group, self.clip_search = group, bool(clip_search)
        self.imatrix = imatrix  # weights the clipping search (zopt.formats.imatrix.Imatrix), or None
        self.storage = f"INT4_G{group}"

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"scales": "F16", "zeros": "U8", "packing": "low nibble = even column"}
        if self.imatrix is not None:
            out["clip_search_importance"] = {"imatrix_sha256": self.imatrix.sha256,
                                             "imatrix_datasets": list(self.imatrix.datasets)}
        return out

    def draft(self) -> Int4Scheme:
        return Int4Scheme(self.group, clip_search=False)  # round to nearest: 6x cheaper

    def unsupported(self, shape):
        if shape[1] % self.group:
            return f"in_features {shape[1]} is not a multiple of the group size {self.group}"
        return None

    def parts(self, name, shape):
        out, inp = shape
        return [(name, "U8", (out, inp // 2)), (name + "_scale", "F16", (out, inp // self.group)),
                (name + "_zero", "U8", (out, inp // self.group))]

    def quantize(self, w):
        return C.quantize_rows(quantize_int4, w, self.group, self.clip_search)

    def quantize_named(self, name, w):
        imp = self.imatrix.importance(name, w.shape[1]) if self.imatrix is not None else None
        if imp is None:  # no entry for this weight: the plain search
            return self.quantize(w)
        return C.quantize_rows(quantize_int4, w, self.group, self.clip_search, imp)

    def module_int8(self, parts, shape):
        return as_int8(self.module(parts, shape, self.dequant_backend))

    def module(self, parts, shape, backend):
        get = {k.rsplit(".", 1)[-1]: v for k, v in parts.items()}
        return int4_linear(get["weight"], get["weight_scale"], get["weight_zero"], backend)


def scheme_from_options(options: Int4Options) -> C.Scheme:
    im = None
    if options.imatrix:
        from .. import imatrix

        if not options.clip_search:
            raise ZoptError("--imatrix weights int4's clipping search; with clip_search=false there is none")
        if options.rank:
            raise ZoptError("--imatrix with a low-rank branch (int4:rN) is not supported: convert without one")
        im = imatrix.read(options.imatrix)
    return with_rank(Int4Scheme(options.group_size, options.clip_search, im), check_rank("int4", options.rank))


def convert(src: TensorSource, out: Path, subtype: str | None, options: Int4Options, progress: bool, *,
            format: str = "int4") -> Path:
    options = with_subtype(options, format, subtype)
    scheme = scheme_from_options(options)
    sub = f"g{options.group_size}" + (f"r{options.rank}" if options.rank else "")
    return C.convert_lowbit(src, out, scheme, sub, options, progress)


def load(path: Path, device: str, backend: str, dtype: Any = None):
    return C.load_lowbit(path, lambda m: scheme_from_options(C.recorded_options(Int4Options, m)), device, backend,
                         dtype)


def list_types() -> list[tuple[str, float, str]]:
    """Subtypes: group sizes, and listed ranks of the low-rank branch (bits counted at dim 3840)."""
    out = [(f"g{g}", 4 + 24 / g, f"INT4 asymmetric, groups of {g}, F16 scale + U8 zero per group")
           for g in GROUP_SIZES]
    for g in GROUP_SIZES:
        for r in LISTED_RANKS:
            name = f"r{r}" if g == DEFAULT_GROUP else f"g{g}r{r}"
            out.append((name, 4 + 24 / g + overhead_bits(r, 3840, 3840),
                        f"groups of {g} + rank-{r} BF16 branch (bits at 3840 x 3840)"))
    return out
