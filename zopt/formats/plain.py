"""Unquantized diffusers folders (bf16 / fp16 / fp32): the reference format.

``convert`` streams any Z-Image source (original or diffusers layout, safetensors or GGUF) into a
diffusers ``transformer`` folder; ``load_source`` loads any source straight into the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._io import atomic_path
from ..checkpoint import TensorSource
from ..families import zimage
from ..policy import Policy
from ..progress import progress_bar
from ..safetensors_io import StreamingSafetensorsWriter
from .artifact import source_provenance, write_config, write_manifest
from .common import check_no_meta, empty_model, set_tensor
from .options import Options

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


@dataclass(frozen=True)
class PlainOptions(Options):
    """bf16 / fp16 / fp32: only the shared options (``keep`` holds a tensor at its source precision)."""


def storage(dec, src_dtype: str, fmt: str) -> str:
    """A tensor's storage in plain format ``fmt`` after the policy's decision: the target dtype, except
    that an F32 source tensor the policy keeps and the family's rules name stays F32."""
    target = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}[fmt]
    keep = not dec.quantize and src_dtype == "F32" and (dec.floor is not None or dec.reason.startswith("--keep"))
    return "F32" if keep else target


def convert(src: TensorSource, out: Path, subtype: str | None, options: PlainOptions, progress: bool, *,
            format: str = "bf16") -> Path:
    import torch

    fmt = format
    dtype = getattr(torch, DTYPES[fmt])
    d = zimage.as_diffusers(src)
    config = zimage.check_shapes(src)
    names = d.names()
    policy = Policy.from_options(options)
    entries, kinds, reasons = [], {}, {}
    for n in names:
        info = d.info(n)
        dec = policy.decide(n, info.shape)
        kinds[n], reasons[n] = storage(dec, info.dtype, fmt), dec.reason
        entries.append((n, kinds[n], info.shape))
    with atomic_path(out, is_dir=True) as tmp:
        write_config(tmp, config)
        with StreamingSafetensorsWriter(tmp / WEIGHTS_NAME, entries, {"format": "pt"}) as w, progress_bar(
            len(names), f"convert -> {fmt}", enabled=progress
        ) as bar:
            for n in names:
                t = d.get(n).to(torch.float32 if kinds[n] == "F32" else dtype)
                w.write(n, t)
                bar.advance()
        write_manifest(
            tmp,
            format=fmt,
            subtype=None,
            options=options.recorded(),
            source=source_provenance(src, options.hash_source),
            config=config,
            tensors={n: {"storage": kinds[n], "reason": reasons[n]} for n in names},
        )
    return out


def load_source(path: str | os.PathLike | TensorSource, device: str = "cpu", dtype: Any = None):
    """Load any Z-Image source (``tiny``, folder, single file, GGUF) as a plain eager model.

    Tensors keep their stored dtype unless ``dtype`` is given (then everything is cast to it).
    """
    from .. import checkpoint

    src = path if isinstance(path, TensorSource) else checkpoint.open(path)
    config = zimage.check_shapes(src)
    d = zimage.as_diffusers(src)
    model = empty_model(config)
    for n in d.names():
        t = d.get(n)
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.to(device)
        if t.untyped_storage().nbytes() > t.numel() * t.element_size():
            # a view of a larger tensor (to_q/to_k/to_v of a fused qkv, each read whole): its own copy,
            # else every part would keep the whole fused tensor alive (1.5x the model's memory)
            t = t.clone()
        set_tensor(model, n, t)
    check_no_meta(model, src.path)
    return model


def open_verified(path: str | os.PathLike) -> TensorSource:
    """The source of a bf16/fp16/fp32 artifact folder after checking it against its manifest: every
    file the source reads (weights, shards, index, config) must be listed and match its sha256."""
    from .. import checkpoint
    from .artifact import verify_manifest

    path = Path(path)
    folder = path / "transformer" if (path / "transformer").is_dir() else path
    src = checkpoint.open(folder)
    try:
        reads = [*src.files, *(f for f in (folder / "config.json", *folder.glob("*.safetensors.index.json"))
                               if f.exists() or f.is_symlink())]
        verify_manifest(folder, reads=reads)
    except BaseException:
        src.close()
        raise
    return src


def load(path: Path, device: str, backend: str, dtype: Any = None):
    return load_source(open_verified(path), device=device, dtype=dtype)
