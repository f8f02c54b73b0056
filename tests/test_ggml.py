"""zopt's one GGML dequantizer: values identical to gguf-py's reference for every type it decodes,
the same decoder behind the read path, the quantizers' API and the loader, and clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from zopt import checkpoint, ggml
from zopt.errors import ShapeMismatch, UnsupportedFormat

QUANTIZED = [t for t in ggml.DECODERS if t not in ggml.FLOAT_DTYPES]


def random_blocks(qtype: GGMLQuantizationType, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random payload bytes whose f16 scales are finite and moderate (no inf/NaN scale, which
    would only compare NaN with NaN)."""
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    halves = rng.uniform(-2, 2, (data.shape[0], size // 2)).astype(np.float16).view(np.uint8)
    # every aligned 2-byte field may be an f16 scale: keep the exponent bits of each odd byte moderate
    data[:, 1::2] = (data[:, 1::2] & 0x83) | (halves[:, 1::2] & 0x7C)
    return data.reshape(-1)


@pytest.mark.parametrize("qtype", QUANTIZED, ids=lambda t: t.name)
def test_decoders_match_gguf_py_exactly(qtype):
    block = GGML_QUANT_SIZES[qtype][0]
    shape = (6, 4 * max(block, 32))
    data = random_blocks(qtype, *shape)
    theirs = np.asarray(gguf_quants.dequantize(data, qtype), dtype=np.float32).reshape(shape)
    assert np.isfinite(theirs).all()
    ours = ggml.dequantize(data, qtype, shape)
    np.testing.assert_array_equal(ours.numpy(), theirs)
    assert torch.equal(ggml.dequantize(torch.from_numpy(data), qtype.name.lower(), shape, torch.bfloat16),
                       ours.to(torch.bfloat16))


def test_types_without_a_torch_decoder_go_to_gguf_py():
    t = GGMLQuantizationType.IQ4_NL  # implemented by gguf-py only
    assert t not in ggml.DECODERS
    data = random_blocks(t, 2, 64)
    want = gguf_quants.dequantize(data, t).reshape(2, 64)
    np.testing.assert_array_equal(ggml.dequantize(data, t, (2, 64)).numpy(), want)
    with pytest.raises(UnsupportedFormat, match="Q8_K"):  # implemented by neither
        ggml.dequantize(np.zeros(GGML_QUANT_SIZES[GGMLQuantizationType.Q8_K][1], np.uint8), "Q8_K", (1, 256))


def test_bad_shapes_and_names():
    with pytest.raises(ShapeMismatch, match="multiple"):
        ggml.dequantize(np.zeros(34, np.uint8), "Q8_0", (2, 16))
    with pytest.raises(ShapeMismatch, match="needs 34 bytes"):
        ggml.dequantize(np.zeros(35, np.uint8), "Q8_0", (1, 32))
    with pytest.raises(UnsupportedFormat):
        ggml.dequantize(np.zeros(34, np.uint8), "Q7_0", (1, 32))


def test_chunked_cpu_decoding_equals_one_pass(monkeypatch):
    data = random_blocks(GGMLQuantizationType.Q4_K, 8, 1024, seed=2)
    whole = ggml.dequantize(data, "Q4_K", (8, 1024))
    monkeypatch.setattr(ggml, "DEQUANT_CHUNK", 3 * 256)  # pieces that cut rows
    assert torch.equal(ggml.dequantize(data, "Q4_K", (8, 1024)), whole)


def test_read_path_loader_and_quantizer_api_share_the_decoder(tmp_path):
    """A GGUF written by gguf-py (an independent writer) with quantized tensors: the read path's
    ``get``, ``dequantize_bytes``, ``quants.dequantize`` and the loader's raw layout all give
    gguf-py's values."""
    import gguf

    from zopt.formats.gguf import dequantize_bytes, loader, quants

    types = (GGMLQuantizationType.Q6_K, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q3_K)
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "lumina2")
    blobs = {}
    for i, t in enumerate(types):
        data = random_blocks(t, 4, 512, seed=i)
        blobs[f"t{i}"] = (t, data)
        w.add_tensor(f"t{i}", data.reshape(4, -1), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    src = checkpoint.open(tmp_path / "q.gguf")
    for name, (t, data) in blobs.items():
        want = torch.from_numpy(np.asarray(gguf_quants.dequantize(data.reshape(4, -1), t), np.float32))
        assert src.info(name).shape == (4, 512)
        got = src.get(name)
        assert got.dtype == torch.float32 and torch.equal(got, want), name
        assert torch.equal(dequantize_bytes(data, t.name, (4, 512)), want)
        assert torch.equal(quants.dequantize(data, t.name, (4, 512)), want)
        packed = loader.pack(torch.from_numpy(data), t.name, 4, 512)
        assert packed["kind"] == "raw" and torch.equal(loader.unpack(packed, 4, 512, torch.float32), want)
