"""Sweep planning, the conversion cache key, and failure containment of the worker process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from zopt.bench import harness as H
from zopt.formats import FORMATS, FormatInfo
from zopt.platform.hardware import Hardware

CPU = Hardware("cpu", "Test CPU", None, "x86_64", 8 << 30, 4 << 30, cores=2)


def test_expand_formats_all_includes_default_subtypes():
    specs = H.expand_formats(None)
    assert specs == H.expand_formats(["all"])
    assert "gguf:Q8_0" in specs and "gguf:Q4_K_M" in specs and "gguf" not in specs
    assert {"bf16", "fp16", "fp32"} <= set(specs)
    assert all(s.partition(":")[0] in FORMATS for s in specs)
    assert H.expand_formats(["bf16, fp32,bf16", "gguf:Q5_K_M"]) == ["bf16", "fp32", "gguf:Q5_K_M"]


def test_plan_runs_what_can_run_and_says_why_not(monkeypatch):
    monkeypatch.setitem(FORMATS, "ghost", FormatInfo("ghost", "zopt.formats.ghost_format_absent", "absent", 4, "file"))
    rows = {r.label: r for r in H.plan(["bf16", "fp32", "ghost", "nope:X"], "auto", CPU)}
    assert rows["bf16@torch"].status is None and rows["bf16@torch"].backend == "torch"
    assert rows["fp32@torch"].status is None
    assert rows["ghost"].status == "unsupported" and "not available in this zopt build" in rows["ghost"].message
    assert rows["nope:X"].status == "unsupported" and "unknown format" in rows["nope:X"].message


def test_plan_backend_choices():
    rows = H.plan(["bf16", "fp16"], "fp16=nosuch", CPU)
    by = {r.label: r for r in rows}
    assert by["bf16@torch"].status is None  # FORMAT=NAME applies only to that format
    assert by["fp16@nosuch"].status == "skipped" and "no backend 'nosuch'" in by["fp16@nosuch"].message
    rows = H.plan(["bf16"], "all", CPU)
    assert [r.label for r in rows] == ["bf16@torch"]


def test_cache_key_tracks_source_spec_and_options():
    a = H.cached_artifact_path("aa" * 32, "bf16", {})
    assert a == H.cached_artifact_path("aa" * 32, "bf16", {})
    assert a.parent.name == H.CACHE_NAME and a.name.startswith("bf16-")
    others = {H.cached_artifact_path("bb" * 32, "bf16", {}), H.cached_artifact_path("aa" * 32, "fp16", {}),
              H.cached_artifact_path("aa" * 32, "bf16", {"hash_source": False})}
    assert a not in others and len(others) == 3


def test_cache_key_tracks_the_converting_code(tmp_path, monkeypatch):
    """A changed writer between releases must not reuse an artifact the new loader refuses."""
    import shutil

    import zopt

    pkg = tmp_path / "zopt"
    shutil.copytree(Path(zopt.__file__).parent, pkg, ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    fake = pkg / "bench" / "harness.py"
    monkeypatch.setattr(H, "__file__", str(fake))
    H.code_fingerprint.cache_clear()
    try:
        same = H.code_fingerprint()
        assert same == H.code_fingerprint()
        (pkg / "formats" / "gguf" / "writer.py").write_text((pkg / "formats" / "gguf" / "writer.py").read_text() + "\n# x\n")
        H.code_fingerprint.cache_clear()
        assert H.code_fingerprint() != same
    finally:
        monkeypatch.undo()
        H.code_fingerprint.cache_clear()


@pytest.mark.parametrize("code, status, words", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGKILL)", "oom", "SIGKILL"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "crashed", "SIGSEGV"),
    ("import sys; sys.stderr.write('boom: cannot go on\\n'); sys.exit(7)", "crashed", "boom: cannot go on"),
    ("import time; time.sleep(60)", "timeout", "no result after 1.5 s"),
])
def test_worker_failures_become_records(tmp_path, code, status, words):
    res = H.run_worker({"mode": "run"}, tmp_path, "w", 1.5, command=[sys.executable, "-c", code])
    assert res["status"] == status and words in res["message"]
    assert res["duration_s"] < 30


def test_worker_events_and_result(tmp_path):
    """A process that reports progress and writes its result: events arrive in order, result is read."""
    code = ("import json, sys; spec = json.load(open(sys.argv[1]));"
            "[print('@zopt-bench ' + json.dumps({'phase': 'generate', 'step': i}), flush=True) for i in range(3)];"
            "print('library noise');"
            "open(spec['result'], 'w').write(json.dumps({'status': 'ok', 'message': None, 'metrics': {'x': 1}}))")
    seen = []
    res = H.run_worker({"mode": "run"}, tmp_path, "w", 30, on_event=seen.append, command=[sys.executable, "-c", code])
    assert [e["step"] for e in seen] == [0, 1, 2]
    assert res == {"status": "ok", "message": None, "metrics": {"x": 1}}


def test_worker_records_a_bad_model_as_failed(tmp_path):
    """The real worker: a model path that does not exist is a 'failed' record naming the path."""
    spec = {"mode": "run", "role": "variant", "model": str(tmp_path / "no-such-artifact"), "device": "cpu",
            "prompts": ["a"], "seeds": [0], "steps": 1, "width": 64, "height": 64, "repeats": 1, "warmup": 0,
            "image_dir": str(tmp_path / "img"), "ref_dir": str(tmp_path / "ref"), "ref_images": []}
    res = H.run_worker(spec, tmp_path, "w", 120)
    assert res["status"] == "failed"
    assert "no-such-artifact" in res["message"] and "no such file or folder" in res["message"]


def test_sweep_options_go_to_the_formats_that_have_them():
    from zopt.formats.options import OptionError

    H.check_options({"group_size": "64", "workers": 2}, {"int4", "gguf", "bf16"})
    with pytest.raises(OptionError, match="no format of this sweep has option 'grup_size'; did you mean 'group_size'"):
        H.check_options({"grup_size": 64}, {"int4", "bf16"})
    with pytest.raises(OptionError, match="'workers'"):
        H.check_options({"workers": 2}, {"int4", "bf16"})


PACED = ("import json, sys, time; spec = json.load(open(sys.argv[1])); log = open(spec['log'], 'a')\n"
         "for i in range(3):\n"
         "    print('@zopt-bench ' + json.dumps({'phase': 'turn'}), flush=True)\n"
         "    assert sys.stdin.readline() == 'go\\n'\n"
         "    log.write(f\"{spec['side']} start {time.monotonic()}\\n\"); log.flush(); time.sleep(0.05)\n"
         "    log.write(f\"{spec['side']} end {time.monotonic()}\\n\"); log.flush()\n"
         "    print('@zopt-bench ' + json.dumps({'phase': 'turn_done'}), flush=True)\n"
         "open(spec['result'], 'w').write(json.dumps({'status': 'ok', 'message': spec['side']}))\n")


def test_paired_workers_take_turns_and_never_overlap(tmp_path):
    """Paced workers run one image at a time, the order reversed every round (A B, B A, A B)."""
    from zopt.bench.process import WorkerProcess, run_in_turns

    log = tmp_path / "turns.log"
    workers = [WorkerProcess({"side": s, "log": str(log), "paced": True}, tmp_path, s,
                             command=[sys.executable, "-c", PACED]) for s in "AB"]
    results = run_in_turns(workers, 30)
    assert [r["message"] for r in results] == ["A", "B"]
    lines = [ln.split() for ln in log.read_text().splitlines()]
    assert [side for side, what, _ in lines if what == "start"] == list("ABBAAB")
    times = [float(t) for _, _, t in lines]
    assert times == sorted(times)  # every start follows the previous image's end: no overlap
    assert [what for _, what, _ in lines] == ["start", "end"] * 6
