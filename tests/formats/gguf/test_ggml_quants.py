"""GGML block quantizers: bytes against gguf-py, decoding by gguf-py, K-quant error bounds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import quants as gguf_quants
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from zopt import ggml
from zopt.errors import ShapeMismatch, UnsupportedFormat
from zopt.formats.gguf import quants as gq


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The searches run thousands of small ops; on a shared 2-core box (pytest -n 2) thread hand-offs
    between busy cores cost more than they save, so each worker quantizes on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


BYTE_EXACT = ("F32", "F16", "BF16", "Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")
K_TYPES = ("Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K")


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


@pytest.mark.parametrize("name", gq.SUPPORTED)
def test_gguf_py_decodes_to_our_values(name):
    x = edge_case_matrix(cols=1024, seed=1)
    data = gq.quantize(torch.from_numpy(x), name).numpy()
    ours = gq.dequantize(torch.from_numpy(data), name, x.shape).numpy()
    theirs = gguf_decode(data, name, x.shape)
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("name", ("Q8_0", "Q5_1", "Q4_0", "Q6_K", "Q4_K", "Q3_K", "Q2_K"))
def test_chunked_passes_give_the_same_bytes_and_values(name, monkeypatch):
    """Quantize/dequantize work in chunks of blocks; chunk edges that cut rows change nothing."""
    x = torch.from_numpy(edge_case_matrix(rows=12, cols=1024, seed=3))
    imp = torch.rand(1024, generator=torch.Generator().manual_seed(0)) + 0.5
    whole, whole_imp = gq.quantize(x, name), gq.quantize(x, name, importance=imp)
    decoded = gq.dequantize(whole, name, x.shape)
    cls = gq.ggml_type(name)
    monkeypatch.setattr(cls, "chunk_weights", 3 * cls.block_size * (1 if cls.block_size == 256 else 5))
    monkeypatch.setattr(ggml, "DEQUANT_CHUNK", 7 * cls.block_size)
    assert torch.equal(gq.quantize(x, name), whole)
    assert torch.equal(gq.quantize(x, name, importance=imp), whole_imp)
    assert torch.equal(gq.dequantize(whole, name, x.shape, dtype=torch.bfloat16), decoded.to(torch.bfloat16))
    assert torch.equal(gq.dequantize(whole, name, x.shape), decoded)


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


# ---------------------------------------------------------------------------------------------
# K types: error against plain round-to-nearest with the same block structure, and stated bounds


def _f16(v: torch.Tensor) -> torch.Tensor:
    return v.half().float()


def _quantized_subscales(s: torch.Tensor, bits: int) -> torch.Tensor:
    """Sub-block scales (B, n_sub, 1) >= 0 stored as ``bits``-bit codes against an fp16 super-scale."""
    qmax = (1 << bits) - 1
    d = _f16(s.amax(1, keepdim=True) / qmax)
    return d * torch.round(s / torch.where(d > 0, d, torch.ones_like(d))).clamp(0, qmax)


def rtn_min_max(x: torch.Tensor, sub: int, nmax: int, scale_bits: int) -> torch.Tensor:
    """Asymmetric round-to-nearest on (min, max) per sub-block, Q4_K/Q5_K/Q2_K structure."""
    xs = x.reshape(-1, 256 // sub, sub)
    mn = xs.amin(-1, keepdim=True).clamp(max=0)
    scale = _quantized_subscales((xs.amax(-1, keepdim=True) - mn) / nmax, scale_bits)
    the_min = _quantized_subscales(-mn, scale_bits)
    q = torch.round((xs + the_min) / torch.where(scale > 0, scale, torch.ones_like(scale))).clamp(0, nmax)
    return (scale * q - the_min).reshape(x.shape)


def rtn_symmetric(x: torch.Tensor, nmax: int, scale_bits: int) -> torch.Tensor:
    """Symmetric round-to-nearest per 16-weight sub-block (largest magnitude -> -nmax), Q6_K/Q3_K structure."""
    xs = x.reshape(-1, 16, 16)
    peak = xs.gather(-1, xs.abs().argmax(-1, keepdim=True))
    scale = peak / -nmax
    mag = _quantized_subscales(scale.abs(), scale_bits - 1)
    scale = torch.sign(scale) * mag
    q = torch.round(xs / torch.where(scale != 0, scale, torch.ones_like(scale))).clamp(-nmax, nmax - 1)
    return (scale * q).reshape(x.shape)


RTN = {
    "Q6_K": lambda x: rtn_symmetric(x, 32, 8),
    "Q5_K": lambda x: rtn_min_max(x, 32, 31, 6),
    "Q4_K": lambda x: rtn_min_max(x, 32, 15, 6),
    "Q3_K": lambda x: rtn_symmetric(x, 4, 6),
    "Q2_K": lambda x: rtn_min_max(x, 16, 3, 4),
}

# Bounds on RMSE / std for N(0, 1) weights: plain rounding with the step a sub-block's range gives
# (range of 32 normals ~4.1 sigma, of 16 ~3.5 sigma; error ~ step/sqrt(12)). Measured: Q6_K 0.018,
# Q5_K 0.036, Q4_K 0.072, Q3_K 0.151, Q2_K 0.298.
NORMAL_BOUND = {"Q6_K": 0.02, "Q5_K": 0.04, "Q4_K": 0.08, "Q3_K": 0.17, "Q2_K": 0.32}


def rel_rmse(y: torch.Tensor, x: torch.Tensor) -> float:
    return float(((y - x) ** 2).mean().sqrt() / x.std())


@pytest.fixture(scope="module")
def k_data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(32, 2048, generator=g)
    # Student-t with 3 degrees of freedom: heavy tails like real transformer weights
    chi2 = (torch.randn(3, 32, 2048, generator=g) ** 2).sum(0)
    heavy = torch.randn(32, 2048, generator=g) / torch.sqrt(chi2 / 3)
    return {"normal": normal, "heavy": heavy}


@pytest.mark.parametrize("name", K_TYPES)
def test_k_quant_beats_round_to_nearest(name, k_data):
    for label, x in k_data.items():
        ours = rel_rmse(gq.dequantize(gq.quantize(x, name), name, x.shape), x)
        rtn = rel_rmse(RTN[name](x), x)
        # ggml's searches fit x^2- or |x|-weighted errors, so on plain RMSE the gain over rounding is
        # 2-10% (smallest for Q3_K/Q6_K on heavy tails, where the weighting favours the outliers).
        margin = 0.98 if label == "normal" else 1.0
        assert ours < margin * rtn, f"{name} on {label}: {ours:.4f} vs round-to-nearest {rtn:.4f}"
        if label == "normal":
            assert ours < NORMAL_BOUND[name], f"{name}: relative RMSE {ours:.4f}"


@pytest.mark.parametrize("name", K_TYPES)
def test_k_quant_edge_blocks(name):
    x = torch.from_numpy(edge_case_matrix(rows=16, cols=1024, seed=2))
    y = gq.dequantize(gq.quantize(x, name), name, x.shape)
    assert torch.isfinite(y).all()
    assert torch.equal(y[0], torch.zeros_like(y[0]))  # all-zero blocks stay exactly zero
    assert (y[1] - 3.0).abs().max() < 2e-3  # constant blocks: only fp16 rounding of the scale/min
    for row in (2, 3, 5, 6, 10):  # one-signed, large, heavy-tailed rows: within 1.5x the normal bound
        assert rel_rmse(y[row], x[row]) < 1.5 * NORMAL_BOUND[name], row


IMPORTANCE_TYPES = ("Q5_1", "Q5_0", "Q4_1", "Q4_0") + K_TYPES


@pytest.mark.parametrize("name", IMPORTANCE_TYPES)
def test_importance_path_lowers_error_where_it_is_asked(name, k_data):
    x = k_data["normal"][:16]
    ref = rel_rmse(gq.dequantize(gq.quantize(x, name), name, x.shape), x)
    ones = rel_rmse(gq.dequantize(gq.quantize(x, name, importance=torch.ones(x.shape[1])), name, x.shape), x)
    # ggml's importance searches minimise the (near-uniformly) weighted squared error directly
    assert ones < ref, f"{name}: {ones:.4f} with unit importance vs {ref:.4f} reference"
    # weighting every other column 100x makes those weights come out more accurately
    focus = torch.arange(x.shape[1]) % 2 == 0
    imp = torch.where(focus, 100.0, 1.0)
    y = gq.dequantize(gq.quantize(x, name, importance=imp), name, x.shape)
    y1 = gq.dequantize(gq.quantize(x, name, importance=torch.ones(x.shape[1])), name, x.shape)
    err = ((y - x)[:, focus] ** 2).mean()
    err1 = ((y1 - x)[:, focus] ** 2).mean()
    assert err < err1, f"{name}: emphasised weights {err:.5f} vs {err1:.5f} unweighted"


def test_importance_must_match_row_length():
    with pytest.raises(ShapeMismatch):
        gq.quantize(torch.zeros(2, 256), "Q4_K", importance=torch.ones(128))


# ---------------------------------------------------------------------------------------------
# Peer: ggml itself, from the library stable-diffusion-cpp-python builds (ggml_quantize_chunk)


def _ggml_library():
    sd_cpp = pytest.importorskip("stable_diffusion_cpp", reason="stable-diffusion-cpp-python is not installed")
    import ctypes
    from pathlib import Path

    libs = sorted((Path(sd_cpp.__file__).parent / "lib").glob("libstable-diffusion*"))
    if not libs:
        pytest.skip("stable-diffusion-cpp-python ships no shared library here")
    lib = ctypes.CDLL(str(libs[0]))
    if not hasattr(lib, "ggml_quantize_chunk"):
        pytest.skip("the stable-diffusion.cpp library does not export ggml_quantize_chunk")
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def ggml_quantize(lib, x: np.ndarray, name: str, importance: np.ndarray | None = None) -> np.ndarray:
    """ggml's own bytes for x (rows, cols); without importance ggml runs its reference quantizer."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.zeros((x.shape[0], gq.row_bytes(name, x.shape[1])), dtype=np.uint8)
    imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    lib.ggml_quantize_chunk(int(GGMLQuantizationType[name]), x.ctypes.data, out.ctypes.data, 0, x.shape[0],
                            x.shape[1], None if imp is None else imp.ctypes.data)
    return out


