"""``int-mm-cpu``, every low-bit format's CPU backend: the stored weight re-quantized once at load to
per-row INT8 codes, integer matmul with per-token INT8 activations."""

from __future__ import annotations

import pytest
from lowbit_helpers import artifact, output

DEQUANT = {"fp8": "fp8-storage", "int8": "torch-dequant", "int4": "torch-dequant", "int4:g64": "torch-dequant",
           "nf4": "torch-dequant", "int4:r16": "torch-dequant"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("cpu-backend")


def _quantized(model):
    return {n: m for n, m in model.named_modules() if hasattr(m, "KERNELS")}


@pytest.mark.parametrize("spec", list(DEQUANT))
def test_int8_codes_are_the_stored_weight_within_half_a_step(spec, root, tiny_transformer_dir):
    import torch

    from zopt.formats import load

    folder = artifact(root, tiny_transformer_dir, spec)
    fast = _quantized(load(folder, backend="int-mm-cpu", dtype=torch.float32))
    ref = _quantized(load(folder, backend=DEQUANT[spec], dtype=torch.float32))
    assert fast.keys() == ref.keys() and fast
    for n, m in fast.items():
        assert m.backend == "int-mm-cpu" and m.weight.dtype == torch.int8
        w = ref[n].dequantize(torch.float32)
        step = m.weight_scale[:, None]
        assert ((m.weight.float() * step - w).abs() <= step / 2 * (1 + 1e-5) + 1e-12).all(), n
        if spec == "int8":  # already per-row INT8: the stored codes as they are
            assert m.weight.equal(ref[n].weight)


@pytest.mark.parametrize("spec", list(DEQUANT))
def test_cpu_backend_output_matches_the_dequantizing_kernel(spec, root, tiny_transformer_dir, tiny_reference_inputs):
    import torch

    from zopt.formats import load

    folder = artifact(root, tiny_transformer_dir, spec)
    fast = output(load(folder, backend="int-mm-cpu", dtype=torch.float32), tiny_reference_inputs)
    ref = output(load(folder, backend=DEQUANT[spec], dtype=torch.float32), tiny_reference_inputs)
    # the INT8 rounding of weights (half a step of the row's range / 127) and of each token's
    # activations (the same): measured 0.015-0.019 over the whole tiny transformer
    assert float((fast - ref).norm() / ref.norm()) < 0.04


def test_comfy_fp8_on_the_cpu_backend(root, tiny_transformer_dir, tiny_reference_inputs):
    import torch

    from zopt.formats import load

    folder = artifact(root, tiny_transformer_dir, "fp8", layout="comfy")
    fast = load(folder, backend="int-mm-cpu", dtype=torch.float32)
    assert {m.backend for m in _quantized(fast).values()} == {"int-mm-cpu"}
    ref = output(load(folder, backend="fp8-storage", dtype=torch.float32), tiny_reference_inputs)
    assert float((output(fast, tiny_reference_inputs) - ref).norm() / ref.norm()) < 0.04


def test_default_cpu_load_runs_the_integer_matmul(root, tiny_transformer_dir):
    from zopt.formats import load

    model = load(artifact(root, tiny_transformer_dir, "int4"), device="cpu")
    assert model.zopt_backend == "int-mm-cpu"
