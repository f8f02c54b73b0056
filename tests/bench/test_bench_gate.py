"""The CI regression gate on records (no sweep): like with like, limits, exit codes, CLI."""

from __future__ import annotations

import json

import pytest
from bench_helpers import clone, record, records

from zopt.bench import gate as G
from zopt.errors import ZoptError

LIMITS = G.parse_limits("latency=10%,memory=5%,psnr=0.5dB")


def _find(recs, label):
    return next(r for r in recs if r["label"] == label)


def test_parse_limits():
    lim = {x.metric.name: x for x in G.parse_limits("latency=10%, memory=5%,psnr=0.5dB,ssim=0.01,memory=20MB")}
    assert lim["latency"].relative and lim["latency"].value == pytest.approx(0.10)
    assert not lim["psnr"].relative and lim["psnr"].value == 0.5
    assert not lim["ssim"].relative and lim["ssim"].value == 0.01
    assert not lim["memory"].relative and lim["memory"].value == 20  # the later entry wins
    for bad in ("latency", "speed=10%", "psnr=0.5ms", "latency=fast", ""):
        with pytest.raises(ZoptError):
            G.parse_limits(bad)


def test_rerun_against_itself_passes():
    base = records()
    res = G.compare(base, clone(base), LIMITS)
    assert res.exit_code == G.EXIT_PASS
    assert res.compared == 3  # reference + 2 ok variants; the unsupported format has nothing to hold to
    assert not res.regressions and res.changes
    assert all(c.old == c.new for c in res.changes)


@pytest.mark.parametrize("factor, regressed", [(1.25, True), (1.09, False)])
def test_injected_latency_regression(factor, regressed):
    base = records()
    new = clone(base)
    _find(new, "fp16@torch")["metrics"]["latency"]["step_ms"]["median"] *= factor
    res = G.compare(base, new, LIMITS)
    assert (res.exit_code == G.EXIT_REGRESSION) is regressed
    if regressed:
        assert [(c.label, c.metric) for c in res.regressions] == [("fp16@torch", "latency")]
        assert "latency" in res.regressions[0].describe() and "+25.0%" in res.regressions[0].describe()


def test_psnr_and_memory_limits_are_absolute_and_relative():
    base = records()
    new = clone(base)
    _find(new, "bf16@torch")["metrics"]["quality"]["psnr_db"] -= 0.6  # beyond 0.5 dB
    _find(new, "fp16@torch")["metrics"]["quality"]["psnr_db"] -= 0.4  # within
    _find(new, "fp16@torch")["metrics"]["memory"]["peak_bytes"] = int(200_000_000 * 1.06)  # beyond 5%
    res = G.compare(base, new, LIMITS)
    assert sorted((c.label, c.metric) for c in res.regressions) == [("bf16@torch", "psnr"), ("fp16@torch", "memory")]
    assert res.exit_code == G.EXIT_REGRESSION
    # an improvement is never a regression
    better = clone(base)
    _find(better, "bf16@torch")["metrics"]["latency"]["step_ms"]["median"] *= 0.5
    _find(better, "bf16@torch")["metrics"]["quality"]["psnr_db"] += 5
    assert G.compare(base, better, LIMITS).exit_code == G.EXIT_PASS


def test_like_with_like_only():
    base = records()
    other_hw = [dict(r, hardware_fingerprint="cuda:RTX 4090:8.9:16") for r in clone(base)]
    for r in other_hw:
        r["metrics"] = dict(r["metrics"])
    _find(other_hw, "bf16@torch")["metrics"]["latency"] = {"step_ms": {"median": 1e6, "p90": 1e6, "n": 1}}
    res = G.compare(base, other_hw, LIMITS)
    assert res.exit_code == G.EXIT_NOTHING_COMPARED and not res.changes
    assert len(res.unmatched_new) == 4 and len(res.unmatched_baseline) == 4
    # a different resolution is a different workload; a different repeat count is not
    new = clone(base)
    for r in new:
        r["settings"]["repeats"] = 7
    _find(new, "fp16@torch")["settings"]["width"] = 128
    res = G.compare(base, new, LIMITS)
    assert res.unmatched_new == ["fp16@torch"] and res.compared == 2


