"""Quantized models under every offload mode on CUDA: the same image as with everything resident,
and the quantized kernel still the one running (offload hooks move buffers, not only parameters)."""

from __future__ import annotations

import pytest
from lowbit_helpers import artifact

pytestmark = pytest.mark.gpu

QUANTIZED = [("fp8", "scaled-mm"), ("int8_w8a8", "int-mm-cuda"), ("nf4", "bitsandbytes")]
OFFLOAD = ["model", "group-stream", "group", "sequential", "disk"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("offload-gpu")


def _image(model, offload: str, backend: str, out):
    import numpy as np
    from PIL import Image

    from zopt.runtime import pipeline as P

    pipe, choice = P.prepare(model, device="cuda", offload=offload, backend=backend, attention="auto",
                             width=64, height=64, disk_dir=out / "disk")
    assert (choice.offload, choice.backend) == (offload, backend)
    layers = [m for m in pipe.transformer.modules() if hasattr(m, "KERNELS")]
    assert layers and {m.backend for m in layers} == {backend}
    res = P.run(pipe, P.GenerateRequest(["a red cube on a table"], [5], steps=2, height=64, width=64), out / offload)
    return np.asarray(Image.open(res[0].path)).astype(int)


@pytest.mark.parametrize("fmt,backend", QUANTIZED, ids=[q[0] for q in QUANTIZED])
def test_quantized_offload_modes_match_resident(fmt, backend, root, tiny_transformer_dir, tmp_path):
    if backend == "bitsandbytes":
        pytest.importorskip("bitsandbytes")
    model = artifact(root, tiny_transformer_dir, fmt)
    resident = _image(model, "none", backend, tmp_path)
    assert resident.std() > 1, "the resident image is flat: nothing to compare against"
    for mode in OFFLOAD:
        img = _image(model, mode, backend, tmp_path)
        assert abs(img - resident).max() <= 2, f"{fmt} ({backend}) under --offload {mode} changed the image"
    assert list((tmp_path / "disk" / "transformer").glob("*.safetensors")), "disk offload wrote no weight files"
