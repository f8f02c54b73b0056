"""GGML block quantizers: bytes against gguf-py, decoding by gguf-py, K-quant error bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from zopt.errors import ShapeMismatch, UnsupportedFormat
from zopt.formats import ggml_quants as gq

BYTE_EXACT = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")


def edge_case_matrix(rows: int = 48, cols: int = 512, seed: int = 0) -> np.ndarray:
    """Random normal rows plus rows that stress the rounding and degenerate-block paths."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    x[0] = 0.0  # all-zero blocks
    x[1] = 3.0  # constant blocks
    x[2] = -np.abs(x[2])  # negative-only
    x[3] = np.abs(x[3])  # positive-only
    x[4] *= 1e-6  # small magnitudes
    x[5] *= 1e3  # large magnitudes
    x[6] = rng.standard_t(2, cols).astype(np.float32)  # heavy tails
    x[7] = np.round(rng.standard_normal(cols) * 4) / 4  # values on a grid: exact .5 ties after scaling
    x[8, :32] = 1e-30  # subnormal-ish constant block
    x[8, 32:64] = -2.5
    x[9, ::2] = 0.0  # half zeros
    x[10] = np.linspace(-1, 1, cols, dtype=np.float32)
    x[11, 1::32] = 7.0  # a single outlier per block
    return x


def gguf_bytes(x: np.ndarray, name: str) -> np.ndarray:
    ref = gguf_quants.quantize(x, GGMLQuantizationType[name])
    return np.ascontiguousarray(ref).view(np.uint8).reshape(x.shape[0], -1)


def gguf_decode(data: np.ndarray, name: str, shape) -> np.ndarray:
    qtype = GGMLQuantizationType[name]
    if name == "F32":
        data = data.view(np.float32)
    elif name == "F16":
        data = data.view(np.float16)
    return np.asarray(gguf_quants.dequantize(data, qtype), dtype=np.float32).reshape(shape)


def test_sizes_come_from_gguf_table():
    for name in gq.SUPPORTED:
        bs, ts = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
        assert (gq.block_size(name), gq.type_size(name)) == (bs, ts)
        assert gq.row_bytes(name, 4 * 256) == 4 * 256 // bs * ts
        assert gq.bits_per_weight(name) == pytest.approx(8 * ts / bs)
    assert gq.bits_per_weight("Q8_0") == 8.5
    assert gq.block_size(GGMLQuantizationType.Q4_0) == gq.block_size("q4_0") == 32


@pytest.mark.parametrize("name", BYTE_EXACT)
def test_bytes_identical_to_gguf_py(name):
    x = edge_case_matrix()
    ours = gq.quantize(torch.from_numpy(x), name)
    assert ours.dtype == torch.uint8 and tuple(ours.shape) == (x.shape[0], gq.row_bytes(name, x.shape[1]))
    ref = gguf_bytes(x, name)
    mismatch = np.argwhere(ours.numpy() != ref)
    assert mismatch.size == 0, f"{name}: {len(mismatch)} bytes differ, first at {mismatch[:3].tolist()}"


@pytest.mark.parametrize("name", BYTE_EXACT)
def test_gguf_py_decodes_to_our_values(name):
    x = edge_case_matrix(seed=1)
    data = gq.quantize(torch.from_numpy(x), name).numpy()
    ours = gq.dequantize(torch.from_numpy(data), name, x.shape).numpy()
    theirs = gguf_decode(data, name, x.shape)
    np.testing.assert_array_equal(ours, theirs)


def test_bf16_nan_inf_and_rounding_ties_match_gguf_py():
    bits = np.array([
        0x7FC00000, 0x7F800001, 0xFF812345, 0x7F800000, 0xFF800000,  # NaNs (quiet/signalling), +-inf
        0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F80FFFF, 0x7F7FFFFF,  # ties to even, near max
        0x00000001, 0x80000000,  # subnormal, -0
    ] * 4, dtype=np.uint32)
    x = bits.view(np.float32).reshape(4, -1)
    ours = gq.quantize(torch.from_numpy(x.copy()), "BF16").numpy()
    np.testing.assert_array_equal(ours, gguf_bytes(x, "BF16"))


def test_dequantize_dtype_shape_and_numpy_input():
    x = edge_case_matrix(rows=16, cols=256)[:8]
    data = gq.quantize(torch.from_numpy(x).reshape(2, 4, 256), "Q4_0")
    assert tuple(data.shape) == (2, 4, 144)
    flat = data.numpy().reshape(-1)
    out32 = gq.dequantize(flat, "Q4_0", (8, 256))
    out16 = gq.dequantize(torch.from_numpy(flat), GGMLQuantizationType.Q4_0, (8, 256), dtype=torch.bfloat16)
    assert out32.dtype == torch.float32 and out16.dtype == torch.bfloat16
    assert torch.equal(out32.to(torch.bfloat16), out16)


def test_bad_input_raises_zopt_errors():
    with pytest.raises(UnsupportedFormat):
        gq.quantize(torch.zeros(32), "Q7_0")
    with pytest.raises(UnsupportedFormat):
        gq.block_size("IQ2_XXS")  # a real GGML type we do not implement
    with pytest.raises(ShapeMismatch):
        gq.quantize(torch.zeros(4, 48), "Q4_0")
    with pytest.raises(ShapeMismatch):
        gq.dequantize(torch.zeros(17, dtype=torch.uint8), "Q4_0", (1, 32))
