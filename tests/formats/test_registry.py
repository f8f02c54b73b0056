"""The format registry: one entry says everything zopt needs to know about a format, so a format
that lives outside zopt (``toy_format.py`` beside this file) works end to end from one entry."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import rel_err

from zopt.formats import registry
from zopt.platform.backends import Backend, needs_device, needs_package
from zopt.platform.fakes import FAKES

# the quality order and effective bits the planner used before candidates moved into the registry
PLANNER_ORDER = ["bf16", "fp8", "int8", "gguf:Q8_0", "gguf:Q6_K", "gguf:Q5_K_M", "gguf:Q4_K_M", "gguf:Q4_K_S", "nf4", "int4",
                 "gguf:Q3_K_M", "gguf:Q2_K"]


def test_planner_candidates_come_from_the_registry():
    from zopt.runtime import planner

    assert [c.spec for c in planner.CANDIDATES] == PLANNER_ORDER
    assert {c.spec for c in planner.CANDIDATES if c.fallback} == {"gguf:Q3_K_M", "gguf:Q2_K"}
    for c in planner.CANDIDATES:
        assert c.spec.split(":")[0] in registry.FORMATS and c in registry.FORMATS[c.spec.split(":")[0]].candidates


def test_every_entry_is_complete():
    from zopt.formats.options import Options

    for name, f in registry.FORMATS.items():
        assert f.backends, name
        assert issubclass(f.options_class(), Options), name
        f.options_class()()  # every option has a default
        assert f.options_class().from_dict({}, format=name).recorded()["keep"] == []
    assert registry.card_tags("int8_w8a8") == ("int8",) and registry.card_tags("bf16") == ()
    assert {"bitsandbytes", "onnxruntime", "tensorrt", "onnx"} <= set(registry.packages())


@pytest.fixture
def toy(monkeypatch):
    """The one registry line of the walkthrough (docs/formats.md), for a module outside zopt."""
    from zopt.formats.registry import Candidate

    entry = registry.Format(
        "toy", "toy_format", "float16 Linear weights (test format)", 16, "folder", "ToyOptions",
        (Backend("toy-cuda", 20, (needs_device("cuda"), needs_package("toy_kernels")), "needs a package"),
         Backend("torch", 10, (), "eager PyTorch")),
        (Candidate("toy", 16.0, True, "test", quality=5),), ("toy-tag",))
    monkeypatch.setitem(registry.FORMATS, "toy", entry)
    monkeypatch.delitem(registry._STATUS, "toy", raising=False)
    yield entry
    registry._STATUS.pop("toy", None)


def test_a_format_is_one_module_and_one_entry(toy, tmp_path, tiny_transformer_dir, tiny_reference_inputs):
    import zopt
    from zopt.formats.plain import load_source
    from zopt.runtime.matrix import format_report

    out = zopt.convert(tiny_transformer_dir, "toy", tmp_path / "toy", options={"scale": "1.0", "keep": ["w2"]},
                       progress=False)
    m = json.loads((out / "zopt-manifest.json").read_text())
    assert m["options"] == {"keep": ["w2"], "quantize": [], "scale": 1.0}
    assert m["tensors"]["layers.0.feed_forward.w1.weight"]["storage"] == "F16"
    assert m["tensors"]["layers.0.feed_forward.w2.weight"]["reason"] == "--keep w2"
    model = zopt.load(out)
    assert model.zopt_backend == "torch" and model.toy_options.keep == ("w2",)
    x, t, cap = tiny_reference_inputs
    ref = load_source(tiny_transformer_dir, dtype=torch.float32)
    with torch.no_grad():
        err = rel_err(model.float()(x, t, cap)[0][0], ref(x, t, cap)[0][0])
    assert err < 5e-3, err  # float16 weights
    # the options, backends, planner candidates, card tags and package needs all come from the entry
    with pytest.raises(zopt.ZoptError, match="toy has no option 'scal'; did you mean 'scale'"):
        zopt.convert(tiny_transformer_dir, "toy", tmp_path / "bad", options={"scal": 2})
    assert not (tmp_path / "bad").exists()
    rep = format_report(FAKES["cuda-sm90-80gb"])["toy"]
    assert rep["selected"] == "torch" and "needs toy_kernels" in rep["backends"][0]["missing"][0]
    assert "toy" in [c.spec for c in registry.planner_candidates()]
    assert registry.card_tags("toy") == ("toy-tag",) and "toy_kernels" in registry.packages()


@pytest.mark.parametrize("spec", ["int8:foo", "fp16:xyz", "bf16:x", "int8_w8a8:q"])
def test_a_subtype_for_a_format_without_subtypes_is_refused_before_any_work(spec, tmp_path, tiny_transformer_dir):
    from zopt.errors import UnsupportedFormat
    from zopt.formats import convert

    with pytest.raises(UnsupportedFormat, match="has no subtypes"):
        convert(tiny_transformer_dir, spec, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_loading_a_fused_qkv_checkpoint_keeps_one_copy_of_each_weight(tmp_path):
    """to_q/to_k/to_v of an original-layout file are parts of one fused qkv tensor: each is stored on its
    own, so the loaded model holds its weights once (views would keep the whole fused tensor three times)."""
    from zopt.cli import main
    from zopt.formats.plain import load_source

    src = tmp_path / "orig.safetensors"
    assert main(["synth", "--size", "tiny", "-o", str(src), "--no-progress"]) == 0
    model = load_source(src, dtype=torch.bfloat16)
    storages = {}
    for _, p in model.named_parameters():
        storages[p.untyped_storage().data_ptr()] = p.untyped_storage().nbytes()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert any(n.endswith("attention.to_q.weight") for n, _ in model.named_parameters())
    assert sum(storages.values()) == params
