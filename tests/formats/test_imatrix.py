"""Importance matrices on disk: llama.cpp's GGUF imatrix format (written, read back, read by gguf-py)
and the legacy .dat format of llama.cpp and stable-diffusion.cpp."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from zopt.errors import CorruptFile, ZoptError
from zopt.formats.imatrix import Imatrix, Stat, read, write


def _sample() -> Imatrix:
    rng = np.random.default_rng(0)
    entries = {
        "layers.0.attention.qkv.weight": Stat(rng.random(256) * 10, 640.0, rng.random(256).astype(np.float32)),
        "layers.0.feed_forward.w2.weight": Stat(rng.random(512), 640.0, None),
    }
    return Imatrix(entries, ["test prompts"], 5, 1)


def test_round_trip_and_gguf_py_reads_llama_cpp_layout(tmp_path):
    import gguf

    path = write(_sample(), tmp_path / "m.imatrix")
    im = read(path)
    want = _sample()
    assert set(im.entries) == set(want.entries)
    for name, st in want.entries.items():
        np.testing.assert_allclose(im.entries[name].sum2, st.sum2.astype(np.float32), rtol=0)
        assert im.entries[name].count == st.count
        np.testing.assert_allclose(im.importance(name, st.sum2.size), (st.sum2 / st.count).astype(np.float32),
                                   rtol=1e-6)
    np.testing.assert_array_equal(im.absmax("layers.0.attention.qkv.weight"),
                                  want.entries["layers.0.attention.qkv.weight"].absmax)
    assert im.datasets == ["test prompts"] and im.chunk_count == 5 and len(im.sha256) == 64

    r = gguf.GGUFReader(path)
    assert str(bytes(r.fields["general.type"].parts[-1]), "utf-8") == "imatrix"
    for key in ("imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"):
        assert key in r.fields
    t = {x.name: x for x in r.tensors}
    # ggml order: ne0 = input channels, ne1 = matrices (one)
    assert t["layers.0.attention.qkv.weight.in_sum2"].shape.tolist() == [256, 1]
    assert t["layers.0.attention.qkv.weight.counts"].shape.tolist() == [1, 1]
    assert float(t["layers.0.feed_forward.w2.weight.counts"].data.reshape(-1)[0]) == 640.0


def _dat(entries: dict[str, tuple[int, np.ndarray]], chunks: int = 3) -> bytes:
    out = struct.pack("<i", len(entries))
    for name, (ncall, mean) in entries.items():
        b = name.encode()
        out += struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, mean.size)
        out += (mean * ncall).astype("<f4").tobytes()  # stored as mean * ncall
    return out + struct.pack("<i", chunks)


def test_reads_stable_diffusion_cpp_legacy_dat(tmp_path):
    mean = np.linspace(0.5, 2.0, 64).astype(np.float32)
    p = tmp_path / "sd.dat"
    p.write_bytes(_dat({"model.diffusion_model.layers.1.feed_forward.w1.weight": (7, mean)}))
    im = read(p)
    assert im.chunk_count == 3
    np.testing.assert_allclose(im.importance("layers.1.feed_forward.w1.weight", 64), mean, rtol=1e-6)
    with pytest.raises(ZoptError, match="64 channels"):
        im.importance("layers.1.feed_forward.w1.weight", 128)


@pytest.mark.parametrize("payload", [b"", b"\x05\x00\x00\x00abc", b"GGUF\x03\x00\x00\x00garbage",
                                     struct.pack("<i", -1)])
def test_damaged_files_are_one_line_errors(tmp_path, payload):
    p = tmp_path / "bad.imatrix"
    p.write_bytes(payload)
    with pytest.raises(CorruptFile) as e:
        read(p)
    assert "bad.imatrix" in str(e.value) and "\n" not in str(e.value)


def test_negative_sums_are_refused(tmp_path):
    p = tmp_path / "neg.dat"
    p.write_bytes(_dat({"x.weight": (1, np.array([1.0, -1.0] * 16, np.float32))}))
    with pytest.raises(CorruptFile, match="negative"):
        read(p)
