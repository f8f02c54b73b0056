"""Throughput of zopt's torch GGML quantizers/dequantizers against gguf-py's numpy ones (and ggml's C).

Usage: python benchmarks/ggml_quants_speed.py [--rows 4096 --cols 4096] [--types Q8_0,Q4_K] [--threads N]

Prints, per type, millions of weights per second for quantize and dequantize (float32 and bfloat16
output), next to gguf-py's ``gguf.quants.quantize``/``dequantize`` where gguf-py implements them, with
the ratio zopt/gguf-py, and ggml's own C quantizer (``ggml_quantize_chunk``, one call, from
stable-diffusion-cpp-python's library) when that package is installed. Wall-clock (or, with
``--clock cpu``, process CPU) times; the best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import quants as gguf_quants
from gguf.constants import GGMLQuantizationType

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's zopt, not an installed one
from zopt.formats.gguf import compile as ggml_compile  # noqa: E402
from zopt.formats.gguf import quants as gq  # noqa: E402

CLOCK = time.perf_counter


def best_time(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = CLOCK()
        fn()
        best = min(best, CLOCK() - t)
    return best


def ggml_c_library():
    try:
        import stable_diffusion_cpp
    except ImportError:
        return None
    libs = sorted((Path(stable_diffusion_cpp.__file__).parent / "lib").glob("libstable-diffusion*"))
    if not libs:
        return None
    lib = ctypes.CDLL(str(libs[0]))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=4096)
    p.add_argument("--cols", type=int, default=4096)
    p.add_argument("--types", default=",".join(gq.SUPPORTED))
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--compile", action="store_true",
                   help="zopt's compiled kernels (torch.compile; the untimed first call compiles them)")
    p.add_argument("--no-gguf-py", action="store_true", help="skip the (slow) gguf-py numpy columns")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: this process's CPU time, steadier than wall time on a shared machine "
                        "(comparable across columns with --threads 1, as numpy and ggml C use one thread)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    x = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0))
    xn = x.numpy()
    lib = ggml_c_library()
    print(f"{args.rows}x{args.cols} float32 weights, torch {torch.__version__}, {args.threads} threads; "
          f"M weights/s by {args.clock} time (best of {args.repeat})")
    head = (f"{'type':6} {'quant':>8} {'gguf-py':>8} {'ratio':>6} {'ggml C':>8} | "
            f"{'deq f32':>8} {'deq bf16':>8} {'gguf-py':>8} {'ratio':>6}")
    print(head)
    print("-" * len(head))
    with ggml_compile.compiled(args.compile) as on:
        if args.compile and not on:
            print("compilation unavailable: measuring the eager quantizers")
        for name in args.types.split(","):
            row(args, name, x, xn, lib)
    print("ratio = gguf-py time / zopt time (higher is better for zopt); ggml C runs one thread.")


def row(args, name: str, x: torch.Tensor, xn: np.ndarray, lib) -> None:
    """Measure and print one type's line."""
    n = x.numel()
    mw = lambda s: n / s / 1e6  # noqa: E731
    qt = GGMLQuantizationType[name]
    data = gq.quantize(x, name)
    tq = best_time(lambda: gq.quantize(x, name), args.repeat)  # noqa: B023
    td = best_time(lambda: gq.dequantize(data, name, x.shape), args.repeat)  # noqa: B023
    tdb = best_time(lambda: gq.dequantize(data, name, x.shape, dtype=torch.bfloat16), args.repeat)  # noqa: B023
    gq_cell = gd_cell = "-"
    rq = rd = ""
    raw = data.numpy()
    if not args.no_gguf_py:
        try:
            t = best_time(lambda: gguf_quants.quantize(xn, qt), 1)  # noqa: B023
            gq_cell, rq = f"{mw(t):8.1f}", f"{t / tq:5.1f}x"
        except NotImplementedError:
            pass
        if name == "F32":
            raw = raw.view(np.float32)
        elif name == "F16":
            raw = raw.view(np.float16)
        t = best_time(lambda: gguf_quants.dequantize(raw, qt), 1)  # noqa: B023
        gd_cell, rd = f"{mw(t):8.1f}", f"{t / td:5.1f}x"
    c_cell = "-"
    if lib is not None and gq.block_size(name) > 1:
        out = np.empty((args.rows, gq.row_bytes(name, args.cols)), dtype=np.uint8)
        t = best_time(lambda: lib.ggml_quantize_chunk(int(qt), xn.ctypes.data, out.ctypes.data, 0,  # noqa: B023
                                                      args.rows, args.cols, None), 1)
        c_cell = f"{mw(t):8.1f}"
    print(f"{name:6} {mw(tq):8.1f} {gq_cell:>8} {rq:>6} {c_cell:>8} | "
          f"{mw(td):8.1f} {mw(tdb):8.1f} {gd_cell:>8} {rd:>6}", flush=True)


if __name__ == "__main__":
    main()
