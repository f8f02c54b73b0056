"""Attention backends: auto picks and refusals on every simulated machine; real switching on CPU."""

from __future__ import annotations

import pytest

from zopt.errors import UnsupportedFormat, ZoptError
from zopt.platform.fakes import FAKES
from zopt.runtime import attention as A

AUTO = {  # machine -> (batch 1, batch 2 of unequal prompts)
    "cuda-sm80-24gb": ("flash", "flash_varlen"),
    "cuda-sm89-8gb": ("native", "native"),  # SageAttention is installed but approximate: never auto
    "cuda-sm90-80gb": ("_flash_3", "_flash_varlen_3"),
    "rocm-mi300x": ("flash", "flash_varlen"),
    "apple-mps": ("native", "native"),
    "cpu-only": ("native", "native"),
}


@pytest.mark.parametrize("machine", list(FAKES))
def test_auto_pick_on_every_machine(machine):
    hw = FAKES[machine]
    dtype = "fp32" if hw.device == "cpu" else "bf16"
    one, two = A.choose("auto", hw, dtype, 1), A.choose("auto", hw, dtype, 2)
    assert (one.name, two.name) == AUTO[machine]
    assert not A.why_not(one.name, hw, dtype, 1) and A.ATTENTION[two.name].masks
    # every kernel auto ranks higher was really unavailable
    rank = A.ATTENTION[one.name].auto_rank
    for a in A.ATTENTION.values():
        if a.auto_rank is not None and a.auto_rank > rank:
            assert A.why_not(a.name, hw, dtype, 1)


def test_fp32_never_gets_half_only_kernels():
    for hw in FAKES.values():
        assert not A.ATTENTION[A.choose("auto", hw, "fp32").name].half_only
    assert A.choose("auto", FAKES["cuda-sm90-80gb"], "fp32").name == "xformers"  # fp32-capable, installed there


def test_unavailable_choice_says_what_to_install():
    with pytest.raises(UnsupportedFormat) as e:
        A.choose("flash", FAKES["cuda-sm89-8gb"], "bf16")
    assert "pip install 'flash-attn>=2.6.3'" in str(e.value)
    with pytest.raises(UnsupportedFormat) as e:
        A.choose("_flash_3", FAKES["cuda-sm80-24gb"], "bf16")
    assert "compute capability >= 9.0" in str(e.value) and "FlashAttention-3" in str(e.value)
    with pytest.raises(UnsupportedFormat, match="masks"):
        A.choose("sage", FAKES["cuda-sm89-8gb"], "bf16", batch=2)
    assert A.choose("sage_varlen", FAKES["cuda-sm89-8gb"], "bf16", batch=2).name == "sage_varlen"
    with pytest.raises(UnsupportedFormat, match="known: auto, native"):
        A.choose("fastest", FAKES["cpu-only"])


def test_every_entry_is_a_diffusers_backend():
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = {b.value for b in AttentionBackendName}
    assert set(A.ATTENTION) <= known


def test_real_check_refuses_missing_package_here():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ZoptError, match="flash-attn"):
        A.check_installed("flash")


def test_switching_kernels_keeps_the_output(tiny_transformer_dir, tiny_reference_inputs):
    import torch
    from conftest import rel_err

    from zopt.formats.plain import load_source

    model = load_source(tiny_transformer_dir, dtype=torch.float32).eval()
    x, t, cap = tiny_reference_inputs
    with torch.no_grad():
        ref = model(x, t, cap, return_dict=False)[0][0]
        outs = {}
        for name in ("native", "_native_math"):
            A.apply(model, name)
            assert all(m.processor._attention_backend == name for m in model.modules()
                       if getattr(m, "processor", None) is not None and hasattr(m.processor, "_attention_backend"))
            outs[name] = model(x, t, cap, return_dict=False)[0][0]
    for name, out in outs.items():
        assert rel_err(out, ref) < 1e-5, name
