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
dynamic scale per call, weight scales applied to the output), ``fp8-storage`` (any device: FP8
kept in memory, each layer's weight dequantized at call time, matmul in the activation dtype) and
``int-mm-cpu`` (CPUs have no FP8 arithmetic: the weight is re-quantized once at load to per-row
INT8 codes and run by the integer matmul with per-token INT8 activations).
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
from .fp8_comfy import convert_comfy, load_comfy
from .fp8_ops import VARIANTS, densify, fp8_linear, needs_fnuz, quantize_fp8, to_fnuz  # noqa: F401  (shared with the comfy layout)
from .int8 import as_int8

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


class FP8Scheme(C.Scheme):
    format = "fp8"
    dequant_backend = "fp8-storage"

    def __init__(self, var: str = "e4m3"):
        self.var = var
        self.storage = VARIANTS[var][1]

    def describe(self) -> dict[str, Any]:
        return {"scales": "per-output-channel F32"}

    def parts(self, name, shape):
        return [(name, self.storage, tuple(shape)), (name + "_scale", "F32", (shape[0],))]

    def quantize(self, w):
        return C.quantize_rows(quantize_fp8, w, self.var)

    def module_int8(self, parts, shape):
        return as_int8(self.module(parts, shape, self.dequant_backend))

    def module(self, parts, shape, backend):
        q = next(v for k, v in parts.items() if not k.endswith("_scale"))
        s = next(v for k, v in parts.items() if k.endswith("_scale"))
        return fp8_linear(q, s, backend)


def convert(src: TensorSource, out: Path, subtype: str | None, options: FP8Options, progress: bool, *,
            format: str = "fp8") -> Path:
    var = variant(options.fp8, subtype)
    if options.fp8 and subtype and var != variant(None, subtype):
        raise ZoptError(f"fp8:{subtype} and --option fp8={options.fp8} disagree; give one of them")
    options = dataclasses.replace(options, fp8=var)  # the manifest records the type actually written
    if options.layout == "comfy":
        return convert_comfy(src, out, FP8Scheme(var), options, progress)
    return C.convert_lowbit(src, out, FP8Scheme(var), var, options, progress)


def load(path: Path, device: str, backend: str, dtype: Any = None):
    from ..artifact import read_manifest

    folder = C.artifact_folder(path)
    if read_manifest(folder).get("layout") == "comfy":
        return load_comfy(folder, device, backend, dtype)
    scheme = lambda m: FP8Scheme(variant(C.recorded_options(FP8Options, m).fp8))  # noqa: E731
    if str(device).startswith("mps"):  # no float8 on MPS: held as fp16/bf16 there (the planner counts it so)
        import torch

        model = C.load_lowbit(path, scheme, "cpu", "fp8-storage", dtype)
        return densify(model, dtype or torch.bfloat16).to(device)
    return C.load_lowbit(path, scheme, device, backend, dtype)


def list_types() -> list[tuple[str, float, str]]:
    return [("e4m3", 8.0, "FP8 E4M3FN weights, per-output-channel F32 scales (default)"),
            ("e5m2", 8.0, "FP8 E5M2 weights (wider range, 2 mantissa bits)")]
