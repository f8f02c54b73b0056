"""Does the regression gate pass identical code and fail a real 30 % slowdown on a shared machine?

Each round starts three bench worker processes (``zopt bench``'s own worker, reference role, the
default workload, ``--threads 1``) that take images in turns, as ``zopt bench --against`` does:
A and B run this zopt as is, S runs it with a slowdown injected into the transformer's forward. The
slowdown is real extra work, not an edited record: a ``sitecustomize`` module that exists only in
this script's scratch folder is on S's PYTHONPATH; it times each forward of the transformer in
process CPU time and then keeps the CPU busy with matrix products for ``--slowdown`` times as long,
inside the forward. The gate (``zopt.bench.gate.compare`` on records built by the harness) then
judges, under ``--limits``:

* paired (``--against``): A against B of the same round (identical code) and A against S;
* stored baseline (``--baseline FILE``): round i's A against round i+1's A, minutes apart, and
  round i's A against round i+1's S.

Nothing is done to quiet the machine: whatever else runs on it is the noise. Every run's step
samples, memory and the load average go to ``-o`` (the file ``tests/bench/test_bench_gate.py``
replays through the gate).

    python benchmarks/gate_noise.py --rounds 20 -o tests/bench/data/gate_noise.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

SITECUSTOMIZE = r'''
import os, time
_F = float(os.environ.get("ZOPT_NOISE_SLOWDOWN") or 0)
if _F > 0:
    import torch
    from torch.nn.modules import module as _m
    _t = {}
    def _pre(mod, args):
        if type(mod).__name__ == "ZImageTransformer2DModel":
            _t[id(mod)] = time.process_time()
    def _post(mod, args, out):
        start = _t.pop(id(mod), None)
        if start is None:
            return
        budget = (time.process_time() - start) * _F
        a = torch.ones(96, 96)
        t0 = time.process_time()
        while time.process_time() - t0 < budget:  # real work inside the forward: the run is slower
            a = torch.tanh(a @ a)
    _m.register_module_forward_pre_hook(_pre)
    _m.register_module_forward_hook(_post)
'''


def _common(threads: int) -> tuple[dict, dict]:
    """The harness's record context and worker spec for reference runs of the default workload."""
    from zopt import checkpoint
    from zopt.bench.harness import DEFAULT_PROMPTS, software_versions
    from zopt.families import resolve_source
    from zopt.runtime import detect

    hw = detect()
    src = checkpoint.open(resolve_source("tiny"))
    settings = {"steps": 4, "width": 256, "height": 256, "prompts": list(DEFAULT_PROMPTS), "seeds": [0],
                "repeats": 2, "warmup": 1, "guidance_scale": 0.0, "device": "cpu", "threads": threads}
    common = {"run_id": "gate-noise", "source": {"spec": "tiny", "sha256": src.sha256(), "params": src.num_params()},
              "options": {}, "hardware": hw.to_dict(), "fingerprint": hw.fingerprint(),
              "software": software_versions(), "settings": settings}
    spec = dict(settings, mode="run", role="reference", model="tiny", dtype="fp32", backend=None, base=None,
                offload="auto", attention="auto", paced=True)
    return common, spec


def _round(common: dict, spec: dict, tmp: Path, inject: Path, slowdown: float) -> dict[str, dict]:
    """A, B (as is) and S (slowed) in turns; their records by name."""
    from zopt.bench.harness import Planned, _record
    from zopt.bench.process import WorkerProcess, run_in_turns

    os.environ["ZOPT_NOISE_SLOWDOWN"] = str(slowdown)  # only S finds the sitecustomize that reads it
    workers = [WorkerProcess(dict(spec, ref_dir=str(tmp / n / "ref"), image_dir=str(tmp / n / "img")), tmp, n,
                             root=str(inject) if n == "S" else None) for n in ("A", "B", "S")]
    results = run_in_turns(workers, 1800.0)
    row = Planned("fp32", "fp32", None, "torch", "reference: eager PyTorch from the source")
    return {n: _record(common, row, "reference", r, {}, "fp32", tmp) for n, r in zip("ABS", results, strict=True)}


def _summary(rec: dict) -> dict:
    """What the gate reads from a run: step samples (wall and CPU), memory peak."""
    lat = rec["metrics"].get("latency") or {}
    return {"status": rec["status"], "message": rec["message"],
            "wall": (lat.get("step_ms") or {}).get("samples"), "cpu": (lat.get("step_cpu_ms") or {}).get("samples"),
            "peak_bytes": (rec["metrics"].get("memory") or {}).get("peak_bytes")}


def load_rounds(path: str | Path) -> list[list[dict[str, dict]]]:
    """The saved measurement as records again: per stream (one invocation of this script), its
    rounds, each a dict of records A, B, S rebuilt with the harness's record code."""
    from zopt.bench.harness import Planned, _record
    from zopt.bench.metrics import latency_stats

    doc = json.loads(Path(path).read_text())
    row = Planned("fp32", "fp32", None, "torch", "reference: eager PyTorch from the source")
    streams = []
    for stream in doc["streams"]:
        common = stream["common"]
        rounds = []
        for r in stream["rounds"]:
            recs = {}
            for n in "ABS":
                run = r[n]
                metrics = {"memory": {"kind": "cpu_rss", "peak_bytes": run["peak_bytes"], "baseline_bytes": 0},
                           "latency": {k: dict(latency_stats(run[s]), samples=run[s])
                                       for k, s in (("step_ms", "wall"), ("step_cpu_ms", "cpu"))}}
                recs[n] = _record(common, row, "reference", {"status": run["status"], "message": run["message"],
                                                             "metrics": metrics}, {}, "fp32", Path("."))
            rounds.append(recs)
        streams.append(rounds)
    return streams


