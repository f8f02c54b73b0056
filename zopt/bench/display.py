"""What the terminal shows: live sweep progress (which run, which phase, which step, elapsed) and
the results table. Both use rich; progress goes to stderr, the table to stdout."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from .schema import get_path

STATUS_STYLE = {"ok": "green", "skipped": "dim", "unsupported": "dim", "missing_dependency": "yellow",
                "failed": "red", "crashed": "red", "oom": "red", "timeout": "red"}


class SweepDisplay:
    """Live progress of a sweep: an overall bar over runs and one bar per run over its steps.

    On a terminal (or with ZOPT_PROGRESS=1) the bars animate; otherwise (CI logs, pipes) one
    plain line is printed when each run starts and ends.
    """

    def __init__(self, total_runs: int, enabled: bool = True):
        self.total = total_runs
        self.enabled = enabled
        self.live = enabled and (sys.stderr.isatty() or bool(os.environ.get("ZOPT_PROGRESS")))
        self.index = 0
        self._progress = None
        self._task = None
        self._overall = None
        self._label = ""
        self._t0 = 0.0

    def __enter__(self) -> SweepDisplay:
        if self.live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                      MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True))
            self._progress.__enter__()
            self._overall = self._progress.add_task("[bold]sweep", total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None

    def start(self, label: str) -> None:
        self.index += 1
        self._label, self._t0 = label, time.monotonic()
        if self._progress is not None:
            self._task = self._progress.add_task(f"[{self.index}/{self.total}] {label}: starting", total=None)
        elif self.enabled:
            print(f"[{self.index}/{self.total}] {label} ...", file=sys.stderr, flush=True)

    def phase(self, label: str, text: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=f"[{self.index}/{self.total}] {label}: {text}")
        elif self.enabled:
            print(f"[{self.index}/{self.total}] {label}: {text}", file=sys.stderr, flush=True)

    def event(self, ev: dict[str, Any]) -> None:
        """A worker's progress event: ``{"phase": ..., "image": i, "images": n, "step": s, "steps": S}``."""
        if self._progress is None or self._task is None:
            return
        phase = ev.get("phase", "")
        text = phase
        if "step" in ev:
            text = f"{phase} image {ev['image']}/{ev['images']} step {ev['step']}/{ev['steps']}"
            total = ev["images"] * ev["steps"]
            done = (ev["image"] - 1) * ev["steps"] + ev["step"]
            self._progress.update(self._task, total=total, completed=done)
        elif phase == "quality":
            text = f"quality deltas vs reference ({ev.get('images', '?')} images)"
        self._progress.update(self._task, description=f"[{self.index}/{self.total}] {self._label}: {text}")

    def end(self, label: str, status: str, message: str | None) -> None:
        dt = time.monotonic() - self._t0
        style = STATUS_STYLE.get(status, "red")
        line = f"[{self.index}/{self.total}] {label}: [{style}]{status}[/{style}] in {dt:.1f} s"
        if message and status != "ok":
            line += f" — {message[:200]}"
        if self._progress is not None:
            if self._task is not None:
                self._progress.remove_task(self._task)
                self._task = None
            self._progress.advance(self._overall)
            self._progress.console.print(line)
        elif self.enabled:
            from rich.console import Console

            Console(stderr=True, highlight=False).print(line)


def _fmt(v: Any, spec: str = ".3g", suffix: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:{spec}}{suffix}"
    return f"{v}{suffix}"


def _mb(v: Any) -> str:
    return "-" if v is None else f"{v / 1e6:.1f}"


def table_rows(records: list[dict[str, Any]]) -> list[list[str]]:
    """One row of display strings per record (reference first)."""
    rows = []
    for r in sorted(records, key=lambda r: (r["role"] != "reference", r["status"] != "ok", r["label"])):
        m = r.get("metrics") or {}
        q = m.get("quality") or {}
        lp = q.get("lpips")
        rows.append([
            r["label"], r.get("backend") or "-", r["status"],
            _mb(m.get("artifact_bytes")), _fmt(m.get("bits_per_weight"), ".2f"), _fmt(m.get("load_s"), ".2f"),
            _mb(get_path(m, "memory.peak_bytes")), _fmt(get_path(m, "latency.step_ms.median"), ".1f"),
            _fmt(get_path(m, "latency.step_ms.p90"), ".1f"), _fmt(get_path(m, "latency.image_s.median"), ".2f"),
            _fmt(q.get("rel_l2_mean"), ".2e"), _fmt(q.get("cosine_min"), ".5f"), _fmt(q.get("psnr_db"), ".1f"),
            _fmt(q.get("ssim"), ".4f"), _fmt(lp, ".4f") if lp is not None else ("n/a" if q else "-"),
        ])
    return rows


COLUMNS = ["run", "backend", "status", "size MB", "bits/w", "load s", "peak MB", "step ms", "p90 ms", "image s",
           "rel L2", "cos min", "PSNR dB", "SSIM", "LPIPS"]


def print_table(records: list[dict[str, Any]], console=None) -> None:
    """The results table on stdout, plus one line per run that did not succeed."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: do not squeeze the table into 80 columns
            console = Console(width=180)
    hw = records[0]["hardware"] if records else {}
    s = records[0]["settings"] if records else {}
    title = (f"zopt bench — {hw.get('device_name', '?')} ({hw.get('device', '?')}), "
             f"{s.get('steps')} steps at {s.get('width')}x{s.get('height')}, "
             f"{len(s.get('prompts', []))} prompts x {len(s.get('seeds', []))} seeds")
    t = Table(title=title, header_style="bold")
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("run", "backend", "status") else "right", no_wrap=c == "run")
    by_label = {r["label"]: r for r in records}
    for row in table_rows(records):
        style = STATUS_STYLE.get(by_label[row[0]]["status"], "")
        row[2] = f"[{style}]{row[2]}[/{style}]"
        t.add_row(*row, style="dim" if style == "dim" else None)
    console.print(t)
    for r in records:
        if r["status"] != "ok" and r.get("message"):
            console.print(f"  {r['label']}: {r['status']} — {r['message']}", highlight=False, markup=False)
    lp = next((get_path(r, "metrics.quality.lpips_status") for r in records
               if get_path(r, "metrics.quality.lpips_status")), None)
    if lp and lp != "ok":
        console.print(f"  LPIPS {lp}", highlight=False, markup=False)
