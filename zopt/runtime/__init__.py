"""Runtime: hardware detection, backend selection, offloading, attention, generation."""

from __future__ import annotations


def detect():
    """Detect the hardware at hand, with the optional packages every format's backends need
    (see :func:`zopt.platform.hardware.detect`)."""
    from ..formats.registry import packages
    from ..platform.hardware import detect as _detect

    return _detect(packages())


def select(format: str, hardware=None, prefer: str | None = None):
    """Best backend for ``format`` on ``hardware`` (default: this machine; see
    :func:`zopt.formats.registry.select_backend`)."""
    from ..formats.registry import select_backend

    return select_backend(format, hardware or detect(), prefer)


def prepare(model="tiny", **kwargs):
    """A ready pipeline for ``model`` on this machine and the :class:`RuntimeChoice` behind it
    (see :func:`zopt.runtime.pipeline.prepare`)."""
    from .pipeline import prepare as _prepare

    return _prepare(model, **kwargs)


def plan(hardware=None, width: int = 1024, height: int = 1024, batch: int = 1, **kwargs):
    """Format / offload / attention recommendation for ``hardware`` (see :func:`zopt.runtime.planner.plan`;
    ``kwargs`` such as ``steps``, ``guidance``, ``cfg_truncation`` pass through)."""
    from .planner import plan as _plan

    return _plan(hardware or detect(), width, height, batch, **kwargs)
