"""NF4: bytes equal to bitsandbytes' quantizer, its dequantizer reads our tensors, reload bounds."""

from __future__ import annotations

import pytest
from conftest import rel_err
from lowbit_helpers import artifact, cosine, output, reference_output


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("nf4")


def _weight(rows=96, cols=256, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)).bfloat16()


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bounds_and_layout(double_quant):
    import torch

    from zopt.formats.lowbit.nf4 import NF4_CODE, absmax_f32, dequantize_nf4, quantize_nf4, read_state

    w = _weight()
    parts = quantize_nf4(w.float(), double_quant)
    packed, absmax, code = parts[:3]
    assert packed.shape == (96 * 256 // 2, 1) and packed.dtype == torch.uint8
    assert absmax.dtype == (torch.uint8 if double_quant else torch.float32) and absmax.numel() == 96 * 256 // 64
    assert code.tolist() == list(NF4_CODE)
    state = read_state(parts[-1])
    assert state["shape"] == [96, 256] and state["blocksize"] == 64 and state["quant_type"] == "nf4"
    scales = absmax_f32(absmax, state, *(parts[3:5] if double_quant else ()))
    dq = dequantize_nf4(packed, scales, code, (96, 256))
    assert rel_err(dq, w.float()) < 0.11
    # each value lands within half the widest NF4 code gap (-1 .. -0.696: 0.152) of its block's scale, plus what
    # double quantization changed in that scale
    true_absmax = w.float().reshape(-1, 64).abs().amax(1)
    bound = 0.1520 * true_absmax + (true_absmax - scales).abs() + 1e-6
    assert ((dq - w.float()).abs().reshape(-1, 64) <= bound[:, None]).all()


@pytest.mark.peer
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_bytes_equal_bitsandbytes(double_quant):
    import torch

    bnbf = pytest.importorskip("bitsandbytes.functional")
    from zopt.formats.lowbit.nf4 import quantize_nf4, read_state

    w = _weight(seed=3)
    q_ref, st = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=double_quant)
    ref = st.as_dict(packed=True)
    ours = quantize_nf4(w.float(), double_quant)
    assert torch.equal(ours[0], q_ref)
    assert torch.equal(ours[1], ref["absmax"])
    assert torch.equal(ours[2], ref["quant_map"])
    if double_quant:
        assert torch.equal(ours[3], ref["nested_absmax"])
        assert torch.equal(ours[4], ref["nested_quant_map"])
    assert read_state(ours[-1]) == read_state(ref["quant_state.bitsandbytes__nf4"])


@pytest.mark.peer
def test_bitsandbytes_dequantizes_our_artifact(root, tiny_transformer_dir):
    import torch
    from safetensors import safe_open

    bnbf = pytest.importorskip("bitsandbytes.functional")
    import zopt

    out = artifact(root, tiny_transformer_dir, "nf4")
    name = "layers.1.feed_forward.w3.weight"
    with safe_open(str(out / "diffusion_pytorch_model.safetensors"), "pt") as f:
        qs = {k[len(name) + 1 :]: f.get_tensor(k) for k in f.keys() if k.startswith(name + ".")}
        packed = f.get_tensor(name)
    state = bnbf.QuantState.from_dict(qs, device=torch.device("cpu"))
    theirs = bnbf.dequantize_4bit(packed, state).float()
    ours = zopt.load(out, backend="torch-dequant").layers[1].feed_forward.w3.dequantize()
    assert torch.allclose(theirs, ours, rtol=1e-2, atol=1e-6)


def test_nf4_artifact_reloads_within_bounds(root, tiny_transformer_dir, tiny_reference_inputs):
    import json

    import torch

    import zopt

    out = artifact(root, tiny_transformer_dir, "nf4")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_quant_type"] == "nf4"
    assert "layers.0.adaLN_modulation.0" in cfg["llm_int8_skip_modules"]
    model = zopt.load(out, dtype=torch.float32, backend="torch-dequant")
    y, ref = output(model, tiny_reference_inputs), reference_output(tiny_transformer_dir, tiny_reference_inputs)
    assert rel_err(y, ref) < 0.25 and cosine(y, ref) > 0.97


@pytest.mark.gpu
def test_diffusers_bitsandbytes_loader_reads_artifact(root, tiny_transformer_dir, tiny_reference_inputs):
    import torch

    pytest.importorskip("bitsandbytes")
    from diffusers import ZImageTransformer2DModel

    import zopt

    out = artifact(root, tiny_transformer_dir, "nf4")
    theirs = ZImageTransformer2DModel.from_pretrained(out, torch_dtype=torch.bfloat16).to("cuda")
    ours = zopt.load(out, device="cuda", dtype=torch.bfloat16)
    assert ours.zopt_backend == "bitsandbytes"
    x, t, cap = tiny_reference_inputs
    inputs = ([v.cuda().bfloat16() for v in x], t.cuda().bfloat16(), [c.cuda().bfloat16() for c in cap])
    a, b = output(theirs, inputs).cpu(), output(ours, inputs).cpu()
    assert rel_err(a, b) < 0.02
    assert cosine(b, reference_output(tiny_transformer_dir, tiny_reference_inputs)) > 0.97


@pytest.mark.peer
def test_bitsandbytes_kernel_matches_torch_dequant():
    import torch

    pytest.importorskip("bitsandbytes")
    from zopt.formats.lowbit.nf4 import NF4Scheme

    g = torch.Generator().manual_seed(5)
    w = torch.randn(256, 512, generator=g)
    scheme = NF4Scheme(True)
    parts = dict(zip([p[0] for p in scheme.parts("a.weight", (256, 512))], scheme.quantize(w), strict=True))
    ours, theirs = scheme.module(parts, (256, 512), "torch-dequant"), scheme.module(parts, (256, 512), "bitsandbytes")
    x = torch.randn(2, 7, 512, generator=g).bfloat16()
    # bitsandbytes' matmul_4bit (run here on CPU; CUDA in production) on zopt's stored tensors
    assert rel_err(theirs(x), ours(x)) < 1e-2
