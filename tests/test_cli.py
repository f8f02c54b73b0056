"""The zopt command: one-line errors with exit 2, inspect, synth, generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zopt.cli import main

REPO = Path(__file__).resolve().parents[1]


def zopt(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "zopt.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, check=check, timeout=600)


def test_help_lists_commands():
    r = zopt("--help")
    assert r.returncode == 0
    for cmd in ("inspect", "convert", "generate", "synth"):
        assert cmd in r.stdout


def test_truncated_file_exit_2_one_line(tmp_path, tiny_transformer_dir):
    data = (tiny_transformer_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[:5000])
    r = zopt("inspect", str(bad))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and "truncated" in lines[0]
    assert "Traceback" not in r.stderr


def test_errors_are_one_line(tmp_path, capsys, tiny_transformer_dir):
    import torch
    from safetensors.torch import save_file

    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(tmp_path / "other.safetensors"))
    torch.save({"a": torch.ones(1)}, tmp_path / "m.pt")
    cases = {
        "no such file": ["inspect", str(tmp_path / "missing.safetensors")],
        "not a Z-Image": ["inspect", str(tmp_path / "other.safetensors")],
        "--allow-pickle": ["inspect", str(tmp_path / "m.pt")],
        "not WxH": ["generate", "--resolution", "big"],
    }
    for needle, argv in cases.items():
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (argv, err)


def test_failed_convert_leaves_no_output(tmp_path, tiny_transformer_dir):
    """A source whose data is cut mid-file fails during conversion and leaves nothing at OUT."""
    import torch
    from safetensors.torch import save_file

    from zopt import checkpoint

    src = checkpoint.open(tiny_transformer_dir)
    sd = {n: src.get(n) for n in src.names()}
    sd["layers.1.feed_forward.w2.weight"] = torch.zeros(384, 1000, dtype=torch.bfloat16)  # wrong shape
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    out = tmp_path / "out-bf16"
    assert main(["convert", str(bad), "--to", "bf16", "-o", str(out), "--no-progress"]) == 2
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_inspect_json(tiny_original_file):
    r = zopt("inspect", str(tiny_original_file), "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    from zopt.families import zimage

    cfg = zimage.TINY_CONFIG
    assert d["layout"] == "original" and d["family"] == "zimage"
    assert d["parameters"] == sum(
        int(__import__("math").prod(s)) for s in zimage.expected_shapes(cfg).values()
    )
    assert d["dtypes"]["BF16"]["bytes"] == 2 * d["parameters"]


def test_synth_tiny_matches_architecture(tmp_path):
    out = tmp_path / "s.safetensors"
    assert main(["synth", "--size", "tiny", "-o", str(out), "--seed", "3", "--no-progress"]) == 0
    from zopt import checkpoint
    from zopt.families import zimage

    src = checkpoint.open(out)
    assert zimage.detect(src).layout == "original"
    assert zimage.check_shapes(src)["dim"] == zimage.TINY_CONFIG["dim"]
    # seeded: a second run writes identical bytes
    out2 = tmp_path / "s2.safetensors"
    main(["synth", "--size", "tiny", "-o", str(out2), "--seed", "3", "--no-progress"])
    assert out.read_bytes() == out2.read_bytes()


def test_convert_plain_roundtrip(tmp_path, tiny_original_file, tiny_transformer_dir):
    import torch

    import zopt
    from zopt import checkpoint
    from zopt.formats.artifact import verify_manifest

    out = zopt.convert(tiny_original_file, "bf16", tmp_path / "bf16", progress=False)
    manifest = verify_manifest(out)
    assert manifest["source"]["layout"] == "original" and manifest["format"] == "bf16"
    a, b = checkpoint.open(out), checkpoint.open(tiny_transformer_dir)
    for n in b.names():
        assert torch.equal(a.get(n).to(b.get(n).dtype), b.get(n)), n


def test_generate_is_deterministic(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for out in (a, b):
        assert main(["generate", "tiny", "--prompt", "a red fox", "--steps", "3",
                     "--resolution", "128x128", "--seeds", "7", "-o", str(out)]) == 0
    from PIL import Image

    ia, ib = Image.open(a), Image.open(b)
    assert ia.size == (128, 128)
    assert ia.tobytes() == ib.tobytes()
    meta = json.loads(a.with_suffix(".json").read_text())
    assert meta["seed"] == 7 and meta["prompt"] == "a red fox"
    # another seed gives another image
    c = tmp_path / "c.png"
    main(["generate", "--prompt", "a red fox", "--steps", "3", "--resolution", "128x128", "--seeds", "8", "-o", str(c)])
    assert Image.open(c).tobytes() != ia.tobytes()


@pytest.mark.parametrize("argv", [["inspect", "tiny"], ["convert", "--list-types"]])
def test_commands_run(argv):
    assert main(argv) == 0


def test_import_zopt_stays_light():
    code = "import sys, zopt, zopt.cli; print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'onnxruntime') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.parametrize("args", [["plan"], ["doctor"], ["--help"], ["plan", "--help"]])
def test_closed_pipe_exits_quietly(args):
    """`zopt plan | head -1`: the reader is gone before zopt writes; no error message, no traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to stdout now fails with EPIPE, deterministically
    try:
        r = subprocess.run([sys.executable, "-m", "zopt.cli", *args], stdout=write_end, stderr=subprocess.PIPE,
                           text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO, timeout=300)
    finally:
        os.close(write_end)
    assert r.stderr == ""
    assert r.returncode in (0, 1)  # 1 as rich does on a closed pipe; argparse's help ignores the failed write


def test_plan_lists_every_simulated_machine(capsys):
    from zopt.platform.fakes import PROFILES

    assert main(["plan", "--hardware", "list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == list(PROFILES)
