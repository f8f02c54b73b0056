"""Generation through zopt.runtime.pipeline: jobs, sidecars, batching, and the CLI on the tiny model."""

from __future__ import annotations

import json

import pytest

from zopt.errors import ZoptError
from zopt.runtime.pipeline import GenerateRequest, make_jobs


def test_seeds_broadcast_against_prompts():
    assert make_jobs(["a", "b"]) == [("a", 0), ("b", 0)]
    assert make_jobs(["a", "b"], [7]) == [("a", 7), ("b", 7)]
    assert make_jobs(["a", "b"], [3, 9]) == [("a", 3), ("b", 9)]
    assert make_jobs(["a"], [1, 2, 3]) == [("a", 1), ("a", 2), ("a", 3)]
    assert make_jobs(["a", "b"], [5], images_per_prompt=2) == [("a", 5), ("a", 6), ("b", 5), ("b", 6)]
    assert make_jobs(["a", "b"], [5], prompt_seeds=[None, 42]) == [("a", 5), ("b", 42)]
    with pytest.raises(ZoptError, match="one per prompt"):
        make_jobs(["a", "b", "c"], [1, 2])
    with pytest.raises(ZoptError):
        make_jobs(["a"], [1], images_per_prompt=0)
    # the old product semantics stay available to callers that pass no jobs
    assert GenerateRequest(["a", "b"], [1, 2]).pairs() == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]


def test_prompts_file(tmp_path):
    from zopt.commands.generate import read_prompts_file

    f = tmp_path / "p.txt"
    f.write_text('plain prompt\n\n{"prompt": "with seed", "seed": 11}\n{"prompt": "no seed", "negative_prompt": "fog"}\n')
    assert read_prompts_file(str(f)) == (["plain prompt", "with seed", "no seed"], [None, 11, None],
                                         [None, None, "fog"])
    f.write_text('{"prompt": "p", "negative_prompt": 3}\n')
    with pytest.raises(ZoptError, match="line 1"):
        read_prompts_file(str(f))
    f.write_text('{"text": "wrong key"}\n')
    with pytest.raises(ZoptError, match="line 1"):
        read_prompts_file(str(f))
    with pytest.raises(ZoptError, match="cannot read"):
        read_prompts_file(str(tmp_path / "missing.txt"))


def _png(path):
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path)).astype(int)


def test_generate_cli_batched_with_per_prompt_seeds(tmp_path, capsys):
    from zopt.cli import main
    from zopt.runtime import pipeline as P

    prompts = tmp_path / "prompts.jsonl"
    long = "a small red house by a quiet lake at dawn, " * 8  # > 32 more tokens than "fog": a masked batch
    prompts.write_text(json.dumps({"prompt": long, "seed": 21}) + '\n{"prompt": "fog"}\n')
    out = tmp_path / "imgs"
    rc = main(["generate", "tiny", "--prompts-file", str(prompts), "--seeds", "4", "--steps", "2",
               "--resolution", "64x64", "--batch", "2", "--device", "auto", "--offload", "auto",
               "--attention", "auto", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    metas = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    assert [(m["prompt"], m["seed"]) for m in metas] == [(long, 21), ("fog", 4)]
    for m in metas:
        assert m["steps"] == 2 and m["format"] == "bf16" and m["backend"] == "torch" and m["device"] == "cpu"
        assert m["offload"] == "none" and m["attention"] == "native" and m["batch_size"] == 2
        assert m["timings"]["batch_seconds"] > 0 and m["timings"]["load_seconds"] > 0
        assert m["hardware"].startswith("cpu:")
    assert sorted(p.name for p in out.iterdir()) == ["000-seed21.json", "000-seed21.png", "001-seed4.json",
                                                     "001-seed4.png"]
    # batching two prompts of different lengths (masked attention) gives the images of one-by-one runs
    pipe, _ = P.prepare("tiny", device="cpu", offload="none", attention="native", width=64, height=64)
    solo = P.run(pipe, GenerateRequest(["fog"], [4], steps=2, height=64, width=64), tmp_path / "solo")
    assert abs(_png(solo[0].path) - _png(out / "001-seed4.png")).max() <= 2


def test_generate_cli_errors(tmp_path, capsys):
    from zopt.cli import main

    common = ["generate", "--steps", "1", "--resolution", "64x64"]
    assert main(common + ["--prompt", "a", "--prompt", "b", "-o", str(tmp_path / "one.png")]) == 2
    assert "names one image" in capsys.readouterr().err
    assert main(common + ["--offload", "model", "-o", str(tmp_path / "x")]) == 2
    assert "on a CPU device it would do nothing" in capsys.readouterr().err
    assert main(common + ["--attention", "flash", "-o", str(tmp_path / "x")]) == 2
    assert "flash-attn" in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        assert main(common + ["--device", "cuda", "-o", str(tmp_path / "x")]) == 2
        assert "no such device here" in capsys.readouterr().err
    assert main(common + ["--prompt", "a", "--prompt", "b", "--prompt", "c", "--seeds", "1", "2"]) == 2
    assert not list(tmp_path.glob("x/*.png"))


def test_single_png_output(tmp_path):
    from zopt.cli import main

    target = tmp_path / "cat.png"
    assert main(["generate", "--prompt", "a cat", "--seeds", "3", "--steps", "1", "--resolution", "64x64",
                 "--offload", "disk", "-o", str(target)]) == 0
    meta = json.loads(target.with_suffix(".json").read_text())
    assert meta["seed"] == 3 and meta["offload"] == "disk" and target.stat().st_size > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cat.json", "cat.png"]  # no leftovers


def test_generate_from_a_converted_variant(tmp_path, capsys):
    from zopt import formats
    from zopt.cli import main

    art = formats.convert("tiny", "fp16", tmp_path / "tiny-fp16", progress=False)
    out = tmp_path / "img"
    assert main(["generate", str(art), "--prompt", "a boat", "--steps", "1", "--resolution", "64x64",
                 "-o", str(out)]) == 0, capsys.readouterr().err
    meta = json.loads((out / "000-seed0.json").read_text())
    assert meta["format"] == "fp16" and meta["backend"] == "torch" and meta["model"] == str(art)
