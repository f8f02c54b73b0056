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

from pathlib import Path
from typing import Any

from ...checkpoint import TensorSource
from ...errors import ZoptError
from . import common as C
from .fp8_comfy import convert_comfy, load_comfy
from .fp8_ops import VARIANTS, fp8_linear, quantize_fp8  # shared with the comfy layout


def variant(options: dict[str, Any], subtype: str | None = None) -> str:
    v = str(options.get("fp8") or subtype or "e4m3").lower().replace("float8_", "").replace("fn", "")
    if v not in VARIANTS:
        raise ZoptError(f"unknown FP8 variant {v!r}; choose e4m3 or e5m2")
    return v


class FP8Scheme(C.Scheme):
    format = "fp8"

    def __init__(self, var: str = "e4m3"):
        self.var = var
        self.storage = VARIANTS[var][1]

    def options(self) -> dict[str, Any]:
        return {"fp8": self.var, "scales": "per-output-channel F32"}

    def parts(self, name, shape):
        return [(name, self.storage, tuple(shape)), (name + "_scale", "F32", (shape[0],))]

    def quantize(self, w):
        return C.quantize_rows(quantize_fp8, w, self.var)

    def module(self, parts, shape, backend):
        q = next(v for k, v in parts.items() if not k.endswith("_scale"))
        s = next(v for k, v in parts.items() if k.endswith("_scale"))
        return fp8_linear(q, s, backend)


def convert(src: TensorSource, out: Path, subtype: str | None, options: dict[str, Any], progress: bool) -> Path:
    var = variant(options, subtype)
    layout = options.get("layout") or "diffusers"
    if layout == "comfy":
        return convert_comfy(src, out, FP8Scheme(var), options, progress)
    if layout != "diffusers":
        raise ZoptError(f"fp8 has no layout {layout!r}; choose diffusers or comfy")
    return C.convert_lowbit(src, out, FP8Scheme(var), var, options, progress)


def load(path: Path, device: str = "cpu", backend: str | None = None, dtype: Any = None):
    from ..artifact import read_manifest

    folder = C.artifact_folder(path)
    if read_manifest(folder).get("layout") == "comfy":
        return load_comfy(folder, device, backend, dtype)
    return C.load_lowbit(path, lambda m: FP8Scheme(m["options"].get("fp8", "e4m3")), device, backend, dtype)


def list_types() -> list[tuple[str, float, str]]:
    return [("e4m3", 8.0, "FP8 E4M3FN weights, per-output-channel F32 scales (default)"),
            ("e5m2", 8.0, "FP8 E5M2 weights (wider range, 2 mantissa bits)")]


def _register_backends() -> None:
    from ...platform.backends import needs_cc, needs_device, register

    register("fp8", "scaled-mm", 30, (needs_device("cuda"), needs_cc(8, 9)),
             "torch._scaled_mm FP8 matmul (dynamic per-tensor E4M3 activations)")
    register("fp8", "fp8-storage", 10, (), "FP8 weights in memory, dequantized per layer, matmul in bf16/fp16/fp32")


_register_backends()
