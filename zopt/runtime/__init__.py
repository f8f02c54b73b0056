"""Runtime: hardware detection, backend selection, offloading, attention, generation."""

from __future__ import annotations


def detect():
    """Detect the hardware at hand (see :func:`zopt.platform.hardware.detect`)."""
    from ..platform.hardware import detect as _detect

    return _detect()


def select(format: str, hardware=None, prefer: str | None = None):
    """Best backend for ``format`` on ``hardware`` (see :func:`zopt.platform.backends.select`)."""
    from ..platform.backends import select as _select

    return _select(format, hardware, prefer)


def prepare(model="tiny", **kwargs):
    """A ready pipeline for ``model`` on this machine and the :class:`RuntimeChoice` behind it
    (see :func:`zopt.runtime.pipeline.prepare`)."""
    from .pipeline import prepare as _prepare

    return _prepare(model, **kwargs)


def plan(hardware=None, width: int = 1024, height: int = 1024, batch: int = 1):
    """Format / offload / attention recommendation for ``hardware`` (see :func:`zopt.runtime.planner.plan`)."""
    from ..platform.hardware import detect as _detect
    from .planner import plan as _plan

    return _plan(hardware or _detect(), width, height, batch)
