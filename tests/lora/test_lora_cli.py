"""zopt convert --lora and zopt generate --lora from the command line, and the bad inputs: one
line naming the file, exit 2, nothing written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from lora_helpers import LAYOUTS, random_lora, tiny_modules, write_lora
from PIL import Image

from zopt.cli import main

GEN = ["--prompt", "a red fox", "--steps", "2", "--resolution", "64x64", "--seeds", "3"]


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    out = tmp_path_factory.mktemp("q4") / "tiny-Q4_K_M.gguf"
    assert main(["convert", "tiny-random", "--to", "gguf:Q4_K_M", "-o", str(out), "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def base_image(q4, tmp_path_factory):
    out = tmp_path_factory.mktemp("img") / "base.png"
    assert main(["generate", str(q4), *GEN, "-o", str(out)]) == 0
    return np.asarray(Image.open(out), dtype=np.float32)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_convert_and_generate_with_lora_in_each_layout(tmp_path, q4, base_image, layout):
    lora = random_lora(tiny_modules(), rank=8, seed=21, alpha=4.0 if LAYOUTS[layout][3] else None, std=0.2)
    path = write_lora(tmp_path / f"{layout}.safetensors", lora, layout)
    merged = tmp_path / "merged.gguf"
    assert main(["convert", "tiny-random", "--lora", f"{path}:0.8", "--to", "gguf:Q4_K_M", "-o", str(merged),
                 "--no-progress"]) == 0
    runtime_png, merged_png = tmp_path / "rt.png", tmp_path / "merged.png"
    assert main(["generate", str(q4), "--lora", f"{path}:0.8", *GEN, "-o", str(runtime_png)]) == 0
    assert main(["generate", str(merged), *GEN, "-o", str(merged_png)]) == 0
    meta = json.loads(runtime_png.with_suffix(".json").read_text())
    assert meta["loras"][0]["file"] == path.name and meta["loras"][0]["scale"] == 0.8
    rt = np.asarray(Image.open(runtime_png), dtype=np.float32)
    mg = np.asarray(Image.open(merged_png), dtype=np.float32)
    # the LoRA changes the image; run-time and merged-then-quantized agree far better than either
    # agrees with the image without LoRA
    moved = np.abs(rt - base_image).mean()
    assert moved > 2.0
    assert np.abs(rt - mg).mean() < 0.5 * moved


def _one_line_exit_2(argv, capsys, needle, path_in_message):
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and str(path_in_message) in err[0], err


def test_bad_loras_exit_2_one_line_nothing_written(tmp_path, q4, capsys):
    from safetensors.torch import save_file

    good = write_lora(tmp_path / "good.safetensors", random_lora(tiny_modules(), rank=2, seed=1), "diffusers")
    flux = tmp_path / "flux.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 3072),
               "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 2)}, str(flux),
              metadata={"ss_base_model_version": "flux1"})
    wide = tmp_path / "wide.safetensors"
    save_file({"layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 3840),
               "layers.0.attention.to_q.lora_B.weight": torch.zeros(3840, 2)}, str(wide))
    extra = tmp_path / "extra.safetensors"
    save_file({"layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 384),
               "layers.0.attention.to_q.lora_B.weight": torch.zeros(384, 2),
               "layers.29.attention.to_q.lora_A.weight": torch.zeros(2, 384),
               "layers.29.attention.to_q.lora_B.weight": torch.zeros(384, 2)}, str(extra))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(good.read_bytes()[:200])
    pickled = tmp_path / "lora.pt"
    torch.save({"layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 384)}, pickled)
    full = tmp_path / "model-not-lora.safetensors"
    save_file({"layers.0.attention.to_q.weight": torch.zeros(384, 384)}, str(full))
    cases = [
        (flux, "another model; the file says ss_base_model_version=flux1"),
        (wide, "a LoRA for another model size"),
        (extra, "does not have: 'layers.29.attention.to_q'"),
        (corrupt, "truncated"),
        (pickled, "--allow-pickle"),
        (full, "no LoRA tensors"),
    ]
    for bad, needle in cases:
        out = tmp_path / "out.gguf"
        _one_line_exit_2(["convert", "tiny-random", "--lora", str(bad), "--to", "gguf:Q4_K_M", "-o", str(out),
                          "--no-progress"], capsys, needle, bad)
        assert not out.exists() and not list(tmp_path.glob(".out*"))
        png = tmp_path / "img.png"
        _one_line_exit_2(["generate", str(q4), "--lora", str(bad), *GEN, "-o", str(png)], capsys, needle,
                         bad)
        assert not png.exists() and not list(tmp_path.glob(".zopt-gen*/*.png"))
    _one_line_exit_2(["convert", "tiny-random", "--lora", f"{good}:strong", "--to", "bf16", "-o", str(tmp_path / "o")],
                     capsys, "is not a number", good)
    assert not (tmp_path / "o").exists()
    _one_line_exit_2(["generate", str(q4), "--lora", f"{good}:nan", *GEN, "-o", str(tmp_path / "i.png")],
                     capsys, "not a finite number", good)


def test_one_pass_conversion_merges_the_lora_into_every_target(tmp_path):
    """``--to A,B --lora L``: each variant equals its single-target conversion with the same LoRA."""
    lora = random_lora(tiny_modules(), rank=4, seed=5, std=0.2)
    path = write_lora(tmp_path / "l.safetensors", lora, sorted(LAYOUTS)[0])
    single = tmp_path / "single.gguf"
    assert main(["convert", "tiny-random", "--lora", f"{path}:0.5", "--to", "gguf:Q8_0", "-o", str(single),
                 "--no-progress"]) == 0
    both = tmp_path / "both"
    assert main(["convert", "tiny-random", "--lora", f"{path}:0.5", "--to", "gguf:Q8_0,int8", "-o", str(both),
                 "--no-progress"]) == 0
    ggufs = list(both.glob("*.gguf"))
    assert len(ggufs) == 1 and ggufs[0].read_bytes() == single.read_bytes()
    manifest = json.loads(next(both.glob("*/zopt-manifest.json")).read_text())
    assert [(x["file"], x["scale"]) for x in manifest["source"]["loras"]] == [(path.name, 0.5)]