# Fraction of blocks whose bytes equal ggml's reference quantizer on the data below. The legacy types,
# Q6_K and Q3_K follow the C float operations exactly; the make_qkx2 types sum in a different order
# (and Q4_K/Q5_K score candidates from sums), so near-ties in the search resolve differently in a few
# blocks (measured 82-96% identical, RMSE within 0.1%).
SAME_BLOCKS = {"Q8_0": 1.0, "Q5_1": 1.0, "Q5_0": 1.0, "Q4_1": 1.0, "Q4_0": 1.0, "Q6_K": 0.999, "Q3_K": 0.999,
               "Q5_K": 0.7, "Q4_K": 0.85, "Q2_K": 0.8}


@pytest.mark.peer
@pytest.mark.parametrize("name", list(SAME_BLOCKS))
def test_matches_ggml_reference_quantizer(name, k_data):
    lib = _ggml_library()
    ts = gq.type_size(name)
    for label, x in k_data.items():
        theirs = ggml_quantize(lib, x.numpy(), name)
        ours = gq.quantize(x, name).numpy()
        same = (ours.reshape(-1, ts) == theirs.reshape(-1, ts)).all(1).mean()
        assert same >= SAME_BLOCKS[name], f"{name} on {label}: {same:.4f} of blocks identical"
        e_ours = rel_rmse(gq.dequantize(torch.from_numpy(ours), name, x.shape), x)
        e_ggml = rel_rmse(gq.dequantize(torch.from_numpy(theirs), name, x.shape), x)
        assert e_ours <= 1.01 * e_ggml, f"{name} on {label}: RMSE {e_ours:.5f} vs ggml {e_ggml:.5f}"


