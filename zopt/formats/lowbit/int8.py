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

``int8_w8a8`` with ``--imatrix FILE`` (``zopt calibrate``) applies SmoothQuant: per input channel
``s_j = max|x_j|^a / max_i |W_ij|^(1-a)`` (``smooth_alpha`` a, default 0.5) moves activation
outliers into the weight, which is stored as ``W diag(s)``, and ``<name>.weight_smooth`` (F32,
``(in,)``) holds ``1/s``, multiplied into the activations before their per-token quantization.

``int8_w8a8`` with ``--option rotate=B`` (a power of two) rotates each Linear's input space by a
block-diagonal Walsh-Hadamard matrix ``H`` (blocks of ``b``, the largest power of two up to ``B``
dividing the layer's input width): the stored weight is ``W H`` and the kernels quantize ``x H``
(``x W^T = (x H)(W H)^T``, ``H`` orthonormal), so a few loud input channels are spread over their
block instead of setting every token's scale. ``dequantize`` returns the weight unrotated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...checkpoint import TensorSource
from ..options import Options
from . import common as C


@dataclass(frozen=True)
class Int8Options(Options):
    """int8 / int8_w8a8; ``imatrix`` (int8_w8a8 only) turns on SmoothQuant smoothing (recorded in the
    manifest's scheme, with the file's sha256)."""

    imatrix: str | None = field(default=None, metadata={"record": False})
    smooth_alpha: float = field(default=0.5, metadata={"record": False})
    rotate: int = 0  # largest Hadamard block (int8_w8a8), 0: none; changes the stored weights


def rotation_block(cols: int, block: int) -> int:
    """The Hadamard block a layer of ``cols`` inputs uses: the largest power of two up to ``block``
    that divides ``cols`` (1: no rotation)."""
    b = 1
    while b * 2 <= block and cols % (b * 2) == 0:
        b *= 2
    return b


def hadamard_signs(b: int):
    """The ``b x b`` Walsh-Hadamard sign matrix (Sylvester's construction; entries +-1, exact in
    every dtype); divided by ``sqrt(b)`` it is orthonormal."""
    import torch

    h = torch.ones(1, 1)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def hadamard(b: int):
    """The orthonormal ``b x b`` Walsh-Hadamard matrix, float32."""
    return hadamard_signs(b) / b ** 0.5


def rotate_cols(x, b: int, signs=None):
    """``x H`` for the block-diagonal Hadamard ``H`` of block ``b`` over ``x``'s last dimension
    (``H`` is symmetric, so this also undoes itself); ``signs``: ``hadamard_signs(b)``, if at hand."""
    if b <= 1:
        return x
    s = hadamard_signs(b) if signs is None else signs
    s = s.to(device=x.device, dtype=x.dtype)
    return ((x.reshape(*x.shape[:-1], x.shape[-1] // b, b) @ s) * b ** -0.5).reshape(x.shape)


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

    def smoothed(m, x):
        x = x if m.weight_smooth is None else x * m.weight_smooth.to(x.dtype)
        return rotate_cols(x, m.rotate, m.rotation)

    def w8a8_sim_kernel(m, x):
        # same quantized operands as the integer kernels; float32 accumulation
        xq, sx = quantize_tokens(smoothed(m, x))
        y = F.linear(xq.float(), m.weight.float())
        return (y * sx * m.weight_scale).to(x.dtype)

    def int_mm_kernel(m, x):
        from . import int_mm

        return int_mm.linear(smoothed(m, x), m.weight, m.weight_scale)

    class Int8Linear(Base):
        KERNELS = {"torch-dequant": dequant_kernel, "torch-dequant-w8a8": w8a8_sim_kernel,
                   "int-mm-cuda": int_mm_kernel, "int-mm-cpu": int_mm_kernel}

        def __init__(self, q, scale, backend: str, smooth=None, rotate: int = 1):
            super().__init__(q.shape[1], q.shape[0], backend)
            self.rotate = rotate  # Hadamard block of the stored weight's input space (1: none)
            # the block itself, built once and moved with the module (not saved: the manifest's
            # block size rebuilds it)
            # (no buffer at all without rotation: accelerate's offload hooks move every non-persistent
            # buffer by name and fail on one that is None)
            if rotate > 1:
                self.register_buffer("rotation", hadamard_signs(rotate), persistent=False)
            else:
                self.rotation = None
            self.register_buffer("weight", q.contiguous())
            self.register_buffer("weight_scale", scale.float().reshape(-1))
            self.register_buffer("weight_smooth", None if smooth is None else smooth.float().reshape(-1))
            # torch._int_mm needs K and N divisible by 8
            if backend.startswith("int-mm") and (q.shape[0] % 8 or q.shape[1] % 8):
                self.backend = "torch-dequant-w8a8"

        def dequantize(self, dtype=None):
            w = rotate_cols(self.weight.float() * self.weight_scale[:, None], self.rotate, self.rotation)
            if self.weight_smooth is not None:
                w = w * self.weight_smooth[None, :]
            return w.to(dtype or torch.float32)

    return Int8Linear


_CLS = None


def int8_linear(q, scale, backend: str = "torch-dequant", smooth=None, rotate: int = 1):
    global _CLS
    _CLS = _CLS or _int8_linear_class()
    return _CLS(q, scale, backend, smooth, rotate)


def smoothing(act_absmax, w, alpha: float):
    """SmoothQuant's per-input-channel factors ``s`` for weight ``w`` (out, in) whose inputs reach
    ``act_absmax`` (in,): ``max|x|^alpha / max|W|^(1-alpha)``, 1 where either is zero."""
    import torch

    a = torch.tensor(act_absmax, dtype=torch.float32)
    wmax = w.float().abs().amax(0)
    s = a.clamp_min(1e-8).pow(alpha) / wmax.clamp_min(1e-8).pow(1 - alpha)
    ok = (a > 0) & (wmax > 0) & torch.isfinite(s)
    return torch.where(ok, s.clamp(1e-4, 1e4), torch.ones_like(s))


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

    def __init__(self, fmt: str = "int8", imatrix=None, alpha: float = 0.5, rotate: int = 0):
        self.format = fmt
        self.imatrix = imatrix  # SmoothQuant statistics (int8_w8a8), or None
        self.alpha = alpha
        self.rotate = rotate  # largest Hadamard block (int8_w8a8), 0: none
        if rotate:
            self.storage = f"I8_H{rotate}"
            self.requires = ("int8-hadamard-rotation",)

    def describe(self) -> dict[str, Any]:
        opts: dict[str, Any] = {"weights": "symmetric per-output-channel, codes [-127, 127], F32 scales"}
        if self.format == "int8_w8a8":
            opts["activations"] = "dynamic per-token symmetric INT8"
        if self.imatrix is not None:
            opts["smoothing"] = {"method": "SmoothQuant", "alpha": self.alpha, "imatrix_sha256": self.imatrix.sha256,
                                 "imatrix_datasets": list(self.imatrix.datasets)}
        if self.rotate:
            opts["rotation"] = {"method": "block Walsh-Hadamard on the input dimension", "block": self.rotate}
        return opts

    def _smoothed(self, name) -> bool:
        return self.imatrix is not None and self.imatrix.absmax(name) is not None

    def parts(self, name, shape):
        out = [(name, "I8", tuple(shape)), (name + "_scale", "F32", (shape[0],))]
        return out + [(name + "_smooth", "F32", (shape[1],))] if self._smoothed(name) else out

    def quantize(self, w):
        return C.quantize_rows(quantize_int8, w)

    def module_int8(self, parts, shape):
        return self.module(parts, shape, C.INT8_CPU)  # already per-row INT8 codes

    def quantize_named(self, name, w):
        if not self._smoothed(name):
            return self.quantize(rotate_cols(w.float(), rotation_block(w.shape[1], self.rotate)))
        am = self.imatrix.absmax(name)
        if am.shape[0] != w.shape[1]:
            from ...errors import ZoptError

            raise ZoptError(f"imatrix entry {name} has {am.shape[0]} channels, the weight has {w.shape[1]}",
                            self.imatrix.path)
        s = smoothing(am, w, self.alpha)
        return [*self.quantize(rotate_cols(w.float() * s[None, :], rotation_block(w.shape[1], self.rotate))), 1.0 / s]

    def module(self, parts, shape, backend):
        q = next(v for k, v in parts.items() if not k.endswith(("_scale", "_smooth")))
        s = next(v for k, v in parts.items() if k.endswith("_scale"))
        smooth = next((v for k, v in parts.items() if k.endswith("_smooth")), None)
        if self.format == "int8_w8a8" and backend == "torch-dequant":
            backend = "torch-dequant-w8a8"
        return int8_linear(q, s, backend, smooth, rotation_block(shape[1], self.rotate))


def convert(src: TensorSource, out: Path, subtype: str | None, options: Int8Options, progress: bool, *,
            format: str = "int8") -> Path:
    im = None
    r = options.rotate
    if r:
        from ...errors import ZoptError

        if format != "int8_w8a8":
            raise ZoptError("rotate= spreads activation outliers for int8_w8a8; int8 (weight-only) has no use for it")
        if r < 2 or r & (r - 1) or r > 4096:
            raise ZoptError(f"rotate={r} is not a power of two between 2 and 4096")
    if options.imatrix:
        from ...errors import ZoptError
        from .. import imatrix

        if format != "int8_w8a8":
            raise ZoptError("--imatrix smooths activations for int8_w8a8; int8 (weight-only) has no use for it")
        if not 0.0 <= options.smooth_alpha <= 1.0:
            raise ZoptError(f"smooth_alpha={options.smooth_alpha} is outside 0..1")
        im = imatrix.read(options.imatrix)
    return C.convert_lowbit(src, out, Int8Scheme(format, im, options.smooth_alpha, r), subtype, options, progress)


def load(path: Path, device: str, backend: str, dtype: Any = None):
    def scheme(m):
        return Int8Scheme(m["format"], rotate=int(m.get("scheme", {}).get("rotation", {}).get("block", 0)))

    return C.load_lowbit(path, scheme, device, backend, dtype)
