"""Keep third-party libraries quiet: zopt reports progress and advice itself."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def quiet_libraries() -> None:
    """Silence diffusers/transformers progress bars and advice."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    dlog.set_verbosity_error()
    tlog.disable_progress_bar()
    tlog.set_verbosity_error()


@contextlib.contextmanager
def quiet_logging() -> Iterator[None]:
    """Mute ``logging`` below errors for a block (onnxruntime's quantizers log per-node notes)."""
    import logging

    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)
