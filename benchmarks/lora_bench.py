"""LoRA on quantized Z-Image transformers: accuracy of run-time branches and of merging first,
and the cost of the branches per step, on CPU.

For each model (``tiny``: the embedded model; ``medium``: the seeded synthetic checkpoint of
``zopt synth --size medium``, dim 1536, 8 layers) and each seeded random LoRA (kohya layout, fused
qkv, alpha = rank/2, every Linear targeted):

* ``runtime``: relative output error of ``zopt.load(FORMAT, loras=[L])`` (branch beside the
  quantized layer) against the float32 model with the same LoRA;
* ``merged``: the same for ``zopt convert SRC --lora L --to FORMAT`` (merge, then quantize);
* ``own``: the format's error without LoRA (against float32 without LoRA), for scale;
* ``lora``: how far the LoRA moves the float32 output (the size of the effect measured).

Then, at ``--overhead-rank``: the median CPU time of one transformer forward (one sampling step,
batch 1, 256 image + 64 caption tokens, float32 compute, one thread, eager) with and without the
branches, per format listed in ``--timing``, and the memory the branches add (their buffers)
against the model's.

Usage: python benchmarks/lora_bench.py [--models tiny,medium] [--formats ...] [--ranks 16,64]
       [--overhead-rank 32] [--timing gguf:Q4_K_M,bf16] [--repeats 5] [--work DIR]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the LoRA file writer shared with the tests

from lora_helpers import random_lora, write_lora  # noqa: E402

import zopt  # noqa: E402
from zopt import formats  # noqa: E402
from zopt.families import get as get_family  # noqa: E402
from zopt.families import zimage  # noqa: E402
from zopt.lora import add_loras, remove_loras  # noqa: E402
from zopt.lora import read as read_lora  # noqa: E402

ALL_FORMATS = ("gguf:Q8_0", "gguf:Q4_K_M", "fp8", "int8", "int8_w8a8", "int4", "nf4", "bf16")


def source(model: str, work: Path) -> Path:
    if model == "tiny":
        out = work / "tiny-fp32"
        return out if out.exists() else formats.convert("tiny", "fp32", out, progress=False)
    out = work / f"{model}.safetensors"  # what `zopt synth --size medium` writes
    return out if out.exists() else get_family("zimage").write_synthetic(out, size=model, seed=0, progress=False)


def inputs(config, image_tokens: int = 256, text: int = 64, seed: int = 0):
    side = int(image_tokens ** 0.5) * 2  # patch 2
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(config["in_channels"], 1, side, side, generator=g)]
    cap = [torch.randn(text, config["cap_feat_dim"], generator=g)]
    return x, torch.tensor([0.6]), cap


def forward(model, inp):
    with torch.no_grad():
        return model(*inp, return_dict=False)[0][0].float()


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def lora_std(rank: int) -> float:
    """Entry scale of the random matrices: the update's size does not depend on the rank (with
    alpha = rank / 2), and moves the tiny model's output by about 20%."""
    return 0.05 * (16 / rank) ** 0.25


def modules_of(src: Path) -> dict[str, tuple[int, int]]:
    from zopt import checkpoint
    from zopt.lora.resolve import linear_modules

    return linear_modules(zimage.as_diffusers(checkpoint.open(src)))


def artifact(src: Path, spec: str, work: Path, tag: str, loras=None) -> Path:
    name = f"{src.stem}-{spec.replace(':', '-')}-{tag}"
    out = work / (name + ".gguf" if spec.startswith("gguf") else name)
    if out.exists():
        return out
    opts = {"compile": False} if spec.startswith("gguf") else None
    return formats.convert(src, spec, out, options=opts, progress=False, loras=loras)


