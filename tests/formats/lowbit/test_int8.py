"""INT8 weight-only and W8A8: quantizer bounds, kernels agreeing with each other, reload bounds."""

from __future__ import annotations

import pytest
from conftest import rel_err
from lowbit_helpers import artifact, cosine, output, reference_output


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("int8")


def test_quantize_int8_bounds():
    import torch

    from zopt.formats.lowbit.int8 import quantize_int8

    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 512, generator=g) * torch.rand(300, 1, generator=g)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127 and int(q.min()) >= -127
    dq = q.float() * s[:, None]
    # symmetric rounding: every value within half a step of its row
    assert ((dq - w).abs() <= s[:, None] / 2 + 1e-7).all()
    assert rel_err(dq, w) < 0.015


def test_w8a8_kernels_agree():
    import torch

    from zopt.formats.lowbit.int8 import int8_linear, quantize_int8, quantize_tokens

    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(256, 512, generator=g), torch.randn(3, 40, 512, generator=g)
    q, s = quantize_int8(w)
    sim = int8_linear(q, s, "torch-dequant-w8a8")(x)
    fast = int8_linear(q, s, "int-mm-cpu")(x)
    # same integer operands: only float accumulation order differs from the exact INT32 sums
    assert rel_err(fast, sim) < 1e-5
    xq, sx = quantize_tokens(x.reshape(-1, 512))
    exact = (xq.long() @ q.long().t()).double() * sx.double() * s.double()
    assert rel_err(fast.reshape(-1, 256).double(), exact) < 1e-6
    ref = x @ w.t()
    assert rel_err(fast, ref) < 0.03


@pytest.mark.parametrize("spec,bound", [("int8", 0.03), ("int8_w8a8", 0.05)])
def test_int8_artifact_reloads_within_bounds(root, tiny_transformer_dir, tiny_reference_inputs, spec, bound):
    import json

    import torch

    import zopt

    out = artifact(root, tiny_transformer_dir, spec)
    m = json.loads((out / "zopt-manifest.json").read_text())
    assert m["format"] == spec
    model = zopt.load(out, dtype=torch.float32)
    assert model.zopt_backend == "int-mm-cpu"  # both on CPU (benchmarks/cpu_latency.py)
    y, ref = output(model, tiny_reference_inputs), reference_output(tiny_transformer_dir, tiny_reference_inputs)
    assert rel_err(y, ref) < bound and cosine(y, ref) > 0.999
    if spec == "int8_w8a8":
        sim = zopt.load(out, dtype=torch.float32, backend="torch-dequant")
        assert rel_err(output(sim, tiny_reference_inputs), y) < 1e-4


@pytest.mark.gpu
def test_int_mm_cuda_matches_simulation(root, tiny_transformer_dir, tiny_reference_inputs):
    import torch

    import zopt

    out = artifact(root, tiny_transformer_dir, "int8_w8a8")
    x, t, cap = tiny_reference_inputs
    cuda_in = ([v.cuda() for v in x], t.cuda(), [c.cuda() for c in cap])
    fast = zopt.load(out, device="cuda", dtype=torch.float32)
    assert fast.zopt_backend == "int-mm-cuda"
    y = output(fast, cuda_in).cpu()
    # the float simulation on the same device: the same INT8 operands, float32 accumulation. (Across
    # devices the per-token activation codes round differently wherever the layers before differ in
    # the last bit, which adds up to about 1% over the model: not a property of the kernel.)
    sim = zopt.load(out, device="cuda", dtype=torch.float32, backend="torch-dequant")
    assert rel_err(y, output(sim, cuda_in).cpu()) < 1e-4
    ref = reference_output(tiny_transformer_dir, tiny_reference_inputs)
    assert rel_err(y, ref) < 0.05 and cosine(y, ref) > 0.999  # the CPU artifact test's bounds


@pytest.mark.parametrize("rotate", [1, 64])
def test_int8_linear_takes_accelerate_offload_hooks(rotate):
    """Sequential CPU offload (accelerate's hooks, as diffusers' enable_sequential_cpu_offload sets
    them) moves every non-persistent buffer by name: the module has none that is None, and runs
    the same after the hooks are attached."""
    import torch
    from accelerate import cpu_offload

    from zopt.formats.lowbit.int8 import int8_linear, quantize_int8

    g = torch.Generator().manual_seed(0)
    q, s = quantize_int8(torch.randn(64, 128, generator=g))
    m = int8_linear(q, s, "torch-dequant-w8a8", rotate=rotate)
    x = torch.randn(3, 128, generator=g)
    before = m(x)
    cpu_offload(m, execution_device=torch.device("cpu"), offload_buffers=True)
    assert torch.equal(m(x), before)
