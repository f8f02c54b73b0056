"""GGUF files load in diffusers and in zopt's loader; other converters' layouts load too."""

from __future__ import annotations

import pytest
import torch
from conftest import rel_err

from zopt import checkpoint
from zopt.errors import ZoptError
from zopt.formats.gguf import recipes as gguf_recipes

# Upper bounds on ||out - ref|| / ||ref|| for the tiny model's forward pass against its bf16
# weights run in float32 (about 1.5x the figures benchmarks/gguf_quality.py prints; docs/gguf.md).
BOUNDS = {
    "F32": 1e-4, "F16": 1e-3, "BF16": 1e-4, "Q8_0": 0.015, "Q6_K": 0.02, "Q5_K_M": 0.07,
    "Q5_1": 0.09, "Q5_0": 0.095, "Q5_K": 0.09, "Q5_K_S": 0.09, "Q4_K_M": 0.08, "Q4_K_S": 0.095, "Q4_K": 0.11,
    "Q4_1": 0.18, "Q4_0": 0.2, "Q3_K_L": 0.125, "Q3_K_M": 0.125, "Q3_K": 0.21, "Q3_K_S": 0.21, "Q2_K": 0.2,
}
assert set(BOUNDS) == set(gguf_recipes.RECIPES)
# The default CPU backend (int-mm-cpu: INT8 weights per row, INT8 activations per token) adds an
# error of its own, measured at most 0.019 on the tiny model (benchmarks/gguf_quality.py): allow
# 0.03 on top of each type's bound, in quadrature.
INT8_EXTRA = 0.03


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # many small ops: one intra-op thread per xdist worker avoids oversubscribing the cores
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(tiny_transformer_dir, tiny_reference_inputs):
    from zopt.formats.plain import load_source

    return _forward(load_source(tiny_transformer_dir, dtype=torch.float32), tiny_reference_inputs)


def _forward(model, inputs, dtype=torch.float32):
    x, t, cap = inputs
    with torch.inference_mode():
        return model([v.to(dtype) for v in x], t, [v.to(dtype) for v in cap], return_dict=False)[0][0].float()


@pytest.mark.parametrize("subtype", list(BOUNDS))
def test_diffusers_and_zopt_load_every_type(tiny_gguf, reference, tiny_transformer_dir, tiny_reference_inputs, subtype):
    from diffusers import GGUFQuantizationConfig, ZImageTransformer2DModel

    from zopt.formats import load

    d = ZImageTransformer2DModel.from_single_file(
        str(tiny_gguf(subtype)), config=str(tiny_transformer_dir), torch_dtype=torch.float32, local_files_only=True,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))
    out_d = _forward(d, tiny_reference_inputs)
    out_z = _forward(load(tiny_gguf(subtype), dtype=torch.float32, backend="torch-dequant"), tiny_reference_inputs)
    assert rel_err(out_d, reference) < BOUNDS[subtype]
    assert rel_err(out_z, reference) < BOUNDS[subtype]
    # both decode the same bytes: they agree far more closely than either does with the reference
    assert rel_err(out_z, out_d) < 2e-3  # diffusers rounds dequantized weights via float16
    out_i = _forward(load(tiny_gguf(subtype), dtype=torch.float32), tiny_reference_inputs)
    assert rel_err(out_i, reference) < (BOUNDS[subtype] ** 2 + INT8_EXTRA ** 2) ** 0.5
    assert rel_err(out_i, out_z) < INT8_EXTRA


def test_cache_modes_and_bf16_agree(tiny_gguf, reference, tiny_reference_inputs):
    from zopt.formats import load
    from zopt.formats.gguf.loader import GGUFLinear

    outs = {c: _forward(load(tiny_gguf("Q4_K_M"), backend="torch-dequant", cache=c), tiny_reference_inputs)
            for c in ("none", "small", "all")}
    assert rel_err(outs["none"], outs["all"]) < 1e-5 and rel_err(outs["small"], outs["all"]) < 1e-5
    m = load(tiny_gguf("Q4_K"), dtype=torch.bfloat16, backend="torch-dequant")
    kinds = {mod.kind for mod in m.modules() if isinstance(mod, GGUFLinear)}
    assert "int4pack" in kinds or not hasattr(torch, "_weight_int4pack_mm_for_cpu")
    out = _forward(m, tiny_reference_inputs, torch.bfloat16)
    assert rel_err(out, reference) < BOUNDS["Q4_K"] + 0.02
    # quantized weights stay quantized by default: no float weight for the big layers
    lin = m.get_submodule("layers.0.feed_forward.w2")
    assert isinstance(lin, GGUFLinear) and not lin.weight.is_floating_point()


