"""What the terminal shows: live sweep progress (which run, which phase, which step, elapsed) and
the results table. Both use rich; progress goes to stderr, the table to stdout."""

from __future__ import annotations

import os
import sys
import textwrap
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


# A latency figure whose p90 is more than this many times its median is marked noisy: the machine was
# busy or the runs disagree, and the median alone would be published as more exact than it is.
NOISY_SPREAD = 1.25
# Below this many parameters a source is a test-sized model whose size, memory and latency do not carry
# over to the full 6.15B-parameter transformer.
FULL_SIZE_PARAMS = 1_000_000_000
MIB, GIB = 2**20, 2**30


def _fmt(v: Any, spec: str = ".3g", suffix: str = "") -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:{spec}}{suffix}"
    return f"{v}{suffix}"


def latency_spread(rec: dict[str, Any]) -> float | None:
    """p90 / median of the per-step latency, or None when either is missing."""
    med, p90 = get_path(rec, "metrics.latency.step_ms.median"), get_path(rec, "metrics.latency.step_ms.p90")
    return p90 / med if med and p90 is not None else None


def is_noisy(rec: dict[str, Any]) -> bool:
    """The step latency of ``rec`` spreads beyond NOISY_SPREAD (p90 / median)."""
    spread = latency_spread(rec)
    return spread is not None and spread > NOISY_SPREAD


def need_bytes(rec: dict[str, Any]) -> int | None:
    """Memory the run needed in total: the allocator's reserve on CUDA, RSS baseline + peak above it on CPU."""
    mem = get_path(rec, "metrics.memory") or {}
    if mem.get("peak_bytes") is None:
        return None
    total = mem["peak_bytes"] + (mem.get("baseline_bytes") or 0)
    return max(total, mem.get("cuda_max_reserved") or 0)


def byte_unit(values: list[int | None]) -> tuple[str, int]:
    """GiB when the largest value reaches 1 GiB, else MiB: one unit per column, named in its header."""
    return ("GiB", GIB) if max((v or 0 for v in values), default=0) >= GIB else ("MiB", MIB)


def _bytes(v: int | None, unit: tuple[str, int]) -> str:
    return "-" if v is None else f"{v / unit[1]:.{2 if unit[0] == 'GiB' else 1}f}"


def is_small_model(records: list[dict[str, Any]]) -> bool:
    params = next((get_path(r, "source.params") for r in records if get_path(r, "source.params")), None)
    return bool(records) and (get_path(records[0], "source.spec") == "tiny"
                              or (params is not None and params < FULL_SIZE_PARAMS))


