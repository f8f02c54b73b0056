"""Regression gate for CI: compare new records with a baseline, like with like, under limits.

Two records are comparable when they ran on the same hardware fingerprint, from the same source
(sha256), in the same role, format spec, backend, conversion options and workload settings
(steps, resolution, prompts, seeds, guidance, device, compute dtype; ``repeats`` and ``warmup``
only change how many samples are taken, so they may differ). Limits read like
``"latency=10%,memory=5%,psnr=0.5dB"``: a percentage is relative to the baseline, anything else
is absolute in the metric's unit. Exit codes: 0 pass, 3 a regression, 4 nothing comparable.

Regressions besides metrics: a run whose format now runs on another backend than in the baseline
(a fallback, e.g. scaled-mm -> fp8-storage after a package went missing), and a baseline run that
is missing from the new records (a format that no longer converts or loads).

Step times are noisy on shared machines. When both records carry at least
:data:`~zopt.bench.noise.MIN_SAMPLES` step samples, ``latency`` and ``cpu_latency`` are judged on
how much slower the new run's steps are (the Hodges-Lehmann ratio new/old) and its one-sided 95 %
bounds (:mod:`zopt.bench.noise`): a regression is a run whose ratio is past the limit and whose lower
bound is above 1, i.e. slower than the limit allows and slower beyond the runs' own scatter. ``cpu_latency`` (the
process CPU time per step) is the one to gate on a machine shared with other work: run the bench with
``--threads 1`` and contention stretches wall time, not CPU time. ``--against DIR`` runs the
baseline's code in the same sweep, each run next to its counterpart, so wall latency can be
compared in the same time window as well.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import ZoptError
from .schema import get_path

EXIT_PASS, EXIT_REGRESSION, EXIT_NOTHING_COMPARED = 0, 3, 4
DEFAULT_LIMITS = "latency=10%,memory=5%,psnr=0.5dB"
# metric -> the latency stats whose ``samples`` the verdict is drawn from
SAMPLED = {"latency": "latency.step_ms", "cpu_latency": "latency.step_cpu_ms"}


@dataclass(frozen=True)
class Metric:
    name: str
    path: str  # inside record["metrics"]
    better: str  # "lower" or "higher"
    unit: str  # the unit absolute limits are given in
    scale: float = 1.0  # stored value / scale = value in ``unit``


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("latency", "latency.step_ms.median", "lower", "ms"),
    Metric("latency_p90", "latency.step_ms.p90", "lower", "ms"),
    Metric("cpu_latency", "latency.step_cpu_ms.median", "lower", "ms"),
    Metric("image_latency", "latency.image_s.median", "lower", "s"),
    Metric("memory", "memory.peak_bytes", "lower", "MB", 1e6),
    Metric("load", "load_s", "lower", "s"),
    Metric("size", "artifact_bytes", "lower", "MB", 1e6),
    Metric("psnr", "quality.psnr_db", "higher", "dB"),
    Metric("ssim", "quality.ssim", "higher", ""),
    Metric("lpips", "quality.lpips", "lower", ""),
    Metric("rel_l2", "quality.rel_l2_mean", "lower", ""),
    Metric("cosine", "quality.cosine_min", "higher", ""),
    Metric("latent_err", "quality.final_latent_rel_err", "lower", ""),
)}
UNIT_ALIASES = {"ms": ("ms",), "s": ("s", "sec"), "MB": ("mb",), "dB": ("db",), "": ("",)}


@dataclass(frozen=True)
class Limit:
    metric: Metric
    value: float
    relative: bool  # True: fraction of the baseline; False: absolute, in metric.unit

    def text(self) -> str:
        return f"{self.value * 100:g}%" if self.relative else f"{self.value:g}{self.metric.unit and ' ' + self.metric.unit}"


def parse_limits(text: str) -> list[Limit]:
    """``"latency=10%,memory=5%,psnr=0.5dB"`` -> limits; raises ZoptError naming the bad part."""
    limits = []
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        name, sep, val = part.partition("=")
        name = name.strip().lower()
        if not sep or name not in METRICS:
            raise ZoptError(f"--max-regression: {part!r} is not METRIC=LIMIT with METRIC one of {', '.join(METRICS)}")
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(%|[A-Za-z]*)\s*", val)
        if not m:
            raise ZoptError(f"--max-regression: {part!r}: the limit must be a number, optionally with % or a unit")
        number, unit = float(m.group(1)), m.group(2)
        metric = METRICS[name]
        if unit == "%":
            limits.append(Limit(metric, number / 100.0, True))
            continue
        if unit.lower() not in UNIT_ALIASES.get(metric.unit, (metric.unit.lower(),)):
            want = f"'{metric.unit}' or " if metric.unit else ""
            raise ZoptError(f"--max-regression: {part!r}: {name} limits are given in {want}% (got {unit!r})")
        limits.append(Limit(metric, number, False))
    if not limits:
        raise ZoptError("--max-regression is empty")
    return limits


def comparison_key(rec: dict[str, Any], backend: bool = True) -> str:
    """What must be equal for two records to be compared (``backend=False``: all but the backend,
    to find a run that fell back to another backend)."""
    s = {k: v for k, v in rec.get("settings", {}).items() if k not in ("repeats", "warmup")}
    return json.dumps([rec.get("hardware_fingerprint"), get_path(rec, "source.sha256"), rec.get("role"),
                       get_path(rec, "format.spec"), rec.get("backend") if backend else None, rec.get("options", {}), s],
                      sort_keys=True, default=str)


@dataclass
class Change:
    label: str
    metric: str
    old: float | None
    new: float | None
    limit: str
    regressed: bool
    note: str = ""
    relative: bool = True

    def delta(self) -> str:
        if self.relative:
            return f"{(self.new - self.old) / abs(self.old) * 100:+.1f}%" if self.old else "n/a"
        unit = METRICS[self.metric].unit
        return f"{self.new - self.old:+.4g}{unit and ' ' + unit}"

    def describe(self) -> str:
        if self.metric == "status":
            return f"{self.label}: status {self.old} -> {self.new} ({self.note})"
        if self.metric == "backend":
            return f"{self.label}: ran on backend {self.new} instead of {self.old} (a fallback: {self.note})"
        if self.metric == "missing":
            return f"{self.label}: in the baseline ({self.old}) but missing from this run"
        unit = METRICS[self.metric].unit
        return (f"{self.label}: {self.metric} {self.old:.4g} -> {self.new:.4g}{unit and ' ' + unit} "
                f"({self.delta()}), limit {self.limit}{' ' + self.note if self.note else ''}")


@dataclass
class GateResult:
    changes: list[Change] = field(default_factory=list)
    compared: int = 0
    unmatched_new: list[str] = field(default_factory=list)
    unmatched_baseline: list[str] = field(default_factory=list)

    @property
    def regressions(self) -> list[Change]:
        return [c for c in self.changes if c.regressed]

    @property
    def exit_code(self) -> int:
        if self.regressions:
            return EXIT_REGRESSION
        return EXIT_PASS if self.compared else EXIT_NOTHING_COMPARED


def compare(baseline: list[dict[str, Any]], new: list[dict[str, Any]], limits: list[Limit]) -> GateResult:
    """Compare every new record with the baseline record of the same key under ``limits``."""
    base = {comparison_key(r): r for r in baseline}
    res = GateResult()
    matched = set()
    pending = []
    for rec in new:
        key = comparison_key(rec)
        if key in base:
            matched.add(key)
            _compare_pair(base[key], rec, limits, res)
        else:
            pending.append(rec)
    for rec in pending:  # same run on another backend: a fallback
        loose = comparison_key(rec, backend=False)
        old_key = next((k for k, r in base.items() if k not in matched and comparison_key(r, False) == loose), None)
        if old_key is None:
            res.unmatched_new.append(rec["label"])
            continue
        matched.add(old_key)
        old = base[old_key]
        res.compared += 1
        res.changes.append(Change(rec["label"], "backend", old.get("backend"), rec.get("backend"), "-", True,
                                  rec.get("backend_reason") or ""))
    contexts = {_context(r) for r in new}
    for k, r in base.items():
        if k in matched:
            continue
        res.unmatched_baseline.append(r["label"])
        # missing from a run of the same machine and workload (not from a run of something else)
        if r.get("status") == "ok" and _context(r) in contexts:
            res.changes.append(Change(r["label"], "missing", r.get("status"), None, "-", True))
    return res


def _context(rec: dict[str, Any]) -> str:
    s = {k: v for k, v in rec.get("settings", {}).items() if k not in ("repeats", "warmup")}
    return json.dumps([rec.get("hardware_fingerprint"), get_path(rec, "source.sha256"), s], sort_keys=True,
                      default=str)


def _compare_pair(old: dict[str, Any], rec: dict[str, Any], limits: list[Limit], res: GateResult) -> None:
    if old["status"] != "ok":
        return  # nothing to hold the new run to
    res.compared += 1
    if rec["status"] != "ok":
        res.changes.append(Change(rec["label"], "status", old["status"], rec["status"], "-", True,
                                  rec.get("message") or ""))
        return
    for lim in limits:
        m = lim.metric
        a, b = get_path(old["metrics"], m.path), get_path(rec["metrics"], m.path)
        if a is None or b is None:
            continue
        a, b = a / m.scale, b / m.scale
        allowance = abs(a) * lim.value if lim.relative else lim.value
        worse = (b - a) if m.better == "lower" else (a - b)
        regressed, note = worse > allowance + 1e-12, ""
        if m.name in SAMPLED:
            regressed, note = _sampled_verdict(old, rec, SAMPLED[m.name], a, allowance, regressed)
        res.changes.append(Change(rec["label"], m.name, a, b, lim.text(), regressed, note, relative=lim.relative))


def _sampled_verdict(old: dict[str, Any], rec: dict[str, Any], stats: str, a: float, allowance: float,
                     plain: bool) -> tuple[bool, str]:
    """Regressed when the estimated slowdown is past the allowance and the slowdown is real: its
    lower confidence bound is above 1 (the new run is slower beyond its own and the baseline's scatter)."""
    from .noise import MIN_SAMPLES, slowdown

    xs, ys = ((get_path(r["metrics"], stats) or {}).get("samples") or [] for r in (old, rec))
    sd = slowdown(xs, ys)
    if sd is None:
        return plain, f"(fewer than {MIN_SAMPLES} step samples: the medians alone decide)"
    past = (sd.ratio - 1.0) * abs(a) > allowance + 1e-12
    regressed = past and sd.lower > 1.0
    verdict = "slower beyond the limit" if regressed else "within the noise" if past else "within the limit"
    return regressed, f"({sd.text()}: {verdict})"


def print_gate(res: GateResult, console=None) -> None:
    """What changed, then a verdict naming each regressed metric."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    t = Table(title="regression gate", header_style="bold")
    for c in ("run", "metric", "baseline", "new", "change", "limit", "verdict"):
        t.add_column(c, justify="left" if c in ("run", "metric", "verdict") else "right")
    for c in res.changes:
        if c.metric in ("status", "backend", "missing"):
            t.add_row(c.label, c.metric, str(c.old), str(c.new), "-", "-", "[red]REGRESSED[/red]")
            continue
        t.add_row(c.label, c.metric, f"{c.old:.4g}", f"{c.new:.4g}", c.delta(), c.limit,
                  "[red]REGRESSED[/red]" if c.regressed else "[green]ok[/green]")
    console.print(t)
    for label in res.unmatched_new:
        console.print(f"  {label}: no comparable baseline record (new run, or different hardware/settings)",
                      highlight=False, markup=False)
    if res.regressions:
        names = sorted({c.metric for c in res.regressions})
        console.print(f"[red bold]regression[/red bold] in {', '.join(names)}:", highlight=False)
        for c in res.regressions:
            console.print("  " + c.describe(), highlight=False, markup=False)
    elif not res.compared:
        console.print("[yellow]nothing compared[/yellow]: no baseline record matches this run's hardware, "
                      "format, backend and settings", highlight=False)
    else:
        console.print(f"[green]no regression[/green] ({res.compared} runs compared)", highlight=False)
