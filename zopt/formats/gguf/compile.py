"""Optional ``torch.compile`` (inductor, CPU C++) of the GGML quantizer kernels.

The quantizers in ``ggml_quants`` / ``ggml_kquants`` / ``ggml_search`` are written as many small
torch ops; run eagerly, each op is a separate pass over memory plus Python dispatch. The functions
decorated with :func:`kernel` (a legacy block quantizer, one step of a K-quant search, a K type's
scale fitting and byte packing) are compiled by inductor into fused C++ loops when compilation is on,
with dynamic shapes so one compilation serves every tensor shape. Compiled and eager code give the
same bytes (tests/formats/gguf/test_ggml_compile.py checks every type).

Compilation is off by default (the first call of each kernel costs seconds of compile time, worth
it only on large tensors); :func:`compiled` turns it on for a block of work, which is what the GGUF
converter does for large checkpoints. ``ZOPT_COMPILE=0`` forces it off, ``ZOPT_COMPILE=1`` on.
Without a C++ compiler, or if compiling fails, zopt warns once and stays eager.
"""

from __future__ import annotations

import functools
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..._compile import cxx_available, env_setting

_lock = threading.Lock()
_wanted: list[bool] = []  # stack of compiled() requests; empty: off unless ZOPT_COMPILE=1
_broken: dict[str, str] = {}  # set once compilation failed or is impossible: stays eager


def _give_up(reason: str) -> None:
    with _lock:
        if _broken:
            return
        _broken["reason"] = reason
    warnings.warn(f"zopt: torch.compile unavailable ({reason}); GGML quantizers run eagerly (slower)",
                  RuntimeWarning, stacklevel=3)


def enabled() -> bool:
    """Whether :func:`kernel` functions currently run compiled."""
    env = env_setting()
    if env is False or _broken:
        return False
    if not (env or (_wanted and _wanted[-1])):
        return False
    if not cxx_available():
        _give_up("no C++ compiler found")
        return False
    return True


@contextmanager
def compiled(flag: bool = True) -> Iterator[bool]:
    """Within the block, run the GGML kernels compiled (``flag``) or eagerly; yields whether
    compilation is actually in effect (False under ZOPT_COMPILE=0, without a compiler, or after a
    failure)."""
    _wanted.append(flag)
    try:
        on = enabled()
        if not on:
            yield False
            return
        from torch._inductor import config
        from torch.fx.experimental import _config as fx_config

        # Keep the fp16 round trips (stored scales) that inductor would otherwise drop as redundant
        # casts: without them the bytes differ from eager. Set for the block rather than per
        # torch.compile call, whose options are re-applied on every call (measurable per kernel).
        # No duck shaping: sizes that happen to be equal in one call must not be assumed equal in
        # the next (each such guard failure costs a recompile).
        with config.patch(emulate_precision_casts=True), fx_config.patch(use_duck_shape=False), \
                _kernels_release_gil():
            yield True
    finally:
        _wanted.pop()


# inductor's C++ kernels are called with the GIL held, so worker threads running compiled kernels
# would take turns on one core. Within compiled(), kernels are built with a binding that parses its
# arguments under the GIL and then releases it for the loop itself (the loop touches no Python object).
_GIL_FREE_CALL = ("auto zopt_args = std::make_tuple({}); "
                  "Py_BEGIN_ALLOW_THREADS std::apply(kernel, zopt_args); Py_END_ALLOW_THREADS Py_RETURN_NONE;")


@contextmanager
def _kernels_release_gil() -> Iterator[None]:
    try:
        from torch._inductor.codecache import CppPythonBindingsCodeCache as cache
    except ImportError:  # another torch layout: kernels keep the GIL (correct, just serial)
        yield
        return
    if cache.call_entry_function != "kernel({}); Py_RETURN_NONE;":
        yield  # already patched (nested block) or not the binding this was written for: leave it
        return
    cache.call_entry_function = _GIL_FREE_CALL
    try:
        yield
    finally:
        cache.call_entry_function = "kernel({}); Py_RETURN_NONE;"


def kernel(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate a pure tensor function: compiled (``torch.compile(fn, dynamic=True)``) while
    compilation is enabled, else called as is. Tensor-valued constants should be passed in rather
    than built inside, and Python scalars that vary per call (floats) as 0-d tensors, so one
    compilation serves every call."""
    box: dict[str, Any] = {}

    @functools.wraps(fn)
    def call(*args: Any) -> Any:
        if not enabled():
            return fn(*args)
        fast = box.get("fn")
        if fast is None:
            import torch

            fast = box["fn"] = torch.compile(fn, dynamic=True)
        try:
            from torch._inductor import config

            if not config.emulate_precision_casts:  # enabled by ZOPT_COMPILE=1 outside compiled()
                with config.patch(emulate_precision_casts=True):
                    return fast(*args)
            return fast(*args)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run eagerly
            _give_up(f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160] if str(e).strip() else ''}")
            return fn(*args)

    call.eager = fn  # type: ignore[attr-defined]
    return call
