"""Load any Z-Image GGUF (zopt's, ComfyUI-style, stable-diffusion.cpp-style) as a
``ZImageTransformer2DModel`` whose Linear layers keep GGUF blocks and dequantize on the fly.

Speed without giving back the memory saving: at load time the blocks of the common types are
re-laid into torch-friendly tensors of about the same size (int8 codes or packed nibbles plus a
float32 scale and offset per 32 weights), so dequantizing is a handful of vectorized passes
(unpack, convert, one multiply-add) instead of re-parsing bytes on every call; the block fields
are read with :mod:`zopt.ggml`'s helpers. Other types are decoded by zopt's one GGML dequantizer,
:func:`zopt.ggml.dequantize`. Weights of small layers (the dequantized copy costs less than
``CACHE_SMALL_NUMEL`` elements) are dequantized once and cached; ``cache="all"`` caches every
layer (eager speed, float memory), ``cache="none"`` none.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ... import ggml
from ..._compile import fused
from ...errors import CorruptFile, UnsupportedFormat, ZoptError
from ...families import zimage
from ..common import check_no_meta, empty_model, replace_module, set_tensor
from ..lowbit import int_mm
from .recipes import FLOAT_TYPES

CACHE_SMALL_NUMEL = 1 << 18  # 1 MB of float32: caching such layers costs little, saves a dequant each call
CACHE_MODES = ("small", "none", "all")


# ---------------------------------------------------------------------------------------------
# packed layouts: raw GGUF rows (N, row_bytes) uint8 -> tensors dequantize() reads fast


def _f16(x: torch.Tensor) -> torch.Tensor:
    """Little-endian f16 fields (..., 2) uint8 -> float32 (...)."""
    return ggml.f16_value(x).squeeze(-1)


def pack(raw: torch.Tensor, qtype: str, n: int, k: int) -> dict[str, Any]:
    """Re-lay GGUF rows of ``qtype`` (uint8, n rows of k weights) for fast dequantization.

    Returns {"kind": ..., tensors...}; kind "raw" keeps the bytes for the generic dequantizer.
    """
    block, size = ggml.layout(qtype)
    b = raw.reshape(n, k // block, size)
    if qtype == "Q8_0":
        return {"kind": "int8", "q": b[..., 2:].contiguous().view(torch.int8).reshape(n, k),
                "scale": _f16(b[..., :2]).reshape(n, k // 32)}
    if qtype in ("Q4_0", "Q4_1"):
        d = _f16(b[..., :2])
        if qtype == "Q4_0":
            q, off = b[..., 2:], -8 * d  # (q - 8) * d == q * d + (-8 d)
        else:
            q, off = b[..., 4:], _f16(b[..., 2:4])
        return {"kind": "nibble", "group": 16, "q": q.contiguous().reshape(n, k // 2),
                "scale": d.reshape(n, k // 32), "offset": off.reshape(n, k // 32)}
    if qtype == "Q4_K":
        d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])
        sc, mn = ggml.unpack_scales_k4(b[..., 4:16])
        return {"kind": "nibble", "group": 32, "q": b[..., 16:].contiguous().reshape(n, k // 2),
                "scale": (d[..., None] * sc).reshape(n, k // 32), "offset": (-dmin[..., None] * mn).reshape(n, k // 32)}
    return {"kind": "raw", "q": raw.reshape(n, -1).contiguous(), "qtype": qtype}


def unpack(p: dict[str, Any], n: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """The (n, k) float weight of a packed layout, in ``dtype``."""
    kind = p["kind"]
    if kind == "int8":
        # one pass: int8 * float promotes inside the kernel, no separate conversion
        return torch.mul(p["q"].view(n, k // 32, 32), p["scale"].to(dtype).unsqueeze(-1)).view(n, k)
    if kind == "nibble":
        g = p["group"]
        q = p["q"].view(n, k // (2 * g), 1, g)
        codes = torch.cat([q & 15, q >> 4], dim=2).view(n, k // 32, 32)
        w = torch.mul(codes, p["scale"].to(dtype).unsqueeze(-1))
        return w.add_(p["offset"].to(dtype).unsqueeze(-1)).view(n, k)
    if kind == "int4pack":
        raise RuntimeError("int4pack weights are only used through int4pack_linear")
    return ggml.dequantize(p["q"], p["qtype"], (n, k), dtype)


def to_int4pack(p: dict[str, Any], n: int, k: int, dtype: torch.dtype) -> dict[str, Any] | None:
    """A nibble layout as torch's CPU int4 weight-only matmul operands, or None if unsupported.

    torch's kernel computes ``w = (q - 8) * scale + zero`` per group of 32, so ``zero = offset +
    8 * scale``; it multiplies without materializing the float weight.
    """
    if not hasattr(torch, "_weight_int4pack_mm_for_cpu") or dtype != torch.bfloat16:
        return None
    g = p["group"]
    q = p["q"].view(n, k // (2 * g), 1, g)
    codes = torch.cat([q & 15, q >> 4], dim=2).reshape(n, k).to(torch.int32)
    try:
        packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
    except RuntimeError:
        return None
    scale, zero = p["scale"], p["offset"] + 8 * p["scale"]
    sz = torch.stack([scale.t(), zero.t()], dim=-1).to(dtype).contiguous()  # (k/32, n, 2)
    return {"kind": "int4pack", "q": packed, "scales_zeros": sz}


class GGUFLinear(nn.Module):
    """A Linear layer holding GGUF blocks; ``forward`` dequantizes the weight and calls ``linear``.

    ``weight`` is the stored uint8 block tensor (not floating point) and ``compute_dtype`` the
    dtype of the dequantized weight, which is how diffusers' Z-Image code finds the input dtype.
    """

    def __init__(self, packed: dict[str, Any], qtype: str, out_features: int, in_features: int,
                 bias: torch.Tensor | None, compute_dtype: torch.dtype, cache: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.qtype, self.kind = qtype, packed["kind"]
        self.compute_dtype = compute_dtype
        self._meta = {k: v for k, v in packed.items() if not isinstance(v, torch.Tensor)}
        self._fields = [k for k, v in packed.items() if isinstance(v, torch.Tensor)]
        for k in self._fields:
            self.register_buffer(k, packed[k], persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        self._cached: torch.Tensor | None = self.dequantize() if cache and self.kind != "int4pack" else None

    @property
    def weight(self) -> torch.Tensor:
        return self.q

    def dequantize(self) -> torch.Tensor:
        p = dict(self._meta, **{k: getattr(self, k) for k in self._fields})
        return unpack(p, self.out_features, self.in_features, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "int4pack":
            shape = x.shape
            y = torch._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(self.compute_dtype), self.q, 32,
                                                  self.scales_zeros)
            y = y.reshape(*shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        w = self._cached
        if w is None or w.device != x.device:
            w = self.dequantize()
        return nn.functional.linear(x.to(self.compute_dtype), w, self.bias)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self._cached is not None:
            self._cached = self.dequantize()
        return self

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, qtype={self.qtype}, cached={self._cached is not None}"


_rows_to_int8 = fused(int_mm.quantize_rows)


@fused
def _q8_0_rows_to_int8(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q8_0 codes (n, k) with a scale per 32 (n, k/32) -> per-row INT8 codes and row scales."""
    return int_mm.quantize_rows((q.view(q.shape[0], -1, 32) * scale.unsqueeze(-1)).view(q.shape))


