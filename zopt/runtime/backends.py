"""Which kernel runs which format on which hardware.

Each format module registers its backends next to its code with :func:`register`, listing the
requirements as small named predicates over a :class:`~zopt.runtime.hardware.Hardware` record.
:func:`select` picks the highest-priority backend whose requirements hold and says why.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import UnsupportedFormat
from .hardware import Hardware


@dataclass(frozen=True)
class Requirement:
    """A named condition on the hardware; ``missing`` tells the user what to do when it fails."""

    name: str
    check: Callable[[Hardware], bool]
    missing: str

    def __call__(self, hw: Hardware) -> bool:
        return bool(self.check(hw))


def needs_device(*kinds: str) -> Requirement:
    return Requirement(f"device in {'/'.join(kinds)}", lambda hw: hw.device in kinds,
                       f"needs a {' or '.join(k.upper() for k in kinds)} device")


def needs_package(module: str, extra: str) -> Requirement:
    return Requirement(f"package {module}", lambda hw: hw.has(module), f"install {module}: pip install 'zopt[{extra}]'")


def needs_cc(major: int, minor: int) -> Requirement:
    return Requirement(
        f"CUDA compute capability >= {major}.{minor}",
        lambda hw: hw.device == "cuda" and hw.compute_capability is not None and hw.compute_capability >= (major, minor),
        f"needs an NVIDIA GPU with compute capability >= {major}.{minor}",
    )


def needs_ort_provider(provider: str) -> Requirement:
    return Requirement(f"onnxruntime {provider}", lambda hw: provider in hw.ort_providers,
                       f"needs onnxruntime with {provider} (onnxruntime-gpu for CUDA/TensorRT)")


@dataclass(frozen=True)
class Backend:
    format: str
    name: str
    priority: int  # higher wins
    requires: tuple[Requirement, ...]
    description: str

    def why_not(self, hw: Hardware) -> list[str]:
        return [r.missing for r in self.requires if not r(hw)]


@dataclass(frozen=True)
class Selection:
    backend: Backend
    reason: str

    @property
    def name(self) -> str:
        return self.backend.name


_REGISTRY: dict[str, dict[str, Backend]] = {}


def register(format: str, name: str, priority: int, requires: tuple[Requirement, ...] = (), description: str = "") -> Backend:
    """Register backend ``name`` for ``format`` (idempotent: re-registering replaces)."""
    b = Backend(format, name, priority, tuple(requires), description)
    _REGISTRY.setdefault(format, {})[name] = b
    return b


def _ensure_loaded(format: str) -> None:
    from ..formats import FORMATS

    if format in _REGISTRY or format not in FORMATS:
        return
    try:
        importlib.import_module(FORMATS[format].module)
    except ImportError:
        pass


def backends_for(format: str) -> list[Backend]:
    _ensure_loaded(format)
    return sorted(_REGISTRY.get(format, {}).values(), key=lambda b: -b.priority)


def select(format: str, hardware: Hardware | None = None, prefer: str | None = None) -> Selection:
    """The best backend that can run ``format`` here (or ``prefer``), with a one-line reason.

    Raises UnsupportedFormat naming what is missing when nothing (or the preferred one) can run.
    """
    from .hardware import detect

    hw = hardware or detect()
    cands = backends_for(format)
    if not cands:
        raise UnsupportedFormat(f"no backend is registered for format {format!r}")
    if prefer and prefer != "auto":
        chosen = next((b for b in cands if b.name == prefer), None)
        if chosen is None:
            raise UnsupportedFormat(
                f"format {format!r} has no backend {prefer!r}; known: {', '.join(b.name for b in cands)}"
            )
        missing = chosen.why_not(hw)
        if missing:
            raise UnsupportedFormat(f"backend {prefer!r} for {format} cannot run here: {'; '.join(missing)}")
        return Selection(chosen, f"{prefer} requested")
    skipped = []
    for b in cands:
        missing = b.why_not(hw)
        if not missing:
            reason = f"{b.name}: {b.description}" if b.description else b.name
            if skipped:
                reason += f" (not {', '.join(skipped)})"
            return Selection(b, reason)
        skipped.append(f"{b.name}: {missing[0]}")
    raise UnsupportedFormat(f"no backend can run {format} here: {'; '.join(skipped)}")
