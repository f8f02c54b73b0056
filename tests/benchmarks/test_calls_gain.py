"""benchmarks/calls_gain.py: the check of ``calls_types=one`` against ``all`` on the trained micro
model prints and records, per tensor, the predicted and measured output errors; the cheapest type's
are the same run, so equal; a missing calls file is a one-line error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import calls_gain  # noqa: E402


def test_calls_gain_on_the_micro_model(tmp_path, capsys):
    from zopt.families import resolve_source
    from zopt.formats.gguf.outputs import save_calls
    from zopt.runtime.calibrate import calibrate

    calls: list = []
    calibrate(resolve_source("tiny"), ["a small red circle at the top left on a black background"], steps=2,
              resolution=64, device="cpu", calls=calls)
    path = save_calls(calls, tmp_path / "c.calls", "one caption, 2 steps")
    out = tmp_path / "gain.json"
    assert calls_gain.main(["tiny", str(path), "--tensors", r"layers\.1\.(attention\.out|feed_forward\.w2)",
                            "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["tensor"] for r in rows] == ["layers.1.attention.out.weight", "layers.1.feed_forward.w2.weight"]
    for r in rows:
        cheapest = min(r["measured"], key=lambda t: ["Q2_K", "Q3_K", "Q4_0", "Q4_1", "Q4_K", "Q5_0", "Q5_1", "Q5_K",
                                                      "Q6_K", "Q8_0", "BF16"].index(t))
        assert r["predicted"][cheapest] == r["measured"][cheapest] > 0
        assert set(r["ratio"]) == {t for t in r["measured"] if t not in (cheapest, "BF16")}
    assert "predicted / measured median" in capsys.readouterr().out
    assert calls_gain.main(["tiny", str(tmp_path / "missing.calls")]) == 2
    assert "missing.calls" in capsys.readouterr().err
