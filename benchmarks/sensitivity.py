"""Which tensors of the trained micro Z-Image are sensitive to quantization: one group at a time.

For each tensor group (embedders, refiners, attention q/k/v and out, FFN w1/w2/w3, adaLN
modulation, the final layer, each main block) and each GGUF type, the group's 2-D weights are
quantized and dequantized with zopt's own GGUF quantizers (``formats.gguf.quants``) while every
other tensor keeps its bf16 value, and the pipeline is run on held-out shapes prompts from the same
starting noise as the bf16 reference. Printed per row (markdown):

* KiB saved against bf16 (weights whose row is not a whole number of the type's blocks stay bf16);
* relative L2 error of the transformer's output on fixed inputs (held-out captions, mid-schedule);
* PSNR of the images against the bf16 model's images;
* prompt adherence (mean of colour, shape and position accuracy) and its drop from bf16;
* the drop per MiB saved: adherence points lost for each MiB the group saves.

    python benchmarks/sensitivity.py                       # Q8_0, Q4_0, Q3_K on 24 prompts
    python benchmarks/sensitivity.py --types Q4_0 --prompts 8

The table in docs/micro.md is this script's output.
"""

from __future__ import annotations

import argparse
import math
import re
import time

import numpy as np
import torch

# (name, pattern over diffusers names); patterns see 2-D weights only
GROUPS: list[tuple[str, str]] = [
    ("x_embedder", r"^all_x_embedder\."),
    ("t_embedder", r"^t_embedder\."),
    ("cap_embedder", r"^cap_embedder\."),
    ("noise_refiner", r"^noise_refiner\."),
    ("context_refiner", r"^context_refiner\."),
    ("attn q/k/v", r"^layers\.\d+\.attention\.to_[qkv]\."),
    ("attn out", r"^layers\.\d+\.attention\.to_out\."),
    ("ffn w1", r"^layers\.\d+\.feed_forward\.w1\."),
    ("ffn w2", r"^layers\.\d+\.feed_forward\.w2\."),
    ("ffn w3", r"^layers\.\d+\.feed_forward\.w3\."),
    ("adaLN (blocks)", r"^(layers|noise_refiner)\.\d+\.adaLN_modulation\."),
    ("final layer", r"^all_final_layer\."),
]


def block_groups(n_layers: int) -> list[tuple[str, str]]:
    """One group per main block."""
    return [(f"block {i}", rf"^layers\.{i}\.") for i in range(n_layers)]


def quantize_group(model, pattern: str, qtype: str) -> tuple[dict[str, torch.Tensor], int, int]:
    """Replace the matching 2-D weights by their GGUF round trip; returns (originals, bytes saved,
    weights quantized)."""
    from zopt.formats.gguf import quants

    block = quants.block_size(qtype)
    saved, count, originals = 0, 0, {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim != 2 or not re.search(pattern, name) or p.shape[-1] % block:
                continue
            q = quants.quantize(p.detach().float(), qtype)
            originals[name] = p.detach().clone()
            p.copy_(quants.dequantize(q, qtype, tuple(p.shape)).to(p.dtype))
            saved += p.numel() * p.element_size() - q.numel()
            count += 1
    return originals, saved, count


def restore(model, originals: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in originals.items():
            params[name].copy_(value)


def fixed_inputs(pipe, prompts: list[str], seed: int = 0):
    """Transformer inputs at sigma 0.5: noisy latents, timestep, caption features of ``prompts``."""
    from zopt.families.zimage.micro import train as T

    feats = T.encode_captions(prompts, pipe.tokenizer, pipe.text_encoder)
    g = torch.Generator().manual_seed(seed)
    dtype = pipe.transformer.dtype
    x = [torch.randn(16, 1, 8, 8, generator=g).to(dtype) for _ in prompts]
    return x, torch.full((len(prompts),), 0.5, dtype=dtype), [feats[p].to(dtype) for p in prompts]


def output(model, inputs) -> torch.Tensor:
    with torch.inference_mode():
        return torch.stack(model(*inputs, return_dict=False)[0]).float()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", default="Q8_0,Q4_0,Q3_K", help="comma-separated GGUF types")
    ap.add_argument("--prompts", type=int, default=24, help="held-out shapes prompts per run")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from zopt.families.zimage.micro import adherence as A
    from zopt.families.zimage.micro import model as M
    from zopt.families.zimage.micro import train as T

    t0 = time.perf_counter()
    pipe = M.build_micro_pipeline()
    model = pipe.transformer
    prompts = A.held_out_prompts(args.prompts)
    inputs = fixed_inputs(pipe, prompts[:8])
    ref_out = output(model, inputs)
    ref_acc, ref_images = T.evaluate(pipe, prompts, args.steps)

    def mean(acc: dict[str, float]) -> float:
        return (acc["colour"] + acc["shape"] + acc["position"]) / 3

    base = mean(ref_acc)
    print(f"micro model (bf16), {args.prompts} held-out prompts, {args.steps} steps: adherence "
          + " ".join(f"{k} {v:.3f}" for k, v in ref_acc.items()) + f" (mean {base:.3f})\n")
    print("| group | type | weights | KiB saved | output rel. error | image PSNR (dB) | adherence | drop | drop per MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    groups = GROUPS + block_groups(model.config.n_layers)
    for qtype in args.types.split(","):
        for name, pattern in groups:
            originals, saved, count = quantize_group(model, pattern, qtype)
            if not count:
                print(f"| {name} | {qtype} | 0 | - | - | - | - | - | - |")
                continue
            try:
                out = output(model, inputs)
                err = float((out - ref_out).norm() / ref_out.norm())
                acc, images = T.evaluate(pipe, prompts, args.steps)
            finally:
                restore(model, originals)
            drop = base - mean(acc)
            per_mib = drop / (saved / 2**20)
            image_psnr = float(np.mean([psnr(a, b) for a, b in zip(images, ref_images, strict=True)]))
            print(f"| {name} | {qtype} | {count} | {saved / 1024:.1f} | {err:.4f} | {image_psnr:.1f} | "
                  f"{mean(acc):.3f} | {drop:+.3f} | {per_mib:+.2f} |", flush=True)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
