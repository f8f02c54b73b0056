"""zopt verify on one artifact (folder or .gguf), and a quantized artifact given as a source."""

from __future__ import annotations

import pytest

from zopt.cli import main


@pytest.fixture(scope="module")
def fp8(tmp_path_factory, tiny_transformer_dir):
    import zopt

    return zopt.convert(tiny_transformer_dir, "fp8", tmp_path_factory.mktemp("v") / "tiny-fp8", progress=False)


def test_verify_one_artifact_folder_and_gguf(fp8, tiny_gguf, capsys):
    assert main(["verify", str(fp8)]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"ok: {fp8}: ") and "files match their sha256; it loads (fp8)" in out
    gguf = tiny_gguf("Q8_0")
    assert main(["verify", str(gguf), "--no-load"]) == 0
    assert "zopt.sha256 matches" in capsys.readouterr().out


def test_verify_one_artifact_names_a_changed_file(fp8, tmp_path, capsys):
    import shutil

    copy = tmp_path / "fp8"
    shutil.copytree(fp8, copy)
    w = copy / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-10] ^= 1
    w.write_bytes(bytes(data))
    assert main(["verify", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("zopt: error:") and "diffusion_pytorch_model.safetensors" in err and "sha256" in err


def test_verify_refuses_a_folder_that_is_no_artifact(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("hello")
    assert main(["verify", str(tmp_path)]) == 2
    assert "not a zopt artifact or publish folder" in capsys.readouterr().err


@pytest.mark.parametrize("to", ["int8", "gguf:Q8_0"])
def test_reconverting_a_quantized_artifact_is_one_clear_line(fp8, tmp_path, capsys, to):
    assert main(["convert", str(fp8), "--to", to, "-o", str(tmp_path / "again"), "--no-progress"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("zopt: error:")]
    assert len(err) == 1 and "is a zopt fp8 artifact (quantized weights), not a source" in err[0]
    assert "weight_scale" not in err[0] and not any(tmp_path.iterdir())


def test_a_plain_artifact_is_still_a_source(tmp_path, tiny_transformer_dir):
    import zopt

    bf16 = zopt.convert(tiny_transformer_dir, "bf16", tmp_path / "bf16", progress=False)
    assert zopt.convert(bf16, "int8", tmp_path / "int8", progress=False).is_dir()
