"""Run-time LoRA beside quantized layers: close to bf16+LoRA on every format, scales change in
place, and removing a LoRA gives back the exact (bitwise) base output."""

from __future__ import annotations

import pytest
import torch
from lora_helpers import random_lora, tiny_modules, write_lora
from lowbit_helpers import output

import zopt
from zopt import formats
from zopt.errors import ZoptError
from zopt.lora import add_loras, lora_info, remove_loras, set_lora_scale

SPECS = ("gguf:Q8_0", "gguf:Q4_K_M", "fp8", "int8", "int8_w8a8", "int4", "nf4", "bf16")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_transformer_dir):
    root = tmp_path_factory.mktemp("rt")
    f32 = formats.convert(tiny_transformer_dir, "fp32", root / "tiny-fp32", progress=False)
    lora = write_lora(root / "l.safetensors", random_lora(tiny_modules(), rank=16, seed=4, std=0.1), "kohya-qkv")
    return root, f32, lora


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_runtime_lora_on_float_equals_merged(setup, tiny_reference_inputs):
    root, f32, lora = setup
    merged = formats.convert(f32, "fp32", root / "merged", progress=False, loras=[f"{lora}:0.8"])
    ref = output(zopt.load(merged), tiny_reference_inputs)
    rt = output(zopt.load(f32, loras=[f"{lora}:0.8"]), tiny_reference_inputs)
    base = output(zopt.load(f32), tiny_reference_inputs)
    assert _rel(rt, ref) < 1e-5 and _rel(base, ref) > 0.05  # the LoRA matters; both paths agree


@pytest.mark.parametrize("spec", SPECS)
def test_runtime_lora_error_bounded_and_removal_is_exact(setup, tiny_reference_inputs, spec):
    root, f32, lora = setup
    ref = output(zopt.load(f32, loras=[f"{lora}:0.8"]), tiny_reference_inputs)
    ref_base = output(zopt.load(f32), tiny_reference_inputs)
    art = formats.convert(f32, spec, root / spec.replace(":", "-"), progress=False)
    model = zopt.load(art, dtype=torch.float32)
    base = output(model, tiny_reference_inputs)
    quantized = model.layers[0].attention.to_q
    names = add_loras(model, [f"{lora}:0.8"])
    # the quantized module itself sits under the branch (nothing was dequantized into a Linear)
    assert model.layers[0].attention.to_q.base is quantized
    assert (type(quantized) is torch.nn.Linear) == (spec == "bf16")
    y = output(model, tiny_reference_inputs)
    # against float32 + the same LoRA, the error is the format's own (measured without LoRA) and
    # no more: the branch runs in float beside the quantized weight
    own = _rel(base, ref_base)
    print(spec, own, _rel(y, ref))
    assert _rel(y, ref) < 1.25 * own + 0.005, (spec, own)
    assert _rel(y, base) > 0.05
    set_lora_scale(model, 0.0)
    assert torch.equal(output(model, tiny_reference_inputs), base)  # a zero-scale branch is skipped
    set_lora_scale(model, 0.8, names[0])
    assert torch.equal(output(model, tiny_reference_inputs), y)
    remove_loras(model)
    assert torch.equal(output(model, tiny_reference_inputs), base)
    assert not any(hasattr(m, "scales") for m in model.modules()) and lora_info(model) == {}


def test_branch_memory_is_the_lora_parameters(setup):
    root, f32, lora = setup
    model = zopt.load(f32)
    before = sum(b.numel() for b in model.buffers()) + sum(p.numel() for p in model.parameters())
    add_loras(model, [str(lora)])
    after = sum(b.numel() for b in model.buffers()) + sum(p.numel() for p in model.parameters())
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        file_params = sum(f.get_tensor(k).numel() for k in f.keys() if not k.endswith(".alpha"))
    # exactly the file's matrices: the fused qkv pair's down matrix is shared by q, k and v, held once
    assert after - before == file_params


def test_two_loras_named_and_removed_one_at_a_time(setup, tiny_reference_inputs, tmp_path):
    root, f32, lora = setup
    other = write_lora(tmp_path / "o.safetensors", random_lora(tiny_modules(), rank=4, seed=9, std=0.1), "diffusers")
    model = zopt.load(f32)
    base = output(model, tiny_reference_inputs)
    a = add_loras(model, [str(lora)])
    only_a = output(model, tiny_reference_inputs)
    b = add_loras(model, [f"{other}:0.5"])
    assert set(lora_info(model)) == {*a, *b}
    remove_loras(model, b)
    assert torch.allclose(output(model, tiny_reference_inputs), only_a, atol=1e-6)
    with pytest.raises(ZoptError, match="no run-time LoRA named"):
        set_lora_scale(model, 1.0, b)
    remove_loras(model)
    assert torch.equal(output(model, tiny_reference_inputs), base)


def test_onnx_refuses_runtime_lora_in_one_line(setup):
    root, f32, lora = setup
    from zopt.families.zimage.config import config_for
    from zopt.formats.artifact import write_manifest

    (root / "fake-onnx").mkdir(exist_ok=True)
    write_manifest(root / "fake-onnx", format="onnx", subtype="fp32", options={}, source={}, config=config_for("tiny"),
                   tensors={})
    with pytest.raises(ZoptError, match="run-time LoRA is not possible on onnx.*--lora") as e:
        zopt.load(root / "fake-onnx", loras=[str(lora)])
    assert "\n" not in str(e.value)


def test_bfloat16_branches_stay_within_the_bound(setup, tiny_reference_inputs):
    """Branches held in bfloat16 (faster on CPUs with bf16 dot products) beside a float32 GGUF
    model: the LoRA's contribution is rounded, the error stays the format's own."""
    root, f32, lora = setup
    ref = output(zopt.load(f32, loras=[f"{lora}:0.8"]), tiny_reference_inputs)
    ref_base = output(zopt.load(f32), tiny_reference_inputs)
    art = formats.convert(f32, "gguf:Q8_0", root / "q8-bf16-branch.gguf", progress=False)
    model = zopt.load(art)
    own = _rel(output(model, tiny_reference_inputs), ref_base)
    add_loras(model, [f"{lora}:0.8"], dtype=torch.bfloat16)
    assert model.layers[0].attention.to_q.lora_l_down.dtype == torch.bfloat16
    assert _rel(output(model, tiny_reference_inputs), ref) < 1.25 * own + 0.005
