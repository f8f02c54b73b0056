"""The GPU benchmark builds its models in memory; they must be the models users get from
``convert`` then ``load``: the same seeded weights through files give the same output."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """The bench's seeded tiny model saved as a diffusers folder, and one call's inputs."""
    import gpu_models as M
    import torch

    from zopt.families import zimage

    cfg = zimage.TINY_CONFIG
    root = tmp_path_factory.mktemp("gpu-models")
    M.build_plain(cfg, 3, "cpu").save_pretrained(root / "src", safe_serialization=True)
    return cfg, root, M.inputs(cfg, 64, 64, 40, "cpu", torch.float32)


@pytest.mark.slow
@pytest.mark.parametrize("fmt,backend", [("fp8", "fp8-storage"), ("nf4", "torch-dequant"),
                                         ("gguf:Q4_K_M", "torch-dequant")])
def test_in_memory_model_equals_converted_and_loaded(fmt, backend, seeded):
    import gpu_models as M
    import torch

    from zopt import formats

    cfg, root, example = seeded
    out = root / fmt.replace(":", "-")
    path = formats.convert(root / "src", fmt, out.with_suffix(".gguf") if fmt.startswith("gguf") else out,
                           options={"hash_source": False}, progress=False)
    loaded = formats.load(path, device="cpu", backend=backend, dtype=torch.float32)
    built = M.build(cfg, fmt, backend, 3, "cpu", dtype=torch.float32)
    a, b = M.forward(built, example), M.forward(loaded, example)
    assert rel_err(a, b) < 1e-5
    # and the quantization did something: the unquantized model differs
    assert rel_err(M.forward(M.build_plain(cfg, 3, "cpu", torch.float32), example), b) > 1e-3
