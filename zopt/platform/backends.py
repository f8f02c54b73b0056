"""Which kernel runs which format on which hardware.

A format declares its backends as data (:class:`Backend`: name, priority, requirements,
description) in its registry entry; the requirements are small named predicates over a
:class:`~zopt.platform.hardware.Hardware` record. :func:`select` picks the highest-priority backend
whose requirements hold and says why; it runs once per load, and its :class:`Selection` is handed
to the format's loader. This module knows nothing about formats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from ..errors import UnsupportedFormat
from .hardware import Hardware


@dataclass(frozen=True)
class Requirement:
    """A named condition on the hardware; ``missing`` tells the user what to do when it fails."""

    name: str
    check: Callable[[Hardware], bool]
    missing: str
    package: str | None = None  # the importable module it asks for, if any (hardware detection probes it)

    def __call__(self, hw: Hardware) -> bool:
        return bool(self.check(hw))


def needs_device(*kinds: str) -> Requirement:
    """The device kind is one of ``kinds`` ("cuda", "rocm", "mps", "xpu", "cpu")."""
    return Requirement(f"device in {'/'.join(kinds)}", lambda hw: hw.device in kinds,
                       f"needs a {' or '.join(_DEVICE_LABEL.get(k, k.upper()) for k in kinds)} device")


def needs_mps() -> Requirement:
    """An Apple-silicon GPU through torch's MPS backend."""
    return needs_device("mps")


def needs_package(module: str, extra: str | None = None, pip: str | None = None, how: str | None = None) -> Requirement:
    """``module`` is importable here. The message says how to get it: the zopt ``extra``, a plain
    ``pip`` requirement, or free text ``how``."""
    hint = how or (f"pip install 'zopt[{extra}]'" if extra else f"pip install {pip or module}")
    return Requirement(f"package {module}", lambda hw: hw.has(module), f"needs {module}: {hint}", module)


def needs_cc(major: int, minor: int, below: tuple[int, int] | None = None) -> Requirement:
    """An NVIDIA GPU with compute capability >= (major, minor) (and < ``below`` when given)."""
    lo = (major, minor)
    span = f">= {major}.{minor}" + (f" and < {below[0]}.{below[1]}" if below else "")

    def ok(hw: Hardware) -> bool:
        cc = hw.compute_capability
        return hw.device == "cuda" and cc is not None and tuple(cc) >= lo and (below is None or tuple(cc) < below)

    return Requirement(f"CUDA compute capability {span}", ok,
                       f"needs an NVIDIA GPU with compute capability {span}")


def needs_rocm_arch(*prefixes: str) -> Requirement:
    """An AMD GPU under ROCm whose gfx architecture starts with one of ``prefixes`` (e.g. "gfx94")."""
    return Requirement(
        f"ROCm arch {'/'.join(prefixes)}*",
        lambda hw: hw.device == "rocm" and bool(hw.arch) and hw.arch.startswith(prefixes),
        f"needs an AMD GPU of architecture {' or '.join(p + '*' for p in prefixes)} (ROCm)",
    )


def needs_free_memory(nbytes: int) -> Requirement:
    """At least ``nbytes`` of free device memory (system RAM on CPU/MPS)."""
    gib = nbytes / 1024**3
    return Requirement(f"free memory >= {gib:.1f} GiB", lambda hw: hw.free_memory >= nbytes,
                       f"needs {gib:.1f} GiB of free device memory")


def needs_cpu_flag(*flags: str) -> Requirement:
    """The CPU advertises one of ``flags`` (as in /proc/cpuinfo: avx2, avx512_vnni, amx_tile...)."""
    return Requirement(f"CPU flag {'/'.join(flags)}", lambda hw: any(f in hw.cpu_flags for f in flags),
                       f"needs a CPU with {' or '.join(f.upper() for f in flags)}")


def needs_ort_provider(provider: str) -> Requirement:
    """onnxruntime is installed with execution provider ``provider``."""
    hint = {"CUDAExecutionProvider": "pip install onnxruntime-gpu",
            "TensorrtExecutionProvider": "pip install onnxruntime-gpu tensorrt",
            "CPUExecutionProvider": "pip install 'zopt[onnx]'"}.get(provider, "an onnxruntime build with it")
    return Requirement(f"onnxruntime {provider}", lambda hw: provider in hw.ort_providers,
                       f"needs onnxruntime with {provider} ({hint})")


