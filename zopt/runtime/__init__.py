"""Runtime: hardware detection, backend selection, offloading, attention, generation."""

from __future__ import annotations


def detect():
    """Detect the hardware at hand (see :func:`zopt.runtime.hardware.detect`)."""
    from .hardware import detect as _detect

    return _detect()


def select(format: str, hardware=None, prefer: str | None = None):
    """Best backend for ``format`` on ``hardware`` (see :func:`zopt.runtime.backends.select`)."""
    from .backends import select as _select

    return _select(format, hardware, prefer)
