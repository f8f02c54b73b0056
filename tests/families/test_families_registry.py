"""The family registry and protocol: lookup by name, by config, from tensor names; built-in sources."""

from __future__ import annotations

import pytest
import torch

from zopt import checkpoint, families
from zopt.errors import SourceNotFound, UnknownArchitecture
from zopt.families import zimage


def test_lookup_by_name():
    assert families.names() == ["zimage"]
    assert families.get("zimage") is zimage.ZIMAGE
    with pytest.raises(UnknownArchitecture, match="unknown model family 'sd35'; known: zimage"):
        families.get("sd35")


def test_detect_finds_the_family_in_either_layout(tiny_transformer_dir, tiny_original_file):
    for path, layout in ((tiny_transformer_dir, "diffusers"), (tiny_original_file, "original")):
        src = checkpoint.open(path)
        fam = families.detect(src)
        assert fam is zimage.ZIMAGE and fam.detect(src).layout == layout


def test_detect_names_the_file_when_no_family_matches(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "sdxl.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4)}, str(p))
    with pytest.raises(UnknownArchitecture) as e:
        families.detect(checkpoint.open(p))
    assert str(e.value).startswith(f"{p}: not a Z-Image transformer")


def test_lookup_by_config_class_name():
    assert families.for_config(zimage.TINY_CONFIG) is zimage.ZIMAGE
    assert families.for_config({"dim": 8}) is families.get(families.DEFAULT)  # configs naming no class
    with pytest.raises(UnknownArchitecture, match="SD3Transformer2DModel"):
        families.for_config({"_class_name": "SD3Transformer2DModel"})


def test_protocol_methods_are_the_module_functions(tiny_original_file):
    """The family object and the ``zimage`` module names (kept for existing callers) agree."""
    fam = families.get("zimage")
    src = checkpoint.open(tiny_original_file)
    assert fam.as_diffusers(src).names() == zimage.as_diffusers(src).names()
    assert fam.as_original(src, "model.").names() == zimage.as_original(src, "model.").names()
    assert fam.infer_config(src) == zimage.infer_config(src)
    assert fam.default_config == zimage.FULL_CONFIG and fam.config_for("tiny") == zimage.TINY_CONFIG
    for name in src.names() + fam.as_diffusers(src).names():
        assert fam.sensitive_reason(name) == zimage.sensitive_reason(name), name
        assert fam.block_index(name) == zimage.block_index(name), name
        assert fam.to_original_name(fam.to_diffusers_name(name)) == zimage.to_original_name(
            zimage.to_diffusers_name(name))


def test_empty_model_is_the_family_class_on_meta():
    fam = families.for_config(zimage.TINY_CONFIG)
    model = fam.empty_model(zimage.TINY_CONFIG)
    assert type(model) is fam.model_class() and type(model).__name__ == fam.model_class_name
    assert all(p.device.type == "meta" for p in model.parameters())
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == fam.expected_shapes(zimage.TINY_CONFIG)
    assert fam.pipeline_class().__name__ == fam.pipeline_class_name
    assert families.for_model(model) is fam  # by class: a diffusers config has no _class_name until saved


def test_stand_in_modules_are_known_by_their_config():
    class StandIn(torch.nn.Module):  # e.g. the ONNX runtime module, configured from its artifact
        config = {"_class_name": "ZImageTransformer2DModel", "dim": 384}

    assert families.for_model(StandIn()) is zimage.ZIMAGE
    StandIn.config = {"_class_name": "FluxTransformer2DModel"}
    with pytest.raises(UnknownArchitecture, match="FluxTransformer2DModel"):
        families.for_model(StandIn())


def test_tiny_is_resolved_by_the_entry_points_not_the_read_path(tmp_path, monkeypatch, tiny_dir):
    import zopt

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SourceNotFound):
        checkpoint.open("tiny")  # the read path opens files only
    assert families.resolve_source("tiny-random") == tiny_dir
    assert zopt.open("tiny-random").path == checkpoint.open(tiny_dir).path
    from zopt.families.zimage.micro.model import micro_pipeline_dir

    assert families.resolve_source("tiny") == families.resolve_source("micro") == micro_pipeline_dir()
    assert families.resolve_source("owner/name") == "owner/name"  # everything else passes through
    (tmp_path / "tiny").mkdir()  # a real folder of that name wins, as any path does
    assert families.resolve_source("tiny") == "tiny"