def accuracy(model: str, src: Path, specs, ranks, work: Path) -> list[dict]:
    rows = []
    fp32 = zopt.load(src, dtype=torch.float32)
    inp = inputs(dict(fp32.config))
    ref0 = forward(fp32, inp)
    mods = modules_of(src)
    for rank in ranks:
        lpath = write_lora(work / f"{model}-r{rank}.safetensors",
                           random_lora(mods, rank=rank, seed=rank, alpha=rank / 2, std=lora_std(rank)), "kohya-qkv")
        add_loras(fp32, [str(lpath)])
        ref = forward(fp32, inp)
        remove_loras(fp32)
        for spec in specs:
            q = zopt.load(artifact(src, spec, work, "base"), dtype=torch.float32)
            own = rel(forward(q, inp), ref0)
            add_loras(q, [str(lpath)])
            rt = rel(forward(q, inp), ref)
            del q
            tag = f"r{rank}-{read_lora(lpath).sha256[:8]}"  # a merged artifact is reused only for the same LoRA
            m = zopt.load(artifact(src, spec, work, tag, loras=[str(lpath)]), dtype=torch.float32)
            rows.append({"model": model, "rank": rank, "format": spec, "own": own, "runtime": rt,
                         "merged": rel(forward(m, inp), ref), "lora": rel(ref, ref0)})
            del m
            print(_row(rows[-1]), flush=True)
    return rows


def _row(r) -> str:
    return (f"| {r['model']} | {r['rank']} | {r['format']} | {r['lora']:.3f} | {r['own']:.4f} | {r['runtime']:.4f} "
            f"| {r['merged']:.4f} |")


