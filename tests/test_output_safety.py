"""An output path is replaced only when nothing but an earlier output is lost."""

from __future__ import annotations

import pytest

from zopt.errors import ZoptError
from zopt.formats import convert


def test_file_output_onto_a_folder_is_refused(tmp_path, tiny_transformer_dir):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(ZoptError) as e:
        convert(tiny_transformer_dir, "gguf:Q8_0", folder, progress=False)
    assert str(folder) in str(e.value) and "folder" in str(e.value) and "\n" not in str(e.value)
    assert [p.name for p in folder.iterdir()] == ["notes.txt"] and not list(tmp_path.glob(".*tmp"))


def test_folder_output_replaces_only_earlier_outputs(tmp_path, tiny_transformer_dir):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(ZoptError) as e:
        convert(tiny_transformer_dir, "int8", foreign, progress=False)
    assert str(foreign) in str(e.value) and "not a zopt output folder" in str(e.value)
    assert (foreign / "a.jpg").read_bytes() == b"\xff\xd8"
    a_file = tmp_path / "model.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(ZoptError, match="is a file"):
        convert(tiny_transformer_dir, "int8", a_file, progress=False)
    assert a_file.read_bytes() == b"x"
    # an empty folder is written into; zopt's own earlier output is replaced only with force
    out = tmp_path / "int8"
    out.mkdir()
    convert(tiny_transformer_dir, "int8", out, progress=False)
    first = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(ZoptError, match="exists; pass --force"):
        convert(tiny_transformer_dir, "int8", out, progress=False)
    convert(tiny_transformer_dir, "int8", out, progress=False, force=True)
    assert sorted(p.name for p in out.rglob("*")) == first and "zopt-manifest.json" in first
