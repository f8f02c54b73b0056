"""The rate-distortion benchmark's comparison with a peer's files: its frontier and verdicts."""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from rate_distortion import compare_to_peer, frontier, frontier_error, peer_types  # noqa: E402


def test_frontier_drops_dominated_files_and_interpolates_in_log_error():
    hull = frontier([(3.0, 0.4), (4.0, 0.2), (4.5, 0.3), (5.0, 0.1), (5.0, 0.12), (6.0, 0.05)])
    assert hull == [(3.0, 0.4), (4.0, 0.2), (5.0, 0.1), (6.0, 0.05)]
    assert frontier_error(hull, 2.9) is None
    assert math.isclose(frontier_error(hull, 4.5), math.sqrt(0.2 * 0.1))
    assert frontier_error(hull, 4.0) == 0.2
    assert frontier_error(hull, 7.0) == 0.05  # past the largest file: its error
    # two files of (nearly) one size: the better one is the frontier there, not the smaller one
    assert frontier([(3.5, 0.42), (4.5453, 0.2642), (4.5454, 0.2177)]) == [(3.5, 0.42), (4.5454, 0.2177)]


def test_verdicts(capsys):
    rows = [{"label": f"sd.cpp {t}", "spec": f"sdcpp:{t}", "bpw": b, "rel_error": e}
            for t, b, e in (("Q3_K", 3.5, 0.4), ("Q4_K", 4.5, 0.2), ("Q5_K", 5.5, 0.1))]
    rows += [{"label": "Q4_K_M", "spec": "gguf:Q4_K_M", "bpw": 5.0, "rel_error": 0.13},
             {"label": "Q4_0", "spec": "gguf:Q4_0", "bpw": 5.0, "rel_error": 0.15},
             {"label": "auto 3.0", "spec": "gguf:auto", "bpw": 3.0, "rel_error": 0.35},
             {"label": "auto 2.5", "spec": "gguf:auto", "bpw": 2.5, "rel_error": 0.5}]
    out = {o["label"]: o for o in compare_to_peer(rows)}
    assert out["Q4_K_M"]["verdict"] == "at or below" and math.isclose(out["Q4_K_M"]["ratio"], 0.13 / math.sqrt(0.02))
    assert out["Q4_0"]["verdict"] == "above"
    assert out["auto 3.0"]["verdict"].startswith("at or below")  # smaller and better than Q3_K's file
    assert out["auto 2.5"]["verdict"] == "no peer file this small"
    text = capsys.readouterr().out
    assert "2 of 4 zopt points at or below" in text and "| 4.500, 0.2000 |" in text  # Q4_K_M beside sd.cpp Q4_K


def test_peer_types_map_recipes_to_its_types():
    assert peer_types(["Q4_K_M", "Q4_K_S", "Q8_0", "Q3_K_L", "F16"]) == ["Q4_K", "Q8_0", "Q3_K"]
    assert peer_types(["q4_k_m"]) == ["Q4_K"]
    assert len(peer_types([])) == 10


def test_peer_points_reused_only_from_a_run_on_the_same_source(tmp_path):
    import json

    import pytest
    from rate_distortion import reused_peer_points

    base = {"params": 10, "ref_bytes": 20, "config": {"dim": 4, "axes_dims": (1, 2)}}
    peer = {"label": "sd.cpp Q4_K", "spec": "sdcpp:Q4_K", "bpw": 4.5, "rel_error": 0.2}
    mine = {"label": "Q4_K", "spec": "gguf:Q4_K", "bpw": 4.6, "rel_error": 0.19}
    old = tmp_path / "old.json"
    old.write_text(json.dumps({**base, "ref_dtype": "float32", "rows": [peer, mine]}))
    assert reused_peer_points(old, base, "float32") == [peer]  # only the peer's rows, tuples read as lists
    with pytest.raises(SystemExit, match="another source"):
        reused_peer_points(old, {**base, "params": 11}, "float32")
    with pytest.raises(SystemExit, match="reference dtype or inputs"):
        reused_peer_points(old, base, "bfloat16")
    with pytest.raises(SystemExit, match="reference dtype or inputs"):  # measured on other inputs
        reused_peer_points(old, {**base, "inputs": "pipeline: 4 prompts, 8 steps, 64 px"}, "float32")
    (tmp_path / "none.json").write_text(json.dumps({**base, "rows": [mine]}))
    with pytest.raises(SystemExit, match="no peer points"):
        reused_peer_points(tmp_path / "none.json", base, "float32")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit, match="not a rate_distortion"):
        reused_peer_points(tmp_path / "bad.json", base, "float32")


def test_legacy_points_also_compared_with_the_peers_32_block_files(capsys):
    rows = [{"label": f"sd.cpp {t}", "spec": f"sdcpp:{t}", "bpw": b, "rel_error": e}
            for t, b, e in (("Q4_K", 4.5, 0.2), ("Q4_0", 4.5, 0.26), ("Q5_0", 5.5, 0.14), ("Q5_K", 5.5, 0.11))]
    rows += [{"label": "Q4_0", "spec": "gguf:Q4_0", "bpw": 5.0, "rel_error": 0.18},
             {"label": "Q4_K_M", "spec": "gguf:Q4_K_M", "bpw": 5.0, "rel_error": 0.14}]
    out = {o["label"]: o for o in compare_to_peer(rows)}
    assert out["Q4_0"]["verdict"] == "above"  # against every file: the K types set the line
    assert math.isclose(out["Q4_0"]["peer_block32_error"], math.sqrt(0.26 * 0.14))
    assert "peer_block32_error" not in out["Q4_K_M"]


def test_the_plot_draws_each_kind_of_point_in_its_own_series(tmp_path):
    """--weights and --calls points are series of their own beside the default's and the peer's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from rate_distortion import plot

    def row(label, spec, bpw, err):
        return {"label": label, "spec": spec, "imatrix": False, "bpw": bpw, "rel_error": err}

    rows = [row("Q4_K_M", "gguf:Q4_K_M", 5.4, 0.10), row("Q4_K_M+weights", "gguf:Q4_K_M", 5.4, 0.12),
            row("Q4_K_M+calls", "gguf:Q4_K_M", 5.4, 0.09), row("auto 4.0", "gguf:auto", 4.0, 0.25),
            row("auto 4.0+weights", "gguf:auto", 4.0, 0.31), row("sd.cpp Q4_K", "sdcpp:Q4_K", 4.5, 0.22),
            row("sd.cpp Q5_K", "sdcpp:Q5_K", 5.5, 0.11)]
    seen = []
    real = plt.Axes.plot

    def spy(self, *a, label=None, **k):
        seen.append(label)
        return real(self, *a, label=label, **k)

    plt.Axes.plot = spy
    try:
        plot(rows, tmp_path / "rd.png", "t")
    finally:
        plt.Axes.plot = real
    assert (tmp_path / "rd.png").stat().st_size > 0
    assert "zopt named types, weight errors alone (sensitivity=weights)" in seen
    assert "zopt gguf:auto, weight errors alone (sensitivity=weights)" in seen
    assert "zopt named types" in seen and "zopt named types, measured on the output (calls)" in seen
