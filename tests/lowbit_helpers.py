"""Shared helpers for the low-bit format tests: convert the tiny model once per worker and spec."""

from __future__ import annotations

import json
from pathlib import Path

_CACHE: dict[tuple, Path] = {}


def _one_thread() -> None:
    # The suite runs one xdist worker per core: a second intra-op thread per worker only adds
    # synchronization stalls (measured 8x slower quantization on small tensors under load).
    import torch

    torch.set_num_threads(1)


_one_thread()


def artifact(root: Path, source: Path, spec: str, **options) -> Path:
    """Convert ``source`` to ``spec`` with ``options`` under ``root`` (memoized per worker)."""
    from zopt import formats

    key = (str(source), spec, json.dumps(options, sort_keys=True))
    if key not in _CACHE:
        out = root / f"{spec.replace(':', '-')}-{len(_CACHE)}"
        _CACHE[key] = formats.convert(source, spec, out, options=dict(options), progress=False)
    return _CACHE[key]


def reference_output(source: Path, inputs):
    """The BF16 checkpoint's output, computed in float32 (the reference every format is held to)."""
    import torch

    from zopt.formats.plain import load_source

    key = ("ref", str(source))
    if key not in _CACHE:
        m = load_source(source, dtype=torch.float32)
        x, t, cap = inputs
        with torch.no_grad():
            _CACHE[key] = m(x, t, cap, return_dict=False)[0][0]
    return _CACHE[key]


def output(model, inputs):
    import torch

    x, t, cap = inputs
    with torch.no_grad():
        return model(x, t, cap, return_dict=False)[0][0].float()


def cosine(a, b) -> float:
    a, b = a.float().flatten(), b.float().flatten()
    return float(a @ b / (a.norm() * b.norm()))