def buffer_bytes(model) -> int:
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def step_time(fn, repeats: int) -> float:
    """Median CPU seconds of ``fn()`` after a warm-up (CPU time of this process, not wall time:
    on a machine other jobs share, wall time measures them too)."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        ts.append(time.process_time() - t0)
    return statistics.median(ts)


def overhead(model: str, src: Path, specs, rank: int, repeats: int, work: Path,
             branch_dtypes=(None,)) -> list[dict]:
    rows = []
    mods = modules_of(src)
    lpath = write_lora(work / f"{model}-r{rank}.safetensors",
                       random_lora(mods, rank=rank, seed=rank, alpha=rank / 2, std=lora_std(rank)), "kohya-qkv")
    for spec in specs:
        m = zopt.load(artifact(src, spec, work, "base"), dtype=torch.float32)
        inp = inputs(dict(m.config))
        before = buffer_bytes(m)

        # interleave base and LoRA measurements so load from other processes hits both alike
        for bdt in branch_dtypes:
            base, lora = [], []
            for _ in range(2):
                base.append(step_time(functools.partial(forward, m, inp), repeats))
                add_loras(m, [str(lpath)], dtype=bdt)
                lora.append(step_time(functools.partial(forward, m, inp), repeats))
                remove_loras(m)
            add_loras(m, [str(lpath)], dtype=bdt)
            extra = buffer_bytes(m) - before
            remove_loras(m)
            b, lo = min(base), min(lora)
            rows.append({"model": model, "format": spec, "rank": rank, "branch": str(bdt or "layer dtype"),
                         "step_s": b, "lora_step_s": lo, "overhead": lo / b - 1, "model_bytes": before,
                         "lora_bytes": extra})
            r = rows[-1]
            print(f"| {model} | {spec} | {str(bdt or torch.float32)[6:]} | {rank} | {b * 1e3:.1f} | {lo * 1e3:.1f} | "
                  f"{100 * r['overhead']:+.1f}% | {before / 1e6:.1f} | {extra / 1e6:.2f} ({100 * extra / before:.1f}%) |",
                  flush=True)
        del m
    return rows


def layer_overhead(dims, rank: int, tokens: int, repeats: int) -> None:
    """CPU time of one Linear layer with and without a rank-``rank`` branch (zopt's LoraLinear) at
    the attention (dim x dim) and feed-forward (ffn x dim) shapes of each model width: float32
    ``nn.Linear`` and the GGUF loader's INT8 matmul layer (int-mm-cpu)."""
    from zopt.formats.gguf.loader import GGUFInt8Linear
    from zopt.lora.runtime import lora_linear_class

    cls = lora_linear_class()
    g = torch.Generator().manual_seed(0)
    for dim in dims:
        ffn = int(dim / 3 * 8)
        for out_f, in_f in ((dim, dim), (ffn, dim)):
            x = torch.randn(tokens, in_f, generator=g)
            w = torch.randn(out_f, in_f, generator=g) * in_f ** -0.5
            scale = w.reshape(out_f, -1, 32).abs().amax(-1) / 127
            codes = (w.reshape(out_f, -1, 32) / scale.unsqueeze(-1)).round().to(torch.int8).reshape(out_f, in_f)
            layers = {"float32": torch.nn.Linear(in_f, out_f, bias=False),
                      "int8 (GGUF int-mm-cpu)": GGUFInt8Linear({"kind": "int8", "q": codes, "scale": scale}, "Q8_0",
                                                               out_f, in_f, None, torch.float32)}
            for kind, layer in layers.items():
                for branch in (torch.float32, torch.bfloat16):
                    wrapped = cls(layer)
                    wrapped.add("l", torch.randn(rank, in_f, generator=g).to(branch),
                                torch.randn(out_f, rank, generator=g).to(branch), 0.1)
                    with torch.no_grad():
                        b = step_time(functools.partial(layer, x), repeats)
                        lo = step_time(functools.partial(wrapped, x), repeats)
                    print(f"| {dim} | {out_f}x{in_f} | {kind} | {str(branch)[6:]} | {b * 1e3:.2f} | {lo * 1e3:.2f} | "
                          f"{100 * (lo / b - 1):+.1f}% | {100 * rank * (in_f + out_f) / (in_f * out_f):.1f}% |",
                          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="tiny,medium")
    ap.add_argument("--formats", default=",".join(ALL_FORMATS))
    ap.add_argument("--ranks", default="16,64")
    ap.add_argument("--overhead-rank", type=int, default=32)
    ap.add_argument("--timing", default="gguf:Q4_K_M,bf16", help="formats whose step time is measured")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layer-dims", default="1536,3840", help="model widths of the per-layer timing")
    ap.add_argument("--skip-models", action="store_true", help="only the per-layer timing")
    ap.add_argument("--skip-accuracy", action="store_true", help="only the timings")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (timings are CPU time)")
    ap.add_argument("--work", default=str(REPO / "exports" / "lora-bench"))
    args = ap.parse_args()
    os.environ.setdefault("ZOPT_COMPILE", "0")  # eager: the same code for every format, no compile time
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    specs = [s for s in args.formats.split(",") if s]
    ranks = [int(r) for r in args.ranks.split(",") if r]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, ZOPT_COMPILE={os.environ['ZOPT_COMPILE']}")
    if not args.skip_models:
        models(args, work, specs, ranks)
    print("\n| width | layer | kind | branch | ms | ms + LoRA | overhead | LoRA FLOPs |")
    print("|---|---|---|---|---|---|---|---|")
    layer_overhead([int(d) for d in args.layer_dims.split(",") if d], args.overhead_rank, 320, max(args.repeats, 9))


def models(args, work: Path, specs, ranks) -> None:
    print("\n| model | rank | format | LoRA effect | own error | run-time LoRA | merge then quantize |")
    print("|---|---|---|---|---|---|---|")
    for model in args.models.split(",") if not args.skip_accuracy else ():
        accuracy(model, source(model, work), specs, ranks, work)
    print("\n| model | format | branch | rank | step ms | step ms + LoRA | overhead | model MB | LoRA MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models.split(","):
        overhead(model, source(model, work), [s for s in args.timing.split(",") if s], args.overhead_rank,
                 args.repeats, work, (None, torch.bfloat16))


if __name__ == "__main__":
    main()
