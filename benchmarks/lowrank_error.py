"""Output error and size of INT4/NF4 with a low-rank BF16 branch (``int4:r32``) against plain INT4.

For each model size (``tiny``; ``medium``: dim 1536, 8 layers), each spec is converted from the
seeded BF16 folder, reloaded from its artifact with the ``torch-dequant`` backend (the stored
numerics exactly, no activation quantization) and run on the same transformer input as
``lowbit_table.py``; the reference is the BF16 model in float32 activations.

    python benchmarks/lowrank_error.py                          # tiny and medium
    python benchmarks/lowrank_error.py --sizes tiny --refine 0 1 3
    python benchmarks/lowrank_error.py --hadamard               # also: does a Hadamard rotation help INT4?

Prints, per size, the bytes of the weights file and the output error, each also as a ratio to
plain ``int4``. ``--refine`` runs the rank specs once per number of refinement steps.
``--hadamard`` prints the mean relative weight reconstruction error of INT4 (groups of 128) over
every quantized Linear with and without a randomized block Hadamard rotation (blocks of 128 along
the input dimension, random signs, as QuaRot/SDNQ rotate), which is what a rotation could gain.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from lowbit_table import make_inputs, make_source

SPECS = ["int4", "int4:g64", "int4:r16", "int4:r32", "int4:r64", "nf4", "nf4:r16", "nf4:r32", "nf4:r64"]


def output(model, inputs):
    import torch

    x, t, cap = inputs
    with torch.no_grad():
        return model(x, t, cap, return_dict=False)[0][0].float()


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))


def hadamard_gain(src: Path) -> tuple[float, float, int]:
    """(mean rel. INT4 weight error, the same after a block-128 randomized Hadamard rotation, count)."""
    import torch
    from safetensors import safe_open

    from zopt.formats.lowbit.int4 import dequantize_int4, quantize_int4

    h = torch.ones(1, 1)
    while h.shape[0] < 128:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / h.shape[0] ** 0.5
    g = torch.Generator().manual_seed(0)
    plain, rotated = [], []
    with safe_open(str(next(src.glob("*.safetensors"))), "pt") as f:
        for n in f.keys():
            w = f.get_tensor(n).float()
            if w.ndim != 2 or w.shape[1] % 128 or w.shape[0] < 128 or "adaLN" in n or "embedder" in n:
                continue
            signs = torch.randint(0, 2, (w.shape[1],), generator=g).float() * 2 - 1
            wr = ((w * signs).reshape(w.shape[0], -1, 128) @ h).reshape(w.shape)  # orthogonal: error norms compare
            for x, out in ((w, plain), (wr, rotated)):
                out.append(float((dequantize_int4(*quantize_int4(x)) - x).norm() / x.norm()))
    return sum(plain) / len(plain), sum(rotated) / len(rotated), len(plain)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "medium"])
    ap.add_argument("--specs", nargs="+", default=SPECS)
    ap.add_argument("--refine", nargs="+", type=int, default=None,
                    help="refinement steps to compare (default: zopt's own, lowrank.REFINE_STEPS)")
    ap.add_argument("--hadamard", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from zopt import formats
    from zopt.formats.lowbit import lowrank
    from zopt.formats.plain import load_source

    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    refine = args.refine or [lowrank.REFINE_STEPS]
    with tempfile.TemporaryDirectory(prefix="zopt-lowrank-") as td:
        tmp = Path(td)
        for size in args.sizes:
            src = make_source(size, tmp)
            if args.hadamard:
                a, b, n = hadamard_gain(src)
                print(f"[{size}] INT4 g128 weight error over {n} Linears: plain {a:.4f}, "
                      f"block-128 Hadamard {b:.4f} ({b / a:.3f}x)", flush=True)
            ref_model = load_source(src, dtype=torch.float32)
            inputs = make_inputs(dict(ref_model.config), 32)
            ref = output(ref_model, inputs)
            del ref_model
            print(f"\n[{size}]\n| spec | refine | weights MB | vs int4 | rel. error | vs int4 | convert s |")
            print("|---|---|---|---|---|---|---|")
            base = None  # the first spec's (bytes, error): plain int4 unless --specs says otherwise
            for spec in args.specs:
                for steps in refine if ":r" in spec else [0]:
                    lowrank.REFINE_STEPS = steps
                    out = tmp / f"{size}-{spec.replace(':', '-')}-{steps}"
                    t0 = time.perf_counter()
                    formats.convert(src, spec, out, options={"hash_source": False}, progress=False)
                    conv = time.perf_counter() - t0
                    y = output(formats.load(out, dtype=torch.float32, backend="torch-dequant"), inputs)
                    err, nbytes = float((y - ref).norm() / ref.norm()), weights_bytes(out)
                    base = base or (nbytes, err)
                    print(f"| {spec} | {steps if ':r' in spec else '-'} | {nbytes / 1e6:.2f} | {nbytes / base[0]:.3f}x "
                          f"| {err:.4f} | {err / base[1]:.3f}x | {conv:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