def _write_sdcpp_style(src_dir, path):
    """A file as stable-diffusion.cpp writes it: prefixed names, no architecture key, 1-D pad
    tokens, norms and pad tokens quantized (Q8_0), big weights Q8_0."""
    from zopt.families import zimage
    from zopt.formats.gguf import quantize_rows
    from zopt.formats.gguf.writer import StreamingGGUFWriter

    view = zimage.as_original(checkpoint.open(src_dir), prefix="model.diffusion_model.")
    entries, tensors = [], {}
    for n in view.names():
        t = view.get(n).float()
        if n.endswith("_pad_token"):
            t = t.reshape(-1)
        qtype = "Q8_0" if t.shape[-1] % 32 == 0 else "F32"
        entries.append((n, tuple(t.shape), qtype))
        tensors[n] = quantize_rows(t, qtype)
    with StreamingGGUFWriter(path, entries, {"general.name": "sd.cpp-style"}) as w:
        for n, _, _ in entries:
            w.write(n, tensors[n])
    return path


def test_sdcpp_style_file_loads_and_reconverts(tmp_path, tiny_transformer_dir, reference, tiny_reference_inputs):
    import gguf

    from zopt.formats import convert, load

    sd = _write_sdcpp_style(tiny_transformer_dir, tmp_path / "sdcpp.gguf")
    r = gguf.GGUFReader(sd)
    pad = next(t for t in r.tensors if t.name.endswith("x_pad_token"))
    assert pad.tensor_type.name == "Q8_0" and len(pad.shape) == 1
    out = _forward(load(sd, backend="torch-dequant"), tiny_reference_inputs)
    assert rel_err(out, reference) < 0.02
    out = _forward(load(sd), tiny_reference_inputs)
    assert rel_err(out, reference) < (0.02 ** 2 + INT8_EXTRA ** 2) ** 0.5
    # converting it back gives a file diffusers accepts (2-D F32 pad tokens, no prefix)
    fixed = convert(sd, "gguf:Q8_0", tmp_path / "fixed.gguf", progress=False)
    names = {t.name: t for t in gguf.GGUFReader(fixed).tensors}
    assert list(names["x_pad_token"].shape) == [384, 1] and names["x_pad_token"].tensor_type.name == "F32"


def test_corrupt_gguf_is_one_line_error(tmp_path, tiny_gguf):
    from zopt.formats import load

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 40)
    with pytest.raises(ZoptError) as e:
        load(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    cut = tmp_path / "truncated.gguf"
    cut.write_bytes(tiny_gguf("Q8_0").read_bytes()[: tiny_gguf("Q8_0").stat().st_size // 2])
    with pytest.raises(ZoptError) as e:
        load(cut)
    assert str(cut) in str(e.value) and "\n" not in str(e.value)


def test_generate_with_gguf(tiny_gguf, tmp_path):
    from zopt.runtime.pipeline import GenerateRequest, build_pipeline, run

    pipe = build_pipeline(tiny_gguf("Q4_K_M"), device="cpu")
    images = run(pipe, GenerateRequest(prompts=["a red cube"], seeds=[1], height=64, width=64, steps=2), tmp_path)
    assert len(images) == 1 and images[0].path.exists()


def test_backend_declared_and_selected():
    from zopt.formats.registry import select_backend as select
    from zopt.platform.fakes import FAKES

    assert select("gguf", FAKES["cpu-only"]).backend.name == "int-mm-cpu"
    assert select("gguf", FAKES["cuda-sm89-8gb"]).backend.name == "torch-dequant"
    assert select("gguf", FAKES["cpu-only"], prefer="torch-dequant").backend.name == "torch-dequant"


@pytest.mark.peer
@pytest.mark.parametrize("subtype", ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "Q4_1"])
def test_stable_diffusion_cpp_reads_every_tensor_to_our_values(tiny_gguf, tmp_path, subtype):
    """stable-diffusion.cpp's model loader opens zopt's file, and ggml's dequantizers give, bit for
    bit, the values gguf-py gives (its converter, asked for F32, decodes every quantized tensor)."""
    pytest.importorskip("stable_diffusion_cpp", reason="stable-diffusion-cpp-python is not installed")
    import gguf
    import numpy as np
    from gguf.quants import dequantize
    from stable_diffusion_cpp import stable_diffusion_cpp as sd_cpp

    ours_path, out = tiny_gguf(subtype), tmp_path / "sdcpp-f32.gguf"
    assert sd_cpp.convert(str(ours_path).encode(), b"", str(out).encode(), 0, b"", True)
    ours = {t.name: t for t in gguf.GGUFReader(ours_path).tensors}
    theirs = {t.name: t for t in gguf.GGUFReader(out).tensors}
    assert set(theirs) == set(ours)
    decoded = 0
    for name, t in theirs.items():
        o = ours[name]
        # sd.cpp writes our 2-D [1, dim] pad tokens back as 1-D (GGUF lists dims innermost first)
        assert [int(d) for d in t.shape] == [int(d) for d in o.shape if d != 1 or len(o.shape) == 1], name
        if o.tensor_type.name not in ("F32", "BF16", "F16"):
            assert t.tensor_type.name == "F32", name
            decoded += 1
        assert np.array_equal(dequantize(t.data, t.tensor_type).reshape(-1), dequantize(o.data, o.tensor_type).reshape(-1)), name
    assert decoded > 0
