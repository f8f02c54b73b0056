"""Relative error of every GGUF type on the tiny model, through diffusers and through zopt's loader.

Converts the embedded tiny Z-Image transformer to every ``gguf:TYPE``, loads each file with
diffusers (``from_single_file`` + ``GGUFQuantizationConfig(compute_dtype=float32)``, offline) and
with ``zopt.formats.gguf.loader.load`` (float32; the exact ``torch-dequant`` backend and the
default ``int-mm-cpu`` one), runs one forward pass on fixed inputs and prints
a markdown table of ||out - ref|| / ||ref|| against the bf16 weights run in float32. The table in
docs/gguf.md is this script's output.

Usage: python benchmarks/gguf_quality.py [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import torch


def reference_inputs():
    # the same inputs as tests/conftest.py's tiny_reference_inputs
    from zopt.families import zimage

    g = torch.Generator().manual_seed(1234)
    cfg = zimage.TINY_CONFIG
    x = [torch.randn(cfg["in_channels"], 1, 32, 32, generator=g)]
    cap = [torch.randn(40, cfg["cap_feat_dim"], generator=g)]
    return x, torch.tensor([0.6]), cap


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().flatten(), b.float().flatten()
    return float((a - b).norm() / b.norm())


def forward(model) -> torch.Tensor:
    x, t, cap = reference_inputs()
    with torch.inference_mode():
        return model(x, t, cap, return_dict=False)[0][0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="folder for the converted files (default: a temp folder)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import GGUFQuantizationConfig, ZImageTransformer2DModel

    from zopt.families.zimage.tiny import tiny_pipeline_dir
    from zopt.formats import convert, load
    from zopt.formats.gguf import recipes as gguf_recipes
    from zopt.formats.plain import load_source

    src = tiny_pipeline_dir() / "transformer"
    ref = forward(load_source(src, dtype=torch.float32))
    bpw = {name: bits for name, bits, _ in gguf_recipes.list_types()}
    work = Path(args.work or tempfile.mkdtemp(prefix="zopt-gguf-quality-"))
    print("| type | bits/weight (full size) | tiny file MB | rel. error, diffusers | zopt torch-dequant | "
          "zopt int-mm-cpu (default) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in gguf_recipes.RECIPES:
        path = convert(src, f"gguf:{name}", work / f"tiny-{name}.gguf", progress=False, options={"hash_source": False},
                       force=True)  # --work may hold an earlier run
        d = ZImageTransformer2DModel.from_single_file(
            str(path), config=str(src), torch_dtype=torch.float32, local_files_only=True,
            quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))
        e_d = rel_err(forward(d), ref)
        e_z = rel_err(forward(load(path, dtype=torch.float32, backend="torch-dequant")), ref)
        e_i = rel_err(forward(load(path, dtype=torch.float32)), ref)
        print(f"| {name} | {bpw[name]:.2f} | {path.stat().st_size / 1e6:.2f} | {e_d:.5f} | {e_z:.5f} | {e_i:.5f} |")


if __name__ == "__main__":
    main()