class GGUFInt8Linear(nn.Module):
    """A GGUF Linear computed with integer matmuls, the way ggml's own CPU backend computes:
    activations are quantized to 8 bits on the fly and multiplied with 8-bit weights, INT32
    accumulation (``torch._int_mm``, oneDNN VNNI kernels on CPU).

    ggml scales each 32-weight block separately, which no torch integer GEMM can do; so the weight
    is re-quantized once, at load, per output row to INT8 codes from its exact GGUF values
    (``codes * row_scale`` is within half a step of each weight), and activations per token (row).
    The layer holds 1 byte per weight whatever the GGUF type: less than the file for Q8_0, up to
    3x the file for Q2_K, a quarter of float32 always. (Rebuilding the codes from 4-bit blocks on
    every call was measured: it costs two thirds of the matmul's time, see docs/gguf.md.)
    """

    def __init__(self, packed: dict[str, Any], qtype: str, out_features: int, in_features: int,
                 bias: torch.Tensor | None, compute_dtype: torch.dtype):
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.qtype, self.compute_dtype = qtype, compute_dtype
        if packed["kind"] == "int8":  # Q8_0: straight from the block codes, one fused pass when compiled
            q, row_scale = _q8_0_rows_to_int8(packed["q"], packed["scale"])
        else:
            q, row_scale = _rows_to_int8(unpack(packed, out_features, in_features, torch.float32))
        self.kind = "int8"
        self.register_buffer("q", q, persistent=False)
        self.register_buffer("row_scale", row_scale, persistent=False)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)

    @property
    def weight(self) -> torch.Tensor:
        return self.q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int_mm.linear(x.to(self.compute_dtype), self.q, self.row_scale, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, qtype={self.qtype}, {self.kind}"


# ---------------------------------------------------------------------------------------------
# loading


def _config(src, path: Path) -> dict[str, Any]:
    text = src.metadata.get("zopt.config")
    if text:
        try:
            return {"_class_name": zimage.DIFFUSERS_CLASS, **json.loads(text)}
        except ValueError:
            raise CorruptFile("zopt.config metadata is not valid JSON", path) from None
    return zimage.infer_config(src)


def _raw_rows(src, base: str) -> tuple[torch.Tensor, str]:
    data, ggml_type = src.raw(base)  # a fresh, writable copy read from the file
    return torch.from_numpy(data).view(torch.uint8), ggml_type.name


def load(path: str | os.PathLike, device: str, backend: str, dtype: Any = None,
         cache: str = "small", compile: bool | None = None) -> nn.Module:
    """A ``ZImageTransformer2DModel`` from the Z-Image GGUF at ``path``, on ``device``.

    ``backend`` (selected by the caller, ``zopt.formats.load``):

    * ``"int-mm-cpu"``: quantized Linear layers become :class:`GGUFInt8Linear` (INT8 weights
      re-quantized per row, dynamic INT8 activations, integer matmul);
    * ``"torch-dequant"``: they stay GGUF blocks (:class:`GGUFLinear`), dequantized exactly on the
      fly; ``cache`` ("small", "none" or "all") says which layers keep a dequantized copy.

    Float tensors and quantized non-Linear tensors (pad tokens or norms some converters quantize)
    become ``dtype`` tensors; ``dtype`` defaults to float32 on CPU and bfloat16 elsewhere.
    ``compile`` runs each transformer block through ``torch.compile`` (about 10-20 s on the first
    forward, then a faster one: inductor fuses the norms, modulation and activation quantization
    around the matmuls); the default compiles with the ``int-mm-cpu`` backend unless
    ``ZOPT_COMPILE=0`` (see :mod:`zopt._compile`).
    """
    from ... import checkpoint

    if backend not in ("int-mm-cpu", "torch-dequant"):
        raise UnsupportedFormat(f"GGUF has no backend {backend!r}; known: int-mm-cpu, torch-dequant", path)
    if cache not in CACHE_MODES:
        raise ZoptError(f"cache must be one of {', '.join(CACHE_MODES)}, not {cache!r}")
    path = Path(path)
    dtype = dtype or (torch.float32 if str(device).startswith("cpu") else torch.bfloat16)
    src = checkpoint.open(path)
    if getattr(src, "kind", None) != "gguf":
        raise UnsupportedFormat("not a GGUF file", path)
    from ...validate.gguf import verify_digest

    verify_digest(src.header, path)
    config = _config(src, path)
    zimage.check_shapes(src, config)
    view = zimage.as_diffusers(src)
    model = empty_model(config)
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    names = view.names()
    done: set[str] = set()
    for n in names:
        if n in done:
            continue
        op = view.plan[n]
        base = op[1]
        qtype = src.info(base).dtype
        mod_name = n.rsplit(".", 1)[0]
        if qtype in FLOAT_TYPES or mod_name not in linears or not n.endswith(".weight"):
            set_tensor(model, n, view.get(n).to(device=device, dtype=dtype))
            continue
        raw, qtype = _raw_rows(src, base)
        out_f, in_f = view.info(n).shape
        if op[0] == "chunk":
            raw = raw.reshape(op[3], out_f, -1)[op[2]]
        packed = pack(raw.to(device), qtype, out_f, in_f)
        small = out_f * in_f <= CACHE_SMALL_NUMEL
        fast = backend == "int-mm-cpu" and int_mm.supported(out_f, in_f)
        if packed["kind"] == "nibble" and str(device).startswith("cpu") and not (small or fast) and cache != "all":
            packed = to_int4pack(packed, out_f, in_f, dtype) or packed
        bias_name = f"{mod_name}.bias"
        bias = view.get(bias_name).to(device) if bias_name in names else None
        done.add(bias_name)
        if fast:
            lin = GGUFInt8Linear(packed, qtype, out_f, in_f, bias, dtype)
        else:
            lin = GGUFLinear(packed, qtype, out_f, in_f, bias, dtype, cache == "all" or (cache == "small" and small))
        replace_module(model, mod_name, lin)
    check_no_meta(model, path)
    model.to(device)
    from ..._compile import enabled

    if compile if compile is not None else (backend == "int-mm-cpu" and enabled()):
        compile_blocks(model)
    return model.eval()


def compile_blocks(model: nn.Module) -> None:
    """Run every transformer block through ``torch.compile`` (eager if compiling fails)."""
    from ..._compile import fused

    for name in ("noise_refiner", "context_refiner", "layers"):
        for block in getattr(model, name, ()):
            block.forward = fused(block.forward)
