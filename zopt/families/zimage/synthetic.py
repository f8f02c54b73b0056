"""A full-size synthetic Z-Image checkpoint: seeded random bf16 weights in the original layout.

6.15B parameters (12.3 GB) written streaming, header first from shapes alone, for scale
benchmarks where the real weights cannot be downloaded.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

from ..._io import atomic_path
from .config import config_for, expected_shapes
from .keys import to_original_name


def synthetic_layout(config: dict[str, Any], prefix: str = "") -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of ``config`` in the original layout, sorted by name."""
    shapes = expected_shapes(config)
    out: dict[str, tuple[int, ...]] = {}
    for n, s in shapes.items():
        if ".attention.to_k." in n or ".attention.to_v." in n:
            continue
        if ".attention.to_q.weight" in n:
            out[prefix + to_original_name(n.replace("to_q.weight", "")) + "qkv.weight"] = (3 * s[0], s[1])
        else:
            out[prefix + to_original_name(n)] = s
    return sorted(out.items())


def synthetic_header(layout: list[tuple[str, tuple[int, ...]]], metadata: dict[str, str] | None = None
                     ) -> tuple[bytes, int]:
    """(8-byte length + padded JSON header, data bytes) of a bf16 safetensors file with ``layout``."""
    header: dict[str, Any] = {
        "__metadata__": {"format": "pt", "modelspec.architecture": "Z-Image (synthetic)", **(metadata or {})}
    }
    offset = 0
    for name, shape in layout:
        n = 1
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + 2 * n]}
        offset += 2 * n
    hbytes = json.dumps(header, separators=(",", ":")).encode()
    hbytes += b" " * (-len(hbytes) % 8)
    return struct.pack("<Q", len(hbytes)) + hbytes, offset


def write_synthetic(
    out: str | os.PathLike,
    size: str = "full",
    seed: int = 0,
    prefix: str = "",
    progress: bool = True,
    chunk_elems: int = 1 << 24,
) -> Path:
    """Stream a seeded random bf16 checkpoint of ``size`` in the original layout to ``out``.

    Tensors are generated and written in chunks of ``chunk_elems`` values, so peak memory stays
    at a few hundred MB whatever the model size. The header is written first from shapes alone.
    """
    import torch

    config = config_for(size)
    layout = synthetic_layout(config, prefix)
    hbytes, total = synthetic_header(layout, {"zopt.synthetic": json.dumps({"size": size, "seed": seed})})
    out = Path(out)
    from ...progress import progress_bar

    with atomic_path(out) as tmp, open(tmp, "wb") as f, progress_bar(
        total, f"synth {size}", unit="B", enabled=progress
    ) as bar:
        f.write(hbytes)
        for name, shape in layout:
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) & 0x7FFFFFFF)
            n = 1
            for d in shape:
                n *= d
            fan_in = shape[-1] if len(shape) > 1 else 1
            std = 1.0 / fan_in**0.5 if len(shape) > 1 else 0.02
            mean = 1.0 if ("norm" in name and len(shape) == 1) else 0.0
            done = 0
            while done < n:
                k = min(chunk_elems, n - done)
                t = torch.randn(k, generator=g, dtype=torch.float32).mul_(std).add_(mean).to(torch.bfloat16)
                f.write(t.view(torch.int16).numpy().tobytes())
                done += k
                bar.advance(2 * k)
    return out
