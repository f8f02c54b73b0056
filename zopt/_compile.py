"""``torch.compile`` for small hot functions, with an eager fallback; the ``ZOPT_COMPILE`` switch.

Chains of elementwise ops (quantize a block, scale a matmul's output) cost one pass over memory
per op in eager torch; inductor fuses them into one generated C++ loop. Compilation needs a C++
compiler (inductor's CPU backend) and takes seconds once per function (cached on disk by torch).
Users: the GGUF loader's INT8 backend (:func:`fused`, on by default) and the GGML quantizers
(:mod:`zopt.formats.gguf.compile`, on for large conversions). ``ZOPT_COMPILE=0`` turns both off,
``ZOPT_COMPILE=1`` on. Without a compiler, or if compiling fails, zopt warns once and runs
eagerly: results are the same, only slower.
"""

from __future__ import annotations

import functools
import os
import shutil
import warnings
from collections.abc import Callable
from typing import Any

OFF_VALUES = ("0", "false", "no", "off")
ON_VALUES = ("1", "true", "yes", "on")


def env_setting() -> bool | None:
    """``ZOPT_COMPILE``: False (0/false/no/off), True (1/true/yes/on) or None (unset: each user's
    default applies; the GGUF loader compiles, the GGUF converter only for large checkpoints)."""
    v = os.environ.get("ZOPT_COMPILE", "").strip().lower()
    return False if v in OFF_VALUES else True if v in ON_VALUES else None


@functools.lru_cache(maxsize=8)
def _cxx_on_path(cxx: str | None, path: str | None) -> bool:
    return any(shutil.which(c) for c in ([cxx] if cxx else []) + ["g++", "c++", "clang++"])


def cxx_available() -> bool:
    """A C++ compiler is on PATH (inductor's CPU backend needs one)."""
    return _cxx_on_path(os.environ.get("CXX"), os.environ.get("PATH"))


def enabled() -> bool:
    """Whether :func:`fused` functions try ``torch.compile``: not turned off by ``ZOPT_COMPILE``
    and a C++ compiler is there."""
    return env_setting() is not False and cxx_available()


_warned: list[bool] = []
_noted: list[bool] = []


def _compile_note() -> None:
    """Say once per process that the next call compiles (seconds to a minute, then cached)."""
    if not _noted:
        _noted.append(True)
        from .progress import note

        note("compiling kernels with torch.compile (once: 10-60 s, then cached on disk; ZOPT_COMPILE=0 "
             "or --no-compile skips it)")


def _no_compiler_warning() -> None:
    if not _warned:
        _warned.append(True)
        warnings.warn("zopt: no C++ compiler found (g++, c++ or clang++), so torch.compile cannot fuse "
                      "kernels; running eagerly (slower). ZOPT_COMPILE=0 silences this.", RuntimeWarning, stacklevel=3)


class _Fused:
    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None
        self._failed = False
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._failed or env_setting() is False:
            return self.fn(*args, **kwargs)
        if not cxx_available():
            _no_compiler_warning()
            return self.fn(*args, **kwargs)
        if self._compiled is None:
            import torch

            _compile_note()
            self._compiled = torch.compile(self.fn, dynamic=True)
        try:
            with warnings.catch_warnings():
                # inductor leaves complex-number ops (rotary embeddings) to eager and says so
                warnings.filterwarnings("ignore", message=".*complex operators.*")
                return self._compiled(*args, **kwargs)
        except Exception as e:  # no compiler, unsupported device...: the eager function is still right
            out = self.fn(*args, **kwargs)  # a genuine error in the inputs raises here, compile stays on
            self._failed = True
            first = (str(e).strip().splitlines() or [""])[0][:160]
            warnings.warn(f"zopt: torch.compile failed for {self.fn.__name__} ({type(e).__name__}: {first}); "
                          "running it eagerly (set ZOPT_COMPILE=0 to skip compiling)", RuntimeWarning, stacklevel=2)
            return out


def fused(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` compiled by inductor on first call (dynamic shapes: one compilation for all sizes),
    or eager when compiling is off or fails."""
    return _Fused(fn)
