"""zopt: convert, run and benchmark Z-Image / Z-Image-Turbo transformers.

Public verbs (heavy packages are imported only when a verb is called)::

    src = zopt.open("model.safetensors")           # lazy tensor source
    zopt.convert("tiny", "gguf:Q4_K_M", "exports/tiny-Q4_K_M.gguf")
    model = zopt.load("exports/tiny-Q4_K_M.gguf")     # a ZImageTransformer2DModel-like module
    hw = zopt.detect()
"""

from __future__ import annotations

__all__ = ["__version__", "open", "convert", "load", "detect", "ZoptError"]

import logging as _logging

from ._version import __version__
from .errors import ZoptError

# bitsandbytes logs, on import, that an optional CPU kernel package is missing; zopt never uses that
# kernel (NF4 layers run zopt's own path), so the line is only noise before every message
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: not str(record.msg).startswith("Failed to load CPU gemm_4bit_forward"))


def open(source, *, allow_pickle: bool = False):  # noqa: A001
    """Open a checkpoint lazily (see :func:`zopt.checkpoint.open`); ``"tiny"`` is the embedded model."""
    from .checkpoint import open as _open
    from .families import resolve_source

    # built-in names become folders here, so the read path only ever sees files
    return _open(resolve_source(source), allow_pickle=allow_pickle)


def convert(source, to: str, out, *, options: dict | None = None, progress: bool = True, allow_pickle: bool = False,
            force: bool = False, loras=None):
    """Convert ``source`` to format spec ``to`` (e.g. ``"gguf:Q4_K_M"``, ``"fp8"``) at ``out``.

    An existing ``out`` is refused (ZoptError, before any work) unless ``force``; a bare name gets
    the format's suffix (``.gguf``). ``loras`` (``"FILE[:SCALE]"`` strings) are merged into the
    weights before quantizing. Returns the path written."""
    from .formats import convert as _convert

    return _convert(source, to, out, options=options, progress=progress, allow_pickle=allow_pickle, force=force,
                    loras=loras)


def load(path, device: str = "cpu", backend: str | None = None, dtype=None, loras=None,
         allow_pickle: bool = False):
    """Load an artifact or checkpoint as a ready transformer module; ``loras`` (``"FILE[:SCALE]"``
    strings) run beside its layers without dequantizing them (change or drop them with
    :func:`zopt.lora.set_lora_scale` / :func:`zopt.lora.remove_loras`)."""
    from .formats import load as _load

    extra = {"loras": loras, "allow_pickle": allow_pickle} if loras else {}
    return _load(path, device=device, backend=backend, dtype=dtype, **extra)


def detect():
    """Detect the hardware (see :func:`zopt.runtime.detect`)."""
    from .runtime import detect as _detect

    return _detect()