def test_a_failed_run_is_a_regression():
    base = records()
    new = clone(base)
    new[1] = record("bf16", status="crashed")
    res = G.compare(base, new, LIMITS)
    assert res.exit_code == G.EXIT_REGRESSION
    assert [(c.label, c.metric, c.new) for c in res.regressions] == [("bf16@torch", "status", "crashed")]


def test_cli_gate_exit_codes(tmp_path, capsys):
    from zopt.bench.schema import results_document
    from zopt.cli import main

    base = records()
    old = tmp_path / "old.json"
    old.write_text(json.dumps(results_document(base)))
    assert main(["bench", "--results", str(old), "--baseline", str(old), "--no-report"]) == 0
    assert "no regression" in capsys.readouterr().out
    new = clone(base)
    _find(new, "bf16@torch")["metrics"]["latency"]["step_ms"]["median"] *= 1.5
    bad = tmp_path / "new.json"
    bad.write_text(json.dumps(results_document(new)))
    code = main(["bench", "--results", str(bad), "--baseline", str(old), "--no-report",
                 "--max-regression", "latency=10%,psnr=0.5dB"])
    out = capsys.readouterr().out
    assert code == 3
    assert "regression in latency" in out and "bf16@torch: latency 90 -> 135 ms (+50.0%), limit 10%" in out
    # a bad limit or a corrupt baseline is a one-line error (exit 2), not a traceback
    assert main(["bench", "--results", str(bad), "--baseline", str(old), "--max-regression", "speed=1%"]) == 2
    (tmp_path / "broken.json").write_text("{not json")
    assert main(["bench", "--results", str(bad), "--baseline", str(tmp_path / "broken.json")]) == 2
    err = capsys.readouterr().err
    assert "broken.json" in err and "not a JSON results file" in err


def test_cli_bad_arguments_fail_before_any_run(tmp_path, capsys):
    from zopt.cli import main

    out = ["-o", str(tmp_path / "o")]
    assert main(["bench", "--prompts", str(tmp_path / "nope.txt"), *out]) == 2
    assert "nope.txt: cannot read prompts file" in capsys.readouterr().err
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    assert main(["bench", "--prompts", str(tmp_path / "empty.txt"), *out]) == 2
    assert "has no prompts" in capsys.readouterr().err
    assert main(["bench", "--resolution", "100x100", *out]) == 2
    assert main(["bench", "--seeds", "1,x", *out]) == 2
    assert main(["bench", "--max-regression", "latency=10%", *out]) == 2
    assert "--max-regression needs --baseline" in capsys.readouterr().err
    assert not (tmp_path / "o" / "results.json").exists()


def test_backend_fallback_fails_with_a_clear_line():
    base = records()
    new = clone(base)
    fell = _find(new, "fp16@torch")
    fell["backend"], fell["label"], fell["backend_reason"] = "slow", "fp16@slow", "slow (not torch: needs a GPU)"
    res = G.compare(base, new, LIMITS)
    assert res.exit_code == G.EXIT_REGRESSION
    [c] = res.regressions
    assert (c.metric, c.old, c.new) == ("backend", "torch", "slow")
    assert c.describe() == "fp16@slow: ran on backend slow instead of torch (a fallback: slow (not torch: needs a GPU))"


def test_missing_format_fails_but_another_machine_is_not_missing():
    base = records()
    new = [r for r in clone(base) if r["label"] != "bf16@torch"]
    res = G.compare(base, new, LIMITS)
    assert [(c.label, c.metric) for c in res.regressions] == [("bf16@torch", "missing")]
    assert "missing from this run" in res.regressions[0].describe()
    elsewhere = [dict(r, hardware_fingerprint="cuda:RTX 4090:8.9:16") for r in new]
    assert G.compare(base, elsewhere, LIMITS).exit_code == G.EXIT_NOTHING_COMPARED


def _with_samples(rec, samples, factor=1.0, key="step_ms"):
    from zopt.bench.metrics import latency_stats

    xs = [x * factor for x in samples]
    rec["metrics"]["latency"][key] = dict(latency_stats(xs, 1.0, 4), samples=xs)
    return rec


def _contended_run(rnd, n=16, spread=0.08, median=100.0, tail=0.1):
    """Step times as a loaded machine gives them: ~6 % scatter and one step in ten 1.5-3x slower."""
    return [median * (1 + abs(rnd.gauss(0, spread))) * (rnd.uniform(1.5, 3) if rnd.random() < tail else 1)
            for _ in range(n)]


