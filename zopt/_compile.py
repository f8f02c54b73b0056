"""``torch.compile`` for small hot functions, with an eager fallback.

Chains of elementwise ops (quantize a block, scale a matmul's output) cost one pass over memory
per op in eager torch; inductor fuses them into one generated C++ loop. Compilation needs a C++
compiler (inductor's CPU backend) and takes seconds once per function (cached on disk by torch).
``ZOPT_COMPILE=0`` turns it off. If compiling fails, zopt warns once per function and runs it
eagerly from then on: results are the same, only slower.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

OFF_VALUES = ("0", "false", "no", "off")


def enabled() -> bool:
    """Whether :func:`fused` functions try ``torch.compile`` (``ZOPT_COMPILE`` not 0/false/no/off)."""
    return os.environ.get("ZOPT_COMPILE", "1").strip().lower() not in OFF_VALUES


class _Fused:
    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self._compiled: Callable[..., Any] | None = None
        self._failed = False
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._failed or not enabled():
            return self.fn(*args, **kwargs)
        if self._compiled is None:
            import torch

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
