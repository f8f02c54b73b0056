"""Conversion time of one GGUF recipe under different options, side by side.

Converts SOURCE to ``gguf:TYPE`` with each option set in turn, ``--rounds`` interleaved rounds,
and prints each run's seconds and every set's best time as a ratio to the first set's. Default
sets: the defaults (measured allocation, weighted search) and ``allocation=rule search=reference``
(the rule and ggml's reference quantizers).

Usage: python benchmarks/gguf_options_speed.py SOURCE [--type Q4_K_M] [--rounds 2] [--workers 1]
       [--set "allocation=rule search=reference" ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--set", action="append", default=None, metavar="'KEY=VALUE ...'",
                    help="an option set ('' for the defaults); repeatable")
    args = ap.parse_args()
    sets = args.set or ["allocation=rule search=reference", ""]
    from zopt.formats import convert

    best: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="zopt-speed-") as tmp:
        for r in range(args.rounds):
            for s in sets:
                opts = dict(kv.split("=", 1) for kv in s.split())
                t0 = time.perf_counter()
                convert(args.source, f"gguf:{args.type}", Path(tmp) / "out.gguf", progress=False, force=True,
                        options={"hash_source": False, "workers": args.workers, **opts})
                dt = time.perf_counter() - t0
                best[s] = min(best.get(s, dt), dt)
                print(f"round {r}: {s or 'defaults'}: {dt:.1f} s", flush=True)
    first = best[sets[0]]
    for s in sets:
        print(f"{s or 'defaults'}: best {best[s]:.1f} s, {best[s] / first:.2f}x")


if __name__ == "__main__":
    main()
