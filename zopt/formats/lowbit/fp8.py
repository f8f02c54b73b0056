"""FP8 weights (E4M3FN by default, E5M2 with ``--option fp8=e5m2``).

Two layouts:

* ``diffusers`` (default): a folder with ``config.json``, ``diffusion_pytorch_model.safetensors``
  and the manifest. A quantized Linear stores ``<name>.weight`` (FP8) and ``<name>.weight_scale``
  (F32, one scale per output channel: ``w ~= fp8 * scale``).
* ``comfy`` (``--layout comfy``): ComfyUI's "scaled FP8" single file, original key names (fused
  qkv), one F32 scalar ``<layer>.scale_weight`` per quantized Linear and the ``scaled_fp8`` marker
  tensor whose dtype names the FP8 type; placed in a folder beside ``config.json`` and the manifest
  (see ``docs/lowbit.md``). ComfyUI loads the ``.safetensors`` file inside the folder.

Kernels: ``scaled-mm`` (``torch._scaled_mm``, CUDA cc >= 8.9: activations quantized to E4M3 with one
dynamic scale per call, weight scales applied to the output) and ``fp8-storage`` (any device: FP8
kept in memory, each layer's weight dequantized at call time, matmul in the activation dtype).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...checkpoint import TensorSource
from ...errors import ZoptError
from ..options import Options
from . import common as C

VARIANTS = {"e4m3": ("float8_e4m3fn", "F8_E4M3", 448.0), "e5m2": ("float8_e5m2", "F8_E5M2", 57344.0)}
COMFY_FILE = "zimage_fp8_scaled.safetensors"
LAYOUTS = ("diffusers", "comfy")


@dataclass(frozen=True)
class FP8Options(Options):
    fp8: str | None = None  # the FP8 type, e4m3 or e5m2 (default: the subtype, else e4m3)
    layout: str = field(default="diffusers", metadata={"choices": LAYOUTS})  # comfy: ComfyUI scaled-FP8 file


def variant(name: str | None, subtype: str | None = None) -> str:
    """``e4m3`` / ``e5m2`` from an option value or subtype (``float8_e4m3fn`` spellings accepted)."""
    v = str(name or subtype or "e4m3").lower().replace("float8_", "").replace("fn", "")
    if v not in VARIANTS:
        raise ZoptError(f"unknown FP8 variant {v!r}; choose e4m3 or e5m2")
    return v


def quantize_fp8(w, var: str = "e4m3", per_channel: bool = True):
    """Float weight ``(out, in)`` -> (FP8 tensor, F32 scales ``(out,)`` or scalar) with ``w ~= q * s``."""
    import torch

    tname, _, fmax = VARIANTS[var]
    w = w.float()
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax()
    scale = (amax / fmax).clamp_min(1e-12)
    s = scale[:, None] if per_channel else scale
    q = (w / s).clamp(-fmax, fmax).to(getattr(torch, tname))
    return q, scale.float()


def _fp8_linear_class():
    import torch
    import torch.nn.functional as F

    Base = C.lowbit_linear_base()

    def storage_kernel(m, x):
        # FP8 values are exact in bf16/fp16/fp32: upcast, matmul, then scale the output columns
        # (fp16 could overflow on unscaled sums, so it scales the weight first)
        w = m.weight.view(m.fp8_dtype).to(x.dtype)
        if x.dtype == torch.float16:
            return F.linear(x, w * m.weight_scale.to(x.dtype)[:, None])
        return F.linear(x, w) * m.weight_scale.to(x.dtype)

    def scaled_mm_kernel(m, x):
        if not m.mm_ok:
            return storage_kernel(m, x)
        out_dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.bfloat16
        sx = (x.abs().amax().float() / 448.0).clamp_min(1e-12)
        xq = (x.float() / sx).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        one = torch.ones((), device=x.device, dtype=torch.float32)
        y = torch._scaled_mm(xq, m.weight.view(m.fp8_dtype).t(), scale_a=sx, scale_b=one, out_dtype=out_dtype)
        y = y[0] if isinstance(y, tuple) else y
        return y * m.weight_scale.to(y.dtype)  # per-output-channel weight scales act on columns

    class FP8Linear(Base):
        """FP8 weight (held as uint8 so ``model.to(dtype)`` cannot upcast it) + per-row F32 scales."""

        KERNELS = {"fp8-storage": storage_kernel, "scaled-mm": scaled_mm_kernel}

        def __init__(self, q, scale, backend: str):
            super().__init__(q.shape[1], q.shape[0], backend)
            self.fp8_dtype = q.dtype
            self.register_buffer("weight", q.contiguous().view(torch.uint8))
            self.register_buffer("weight_scale", scale.float().reshape(-1).expand(q.shape[0]).contiguous())
            # torch._scaled_mm needs both matrix dims divisible by 16
            self.mm_ok = q.shape[0] % 16 == 0 and q.shape[1] % 16 == 0

        def dequantize(self, dtype=None):
            import torch as _t

            return (self.weight.view(self.fp8_dtype).float() * self.weight_scale[:, None]).to(dtype or _t.float32)

    return FP8Linear


_CLS = None


def fp8_linear(q, scale, backend: str = "fp8-storage"):
    """An FP8 Linear module from stored weight ``q`` and scales (per row, or one scalar)."""
    global _CLS
    _CLS = _CLS or _fp8_linear_class()
    return _CLS(q, scale, backend)


class FP8Scheme(C.Scheme):
    format = "fp8"

    def __init__(self, var: str = "e4m3"):
        self.var = var
        self.storage = VARIANTS[var][1]

    def describe(self) -> dict[str, Any]:
        return {"scales": "per-output-channel F32"}

    def parts(self, name, shape):
        return [(name, self.storage, tuple(shape)), (name + "_scale", "F32", (shape[0],))]

    def quantize(self, w):
        return C.quantize_rows(quantize_fp8, w, self.var)

    def module(self, parts, shape, backend):
        q = next(v for k, v in parts.items() if not k.endswith("_scale"))
        s = next(v for k, v in parts.items() if k.endswith("_scale"))
        return fp8_linear(q, s, backend)


def convert(src: TensorSource, out: Path, subtype: str | None, options: FP8Options, progress: bool, *,
            format: str = "fp8") -> Path:
    var = variant(options.fp8, subtype)
    options = dataclasses.replace(options, fp8=var)  # the manifest records the type actually written
    if options.layout == "comfy":
        from .fp8_comfy import convert_comfy

        return convert_comfy(src, out, var, options, progress)
    return C.convert_lowbit(src, out, FP8Scheme(var), var, options, progress)


def load(path: Path, device: str, backend: str, dtype: Any = None):
    from ..artifact import read_manifest

    folder = C.artifact_folder(path)
    if read_manifest(folder).get("layout") == "comfy":
        from .fp8_comfy import load_comfy

        return load_comfy(folder, device, backend, dtype)
    return C.load_lowbit(path, lambda m: FP8Scheme(variant(C.recorded_options(FP8Options, m).fp8)), device, backend,
                         dtype)


def list_types() -> list[tuple[str, float, str]]:
    return [("e4m3", 8.0, "FP8 E4M3FN weights, per-output-channel F32 scales (default)"),
            ("e5m2", 8.0, "FP8 E5M2 weights (wider range, 2 mantissa bits)")]
