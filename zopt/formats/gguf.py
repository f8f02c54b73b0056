"""GGUF: convert any Z-Image source to a GGUF file (F32 ... Q2_K and K-quant recipes), load any
Z-Image GGUF (zopt's, ComfyUI-style, stable-diffusion.cpp-style) as a working model.

Files are written in the original/ComfyUI key layout (fused qkv, no prefix) with 2-D pad tokens
and ``general.architecture = "lumina2"`` (what ComfyUI-GGUF's loader detects Z-Image as), so
ComfyUI-GGUF, diffusers' ``from_single_file`` and stable-diffusion.cpp read them. The per-tensor
policy lives in :mod:`gguf_recipes`, the byte layout in :mod:`gguf_writer`, the loader in
:mod:`gguf_loader`; see ``docs/gguf.md``.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .._io import atomic_path
from ..checkpoint import TensorSource
from ..errors import ZoptError
from ..families import zimage
from ..progress import progress_bar
from . import gguf_recipes
from .gguf_recipes import FILE_TYPE, FLOAT_TYPES, TensorPlan
from .gguf_writer import StreamingGGUFWriter

ARCHITECTURE = "lumina2"  # ComfyUI-GGUF's name for the Lumina-2 / Z-Image (NextDiT) family
QUANTIZATION_VERSION = 2  # ggml's GGML_QNT_VERSION
CHUNK_ELEMENTS = 1 << 22  # rows are quantized in pieces of ~4M weights: bounded memory per step


def _ggml_quants():
    """zopt's torch block quantizers, or None where this build lacks them."""
    try:
        from . import ggml_quants
    except ImportError:
        return None
    return ggml_quants


def _supported_by(gq, qtype: str) -> bool:
    sup = getattr(gq, "SUPPORTED", ())
    return qtype in sup or any(getattr(s, "name", None) == qtype for s in sup)


def quantize_rows(x, qtype: str):
    """Float rows ``x`` (..., row) -> stored bytes of GGML type ``qtype`` (a uint8 tensor/array)."""
    import torch

    if qtype == "F32":
        return x.to(torch.float32)
    if qtype == "F16":
        return x.to(torch.float16)
    if qtype == "BF16":
        return x.to(torch.bfloat16)
    gq = _ggml_quants()
    if gq is not None and _supported_by(gq, qtype):
        return gq.quantize(x.to(torch.float32), qtype)
    import gguf.quants

    try:
        return gguf.quants.quantize(x.to(torch.float32).numpy(), gguf.GGMLQuantizationType[qtype])
    except NotImplementedError:
        raise ZoptError(f"GGUF type {qtype} needs zopt's block quantizers (zopt.formats.ggml_quants)") from None


