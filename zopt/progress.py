"""Progress display for long work (rich): tensors or bytes done, throughput and ETA."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator


class _Bar:
    def __init__(self, progress, task):
        self._p, self._t = progress, task

    def advance(self, n: float = 1) -> None:
        if self._p is not None:
            self._p.advance(self._t, n)

    def describe(self, text: str) -> None:
        if self._p is not None:
            self._p.update(self._t, description=text)


@contextlib.contextmanager
def progress_bar(total: float, description: str, unit: str = "", enabled: bool = True) -> Iterator[_Bar]:
    """A rich progress bar on stderr; a no-op when disabled or when stderr is not a terminal
    and ZOPT_PROGRESS is not set (keeps CI logs and pipes clean)."""
    import os

    if not enabled or (not sys.stderr.isatty() and not os.environ.get("ZOPT_PROGRESS")):
        yield _Bar(None, None)
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    cols = [TextColumn("[bold]{task.description}"), BarColumn()]
    if unit == "B":
        cols += [DownloadColumn(), TransferSpeedColumn()]
    else:
        cols += [MofNCompleteColumn()]
    cols += [TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    with Progress(*cols, console=Console(stderr=True), transient=False) as p:
        yield _Bar(p, p.add_task(description, total=total))


def note(text: str) -> None:
    """One status line on stderr, written at once: what a command is about to do before slow work
    (heavy imports, a build, compilation). Shown where progress bars are (stderr a terminal, or
    ``ZOPT_PROGRESS`` set), so pipes and logs keep only results and one-line errors;
    ``ZOPT_QUIET=1`` turns notes off everywhere."""
    import os

    if os.environ.get("ZOPT_QUIET", "").strip().lower() in ("1", "true", "yes", "on"):
        return
    if not sys.stderr.isatty() and not os.environ.get("ZOPT_PROGRESS"):
        return
    print(f"zopt: {text}", file=sys.stderr, flush=True)
