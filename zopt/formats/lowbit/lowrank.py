"""A rank-r BF16 branch beside a 4-bit weight (``int4:r32``, ``nf4:r32``, ``--option rank=32``).

The weight is split as ``w ~= Q(w - up @ down) + up @ down``, after SVDQuant (Li et al., 2024):
``up`` ``(out, r)`` and ``down`` ``(r, in)`` are the top-r singular directions of the weight,
stored in BF16, and only the residual is quantized by the format's own scheme. The low-rank
part takes the weight's largest directions (outlier rows and columns, shared structure), which
leaves the quantizer a residual of smaller range. Refinement steps follow, as in LoftQ
(Li et al., 2023): the branch is recomputed from ``w - Q(w - up @ down)``, so it also takes
what the quantizer got wrong along those directions (with the scheme's cheaper
:meth:`~.common.Scheme.draft` quantizer; the stored residual gets the full one).

A Linear computes ``y = x @ Wq^T + (x @ down^T) @ up^T``: the base module adds the branch after
whichever kernel runs (:mod:`.common`), so every backend has it. Each weight adds
``2 * r * (out + in)`` bytes; :func:`overhead_bits` gives it per weight.

The SVD is a seeded randomized subspace iteration (Halko, Martinsson, Tropp 2011): a few
``(out, in) x (in, r + 16)`` matmuls per weight instead of a full SVD, deterministic for a given
weight, and bounded in memory by two copies of the one weight being converted.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

from ...errors import ZoptError
from . import common as C

T = TypeVar("T")

OVERSAMPLE = 16  # extra columns of the random sketch (accuracy of the top-r directions)
POWER_ITERS = 4  # subspace iterations: singular values of these weights decay slowly
REFINE_STEPS = 3  # recompute the branch from w - Q(residual) this many times (measured: docs/lowbit.md)
SEED = 0x5EED
UP, DOWN = "_lowrank_up", "_lowrank_down"
LISTED_RANKS = (16, 32, 64)  # ranks --list-types names; --option rank=N takes any
MAX_RANK = 1024


def overhead_bits(rank: int, out_features: int, in_features: int) -> float:
    """Extra bits per weight of a rank-``rank`` BF16 branch on an ``(out, in)`` weight."""
    return 16.0 * rank * (out_features + in_features) / (out_features * in_features)


def top_singular(w, rank: int):
    """(U ``(out, r)``, S ``(r,)``, Vh ``(r, in)``) of float32 ``w``: seeded randomized SVD."""
    import torch

    rows, cols = w.shape
    k = min(rank + OVERSAMPLE, rows, cols)
    g = torch.Generator().manual_seed(SEED)
    sketch = torch.randn(cols, k, generator=g, dtype=torch.float32)
    q, _ = torch.linalg.qr(w @ sketch)
    for _ in range(POWER_ITERS):
        z, _ = torch.linalg.qr(w.T @ q)
        q, _ = torch.linalg.qr(w @ z)
    u, s, vh = torch.linalg.svd(q.T @ w, full_matrices=False)
    return (q @ u)[:, :rank], s[:rank], vh[:rank]


def factors(w, rank: int):
    """BF16 (up ``(out, r)``, down ``(r, in)``) with ``up @ down`` the best rank-r part of ``w``
    (singular values split evenly between the two, so both have the same range in BF16)."""
    import torch

    u, s, vh = top_singular(w, rank)
    root = s.sqrt()
    return (u * root).to(torch.bfloat16).contiguous(), (root[:, None] * vh).to(torch.bfloat16).contiguous()


def product(up, down):
    """``up @ down`` in float32 (the branch as a dense weight)."""
    return up.float() @ down.float()


class LowRankScheme(C.Scheme):
    """``inner`` (a 4-bit scheme) storing the residual of a rank-``rank`` branch kept in BF16."""

    def __init__(self, inner: C.Scheme, rank: int):
        self.inner, self.rank = inner, int(rank)
        self.format = inner.format
        self.storage = f"{inner.storage}_R{self.rank}"

    def _rank(self, shape) -> int:
        return min(self.rank, shape[0], shape[1])

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "lowrank": {
            "rank": self.rank, "dtype": "BF16", "tensors": f"<weight>{UP} (out, rank), <weight>{DOWN} (rank, in)",
            "weight": f"dequantized residual + {UP[1:]} @ {DOWN[1:]}",
            "method": f"randomized SVD (seed {SEED}, {POWER_ITERS} power iterations), {REFINE_STEPS} refinement steps"}}

    def unsupported(self, shape):
        return self.inner.unsupported(shape)

    def parts(self, name, shape):
        r = self._rank(shape)
        return self.inner.parts(name, shape) + [(name + UP, "BF16", (shape[0], r)), (name + DOWN, "BF16", (r, shape[1]))]

    def quantize(self, w):
        w = w.float()
        up, down = factors(w, self._rank(w.shape))
        draft = self.inner.draft()
        for _ in range(REFINE_STEPS):
            q = draft.quantize(w - product(up, down))
            up, down = factors(w - _dequantize(draft, q, tuple(w.shape)), self._rank(w.shape))
        return list(self.inner.quantize(w - product(up, down))) + [up, down]

    def split(self, parts: dict[str, Any]):
        """(the inner scheme's parts, up, down) from a quantized weight's stored tensors."""
        up = next(v for k, v in parts.items() if k.endswith(UP))
        down = next(v for k, v in parts.items() if k.endswith(DOWN))
        return {k: v for k, v in parts.items() if not k.endswith((UP, DOWN))}, up, down

    def module(self, parts, shape, backend):
        rest, up, down = self.split(parts)
        return attach(self.inner.module(rest, shape, backend), up, down)

    def module_int8(self, parts, shape):
        rest, up, down = self.split(parts)
        return attach(self.inner.module_int8(rest, shape), up, down)

    def extra_config(self) -> dict[str, Any]:
        return self.inner.extra_config()


def _dequantize(scheme: C.Scheme, q, shape):
    import torch

    names = [p[0] for p in scheme.parts("w.weight", shape)]
    return scheme.module(dict(zip(names, q, strict=True)), shape, scheme.dequant_backend).dequantize(torch.float32)


def attach(module, up, down):
    """Give quantized Linear ``module`` the branch ``up @ down`` (BF16 buffers); returns it."""
    module.register_buffer("lowrank_up", up.contiguous())
    module.register_buffer("lowrank_down", down.contiguous())
    return module


def with_rank(scheme: C.Scheme, rank: int) -> C.Scheme:
    """``scheme`` itself for rank 0, else wrapped in :class:`LowRankScheme`."""
    return LowRankScheme(scheme, rank) if rank else scheme


def check_rank(fmt: str, rank: int) -> int:
    """``rank`` if it is a usable low-rank branch rank, else ZoptError."""
    if not 0 <= rank <= MAX_RANK:
        raise ZoptError(f"{fmt} rank (--option rank=N or {fmt}:rN) must be between 0 and {MAX_RANK}, not {rank}")
    return rank


def parse_subtype(fmt: str, subtype: str, groups: bool = True) -> tuple[int | None, int | None]:
    """``g64``, ``r32``, ``g64r32`` -> (group or None, rank or None); ZoptError otherwise."""
    m = re.fullmatch(r"(?:g(\d+))?-?(?:r(\d+))?" if groups else r"r(\d+)()", str(subtype).strip().lower())
    if not m or not any(m.groups()):
        raise ZoptError(f"unknown {fmt} type {subtype!r} (zopt convert --list-types lists them)")
    a, b = m.groups()
    if not groups:
        return None, int(a)
    return (int(a) if a else None), (int(b) if b else None)


def with_subtype(options: T, fmt: str, subtype: str | None, groups: bool = True) -> T:
    """``options`` with the group size / rank a subtype names (``int4:g64r32``); a subtype and an
    option that disagree are refused."""
    if not subtype:
        return options
    import dataclasses

    group, rank = parse_subtype(fmt, subtype, groups)
    changes: dict = {}
    if group is not None:
        if options.group_size != type(options)().group_size and group != options.group_size:
            raise ZoptError(f"{fmt}:{subtype} and --option group_size={options.group_size} disagree; give one of them")
        changes["group_size"] = group
    if rank is not None:
        if options.rank and rank != options.rank:
            raise ZoptError(f"{fmt}:{subtype} and --option rank={options.rank} disagree; give one of them")
        changes["rank"] = rank
    # every other field as given, those the manifest does not record (--imatrix) too
    return dataclasses.replace(options, **changes)