def dequantize_bytes(data, qtype: str, shape: tuple[int, ...], dtype=None):
    """Stored bytes of GGML type ``qtype`` -> a float tensor of ``shape`` (torch order)."""
    import numpy as np
    import torch

    dtype = dtype or torch.float32
    if isinstance(data, torch.Tensor):
        raw = data.contiguous().reshape(-1).view(torch.uint8)
    else:
        raw = torch.as_tensor(np.ascontiguousarray(data)).reshape(-1).view(torch.uint8)
    if qtype in FLOAT_TYPES:
        return raw.view({"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[qtype]) \
            .reshape(shape).to(dtype)
    gq = _ggml_quants()
    if gq is not None and _supported_by(gq, qtype):
        return gq.dequantize(raw, qtype, shape, dtype)
    import gguf.quants

    arr = gguf.quants.dequantize(raw.cpu().numpy(), gguf.GGMLQuantizationType[qtype])
    return torch.from_numpy(np.ascontiguousarray(arr)).reshape(shape).to(dtype).to(raw.device)


def _pieces(t, qtype: str):
    """Yield the stored bytes of 2-D+ tensor ``t`` in row chunks (1-D: in one piece)."""
    rows = t.reshape(-1, t.shape[-1]) if t.dim() >= 2 else t.reshape(1, -1)
    step = max(1, CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for i in range(0, rows.shape[0], step):
        yield quantize_rows(rows[i : i + step], qtype)


def plan_for(src: TensorSource, subtype: str | None, options: dict[str, Any]) -> tuple[TensorSource, list[TensorPlan]]:
    """(original-layout view of ``src``, per-tensor plan) — decided from shapes, before any data."""
    view = zimage.as_original(src)
    shapes = {n: _file_shape(n, view.info(n).shape) for n in view.names()}
    plans = gguf_recipes.plan(shapes, subtype, options.get("keep", ()), options.get("quantize", ()))
    return view, plans


def _file_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    # pad tokens are (1, dim) in the model; 1-D copies (stable-diffusion.cpp) are stored 2-D again
    return (1, shape[0]) if name.endswith("_pad_token") and len(shape) == 1 else tuple(shape)


def metadata_for(src: TensorSource, subtype: str, config: dict[str, Any], plans: list[TensorPlan],
                 sha256: str | None) -> dict[str, Any]:
    from .. import __version__

    rec = gguf_recipes.recipe(subtype)
    det = zimage.detect(src)
    return {
        "general.architecture": ARCHITECTURE,
        "general.type": "model",
        "general.name": det.variant,
        "general.file_type": FILE_TYPE[rec.name],
        "general.quantization_version": QUANTIZATION_VERSION,
        "zopt.version": __version__,
        "zopt.recipe": rec.name,
        "zopt.source.name": _source_name(src.path),
        "zopt.source.sha256": sha256 or "",
        "zopt.bits_per_weight": round(gguf_recipes.bits_per_weight(plans), 4),
        "zopt.config": json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True),
    }


def convert(src: TensorSource, out: Path, subtype: str | None, options: dict[str, Any], progress: bool) -> Path:
    """Write ``src`` as a GGUF file at ``out`` with per-tensor types from recipe ``subtype``.

    Streams: the header is computed from shapes first, then each tensor is read, quantized in row
    chunks and written; the source hash is computed in a background thread and patched into the
    header at the end. The output appears at ``out`` only when complete.
    """
    import torch

    rec = gguf_recipes.recipe(subtype)
    config = zimage.check_shapes(src)
    view, plans = plan_for(src, rec.name, options)
    hash_source = options.get("hash_source", True)
    digest: dict[str, str] = {}
    hasher = None
    if hash_source:
        hasher = threading.Thread(target=lambda: digest.setdefault("sha", src.sha256()), daemon=True)
        hasher.start()
    meta = metadata_for(src, rec.name, config, plans, "0" * 64 if hash_source else None)
    entries = [(p.name, p.shape, p.qtype) for p in plans]
    total = sum(view.info(p.name).nbytes for p in plans)

    def fetch(name: str):
        # read ahead in a thread: page faults on the next tensor overlap quantizing this one
        return view.get(name).clone()

    with atomic_path(out) as tmp, StreamingGGUFWriter(tmp, entries, meta) as w, progress_bar(
        total, f"gguf:{rec.name}", unit="B", enabled=progress
    ) as bar, ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(fetch, plans[0].name) if plans else None
        for i, p in enumerate(plans):
            t = nxt.result()
            nxt = pool.submit(fetch, plans[i + 1].name) if i + 1 < len(plans) else None
            t = t.reshape(p.shape)
            if not t.is_floating_point():
                raise ZoptError(f"tensor {p.name} is not floating point ({t.dtype})", src.path)
            with torch.inference_mode():
                w.write(p.name, _pieces(t, p.qtype))
            bar.describe(f"gguf:{rec.name} {i + 1}/{len(plans)} tensors")
            bar.advance(view.info(p.name).nbytes)
            del t
        if hasher is not None:
            hasher.join()
            w.patch_string("zopt.source.sha256", digest["sha"])
    return out


def list_types() -> list[tuple[str, float, str]]:
    """(subtype, effective bits per weight on the full-size layout, summary) for every recipe."""
    return gguf_recipes.list_types()


def load(path: Path, device: str = "cpu", backend: str | None = None, dtype: Any = None, **kw: Any):
    """Load a Z-Image GGUF as a ``ZImageTransformer2DModel`` dequantizing on the fly (see gguf_loader)."""
    from .gguf_loader import load as _load

    return _load(path, device=device, backend=backend, dtype=dtype, **kw)


def _register_backends() -> None:
    from ..runtime.backends import needs_device, register

    register("gguf", "int-mm-cpu", 20, (needs_device("cpu"),),
             "INT8 weights re-quantized per row from the GGUF values, dynamic INT8 activations, "
             "torch._int_mm (oneDNN) with INT32 accumulation")
    register("gguf", "torch-dequant", 10, (),
             "keeps GGUF blocks in memory, dequantizes each Linear weight exactly on the fly in torch (any device)")


_register_backends()


def _source_name(path) -> str:
    """A readable source name (a diffusers ``transformer/`` folder goes by its parent's name)."""
    if not path:
        return ""
    p = Path(path)
    return p.parent.name if p.name == "transformer" and p.parent.name else p.name