@pytest.mark.peer
@pytest.mark.parametrize("name", IMPORTANCE_TYPES)
def test_matches_ggml_importance_quantizer(name, k_data):
    lib = _ggml_library()
    ts = gq.type_size(name)
    for label, x in k_data.items():
        theirs = ggml_quantize(lib, x.numpy(), name, np.ones(x.shape[1], dtype=np.float32))
        ours = gq.quantize(x, name, importance=torch.ones(x.shape[1])).numpy()
        same = (ours.reshape(-1, ts) == theirs.reshape(-1, ts)).all(1).mean()
        assert same >= 0.85, f"{name} on {label}: {same:.4f} of blocks identical"  # measured 0.92-1.0
        e_ours = rel_rmse(gq.dequantize(torch.from_numpy(ours), name, x.shape), x)
        e_ggml = rel_rmse(gq.dequantize(torch.from_numpy(theirs), name, x.shape), x)
        assert e_ours <= 1.01 * e_ggml, f"{name} on {label}: RMSE {e_ours:.5f} vs ggml {e_ggml:.5f}"


@pytest.mark.peer
def test_k_quant_rmse_within_1pct_of_stable_diffusion_cpp_convert(tmp_path, k_data):
    """stable-diffusion.cpp's converter (ggml with a unit importance matrix) on a safetensors file; its
    GGUF read back with gguf-py. zopt with unit importance stays within 1% RMSE of it, and zopt's
    reference path (no importance) stays within the gap between ggml's own two paths."""
    pytest.importorskip("stable_diffusion_cpp", reason="stable-diffusion-cpp-python is not installed")
    from gguf import GGUFReader
    from safetensors.torch import save_file
    from stable_diffusion_cpp import stable_diffusion_cpp as sd_cpp

    for label, x in k_data.items():
        src = tmp_path / f"{label}.safetensors"
        save_file({"w.weight": x.contiguous()}, str(src))
        for name in K_TYPES:
            out = tmp_path / f"{label}-{name}.gguf"
            assert sd_cpp.convert(str(src).encode(), b"", str(out).encode(), int(GGMLQuantizationType[name]), b"", False)
            (tensor,) = GGUFReader(out).tensors
            assert tensor.tensor_type == GGMLQuantizationType[name]
            theirs = rel_rmse(gq.dequantize(np.array(tensor.data), name, x.shape), x)
            ours = rel_rmse(gq.dequantize(gq.quantize(x, name, importance=torch.ones(x.shape[1])), name, x.shape), x)
            assert ours <= 1.01 * theirs, f"{name} on {label}: {ours:.5f} vs stable-diffusion.cpp {theirs:.5f}"
