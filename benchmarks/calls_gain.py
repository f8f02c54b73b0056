"""How well ``--option calls_types=one`` predicts the output errors that ``calls_types=all`` measures.

    python benchmarks/calls_gain.py tiny micro.calls
    python benchmarks/calls_gain.py medium.safetensors medium.calls --tensors 'layers\\.[03]\\.' --json gain.json

For every quantizable weight of SOURCE (or those matching ``--tensors``), on its gguf:auto candidate
types: the calls are run once with the tensor at its cheapest type (what ``one`` does: the other
types' errors are that run's output error per unit of squared weight error times their own weight
errors) and once per type (what ``all`` does). Prints, per tensor, the ratio predicted / measured for
every type but the cheapest (whose error both measure the same way) and the summary over all of
them: median and 10th / 90th percentiles, and the share of tensors whose types the prediction puts
in the measured order. The types are quantized with the weighted searches and unit importance, as
``search=weighted`` (the default) quantizes them. Stored types the source holds exactly (a BF16
checkpoint at BF16) measure zero error both ways and are left out.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's zopt


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("source", help="a Z-Image transformer (folder, safetensors file or an embedded name)")
    ap.add_argument("calls", help="a calls file from zopt calibrate --save-calls")
    ap.add_argument("--tensors", default=".", metavar="REGEX", help="only weights whose original-layout name matches")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the model runs (default: torch's)")
    ap.add_argument("--json", default=None, help="write every tensor's measured and predicted errors here")
    args = ap.parse_args(argv)
    try:
        pattern = re.compile(args.tensors)
    except re.error as e:
        print(f"calls_gain: --tensors {args.tensors!r}: not a regular expression ({e})", file=sys.stderr)
        return 2
    if args.json and not Path(args.json).resolve().parent.is_dir():
        print(f"calls_gain: {args.json}: its folder does not exist", file=sys.stderr)
        return 2

    import torch

    from zopt import checkpoint
    from zopt.errors import ZoptError
    from zopt.families import resolve_source, zimage
    from zopt.formats.gguf import auto
    from zopt.formats.gguf.outputs import OutputProbe
    from zopt.formats.gguf.recipes import TensorPlan

    try:
        path = Path(resolve_source(args.source))
        src = checkpoint.open(path / "transformer" if (path / "transformer").is_dir() else path)
        probe = OutputProbe.from_source(src, args.calls, "all")
    except ZoptError as e:
        print(f"calls_gain: {e}", file=sys.stderr)
        return 2
    threads = args.threads or torch.get_num_threads()
    view = zimage.as_original(src)
    rows, ratios, ordered = [], [], 0
    print(f"{'tensor':52} {'types':>5}  predicted / measured, each type but the cheapest (the run itself) "
          "and those exact in the source")
    for name in view.names():
        shape = tuple(view.info(name).shape)
        if len(shape) != 2 or shape[-1] % 32 or not name.endswith(".weight") or not pattern.search(name):
            continue
        types = auto.candidates(shape)
        w = view.get(name).float().reshape(shape)
        plan, unit = TensorPlan(name, shape, types[0], ""), torch.ones(shape[-1])
        t0 = time.perf_counter()
        probe.types = "all"
        every = probe.measure(plan, w, unit, types, threads)
        probe.types = "one"
        one = probe.measure(plan, w, unit, types, threads)
        cheapest = min(types, key=lambda t: one.nbytes[t])
        compared = [t for t in types if t != cheapest and every.errors[t] > 0]
        r = {t: one.errors[t] / every.errors[t] for t in compared}
        ratios += r.values()
        kept = [t for t in types if every.errors[t] > 0]
        same = sorted(kept, key=lambda t: one.errors[t]) == sorted(kept, key=lambda t: every.errors[t])
        ordered += same
        rows.append({"tensor": name, "shape": shape, "measured": every.errors, "predicted": one.errors,
                     "ratio": r, "same_order": same, "seconds": round(time.perf_counter() - t0, 1)})
        print(f"{name:52} {len(types):>5}  " + " ".join(f"{t} {v:.2f}" for t, v in r.items()), flush=True)
    if not ratios:
        print(f"calls_gain: no quantizable weight of {args.source} matches {args.tensors!r}", file=sys.stderr)
        return 2
    q = statistics.quantiles(ratios, n=10)
    print(f"\n{len(rows)} tensors, {len(ratios)} type errors predicted from one run per tensor: predicted / measured "
          f"median {statistics.median(ratios):.3f}, 10th percentile {q[0]:.3f}, 90th {q[-1]:.3f}; "
          f"types in the measured order in {ordered} of {len(rows)} tensors")
    if args.json:
        Path(args.json).write_text(json.dumps({"source": args.source, "calls": args.calls, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
