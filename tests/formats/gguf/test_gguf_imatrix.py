"""Importance-weighted GGUF quantization (``--imatrix``): ggml's weighted searches lower the
importance-weighted error, a conversion uses the file's entries and records it, and a mismatched
file is refused before anything is written."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zopt import checkpoint
from zopt.errors import ZoptError
from zopt.formats import convert
from zopt.formats.gguf import plan_for, quants
from zopt.formats.imatrix import Imatrix, Stat, write


def _weighted_err(w, qtype, imp, use_imp: bool) -> float:
    q = quants.quantize(w, qtype, imp if use_imp else None)
    d = quants.dequantize(q, qtype, tuple(w.shape))
    return float(((w - d).square() * imp).sum())


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_weighted_search_lowers_weighted_error(qtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 512, generator=g)
    imp = torch.exp(1.5 * torch.randn(512, generator=g))  # heavy-tailed channel importance, as activations
    plain, weighted = _weighted_err(w, qtype, imp, False), _weighted_err(w, qtype, imp, True)
    # measured 0.41 (Q2_K) .. 0.70 (Q5_0) on this seed
    assert weighted < 0.8 * plain, (qtype, weighted / plain)


def tiny_imatrix(src, n_cols_fix=None) -> Imatrix:
    """An imatrix for every 2-D weight of ``src`` (original layout) with seeded heavy-tailed values."""
    rng = np.random.default_rng(1)
    entries = {}
    for name in src.names():
        shape = src.info(name).shape
        if len(shape) == 2 and name.endswith(".weight"):
            n = n_cols_fix or shape[1]
            entries[name] = Stat(np.exp(1.5 * rng.standard_normal(n)) * 100, 100.0, np.ones(n, np.float32))
    return Imatrix(entries, ["seeded"], 1, 1)


def test_convert_uses_and_records_the_imatrix(tmp_path, tiny_transformer_dir, tiny_gguf):
    import gguf

    from zopt.formats.gguf import dequantize_bytes

    src = checkpoint.open(tiny_transformer_dir)
    from zopt.families import zimage

    view = zimage.as_original(src)
    im = tiny_imatrix(view)
    path = write(im, tmp_path / "tiny.imatrix")
    out = convert(tiny_transformer_dir, "gguf:Q4_K", tmp_path / "w.gguf", options={"imatrix": str(path)},
                  progress=False)
    plain = gguf.GGUFReader(tiny_gguf("Q4_K"))
    mine = gguf.GGUFReader(out)
    meta = checkpoint.open(out).metadata
    from zopt.formats.imatrix import read

    assert meta["zopt.imatrix.sha256"] == read(path).sha256
    assert meta["zopt.imatrix.file"] == "tiny.imatrix"
    _, plans = plan_for(src, "Q4_K", {})
    # Q8_0 (the sensitive weights) ignores the importance matrix, as in ggml: byte-identical below
    quantized = {p.name: p for p in plans if p.qtype not in ("F32", "BF16", "Q8_0")}
    assert quantized
    theirs = {t.name: t for t in plain.tensors}
    better = 0
    for t in mine.tensors:
        if t.name not in quantized:
            assert np.array_equal(np.asarray(t.data), np.asarray(theirs[t.name].data)), t.name
            continue
        p = quantized[t.name]
        w = view.get(t.name).float().reshape(p.shape)
        imp = torch.from_numpy(im.importance(t.name, p.shape[-1]))
        errs = [float(((w - dequantize_bytes(np.asarray(r.data), p.qtype, p.shape)).square() * imp).sum())
                for r in (t, theirs[t.name])]
        better += errs[0] < errs[1]
    assert better == len(quantized)  # every quantized tensor: lower importance-weighted error


def test_mismatched_imatrix_is_refused_before_writing(tmp_path, tiny_transformer_dir):
    from zopt.families import zimage

    view = zimage.as_original(checkpoint.open(tiny_transformer_dir))
    path = write(tiny_imatrix(view, n_cols_fix=64), tmp_path / "wrong.imatrix")
    out = tmp_path / "x.gguf"
    with pytest.raises(ZoptError, match="channels"):
        convert(tiny_transformer_dir, "gguf:Q4_K", out, options={"imatrix": str(path)}, progress=False)
    assert not out.exists()
    other = write(Imatrix({"blk.0.ffn_down.weight": Stat(np.ones(8), 1.0)}), tmp_path / "llm.imatrix")
    with pytest.raises(ZoptError, match="no entry"):
        convert(tiny_transformer_dir, "gguf:Q4_K", out, options={"imatrix": str(other)}, progress=False)
    assert not out.exists()
