"""INT8 weights, symmetric per output channel (``int8``), optionally with dynamic per-token INT8
activations at run time (``int8_w8a8``). Both store the same tensors: ``<name>.weight`` (I8,
codes in [-127, 127]) and ``<name>.weight_scale`` (F32, ``(out,)``): ``w ~= q * scale``.

Kernels:

* ``int8``: ``torch-dequant`` (weight dequantized per layer, matmul in the activation dtype) and,
  on CPU, ``int-mm-cpu`` (the stored codes as they are, with per-token INT8 activations: the same
  kernel as ``int8_w8a8``, measured faster than any weight-only kernel there).
* ``int8_w8a8``: activations are quantized per token (row) to INT8 with scale ``amax/127``;
  ``int-mm-cuda`` multiplies with ``torch._int_mm`` (INT32 accumulation) on CUDA, ``int-mm-cpu``
  does the same on CPU (measured faster than dequant + matmul here, see docs/lowbit.md), and
  ``torch-dequant`` simulates the same quantized numerics with float matmuls anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...checkpoint import TensorSource
from ..options import Options
from . import common as C


@dataclass(frozen=True)
class Int8Options(Options):
    """int8 / int8_w8a8: only the shared options (the storage has no knobs)."""


def quantize_int8(w):
    """Float ``(out, in)`` -> (I8 codes, F32 per-row scales) with ``w ~= q * scale``."""
    from .int_mm import quantize_rows

    return quantize_rows(w)


def quantize_tokens(x):
    """Dynamic per-token (row) symmetric INT8 quantization: (codes as I8, F32 scales ``(rows, 1)``)."""
    from .int_mm import quantize_tokens as quantize

    return quantize(x)


def _int8_linear_class():
    import torch
    import torch.nn.functional as F

    Base = C.lowbit_linear_base()

    def dequant_kernel(m, x):
        # INT8 codes are exact in bf16/fp16/fp32; scaling the output instead of the weight saves a
        # full pass over the weight (same trick as torchao's weight-only INT8)
        # (fp16 could overflow on unscaled sums, so it scales the weight first)
        if x.dtype == torch.float16:
            return F.linear(x, m.weight.to(x.dtype) * m.weight_scale.to(x.dtype)[:, None])
        return F.linear(x, m.weight.to(x.dtype)) * m.weight_scale.to(x.dtype)

    def w8a8_sim_kernel(m, x):
        # same quantized operands as the integer kernels; float32 accumulation
        xq, sx = quantize_tokens(x)
        y = F.linear(xq.float(), m.weight.float())
        return (y * sx * m.weight_scale).to(x.dtype)

    def int_mm_kernel(m, x):
        from . import int_mm

        return int_mm.linear(x, m.weight, m.weight_scale)

    class Int8Linear(Base):
        KERNELS = {"torch-dequant": dequant_kernel, "torch-dequant-w8a8": w8a8_sim_kernel,
                   "int-mm-cuda": int_mm_kernel, "int-mm-cpu": int_mm_kernel}

        def __init__(self, q, scale, backend: str):
            super().__init__(q.shape[1], q.shape[0], backend)
            self.register_buffer("weight", q.contiguous())
            self.register_buffer("weight_scale", scale.float().reshape(-1))
            # torch._int_mm needs K and N divisible by 8
            if backend.startswith("int-mm") and (q.shape[0] % 8 or q.shape[1] % 8):
                self.backend = "torch-dequant-w8a8"

        def dequantize(self, dtype=None):
            return (self.weight.float() * self.weight_scale[:, None]).to(dtype or torch.float32)

    return Int8Linear


_CLS = None


def int8_linear(q, scale, backend: str = "torch-dequant"):
    global _CLS
    _CLS = _CLS or _int8_linear_class()
    return _CLS(q, scale, backend)


def as_int8(module):
    """Quantized Linear ``module`` held as INT8 instead (backend ``int-mm-cpu``): its weight
    dequantized once, at load, and re-quantized per output row to INT8 codes (each within half a
    step of the dequantized weight), run by the integer-matmul kernel with per-token INT8
    activations; a low-rank branch moves over as it is."""
    import torch

    from .int_mm import quantize_rows

    q, scale = quantize_rows(module.dequantize(torch.float32))
    out = int8_linear(q, scale, C.INT8_CPU)
    if module.lowrank_up is not None:
        out.register_buffer("lowrank_up", module.lowrank_up)
        out.register_buffer("lowrank_down", module.lowrank_down)
    return out


class Int8Scheme(C.Scheme):
    storage = "I8"

    def __init__(self, fmt: str = "int8"):
        self.format = fmt

    def describe(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"weights": "symmetric per-output-channel, codes [-127, 127], F32 scales"}
        if self.format == "int8_w8a8":
            opts["activations"] = "dynamic per-token symmetric INT8"
        return opts

    def parts(self, name, shape):
        return [(name, "I8", tuple(shape)), (name + "_scale", "F32", (shape[0],))]

    def quantize(self, w):
        return C.quantize_rows(quantize_int8, w)

    def module_int8(self, parts, shape):
        return self.module(parts, shape, C.INT8_CPU)  # already per-row INT8 codes

    def module(self, parts, shape, backend):
        q = next(v for k, v in parts.items() if not k.endswith("_scale"))
        s = next(v for k, v in parts.items() if k.endswith("_scale"))
        if self.format == "int8_w8a8" and backend == "torch-dequant":
            backend = "torch-dequant-w8a8"
        return int8_linear(q, s, backend)


def convert(src: TensorSource, out: Path, subtype: str | None, options: Int8Options, progress: bool, *,
            format: str = "int8") -> Path:
    return C.convert_lowbit(src, out, Int8Scheme(format), subtype, options, progress)


def load(path: Path, device: str, backend: str, dtype: Any = None):
    return C.load_lowbit(path, lambda m: Int8Scheme(m["format"]), device, backend, dtype)