def verdicts(rounds: list[dict[str, dict]], limits) -> dict[str, list[bool]]:
    """Gate verdicts (True: regression) for paired and stored-baseline comparisons of ``rounds``
    (each a dict of records A, B, S)."""
    from zopt.bench import gate as G

    def bad(x, y):
        return G.compare([x], [y], limits).exit_code == G.EXIT_REGRESSION

    n = len(rounds)
    rounds = [r for r in rounds if all(x["status"] == "ok" for x in r.values())]
    return {"paired_identical": [bad(r["A"], r["B"]) for r in rounds],
            "paired_slowed": [bad(r["A"], r["S"]) for r in rounds],
            "stored_identical": [bad(rounds[i]["A"], rounds[i + 1]["A"]) for i in range(n - 1)],
            "stored_slowed": [bad(rounds[i]["A"], rounds[i + 1]["S"]) for i in range(n - 1)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20, help="rounds of (A, B, S) in turns (default 20)")
    ap.add_argument("--threads", type=int, default=1, help="zopt bench --threads (default 1)")
    ap.add_argument("--slowdown", type=float, default=0.30, help="injected extra work per forward (default 0.30)")
    ap.add_argument("--limits", default="cpu_latency=10%,latency=10%", help="the gate's limits")
    ap.add_argument("-o", "--out", default="tests/bench/data/gate_noise.json")
    ap.add_argument("--replay", metavar="FILE", help="measure nothing: the gate's verdicts on a saved measurement")
    args = ap.parse_args()
    from zopt.bench import gate as G

    if args.replay:
        streams = load_rounds(args.replay)
        print(f"{args.replay}: {sum(map(len, streams))} rounds in {len(streams)} stream(s)")
        summarize(streams, args.limits)
        return 0
    limits = G.parse_limits(args.limits)
    common, spec = _common(args.threads)
    spec["threads"] = args.threads
    doc = {"what": f"reference runs of zopt bench's default workload on tiny (--threads {args.threads}), three "
                   f"workers per round in turns: A and B as is, S with {args.slowdown:.0%} extra CPU work per "
                   "transformer forward (benchmarks/gate_noise.py)",
           "machine": f"{os.cpu_count()} CPU cores, shared", "streams": [{"common": common, "rounds": []}]}
    rounds = []
    with tempfile.TemporaryDirectory(prefix="gate-noise-") as tmp:
        inject = Path(tmp) / "inject"
        inject.mkdir()
        (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
        (inject / "zopt").symlink_to(Path(G.__file__).resolve().parents[1])
        for i in range(args.rounds):
            t0, load0 = time.time(), os.getloadavg()[0]
            recs = _round(common, spec, Path(tmp) / f"r{i}", inject, args.slowdown)
            rounds.append(recs)
            load = [round(load0, 2), round(os.getloadavg()[0], 2)]
            doc["streams"][0]["rounds"].append({"seconds": round(time.time() - t0, 1), "load": load,
                                  **{n: _summary(r) for n, r in recs.items()}})
            v = verdicts(rounds[-2:], limits)
            print(f"round {i + 1}/{args.rounds}: load {load[0]:.1f}-{load[1]:.1f}, {time.time() - t0:.0f} s; "
                  f"paired identical {'FAIL' if v['paired_identical'][-1] else 'pass'}, slowed "
                  f"{'caught' if v['paired_slowed'][-1] else 'MISSED'}"
                  + (f"; stored identical {'FAIL' if v['stored_identical'][-1] else 'pass'}, slowed "
                     f"{'caught' if v['stored_slowed'][-1] else 'MISSED'}" if i else ""), flush=True)
            with open(args.out, "w") as f:  # after every round: an interrupted run keeps what it measured
                json.dump(doc, f)
                f.write("\n")
    summarize([rounds], args.limits)
    return 0


def summarize(streams: list[list[dict[str, dict]]], limits: str) -> None:
    """Print, for the limits together and each alone, how many identical pairs passed and how many
    slowed runs failed, paired and against a stored baseline."""
    from zopt.bench import gate as G

    for lim in (limits, *limits.split(",")):
        total: dict[str, list[bool]] = {}
        for rounds in streams:
            for k, x in verdicts(rounds, G.parse_limits(lim)).items():
                total.setdefault(k, []).extend(x)
        print(f"{lim}: " + "; ".join(
            f"{k} {'pass' if 'identical' in k else 'fail'} {(len(x) - sum(x)) if 'identical' in k else sum(x)}/{len(x)}"
            for k, x in total.items()))


if __name__ == "__main__":
    sys.exit(main())