def ordered(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Reference first, then successful runs, then the rest; by label within each group."""
    return sorted(records, key=lambda r: (r["role"] != "reference", r["status"] != "ok", r["label"]))


def columns(records: list[dict[str, Any]], wide: bool = False) -> list[tuple[str, Any]]:
    """(header, cell function) of the table's columns; the compact set fits 100 terminal columns."""
    size_u = byte_unit([get_path(r, "metrics.artifact_bytes") for r in records])
    mem_u = byte_unit([need_bytes(r) for r in records])
    has_lpips = any(get_path(r, "metrics.quality.lpips") is not None for r in records)
    has_adh = any(get_path(r, "metrics.quality.adherence") is not None for r in records)
    q = lambda path, spec: lambda r: _fmt(get_path(r, f"metrics.quality.{path}"), spec)  # noqa: E731

    def step(r):
        cell = _fmt(get_path(r, "metrics.latency.step_ms.median"), ".1f")
        return "~" + cell if is_noisy(r) else cell

    def lpips(r):
        v = get_path(r, "metrics.quality.lpips")
        return _fmt(v, ".4f") if v is not None else ("n/a" if get_path(r, "metrics.quality") else "-")

    ref_adh = next((v for r in records if (v := get_path(r, "metrics.quality.adherence_ref")) is not None), None)

    def adherence(r):  # the reference's own, as its runs measured it
        return _fmt(ref_adh if r.get("role") == "reference" else get_path(r, "metrics.quality.adherence"), ".2f")

    cols: list[tuple[str, Any, bool]] = [  # (header, cell, in the compact table)
        ("run", lambda r: r["label"], True),
        ("backend", lambda r: r.get("backend") or "-", False),
        ("status", lambda r: r["status"], True),
        (f"size\n{size_u[0]}", lambda r: _bytes(get_path(r, "metrics.artifact_bytes"), size_u), True),
        ("bits/w", lambda r: _fmt(get_path(r, "metrics.bits_per_weight"), ".2f"), True),
        ("load\ns", lambda r: _fmt(get_path(r, "metrics.load_s"), ".2f"), False),
        (f"peak\n{mem_u[0]}", lambda r: _bytes(need_bytes(r), mem_u), True),
        ("step\nms", step, True),
        ("p90\nms", lambda r: _fmt(get_path(r, "metrics.latency.step_ms.p90"), ".1f"), False),
        ("image\ns", lambda r: _fmt(get_path(r, "metrics.latency.image_s.median"), ".2f"), True),
        ("rel L2", q("rel_l2_mean", ".2e"), True),
        ("cos\nmin", q("cosine_min", ".5f"), False),
        ("PSNR\ndB", q("psnr_db", ".1f"), True),
        ("SSIM", q("ssim", ".4f"), wide or not has_lpips),  # LPIPS, when measured, takes its place
        ("LPIPS", lpips, wide or has_lpips),
        # prompts in the micro model's shapes grammar: share of colour, shape, position, size read right
        ("adher-\nence", adherence, has_adh),
    ]
    return [(h, f) for h, f, compact in cols if wide or compact]


def table_rows(records: list[dict[str, Any]], wide: bool = False) -> list[list[str]]:
    """One row of display strings per record, in ``ordered`` order."""
    cols = columns(records, wide)
    return [[f(r) for _, f in cols] for r in ordered(records)]


def footnotes(records: list[dict[str, Any]]) -> list[str]:
    """What the table's figures mean and where they do not carry over, one sentence each."""
    notes = ["Sizes and memory in binary units (1 MiB = 2^20 bytes, 1 GiB = 2^30). peak = the total memory the "
             "run needed (CPU: process RSS incl. Python and the whole pipeline; CUDA: the allocator's reserve). "
             "PSNR 100 dB = identical to the reference."]
    noisy = [r for r in ordered(records) if r["status"] == "ok" and is_noisy(r)]
    if noisy:
        which = ", ".join(f"{r['label']} {latency_spread(r):.1f}x" for r in noisy)
        notes.append(f"~ noisy latency: p90 more than {NOISY_SPREAD:g}x the median ({which}); the median is not a "
                     "reliable figure: rerun on an idle machine with more --repeats.")
    scored = [r for r in records if get_path(r, "metrics.quality.adherence") is not None]
    if scored:
        per = sum(len(r.get("images") or []) for r in scored) // len(scored)
        step = f" One attribute of one image is {1 / (4 * per):.3f} of it" if per else ""
        notes.append("adherence: the mean of the share of the prompts' colours, shapes, positions and sizes read "
                     "right from the pixels (the shapes captions the embedded micro model learned; docs/micro.md), "
                     f"for the reference too.{step}: a difference of one or two such steps from the reference "
                     "is one shape drawn differently, not a format failing (per attribute: "
                     "metrics.quality.adherence_detail in results.json).")
    if is_small_model(records):
        params = next((get_path(r, "source.params") for r in records if get_path(r, "source.params")), None)
        n = f"{params / 1e6:.1f}M-parameter" if params else "small"
        notes.append(f"Test-sized model ({n}): bits/w and size are inflated by the tensors every format keeps at "
                     "high precision (norms, biases, embedders, adaLN modulation, final layer: BF16/F32, GGUF's "
                     "adaLN Q8_0), a far larger share of this model than of the full 6.15B one; memory and latency "
                     "are dominated by Python, text encoder and VAE. Compare formats with each other here, not with full-size figures.")
    return notes


# the compact table's status column stays narrow; the full status and reason follow the table
STATUS_TEXT = {"missing_dependency": "no pkg", "unsupported": "unsup."}


def print_table(records: list[dict[str, Any]], console=None, wide: bool = False) -> None:
    """The results table on stdout (100 columns unless ``wide``), then notes and failed runs' reasons."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:  # logs and pipes: never squeeze the table below its natural width
            console = Console(width=200 if wide else 100)
    hw = records[0]["hardware"] if records else {}
    s = records[0]["settings"] if records else {}
    title = (f"zopt bench — {hw.get('device_name', '?')} ({hw.get('device', '?')}), "
             f"{s.get('steps')} steps at {s.get('width')}x{s.get('height')}, "
             f"{len(s.get('prompts', []))} prompts x {len(s.get('seeds', []))} seeds")
    t = Table(title=title, header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    heads = [h for h, _ in columns(records, wide)]
    for h in heads:
        t.add_column(h, justify="left" if h in ("run", "backend", "status") else "right", no_wrap=h == "run")
    status_col = heads.index("status")
    for r, row in zip(ordered(records), table_rows(records, wide), strict=True):
        style = STATUS_STYLE.get(r["status"], "")
        text = row[status_col] if wide else STATUS_TEXT.get(row[status_col], row[status_col])
        row[status_col] = f"[{style}]{text}[/{style}]"
        t.add_row(*row, style="dim" if style == "dim" else None)
    console.print(t)
    lines = footnotes(records)
    lines += [f"{r['label']}: {r['status']} — {r['message']}" for r in records if r["status"] != "ok" and r.get("message")]
    lp = next((get_path(r, "metrics.quality.lpips_status") for r in records
               if get_path(r, "metrics.quality.lpips_status")), None)
    if lp and lp != "ok":
        lines.append(f"LPIPS {lp}")
    for line in lines:  # indented, and wrapped lines keep the indent
        console.print(textwrap.fill(line, width=max(40, console.width - 1), initial_indent="  ",
                                    subsequent_indent="  ", break_on_hyphens=False, break_long_words=False),
                      soft_wrap=True, markup=False, highlight=False)
