"""INT8 x INT8 -> INT32 matmul with dynamic per-token activation scales (``torch._int_mm``).

``linear(x, q, scale, bias)`` computes ``x @ (q * scale[:, None]).T + bias`` the way integer
backends do: each row (token) of ``x`` is quantized to INT8 with scale ``amax / 127``, multiplied
with the INT8 weight codes ``q`` ``(out, in)`` with INT32 accumulation, and the result is scaled
by both scales. On CPU ``torch._int_mm`` runs oneDNN's VNNI kernels, measured several times faster
than a float32 matmul of the same shape (``benchmarks/int_mm_cpu.py``). The quantize and rescale
steps are fused by ``torch.compile`` when available (:mod:`zopt._compile`).
"""

from __future__ import annotations

import torch

from ..._compile import fused

QMAX = 127


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float weight (out, in) -> (INT8 codes, float32 per-row scales (out,)), ``w ~= q * scale``:
    symmetric round to nearest per output row."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / QMAX).clamp_min(1e-12)
    return torch.round(w / scale[:, None]).clamp(-QMAX, QMAX).to(torch.int8), scale


@fused
def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` (rows, k) -> (INT8 codes (rows, k), float32 scales (rows, 1)), ``x ~= codes * scales``."""
    xf = x.float()
    sx = xf.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / QMAX
    return torch.round(xf / sx).clamp(-QMAX, QMAX).to(torch.int8), sx


@fused
def _rescale(y: torch.Tensor, sx: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (y.float() * sx * scale).to(dtype)


@fused
def _rescale_bias(y: torch.Tensor, sx: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                  dtype: torch.dtype) -> torch.Tensor:
    return (y.float() * sx * scale + bias.float()).to(dtype)


def supported(out_features: int, in_features: int) -> bool:
    """``torch._int_mm`` needs both matrix sizes divisible by 8."""
    return hasattr(torch, "_int_mm") and out_features % 8 == 0 and in_features % 8 == 0


def linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (..., in) times INT8 weight codes ``q`` (out, in) with per-row float ``scale`` (out,);
    returns (..., out) in ``x``'s dtype."""
    shape = x.shape
    inner = torch.compiler.is_compiling()  # inside a compiled caller: trace the plain functions into its graph
    quant = quantize_tokens.fn if inner else quantize_tokens
    rescale, rescale_bias = (_rescale.fn, _rescale_bias.fn) if inner else (_rescale, _rescale_bias)
    xq, sx = quant(x.reshape(-1, shape[-1]))
    rows = xq.shape[0]
    if rows <= 16:  # the kernels want more than 16 rows
        xq = torch.cat([xq, xq.new_zeros(17 - rows, xq.shape[1])])
    y = torch._int_mm(xq, q.t())[:rows]
    s = scale.reshape(1, -1)
    out = rescale(y, sx, s, x.dtype) if bias is None else rescale_bias(y, sx, s, bias, x.dtype)
    return out.reshape(*shape[:-1], q.shape[0])
