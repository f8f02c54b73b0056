"""GGUF conversion of the tiny model: every type, read back by gguf-py, atomic on failure."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zopt import checkpoint
from zopt.formats.gguf import AUTO_TYPES_KEY
from zopt.formats.gguf import recipes as gguf_recipes

ALL_TYPES = list(gguf_recipes.RECIPES)


@pytest.fixture(scope="module")
def converted(tiny_gguf):
    """Every GGUF type of the tiny model: {subtype: path}."""
    return {t: tiny_gguf(t) for t in ALL_TYPES}


@pytest.mark.parametrize("subtype", ALL_TYPES)
def test_gguf_py_decodes_every_tensor_to_zopt_values(tiny_gguf, tiny_transformer_dir, subtype):
    import gguf
    import torch

    from zopt.formats.gguf import dequantize_bytes, plan_for

    reader = gguf.GGUFReader(tiny_gguf(subtype))
    _, plans = plan_for(checkpoint.open(tiny_transformer_dir), subtype, {})
    want = {p.name: p for p in plans}
    assert [t.name for t in reader.tensors] == [p.name for p in plans]
    # the uniform types store the rule's types; the others the measured ones they record (or, where
    # the measurement found nothing better, the rule's, with no map)
    recorded = reader.fields.get(AUTO_TYPES_KEY)
    assert recorded is None or gguf_recipes.recipe(subtype).measured
    types = json.loads(recorded.contents()) if recorded is not None else {p.name: p.qtype for p in plans}
    for t in reader.tensors:
        p = want[t.name]
        assert t.tensor_type.name == types[t.name], t.name
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        assert shape == p.shape, t.name
        theirs = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        ours = dequantize_bytes(np.asarray(t.data), t.tensor_type.name, shape, torch.float32).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-7, err_msg=t.name)


def test_metadata_and_layout(converted, tiny_transformer_dir):
    import gguf

    from zopt import __version__

    src = checkpoint.open(tiny_transformer_dir)
    r = gguf.GGUFReader(converted["Q4_K_M"])
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == "lumina2"
    assert f["general.file_type"] == 15 and f["general.quantization_version"] == 2
    assert f["zopt.recipe"] == "Q4_K_M" and f["zopt.version"] == __version__
    assert f["zopt.source.sha256"] == src.sha256()
    names = {t.name: t for t in r.tensors}
    # ComfyUI layout: fused qkv, no prefix, 2-D pad tokens (GGUF dims innermost first)
    assert "layers.0.attention.qkv.weight" in names and "layers.0.attention.to_q.weight" not in names
    assert not any(n.startswith("model.diffusion_model.") for n in names)
    assert list(names["x_pad_token"].shape) == [384, 1] and names["x_pad_token"].tensor_type.name == "F32"
    # ComfyUI-GGUF's lumina2 detection keys
    assert "cap_embedder.1.weight" in names and "context_refiner.0.attention.qkv.weight" in names


def test_k_quant_recipe_file_sizes_follow_bits(converted):
    size = {t: p.stat().st_size for t, p in converted.items()}
    assert size["F32"] > size["BF16"] > size["Q8_0"] > size["Q6_K"] > size["Q5_K_M"] > size["Q4_K_M"] \
        > size["Q4_K_S"] > size["Q3_K_S"] > size["Q2_K"]


class _FailingSource(checkpoint.TensorSource):
    """Wraps a source; reading the ``fail_at``-th tensor raises (an I/O error mid-conversion)."""

    def __init__(self, base, fail_at: int):
        self.base, self.fail_at, self.reads = base, fail_at, 0
        self.path, self.kind, self.metadata = base.path, base.kind, base.metadata
        self.config = getattr(base, "config", None)

    def names(self):
        return self.base.names()

    def info(self, name):
        return self.base.info(name)

    @property
    def files(self):
        return self.base.files

    def get(self, name):
        self.reads += 1
        if self.reads >= self.fail_at:
            raise OSError("disk went away")
        return self.base.get(name)


def test_failed_conversion_leaves_nothing(tmp_path, tiny_transformer_dir):
    from zopt.formats import convert

    src = _FailingSource(checkpoint.open(tiny_transformer_dir), fail_at=12)
    out = tmp_path / "out.gguf"
    with pytest.raises(OSError, match="disk went away"):
        convert(src, "gguf:Q4_K_M", out, progress=False, options={"hash_source": False})
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_cli_convert_and_list_types(tmp_path, tiny_transformer_dir, capsys):
    from zopt.cli import main

    out = tmp_path / "cli.gguf"
    assert main(["convert", str(tiny_transformer_dir), "--to", "gguf:Q5_K_S", "-o", str(out), "--no-progress",
                 "--no-hash"]) == 0
    got = checkpoint.open(out)
    assert got.info("layers.0.feed_forward.w2.weight").dtype == "Q5_K"  # rows of 1024
    assert got.info("layers.0.feed_forward.w1.weight").dtype == "Q5_1"  # rows of 384: the 32-block fallback
    from zopt.commands.convert import list_types

    rows = {spec: bits for spec, bits, _ in list_types()}
    assert rows["gguf:Q4_K_M"] == f"{dict((n, b) for n, b, _ in gguf_recipes.list_types())['Q4_K_M']:.2f}"
    assert {f"gguf:{t}" for t in ALL_TYPES} <= set(rows)


def test_parallel_workers_write_the_same_bytes(tiny_transformer_dir, tmp_path):
    """Row chunks quantized by several worker threads are written in file order: same file as one
    worker (the converter's default on a multi-core machine is several)."""
    from zopt.formats import convert

    outs = []
    for workers in (1, 3):
        out = tmp_path / f"w{workers}.gguf"
        convert(tiny_transformer_dir, "gguf:Q4_K_M", out, options={"workers": workers, "compile": False})
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
