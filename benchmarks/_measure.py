"""Run a command in a child process and report wall time and the child's peak RSS."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_measured(argv: list[str], env: dict[str, str] | None = None) -> tuple[float, int, subprocess.CompletedProcess]:
    """(wall seconds, peak RSS bytes of the child, completed process). Linux: ru_maxrss is in KiB."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=REPO)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # RUSAGE_CHILDREN reports the max over all waited-for children: measure one child per process
    peak = max(after, before) * 1024
    return wall, peak, proc


def zopt_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "zopt.cli", *args]
