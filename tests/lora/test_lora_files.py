"""LoRA specs and file checks that need no model: FILE[:SCALE], half pairs, other adapter types."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from zopt.errors import ZoptError
from zopt.lora import LoraSpec, read


def test_spec_scale_parsing(tmp_path):
    assert LoraSpec.parse("a.safetensors:0.8") == LoraSpec(Path("a.safetensors"), 0.8)
    assert LoraSpec.parse("a.safetensors") == LoraSpec(Path("a.safetensors"), 1.0)
    assert LoraSpec.parse("dir/a.safetensors:-1.5e-1").scale == -0.15
    odd = tmp_path / "odd:name.safetensors"
    odd.write_bytes(b"")
    assert LoraSpec.parse(str(odd)) == LoraSpec(odd, 1.0)  # an existing file is taken as it is
    for bad, needle in (("a.safetensors:strong", "is not a number"), ("a.safetensors:inf", "not a finite")):
        with pytest.raises(ZoptError, match=needle) as e:
            LoraSpec.parse(bad)
        assert "a.safetensors" in str(e.value)


def _write(path, tensors, **meta):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta or None)
    return path


@pytest.mark.parametrize("tensors, needle", [
    ({"layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 8)}, "has a down matrix but no up matrix"),
    ({"layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 8),
      "layers.0.attention.to_q.lora_B.weight": torch.zeros(8, 3)}, "their ranks differ"),
    ({"lora_unet_layers_0_attention_to_q.lokr_w1": torch.zeros(2, 2)}, "not LoKr/LoHa/DoRA"),
    ({"layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 8),
      "layers.0.attention.to_q.lora_B.weight": torch.zeros(8, 2),
      "layers.0.attention.to_q.alpha": torch.ones(2)}, "not one"),
    ({"layers.0.attention.to_q.lora_A.weight": torch.full((2, 8), float("nan")),
      "layers.0.attention.to_q.lora_B.weight": torch.zeros(8, 2)}, "NaN"),
    ({"layers.0.attention.to_q.lora_A.weight": torch.zeros(2, 8),
      "layers.0.attention.to_q.lora_B.weight": torch.zeros(8, 2),
      "layers.0.attention.to_q.extra": torch.zeros(2)}, "not part of a LoRA pair"),
])
def test_malformed_files_are_one_line_errors(tmp_path, tensors, needle):
    path = _write(tmp_path / "l.safetensors", tensors)
    with pytest.raises(ZoptError, match=needle) as e:
        read(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_alpha_and_prefixes(tmp_path):
    t = {"transformer.layers.0.attention.to_q.lora_A.default.weight": torch.ones(4, 8),
         "transformer.layers.0.attention.to_q.lora_B.default.weight": torch.ones(8, 4),
         "lora_unet__layers_0_attention_to_k.lora_down.weight": torch.ones(4, 8),
         "lora_unet__layers_0_attention_to_k.lora_up.weight": torch.ones(8, 4),
         "lora_unet__layers_0_attention_to_k.alpha": torch.tensor(2.0)}
    lf = read(_write(tmp_path / "l.safetensors", t), ("transformer.",))
    assert set(lf.pairs) == {"layers.0.attention.to_q", "layers_0_attention_to_k"}
    assert lf.pairs["layers.0.attention.to_q"].factor == 1.0  # no alpha: alpha = rank
    assert lf.pairs["layers_0_attention_to_k"].factor == 0.5
    assert lf.layout == "kohya" and len(lf.sha256) == 64


def test_pickle_lora_needs_allow_pickle(tmp_path):
    path = tmp_path / "l.pt"
    torch.save({"layers.0.attention.to_q.lora_A.weight": torch.ones(2, 8),
                "layers.0.attention.to_q.lora_B.weight": torch.ones(8, 2)}, path)
    with pytest.raises(ZoptError, match="--allow-pickle"):
        read(path)
    lf = read(path, allow_pickle=True)
    assert lf.pairs["layers.0.attention.to_q"].rank == 2