def test_slowdown_bounds_on_synthetic_samples():
    import random

    from zopt.bench.noise import slowdown

    rnd = random.Random(1234)
    limits = G.parse_limits("latency=10%")
    for _ in range(20):
        a, b = _contended_run(rnd), _contended_run(rnd)
        same = G.compare([_with_samples(record("bf16"), a)], [_with_samples(record("bf16"), b)], limits)
        assert same.exit_code == G.EXIT_PASS, same.changes[0].describe()
        slow = G.compare([_with_samples(record("bf16"), a)], [_with_samples(record("bf16"), b, 1.3)], limits)
        assert [c.metric for c in slow.regressions] == ["latency"]
        assert "slower beyond the limit" in slow.regressions[0].note
        sd = slowdown(a, [x * 1.3 for x in b])
        assert sd.lower <= sd.ratio <= sd.upper and sd.lower > 1.1
    # the same records give the same verdict and bounds every time (seeded bootstrap)
    a, b = _contended_run(rnd), _contended_run(rnd)
    assert slowdown(a, b) == slowdown(a, b)
    # steps that scatter over 2x cannot show a 12 % slowdown: the median moved, the bound did not
    wild = [100.0 * rnd.uniform(1, 2.5) for _ in range(16)]
    [c] = G.compare([_with_samples(record("bf16"), wild)], [_with_samples(record("bf16"), wild, 1.12)],
                    limits).changes
    assert not c.regressed and "within the noise" in c.note and c.new > 1.1 * c.old


def test_cpu_latency_is_judged_on_cpu_samples():
    import random

    rnd = random.Random(7)
    a, b = _contended_run(rnd, spread=0.03, tail=0), _contended_run(rnd, spread=0.03, tail=0)
    old = _with_samples(_with_samples(record("bf16"), a), a, key="step_cpu_ms")
    new = _with_samples(_with_samples(record("bf16"), [x * 3 for x in b]), b, 1.3, key="step_cpu_ms")
    res = G.compare([old], [new], G.parse_limits("cpu_latency=10%"))
    assert [(c.metric, c.regressed) for c in res.changes] == [("cpu_latency", True)]
    assert G.compare([old], [new], G.parse_limits("cpu_latency=40%")).exit_code == G.EXIT_PASS


def test_few_samples_keep_the_plain_limit():
    base = [_with_samples(record("bf16"), [100.0] * 4)]
    new = [_with_samples(record("bf16"), [108.0] * 4)]
    [c] = [c for c in G.compare(base, new, LIMITS).changes if c.metric == "latency"]
    assert not c.regressed and "the medians alone decide" in c.note
    new = [_with_samples(record("bf16"), [111.0] * 4)]
    [c] = [c for c in G.compare(base, new, LIMITS).changes if c.metric == "latency"]
    assert c.regressed


def test_recorded_rounds_on_this_machine():
    """The measurement behind docs/bench.md (benchmarks/gate_noise.py), replayed through the gate:
    identical code taking turns passes every time, and every run slowed by 30 % extra work per
    forward fails, with --threads 1 and cpu_latency=10 %, under whatever load the machine had."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import gate_noise

    streams = gate_noise.load_rounds(Path(__file__).parent / "data" / "gate_noise.json")
    rounds = [r for s in streams for r in s]
    assert len(rounds) >= 20 and all(len(r["A"]["metrics"]["latency"]["step_cpu_ms"]["samples"]) >= 16
                                    for r in rounds)
    assert all(rec["settings"]["threads"] == 1 for r in rounds for rec in r.values())
    limits = G.parse_limits("cpu_latency=10%")
    for s in streams:
        v = gate_noise.verdicts(s, limits)
        assert not any(v["paired_identical"]) and all(v["paired_slowed"])
    # the injected work is real: each slowed run's steps take 15-60 % more CPU time than its partner's
    from zopt.bench.noise import slowdown

    for r in rounds:
        sd = slowdown(*(r[n]["metrics"]["latency"]["step_cpu_ms"]["samples"] for n in "AS"))
        assert 1.15 < sd.ratio < 1.6, sd.text()
