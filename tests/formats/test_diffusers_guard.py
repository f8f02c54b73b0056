"""diffusers and zopt folders: diffusers either loads a zopt folder correctly or refuses it naming
zopt (never a model with ignored scales); any variant runs inside a ZImagePipeline via zopt.load."""

from __future__ import annotations

import json

import pytest

from tests.lowbit_helpers import artifact, output

pytest.importorskip("diffusers")

# every folder layout whose weights diffusers cannot read as they are stored
ZOPT_ONLY = [("fp8", {}), ("fp8", {"layout": "comfy"}), ("int8", {}), ("int8_w8a8", {}), ("int4", {}),
             ("int4:r16", {}), ("nf4:r16", {})]  # a low-rank branch diffusers would drop


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("guard")


@pytest.mark.parametrize("spec,options", ZOPT_ONLY, ids=lambda v: str(v))
def test_diffusers_refuses_zopt_only_folders_naming_zopt(root, tiny_transformer_dir, spec, options):
    from diffusers import ZImageTransformer2DModel

    out = artifact(root, tiny_transformer_dir, spec, **options)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "zopt"
    with pytest.raises(ValueError, match="got zopt"):
        ZImageTransformer2DModel.from_pretrained(out)


def test_nf4_folder_goes_to_diffusers_bitsandbytes_loader(root, tiny_transformer_dir):
    """nf4 is stored as bitsandbytes serializes it: diffusers hands it to its bitsandbytes quantizer
    (equal outputs on CUDA: tests/formats/lowbit/test_nf4.py); here it must refuse loudly, not load."""
    import torch
    from diffusers import ZImageTransformer2DModel

    out = artifact(root, tiny_transformer_dir, "nf4")
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "bitsandbytes"
    if torch.cuda.is_available():
        pytest.skip("loads on CUDA; compared there by test_diffusers_bitsandbytes_loader_reads_artifact")
    with pytest.raises(Exception) as e:  # noqa: PT011 (diffusers' own types: missing package or no GPU)
        ZImageTransformer2DModel.from_pretrained(out)
    assert any(w in str(e.value) for w in ("GPU", "bitsandbytes", "CUDA"))


def test_bf16_folder_loads_through_diffusers_unchanged(root, tiny_transformer_dir, tiny_reference_inputs):
    import torch
    from diffusers import ZImageTransformer2DModel

    import zopt

    out = artifact(root, tiny_transformer_dir, "bf16")
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    theirs = ZImageTransformer2DModel.from_pretrained(out, torch_dtype=torch.float32)
    ours = zopt.load(out, dtype=torch.float32)
    assert torch.equal(output(theirs, tiny_reference_inputs), output(ours, tiny_reference_inputs))


@pytest.mark.parametrize("spec", ["fp8", "int4"])
def test_zopt_variant_runs_in_a_diffusers_pipeline(root, tiny_dir, tiny_transformer_dir, spec):
    """The card's one-liner: ZImagePipeline.from_pretrained(base, transformer=zopt.load(folder))."""
    import torch
    from diffusers import ZImagePipeline

    import zopt

    out = artifact(root, tiny_transformer_dir, spec)
    pipe = ZImagePipeline.from_pretrained(tiny_dir, transformer=zopt.load(out), torch_dtype=torch.float32)
    img = pipe("a red square", num_inference_steps=2, guidance_scale=0.0, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert img.shape == (64, 64, 3) and float(img.std()) > 0