def needs_any(*reqs: Requirement) -> Requirement:
    """At least one of ``reqs`` holds (e.g. a CUDA >= sm_80 or a ROCm gfx94x GPU)."""
    msgs = [r.missing for r in reqs]
    msgs = msgs[:1] + [m.removeprefix("needs ") for m in msgs[1:]]
    return Requirement(" or ".join(r.name for r in reqs), lambda hw: any(r(hw) for r in reqs), " or ".join(msgs))


_DEVICE_LABEL = {"cuda": "CUDA (NVIDIA)", "rocm": "ROCm (AMD)", "mps": "Apple MPS", "xpu": "Intel XPU", "cpu": "CPU"}


@dataclass(frozen=True)
class Backend:
    """One kernel a format can run with: data a format's registry entry declares."""

    name: str
    priority: int  # higher wins
    requires: tuple[Requirement, ...] = ()
    description: str = ""

    def why_not(self, hw: Hardware) -> list[str]:
        return [r.missing for r in self.requires if not r(hw)]


@dataclass(frozen=True)
class Selection:
    backend: Backend
    reason: str

    @property
    def name(self) -> str:
        return self.backend.name


class HasBackends(Protocol):
    """Anything that declares backends: a format's registry entry, for instance."""

    name: str
    backends: tuple[Backend, ...]


def ordered(backends: Iterable[Backend] | HasBackends) -> list[Backend]:
    """``backends`` (or an entry's ``.backends``), best (highest priority) first."""
    items = getattr(backends, "backends", backends)
    return sorted(items, key=lambda b: -b.priority)


def availability(backends: Iterable[Backend] | HasBackends, hw: Hardware) -> list[tuple[Backend, list[str]]]:
    """(backend, what is missing) for each backend, best first; an empty list means it runs."""
    return [(b, b.why_not(hw)) for b in ordered(backends)]


def required_packages(backends: Iterable[Backend]) -> tuple[str, ...]:
    """The importable modules the requirements of ``backends`` ask for (what detection must probe)."""
    return tuple(dict.fromkeys(r.package for b in backends for r in b.requires if r.package))


def select(backends: Iterable[Backend] | HasBackends, hardware: Hardware | None = None,
           prefer: str | Backend | Selection | None = None) -> Selection:
    """The best of ``backends`` (or of an entry's ``.backends``) that runs on ``hardware``, or
    ``prefer``, with a one-line reason. A ``Selection`` given as ``prefer`` is returned as it is:
    a choice made once is never made again.

    Raises UnsupportedFormat naming what is missing when nothing (or the preferred one) can run.
    """
    if isinstance(prefer, Selection):
        return prefer
    if isinstance(prefer, Backend):
        return Selection(prefer, f"{prefer.name} requested")
    from .hardware import detect

    if isinstance(backends, str):
        raise TypeError("select() takes backends (or an entry that has them); by format name: "
                        "zopt.formats.registry.select_backend")
    label = getattr(backends, "name", None) or "this format"
    cands = ordered(backends)
    if not cands:
        raise UnsupportedFormat(f"format {label!r} cannot run: no backend is declared")
    # detect only when a requirement has to be checked (a backend without any runs anywhere)
    hw = hardware or (detect(required_packages(cands)) if any(b.requires for b in cands) else None)
    if prefer and prefer != "auto":
        chosen = next((b for b in cands if b.name == prefer), None)
        if chosen is None:
            raise UnsupportedFormat(
                f"format {label!r} has no backend {prefer!r}; known: {', '.join(b.name for b in cands)}"
            )
        missing = chosen.why_not(hw) if chosen.requires else []
        if missing:
            raise UnsupportedFormat(f"backend {prefer!r} for {label} cannot run here: {'; '.join(missing)}")
        return Selection(chosen, f"{prefer} requested")
    skipped = []
    for b in cands:
        missing = b.why_not(hw) if b.requires else []
        if not missing:
            reason = f"{b.name}: {b.description}" if b.description else b.name
            if skipped:
                reason += f" (not {', '.join(skipped)})"
            return Selection(b, reason)
        skipped.append(f"{b.name}: {missing[0]}")
    raise UnsupportedFormat(f"no backend can run {label} here: {'; '.join(skipped)}")
