"""zopt convert's output rules: existing outputs, file/folder names, suffixes, default names and
did-you-mean for --to, all checked before the source is read."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import zopt
from zopt.cli import main
from zopt.commands.convert import default_out
from zopt.errors import ZoptError

MISSING = "/nonexistent/model.safetensors"  # a source that is never read when the output is refused


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def test_existing_output_needs_force_and_is_replaced_atomically(tmp_path, tiny_transformer_dir, capsys):
    out = tmp_path / "q8"  # no extension: the GGUF gets .gguf
    argv = ["convert", str(tiny_transformer_dir), "--to", "gguf:Q8_0", "-o", str(out), "--no-progress", "--no-hash"]
    assert main(argv) == 0
    gguf = tmp_path / "q8.gguf"
    assert gguf.is_file() and not out.exists()
    assert gguf.read_bytes()[:4] == b"GGUF"
    before = gguf.stat()
    capsys.readouterr()
    assert main([*argv[:5], str(gguf), *argv[6:]]) == 2
    err = _one_line_error(capsys)
    assert str(gguf) in err and "--force" in err
    assert gguf.stat().st_ino == before.st_ino and gguf.stat().st_mtime_ns == before.st_mtime_ns
    assert main([*argv, "--force"]) == 0
    after = gguf.stat()
    assert after.st_ino != before.st_ino and after.st_size == before.st_size  # a new file swapped in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q8.gguf"]  # no temporary left behind
    assert zopt.load(gguf) is not None


def test_python_api_refuses_existing_output_unless_force(tmp_path, tiny_transformer_dir):
    out = zopt.convert(tiny_transformer_dir, "gguf:Q8_0", tmp_path / "m", progress=False)
    assert out == tmp_path / "m.gguf"
    with pytest.raises(ZoptError, match="exists; pass --force"):
        zopt.convert(tiny_transformer_dir, "gguf:Q8_0", tmp_path / "m.gguf", progress=False)
    ino = out.stat().st_ino
    assert zopt.convert(tiny_transformer_dir, "gguf:Q8_0", out, progress=False, force=True) == out
    assert out.stat().st_ino != ino


@pytest.mark.parametrize(("to", "name", "problem"), [
    ("fp8", "x.safetensors", "is a file name; fp8 writes a folder"),
    ("int4", "y.gguf", "is a file name; int4 writes a folder"),
    ("gguf:Q4_K_M", "z/", "is a folder name; gguf writes one file"),
    ("gguf:Q4_K_M", "w.safetensors", "gguf writes a .gguf file"),
])
def test_wrong_kind_of_output_name_is_refused_before_the_source_is_read(tmp_path, capsys, to, name, problem):
    out = str(tmp_path / name) + ("/" if name.endswith("/") else "")
    assert main(["convert", MISSING, "--to", to, "-o", out, "--no-progress"]) == 2
    err = _one_line_error(capsys)
    assert problem in err and str(tmp_path / name.rstrip("/")) in err and "nonexistent" not in err
    assert list(tmp_path.iterdir()) == []


def test_default_names_follow_the_community_pattern():
    assert default_out("tiny", "gguf:Q4_K_M") == Path("exports/tiny-Q4_K_M.gguf")
    assert default_out("tiny", "gguf:q5_k_s") == Path("exports/tiny-Q5_K_S.gguf")
    assert default_out("tiny", "gguf") == Path("exports/tiny-Q8_0.gguf")  # the default type
    assert default_out("Tongyi-MAI/Z-Image-Turbo@abc123", "fp8") == Path("exports/Z-Image-Turbo-fp8")
    assert default_out("tiny", "fp8", "comfy") == Path("exports/tiny-fp8-comfy")
    assert default_out("tiny", "fp8", "diffusers") == Path("exports/tiny-fp8")
    assert default_out("models/z_image.safetensors", "int4:g64") == Path("exports/z_image-int4-g64")
    assert default_out("tiny", "onnx") == Path("exports/tiny-onnx-fp32")


def test_default_output_is_written_where_default_out_says(tmp_path, tiny_transformer_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = str(tiny_transformer_dir)
    assert main(["convert", src, "--to", "fp8", "--no-progress", "--no-hash"]) == 0
    assert main(["convert", src, "--to", "fp8", "--layout", "comfy", "--no-progress", "--no-hash"]) == 0
    plain, comfy = tmp_path / default_out(src, "fp8"), tmp_path / default_out(src, "fp8", "comfy")
    assert plain != comfy and (plain / "zopt-manifest.json").is_file() and (comfy / "zopt-manifest.json").is_file()
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == sorted([plain.name, comfy.name])


@pytest.mark.parametrize(("to", "hint"), [
    ("Q4_K_M", "did you mean gguf:Q4_K_M?"),
    ("q8_0", "did you mean gguf:Q8_0?"),
    ("fp9", "did you mean fp8?"),
    ("gguf:Q4_K_X", "did you mean gguf:Q4_K_"),
    ("onnx:fp61", "did you mean onnx:fp16?"),
])
def test_unknown_target_names_the_closest(capsys, tmp_path, to, hint):
    assert main(["convert", MISSING, "--to", to, "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    err = _one_line_error(capsys)
    assert hint in err and repr(to.split(":")[-1]) in err and "nonexistent" not in err


def test_unknown_gguf_type_lists_the_known_ones(capsys, tmp_path):
    assert main(["convert", MISSING, "--to", "gguf:Q9_X", "-o", str(tmp_path / "o"), "--no-progress"]) == 2
    err = _one_line_error(capsys)
    assert "unknown gguf type 'Q9_X'" in err and "Q4_K_M" in err and "Q8_0" in err


def test_target_and_output_errors_come_before_heavy_imports(tmp_path):
    code = ("import sys; from zopt.cli import main; "
            f"codes = [main(['convert', {MISSING!r}, '--to', 'Q4_K_M']), "
            f"main(['convert', {MISSING!r}, '--to', 'fp8', '-o', {str(tmp_path / 'x.safetensors')!r}])]; "
            "print(codes, sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "[2, 2] []", (r.stdout, r.stderr)
