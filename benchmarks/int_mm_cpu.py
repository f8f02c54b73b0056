"""Is ``torch._int_mm`` on CPU faster than dequantize + float matmul for W8A8?

Decides whether the ``int8_w8a8`` format registers the ``int-mm-cpu`` backend. For Z-Image-like
GEMM shapes (tokens x in -> out) it times, per call, with the same dynamic per-token activation
quantization in all three: ``dequant`` (dequantize both operands, fp32 matmul — the
``torch-dequant`` backend), ``int_mm`` (INT8 x INT8 -> INT32 with ``torch._int_mm``) and, for
reference, the weight-only fp32 matmul.

    python benchmarks/int_mm_cpu.py [THREADS]     # default 1 thread
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

SHAPES = [(1024, 1536, 1536), (1024, 1536, 4096), (1024, 3840, 3840), (1024, 3840, 10240)]


def best_ms(fn, reps: int = 3) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1000


def main() -> None:
    import sys

    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'M x K x N':>20} {'dequant ms':>11} {'int_mm ms':>10} {'fp32 w-only ms':>15} {'speed-up':>9} {'rel diff':>9}")
    for m, k, n in SHAPES:
        x, w = torch.randn(m, k), torch.randn(n, k)
        sw = w.abs().amax(1) / 127
        wq = torch.round(w / sw[:, None]).to(torch.int8)

        def quant_x(x=x):
            sx = x.abs().amax(-1, keepdim=True) / 127
            return torch.round(x / sx), sx

        def dequant(x=x, wq=wq, sw=sw):
            xq, sx = quant_x(x)
            return F.linear(xq * sx, wq.float() * sw[:, None])

        def int_mm(x=x, wq=wq, sw=sw):
            xq, sx = quant_x(x)
            return torch._int_mm(xq.to(torch.int8), wq.t()).float() * sx * sw

        def weight_only(x=x, wq=wq, sw=sw):
            return F.linear(x, wq.float() * sw[:, None])

        a, b = dequant(), int_mm()
        td, ti, tw = best_ms(dequant), best_ms(int_mm), best_ms(weight_only)
        diff = float((a - b).norm() / a.norm())
        print(f"{f'{m} x {k} x {n}':>20} {td:11.1f} {ti:10.1f} {tw:15.1f} {td / ti:8.2f}x {diff:9.1e}")


if __name__ == "__main__":
    main()
