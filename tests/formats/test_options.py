"""Typed options: unknown keys and bad values are one-line errors, the dataclass is what the
manifest records and what load() reads back; the backend is selected once and handed to load()."""

from __future__ import annotations

import json

import pytest

from zopt.formats.options import OptionError
from zopt.formats.registry import entry


@pytest.mark.parametrize("option, words", [
    ("grup_size=64", ["int8 has no option 'grup_size'", "valid: keep, quantize, hash_source"]),
    ("bogus=1", ["int8 has no option 'bogus'", "valid: keep, quantize, hash_source"]),
])
def test_cli_unknown_option_is_one_line_exit_2(tmp_path, capsys, option, words):
    from zopt.cli import main

    out = tmp_path / "x"
    assert main(["convert", "tiny", "--to", "int8", "--option", option, "-o", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(w in err for w in words), err
    assert not out.exists()


def test_misspelled_key_suggests_the_real_one():
    with pytest.raises(OptionError, match=r"int4 has no option 'grup_size'; did you mean 'group_size'\?"):
        entry("int4").parse_options({"grup_size": 64})
    with pytest.raises(OptionError, match="did you mean 'double_quant'"):
        entry("nf4").parse_options({"double_quant_": False})


@pytest.mark.parametrize("fmt, raw, message", [
    ("int4", {"group_size": "sixty"}, "int4 option group_size='sixty' is not an integer"),
    ("int4", {"group_size": 32}, "int4 option group_size=32 is not one of 64, 128"),
    ("int4", {"clip_search": "maybe"}, "int4 option clip_search='maybe' is not true/false"),
    ("gguf", {"compile": "sometimes"}, "gguf option compile='sometimes' is not one of True, False, auto"),
    ("fp8", {"layout": "flat"}, "fp8 option layout='flat' is not one of diffusers, comfy"),
    ("int8", {"keep": 3}, "int8 option keep=3 is not a list of strings"),
])
def test_bad_values_are_one_line_errors(fmt, raw, message):
    with pytest.raises(OptionError) as e:
        entry(fmt).parse_options(raw)
    assert str(e.value) == message and e.value.exit_code == 2


def test_cli_strings_and_python_values_give_the_same_options():
    a = entry("int4").parse_options({"group_size": "64", "clip_search": "false", "keep": "w2"})
    b = entry("int4").parse_options({"group_size": 64, "clip_search": False, "keep": ["w2"]})
    assert a == b and a.group_size == 64 and a.clip_search is False and a.keep == ("w2",)
    g = entry("gguf").parse_options({"workers": "2", "compile": "auto"})
    assert g.workers == 2 and g.compile == "auto" and entry("gguf").parse_options({"compile": True}).compile is True
    # run knobs (and the imatrix path: its sha256 goes in the header) are not recorded
    assert g.recorded() == {"keep": [], "quantize": [], "min_elements": 1 << 16, "target_bpw": None,
                            "target_size": None, "allocation": "measured", "search": "weighted"}


def test_manifest_records_the_dataclass_and_load_reads_it_back(tmp_path, tiny_transformer_dir):
    import zopt

    out = zopt.convert(tiny_transformer_dir, "int4", tmp_path / "g64", options={"group_size": 64, "clip_search": False},
                       progress=False)
    m = json.loads((out / "zopt-manifest.json").read_text())
    assert m["options"] == {"keep": [], "quantize": [], "group_size": 64, "clip_search": False, "rank": 0}
    assert m["scheme"]["scales"] == "F16"
    assert "--option group_size=64" in m["command"] and "--option clip_search=false" in m["command"]
    model = zopt.load(out, backend="torch-dequant")  # the stored INT4 layout as it is
    lin = model.layers[0].feed_forward.w1
    assert lin.weight_scale.shape[1] == lin.in_features // 64
    # a manifest an older zopt wrote (descriptive entries among the options) still loads
    m["options"].update({"scales": "F16", "zeros": "U8", "packing": "low nibble = even column"})
    m.pop("manifest_sha256", None)  # older manifests carry no digest of their own
    (out / "zopt-manifest.json").write_text(json.dumps(m))
    assert zopt.load(out, backend="torch-dequant").layers[0].feed_forward.w1.weight_scale.shape == lin.weight_scale.shape


def test_backend_is_selected_once_and_handed_to_the_loader(tmp_path, tiny_transformer_dir):
    """A selection made for the run device (here a simulated sm_90 GPU) reaches the loader as it is,
    even when the weights are staged on the CPU first (offload), where it would not be chosen."""
    import zopt
    from zopt.formats.registry import select_backend
    from zopt.platform.fakes import FAKES

    out = zopt.convert(tiny_transformer_dir, "fp8", tmp_path / "fp8", progress=False)
    sel = select_backend("fp8", FAKES["cuda-sm90-80gb"])
    assert sel.name == "scaled-mm"
    model = zopt.load(out, device="cpu", backend=sel)
    assert model.zopt_backend == "scaled-mm"
    assert model.layers[0].feed_forward.w1.backend == "scaled-mm"
    # asked by name on this CPU, the same backend is refused: the loader did not select again above
    with pytest.raises(zopt.ZoptError, match="scaled-mm"):
        zopt.load(out, device="cpu", backend="scaled-mm")
    assert zopt.load(out, device="cpu").zopt_backend == "int-mm-cpu"


@pytest.mark.parametrize("spec,options", [("int4:g128", {"group_size": 64}), ("fp8:e4m3", {"fp8": "e5m2"})])
def test_subtype_and_option_that_disagree_are_refused(spec, options, tmp_path, tiny_transformer_dir):
    from zopt.errors import ZoptError
    from zopt.formats import convert

    with pytest.raises(ZoptError, match="disagree"):
        convert(tiny_transformer_dir, spec, tmp_path / "out", options=options, progress=False)
    assert not (tmp_path / "out").exists()
