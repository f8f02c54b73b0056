"""Feedback and argument checks: every command says what it does before the heavy imports, and a
bad argument fails (one line, exit 2) before torch or diffusers is imported or any run starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zopt.cli import main

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "ZOPT_QUIET": "", "ZOPT_PROGRESS": "1"}  # notes as on a terminal

# Runs one command in a fresh interpreter and reports which heavy packages it imported.
PROBE = """
import json, sys
from zopt.cli import main
rc = main(json.loads(sys.argv[1]))
print(json.dumps({"rc": rc, "heavy": sorted(m for m in ("torch", "diffusers", "transformers") if m in sys.modules)}))
"""

BAD = [
    (["generate", "no/such/model/dir"], "no such file or folder"),
    (["generate", "--offload", "bogus"], "--offload 'bogus'"),
    (["generate", "--attention", "flahs"], "did you mean flash"),
    (["generate", "--resolution", "100x7"], "multiples of 16"),
    (["generate", "--base", "/nonexistent/pipeline"], "/nonexistent/pipeline"),
    (["generate", "--seeds", "1", "2", "--prompt", "a", "--prompt", "b", "--prompt", "c"], "2 seeds for 3 prompts"),
    (["generate", "--device", "tpu"], "--device 'tpu'"),
    (["bench", "--formats", "Q4_K_M"], "did you mean gguf:Q4_K_M"),
    (["bench", "--formats", "bf16,gguf:Q9_X"], "unknown gguf type 'Q9_X'"),
    (["bench", "--offload", "nah"], "offload mode 'nah'"),
    (["bench", "/no/such/source"], "no such file or folder"),
    (["convert", "tiny", "--to", "Q4_K_M"], "did you mean gguf:Q4_K_M"),
    (["convert", "tiny", "--to", "gguf:Q8_0,fp9"], "unknown format 'fp9'"),
    (["doctor", "--hardware", "nosuch"], "nosuch"),
]


@pytest.mark.parametrize("argv,words", BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_arguments_fail_before_heavy_imports(argv, words):
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True, env=ENV,
                       cwd=REPO, timeout=120)
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert result == {"rc": 2, "heavy": []}, (r.stderr, result)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("zopt: error:")]
    assert len(errors) == 1 and words in errors[0], r.stderr


# Prints a marker the moment torch starts importing; the command's first line must come before it.
MARKER = "<<torch import starts>>"
HOOK = f"""
import importlib.abc, json, sys
class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            print({MARKER!r}, flush=True)
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, Hook())
from zopt.cli import main
sys.exit(main(json.loads(sys.argv[1])))
"""


def _first_lines(argv: list[str]) -> list[str]:
    """Output lines (stdout and stderr, in order) until torch starts importing; then stop the command."""
    p = subprocess.Popen([sys.executable, "-u", "-c", HOOK, json.dumps(argv)], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=ENV, cwd=REPO)
    lines = []
    try:
        for line in p.stdout:
            lines.append(line.rstrip("\n"))
            if line.strip() == MARKER:
                break
    finally:
        p.kill()
        p.wait()
    return lines


@pytest.mark.parametrize("argv,first", [
    (["convert", "tiny", "--to", "fp8", "-o", "{tmp}/x"], "zopt: converting tiny to fp8"),
    (["convert", "tiny", "--to", "gguf:Q8_0,fp8", "-o", "{tmp}/many"], "zopt: converting tiny to 2 formats"),
    (["generate", "tiny", "--steps", "1", "-o", "{tmp}/img"], "zopt: generating 1 image with tiny"),
    (["bench", "--formats", "fp8", "-o", "{tmp}/bench"], "zopt: bench: 1 format of tiny"),
    (["doctor"], "hardware"),
    (["synth", "--size", "tiny", "-o", "{tmp}/s.safetensors"], "zopt: writing a tiny synthetic checkpoint"),
])
def test_first_line_comes_before_heavy_imports(tmp_path, argv, first):
    lines = _first_lines([a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert MARKER in lines, lines
    before = lines[: lines.index(MARKER)]
    assert before and before[0].startswith(first), lines


def test_verify_names_its_work_before_hashing(tmp_path, tiny_gguf):
    lines = _first_lines(["verify", str(tiny_gguf("Q8_0"))])
    assert lines[0].startswith("zopt: checking the checksum of tiny-Q8_0.gguf"), lines


def test_generate_flags_positional_source_and_deprecated_aliases(tmp_path, capsys):
    """SOURCE is positional as everywhere; --model, --seed and --batch-size still work and say
    which spelling replaces them; --seeds takes lists."""
    out = tmp_path / "new"
    assert main(["generate", "tiny", "--prompt", "a", "--prompt", "b", "--seeds", "3,4", "--batch", "2",
                 "--steps", "1", "--resolution", "64x64", "--no-compile", "-o", str(out)]) == 0
    new = sorted(json.loads(p.read_text())["seed"] for p in out.glob("*.json"))
    assert new == [3, 4]
    assert "deprecated" not in capsys.readouterr().err
    old = tmp_path / "old"
    assert main(["generate", "--model", "tiny", "--prompt", "a", "--prompt", "b", "--seed", "3", "--seed", "4",
                 "--batch-size", "2", "--steps", "1", "--resolution", "64x64", "-o", str(old)]) == 0
    err = capsys.readouterr().err
    for flag, new_flag in (("--model", "SOURCE"), ("--seed", "--seeds"), ("--batch-size", "--batch")):
        assert f"zopt: {flag} is deprecated; use" in err and new_flag in err
    for p in out.glob("*.png"):  # the same images through either spelling
        assert p.read_bytes() == (old / p.name).read_bytes()


def test_base_accepts_a_hub_id_like_source(tmp_path, tiny_dir, monkeypatch):
    """--base owner/name resolves through the Hugging Face cache, as SOURCE does."""
    import shutil

    from zopt.runtime.pipeline import resolve_base

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-pipeline"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    from zopt.families.zimage import TINY_CONFIG

    got = resolve_base("tiny", TINY_CONFIG, "someone/tiny-pipeline")
    assert got == repo / "snapshots" / commit and (got / "model_index.json").exists()


@pytest.mark.parametrize("source, size", [("tiny", 64), ("micro", 64), ("tiny-base", 64), ("tiny-random", 256)])
def test_builtin_sources_default_to_what_they_learned(source, size, tmp_path):
    """`zopt generate tiny` with no prompt or resolution asks the trained micro model for what it
    knows (a 64 px shapes scene); a checkpoint, or the random tiny, keeps 256 px and a photo prompt."""
    import argparse

    from zopt.commands import generate
    from zopt.families.zimage.micro import shapes

    p = argparse.ArgumentParser()
    generate.add_arguments(p)
    prompts, _, w, h, _ = generate.check_args(p.parse_args([source, "-o", str(tmp_path / "x")]))
    assert (w, h) == (size, size)
    if size == 64:
        shapes.parse_caption(prompts[0])  # in the grammar it was trained on
    else:
        with pytest.raises(ValueError):
            shapes.parse_caption(prompts[0])
    # what the user gives wins
    _, _, w, h, _ = generate.check_args(p.parse_args([source, "--resolution", "128x96", "-o", str(tmp_path / "y")]))
    assert (w, h) == (128, 96)


def test_a_file_converted_from_tiny_keeps_its_defaults(tmp_path, capsys):
    """A GGUF or zopt folder converted from ``tiny`` generates what tiny learned, and says which
    prompt it drew; a prompt outside the shapes grammar gets a warning."""
    import argparse

    from zopt.commands import generate
    from zopt.commands._args import source_defaults

    gguf = tmp_path / "t.gguf"
    assert main(["convert", "tiny", "--to", "gguf:Q4_0", "-o", str(gguf), "--no-progress"]) == 0
    assert main(["convert", "tiny", "--to", "int8", "-o", str(tmp_path / "i8"), "--no-progress"]) == 0
    for art in (gguf, tmp_path / "i8"):
        assert source_defaults(art) == source_defaults("tiny") != {}
    assert source_defaults(tmp_path) == {}  # a plain folder
    p = argparse.ArgumentParser()
    generate.add_arguments(p)
    args = p.parse_args([str(gguf), "--prompt", "a photo of a cat", "-o", str(tmp_path / "x")])
    prompts, _, w, h, _ = generate.check_args(args)
    assert (w, h) == (64, 64)
    capsys.readouterr()
    generate._explain_defaults(args, prompts, w, h)
    assert "only learned shapes captions" in capsys.readouterr().err
    args = p.parse_args(["tiny", "-o", str(tmp_path / "y")])
    prompts, _, w, h, _ = generate.check_args(args)
    generate._explain_defaults(args, prompts, w, h)
    out = capsys.readouterr()
    assert prompts[0] in out.out and "warning" not in out.err
