"""Per-tensor policy, manifest records and checksums shared by the low-bit formats."""

from __future__ import annotations

import json

import pytest
from lowbit_helpers import artifact

from zopt.families import zimage


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("lowbit-policy")


def _manifest(folder):
    return json.loads((folder / "zopt-manifest.json").read_text())


def test_sensitive_tensors_kept_and_recorded(root, tiny_transformer_dir):
    from zopt.formats.lowbit.common import linear_weight_names

    m = _manifest(artifact(root, tiny_transformer_dir, "int8"))
    linear = linear_weight_names(m["config"])
    quantized = {n for n, r in m["tensors"].items() if r["storage"] == "I8"}
    for n, r in m["tensors"].items():
        rule = zimage.sensitive_reason(n)
        if rule is not None or n not in linear:
            assert n not in quantized, n
            assert r["storage"] in ("BF16", "F32")
            assert r["reason"]
        else:
            assert n in quantized, n
            assert r["parts"] == [n, n + "_scale"]
    assert "layers.0.adaLN_modulation.0.weight" not in quantized
    assert "all_final_layer.2-1.linear.weight" not in quantized
    assert "layers.0.feed_forward.w1.weight" in quantized
    assert m["summary"]["I8"] == len(quantized)
    # every stored tensor of the safetensors file is accounted for by the manifest
    from safetensors import safe_open

    with safe_open(str(artifact(root, tiny_transformer_dir, "int8") / "diffusion_pytorch_model.safetensors"), "pt") as f:
        stored = set(f.keys())
    listed = {p for n, r in m["tensors"].items() for p in r.get("parts", [n])}
    assert stored == listed


def test_keep_and_quantize_overrides(root, tiny_transformer_dir):
    out = artifact(root, tiny_transformer_dir, "fp8", keep=[r"feed_forward\.w2"], quantize=[r"adaLN_modulation"])
    m = _manifest(out)
    t = m["tensors"]
    assert t["layers.0.feed_forward.w2.weight"]["storage"] == "BF16"
    assert t["layers.0.feed_forward.w2.weight"]["reason"] == r"--keep feed_forward\.w2"
    assert t["layers.1.adaLN_modulation.0.weight"]["storage"] == "F8_E4M3"
    assert t["layers.1.adaLN_modulation.0.weight"]["reason"] == "--quantize adaLN_modulation"
    # --quantize cannot turn a norm or bias into a quantized Linear
    assert t["layers.0.adaLN_modulation.0.bias"]["storage"] in ("BF16", "F32")
    assert m["options"]["keep"] == [r"feed_forward\.w2"] and m["options"]["quantize"] == ["adaLN_modulation"]
    import zopt

    model = zopt.load(out, backend="fp8-storage")
    assert type(model.layers[0].adaLN_modulation[0]).__name__ == "FP8Linear"
    assert type(model.layers[0].feed_forward.w2).__name__ == "Linear"


def test_original_layout_names_match_patterns(root, tiny_transformer_dir):
    # patterns are also searched in the original-layout name (attention.out <-> attention.to_out.0)
    m = _manifest(artifact(root, tiny_transformer_dir, "fp8", keep=[r"attention\.out\."]))
    assert m["tensors"]["layers.0.attention.to_out.0.weight"]["storage"] == "BF16"


def test_bad_pattern_is_one_line_error(root, tiny_transformer_dir):
    from zopt import formats
    from zopt.errors import ZoptError

    with pytest.raises(ZoptError, match="bad tensor pattern"):
        formats.convert(tiny_transformer_dir, "int8", root / "bad", options={"keep": ["("]}, progress=False)
    assert not (root / "bad").exists()


def test_manifest_provenance_and_checksums(root, tiny_transformer_dir):
    from zopt import checkpoint
    from zopt._io import sha256_file

    out = artifact(root, tiny_transformer_dir, "int4")
    m = _manifest(out)
    assert m["format"] == "int4" and m["zopt_version"]
    assert m["source"]["sha256"] == checkpoint.open(tiny_transformer_dir).sha256()
    assert set(m["files"]) == {"config.json", "diffusion_pytorch_model.safetensors"}
    for rel, meta in m["files"].items():
        assert sha256_file(out / rel) == meta["sha256"]


@pytest.mark.parametrize("spec", ["fp8", "int8", "int4", "nf4"])
def test_tampered_byte_refused(tmp_path, tiny_transformer_dir, spec):
    import shutil

    import zopt
    from zopt.errors import ChecksumMismatch

    out = tmp_path / "a"
    shutil.copytree(artifact(tmp_path.parent, tiny_transformer_dir, spec), out)
    f = out / "diffusion_pytorch_model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch, match="sha256 differs"):
        zopt.load(out)


def test_backend_selection_per_hardware():
    from zopt.formats.registry import select_backend as select
    from zopt.platform.hardware import Hardware

    cpu = Hardware("cpu", "x")
    ada = Hardware("cuda", "L4", (8, 9), packages={"bitsandbytes": "0.50"})
    ampere = Hardware("cuda", "A100", (8, 0))
    assert select("fp8", ada).name == "scaled-mm"
    assert select("fp8", ampere).name == "fp8-storage"
    assert select("fp8", cpu).name == "int-mm-cpu"  # every low-bit format: the CPU integer matmul
    assert select("int8_w8a8", ampere).name == "int-mm-cuda"
    assert select("int8_w8a8", cpu).name == "int-mm-cpu"
    assert select("int8_w8a8", Hardware("mps", "m")).name == "torch-dequant"
    assert select("int8", ampere).name == "torch-dequant"
    assert select("int8", cpu).name == "int-mm-cpu"
    assert select("nf4", ada).name == "bitsandbytes"
    assert select("nf4", ampere).name == "torch-dequant"  # no bitsandbytes installed there
    assert select("int4", cpu).name == "int-mm-cpu"
    assert select("int4", Hardware("mps", "m")).name == "torch-dequant"
    assert select("nf4", cpu).name == "int-mm-cpu"
