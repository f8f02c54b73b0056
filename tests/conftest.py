"""Shared fixtures: the embedded tiny model is built once per session (per xdist worker)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Keep tests off the user's cache and the network.
_REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("ZOPT_CACHE", str(_REPO / ".pytest_cache" / "zopt-cache"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch.compile costs 10-20 s per model on first use; the compiled paths have their own tests
# (tests/formats/gguf/test_gguf_int8.py), every other test runs them eagerly
os.environ.setdefault("ZOPT_COMPILE", "0")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        # the marker itself, not keywords: keywords also hold folder names (a checkout in "gpu/")
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dir() -> Path:
    """The seeded random tiny pipeline folder (model_index.json, transformer/, vae/, ...): the
    shapes of ``zimage.TINY_CONFIG``, which format tests are written against."""
    from zopt.families.zimage.tiny import tiny_pipeline_dir

    return tiny_pipeline_dir()


@pytest.fixture(scope="session")
def tiny_transformer_dir(tiny_dir) -> Path:
    return tiny_dir / "transformer"


@pytest.fixture(scope="session")
def tiny_original_file(tmp_path_factory, tiny_transformer_dir) -> Path:
    """The tiny transformer in the original/ComfyUI single-file layout (fused qkv)."""
    from safetensors.torch import save_file

    from zopt import checkpoint
    from zopt.families import zimage

    src = zimage.as_original(checkpoint.open(tiny_transformer_dir))
    out = tmp_path_factory.mktemp("orig") / "tiny-original.safetensors"
    save_file({n: src.get(n).contiguous() for n in src.names()}, str(out))
    return out


@pytest.fixture(scope="session")
def tiny_reference_inputs():
    """Deterministic transformer inputs for the tiny model: (x list, t, cap_feats list)."""
    import torch

    from zopt.families import zimage

    g = torch.Generator().manual_seed(1234)
    cfg = zimage.TINY_CONFIG
    x = [torch.randn(cfg["in_channels"], 1, 32, 32, generator=g)]
    cap = [torch.randn(40, cfg["cap_feat_dim"], generator=g)]
    t = torch.tensor([0.6])
    return x, t, cap


def rel_err(a, b) -> float:
    """Relative L2 error ||a-b|| / ||b||."""
    a, b = a.float().flatten(), b.float().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_transformer_dir):
    """``tiny_gguf("Q4_K_M")`` -> the tiny transformer converted to that GGUF type (converted once
    per session and worker, on first use)."""
    from zopt.formats import convert

    out = tmp_path_factory.mktemp("tiny-gguf")
    made: dict[str, Path] = {}

    def get(subtype: str) -> Path:
        if subtype not in made:
            made[subtype] = convert(tiny_transformer_dir, f"gguf:{subtype}", out / f"tiny-{subtype}.gguf",
                                    progress=False)
        return made[subtype]

    return get
