"""Which kernel runs which format on which hardware.

Each format module registers its backends next to its code with :func:`register`, listing the
requirements as small named predicates over a :class:`~zopt.platform.hardware.Hardware` record.
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
    return Requirement(f"package {module}", lambda hw: hw.has(module), f"needs {module}: {hint}")


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
_LOAD_PROBLEMS: dict[str, str] = {}  # format -> why its module could not be imported
# what formats.artifact_format() reports for sources loaded as they are: they run like a plain folder
ALIASES = {"tiny": "bf16", "safetensors": "bf16"}


def register(format: str, name: str, priority: int, requires: tuple[Requirement, ...] = (), description: str = "") -> Backend:
    """Register backend ``name`` for ``format`` (idempotent: re-registering replaces)."""
    b = Backend(format, name, priority, tuple(requires), description)
    _REGISTRY.setdefault(format, {})[name] = b
    return b


def unregister(format: str, name: str | None = None) -> None:
    """Remove one backend (or all of ``format``'s); for tests and plug-ins that withdraw themselves."""
    if name is None:
        _REGISTRY.pop(format, None)
    else:
        _REGISTRY.get(format, {}).pop(name, None)


def _ensure_loaded(format: str) -> None:
    """Import the format's module so it registers its backends; remember why when it cannot."""
    from ..formats import FORMATS

    if format in _REGISTRY or format not in FORMATS or format in _LOAD_PROBLEMS:
        return
    module = FORMATS[format].module
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module or module.startswith(e.name + ".")):
            _LOAD_PROBLEMS[format] = "not in this build"
        else:
            _LOAD_PROBLEMS[format] = f"its module needs {e.name}, which is not installed"
    except ImportError as e:  # a broken install must not take doctor down with it
        _LOAD_PROBLEMS[format] = f"its module failed to import ({e})"


def format_status(format: str) -> str | None:
    """None when ``format``'s module is importable here, else why not (e.g. "not in this build")."""
    _ensure_loaded(format)
    if format in _REGISTRY:
        return None
    return _LOAD_PROBLEMS.get(format, "no backend registered")


def backends_for(format: str) -> list[Backend]:
    """Every backend registered for ``format``, best (highest priority) first."""
    _ensure_loaded(format)
    return sorted(_REGISTRY.get(format, {}).values(), key=lambda b: -b.priority)


def availability(format: str, hw: Hardware) -> list[tuple[Backend, list[str]]]:
    """(backend, what is missing) for each of ``format``'s backends; an empty list means it runs."""
    return [(b, b.why_not(hw)) for b in backends_for(format)]


def select(format: str, hardware: Hardware | None = None, prefer: str | None = None) -> Selection:
    """The best backend that can run ``format`` here (or ``prefer``), with a one-line reason.

    Raises UnsupportedFormat naming what is missing when nothing (or the preferred one) can run.
    """
    from .hardware import detect

    hw = hardware or detect()
    format = ALIASES.get(format, format)
    cands = backends_for(format)
    if not cands:
        problem = format_status(format)
        if problem == "not in this build":
            raise UnsupportedFormat(f"format {format!r} is not in this zopt build")
        raise UnsupportedFormat(f"format {format!r} cannot run: {problem or 'no backend is registered'}")
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
