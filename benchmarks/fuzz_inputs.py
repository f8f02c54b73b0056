"""Fuzz every kind of input zopt reads and print counts per outcome.

    PYTHONPATH=$PWD python benchmarks/fuzz_inputs.py [--per-kind 200] [--seed 0] [--quick] [--cli 12]

Inputs are mutations of zopt's own small files (safetensors, GGUF, artifact manifests of bf16,
int8 and fp8 (ComfyUI) folders, model configs, sharded indexes, publish folders; see
``tests/fuzz_cases.py``). Each case runs in this
process under a time limit through the entry point users reach: by default artifacts are loaded
all the way to a model (``--quick``: stop after verification and the shape check, as the test
suite does). ``--cli N`` also runs N cases through the ``zopt`` command and checks exit code 2
with exactly one line on stderr. Outcomes: clean (one-line ZoptError naming a path), accepted
(read; nothing checksummed changed), tampering (read although checksummed bytes changed),
unclean (any other exception), hang (time limit passed).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import fuzz_cases as C  # noqa: E402
import fuzz_helpers as F  # noqa: E402

# artifact folders are loaded by `zopt generate` (one 64x64 step); the rest by inspect / verify
ARTIFACT_KINDS = ("manifest", "lowbit", "fp8comfy")
CLI_COMMANDS = {"safetensors": ["inspect"], "gguf": ["inspect"], "config": ["inspect"], "index": ["inspect"],
                "publish": ["verify", "--no-load"]}


def _cli_checks(cases: list[F.Case], work: Path) -> Counter:
    """Run cases through the zopt command: rejected ones must exit 2 with one stderr line."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out: Counter = Counter()
    for i, c in enumerate(cases):
        d = work / f"cli{i}"
        d.mkdir(parents=True)
        target = c.build(d)
        if c.kind in ARTIFACT_KINDS:
            cmd = ["generate", str(target), "--steps", "1", "--resolution", "64x64", "--out", str(d / "o")]
        else:
            cmd = [*CLI_COMMANDS[c.kind], str(target)]
        try:
            r = subprocess.run([sys.executable, "-m", "zopt.cli", *cmd], capture_output=True, text=True, env=env,
                               timeout=120)
        except subprocess.TimeoutExpired:
            out["hang"] += 1
            continue
        lines = r.stderr.strip().splitlines()
        if r.returncode == 0:
            out["tampering" if c.tamper else "accepted"] += 1
        elif r.returncode == 2 and len(lines) == 1 and lines[0].startswith("zopt: error: "):
            out["clean (exit 2, one line)"] += 1
        else:
            out["unclean"] += 1
            print(f"  unclean CLI case {c.kind}/{c.label}: exit {r.returncode}: {lines[-3:]}", file=sys.stderr)
        F._rmtree(d)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-kind", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="stop after verification (as the test suite does)")
    ap.add_argument("--limit", type=float, default=30.0, help="seconds per case before it counts as a hang")
    ap.add_argument("--cli", type=int, default=12, help="cases also run through the zopt command")
    args = ap.parse_args()
    os.environ.setdefault("ZOPT_COMPILE", "0")
    from zopt.formats import convert
    from zopt.models import tiny_pipeline_dir

    with tempfile.TemporaryDirectory(prefix="zopt-fuzz-") as tmp:
        root = Path(tmp)
        tiny = tiny_pipeline_dir() / "transformer"
        q8 = convert(tiny, "gguf:Q8_0", root / "tiny-Q8_0.gguf", progress=False)
        bases = F.make_bases(root / "bases", tiny, q8)
        rng = random.Random(args.seed)
        cases = [c for kind, gen in C.GENERATORS.items() for c in gen(bases[kind], rng, args.per_kind)]
        t0 = time.perf_counter()
        counts, details = F.run_all(cases, C.entries(full=not args.quick), root / "work", args.limit)
        wall = time.perf_counter() - t0
        kinds = list(C.GENERATORS)
        print(f"{len(cases)} cases, seed {args.seed}, {'quick' if args.quick else 'full load'}, {wall:.0f} s")
        print(f"{'kind':<12}" + "".join(f"{o:>11}" for o in F.OUTCOMES) + f"{'total':>8}")
        for k in kinds + ["all"]:
            row = [sum(v for (kk, o2), v in counts.items() if o2 == o and (k == "all" or kk == k)) for o in F.OUTCOMES]
            print(f"{k:<12}" + "".join(f"{v:>11}" for v in row) + f"{sum(row):>8}")
        for o in ("unclean", "hang", "tampering"):
            for d in details[o][:20]:
                print(f"  {o}: {d}")
        if args.cli:
            crng = random.Random(args.seed + 1)
            picked = crng.sample(cases, args.cli)
            cli = _cli_checks(picked, root / "cli")
            print(f"zopt command on {args.cli} cases: {dict(cli)}")
        bad = sum(len(details[o]) for o in ("unclean", "hang", "tampering"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
