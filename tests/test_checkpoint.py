"""The one read path: every source kind opens lazily and gives the same tensors."""

from __future__ import annotations

import json
import shutil
import struct
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from zopt import checkpoint
from zopt.errors import CorruptFile, OfflineError, PickleRefused, SourceNotFound
from zopt.families import zimage


def test_diffusers_folder_lazy_and_exact(tiny_dir, tiny_transformer_dir):
    src = checkpoint.open(tiny_dir)  # the pipeline folder resolves to transformer/
    ref = load_file(str(tiny_transformer_dir / "diffusion_pytorch_model.safetensors"))
    assert sorted(src.names()) == sorted(ref)
    assert src.kind == "diffusers" and src.config["dim"] == zimage.TINY_CONFIG["dim"]
    for n in src.names():
        info = src.info(n)
        assert info.shape == tuple(ref[n].shape) and info.dtype == "BF16"
        assert torch.equal(src.get(n), ref[n])


def test_sharded_folder(tmp_path, tiny_transformer_dir):
    ref = load_file(str(tiny_transformer_dir / "diffusion_pytorch_model.safetensors"))
    names = sorted(ref)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: ref[k] for k in keys}, str(tmp_path / fname))
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(tiny_transformer_dir / "config.json", tmp_path / "config.json")
    src = checkpoint.open(tmp_path)
    assert len(src.files) == 2 and sorted(src.names()) == names
    for n in names:
        assert torch.equal(src.get(n), ref[n])


def test_sharded_missing_shard_is_named(tmp_path, tiny_transformer_dir):
    (tmp_path / "x.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(SourceNotFound, match="gone.safetensors"):
        checkpoint.open(tmp_path)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_original_single_file(tmp_path, tiny_transformer_dir, prefix):
    d = checkpoint.open(tiny_transformer_dir)
    orig = zimage.as_original(d, prefix=prefix)
    path = tmp_path / "orig.safetensors"
    save_file({n: orig.get(n).contiguous() for n in orig.names()}, str(path))
    src = checkpoint.open(path)
    det = zimage.detect(src)
    assert (det.layout, det.prefix) == ("original", prefix)
    assert any(n.endswith("attention.qkv.weight") for n in src.names())
    back = zimage.as_diffusers(src)
    assert sorted(back.names()) == sorted(d.names())
    for n in d.names():
        assert torch.equal(back.get(n), d.get(n)), n


def test_get_releases_mapping(tiny_transformer_dir):
    # a tensor views only its own mapped region: dropping it releases the mapping
    import gc
    import weakref

    src = checkpoint.open(tiny_transformer_dir)
    t = src.get("layers.0.feed_forward.w1.weight")
    buf = t.untyped_storage()
    assert buf.nbytes() <= src.info("layers.0.feed_forward.w1.weight").nbytes + 2 * 65536
    ref = weakref.ref(t)
    del t, buf
    gc.collect()
    assert ref() is None


def test_gguf_source_reads_gguf_py_file(tmp_path):
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "lumina2")
    a = np.arange(64, dtype=np.float32).reshape(2, 32)
    w.add_tensor("x_pad_token", a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    src = checkpoint.open(tmp_path / "t.gguf")
    assert src.kind == "gguf" and src.info("x_pad_token").shape == (2, 32)
    assert torch.equal(src.get("x_pad_token"), torch.from_numpy(a))
    assert src.metadata["general.architecture"] == "lumina2"


def test_missing_path():
    with pytest.raises(SourceNotFound, match="no such file"):
        checkpoint.open("/nonexistent/model.safetensors")


def test_truncated_safetensors(tmp_path, tiny_transformer_dir):
    data = (tiny_transformer_dir / "diffusion_pytorch_model.safetensors").read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFile, match="truncated") as e:
        checkpoint.open(bad)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("payload", [b"", b"\x01\x00", struct.pack("<Q", 5) + b"{not", struct.pack("<Q", 2) + b"[]"])
def test_garbage_safetensors(tmp_path, payload):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(payload)
    with pytest.raises(CorruptFile):
        checkpoint.open(bad)


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\xff" * 40)
    with pytest.raises(CorruptFile, match="GGUF"):
        checkpoint.open(bad)


def test_pickle_refused_then_weights_only(tmp_path):
    p = tmp_path / "m.ckpt"
    torch.save({"state_dict": {"a": torch.ones(3)}}, p)
    with pytest.raises(PickleRefused, match="--allow-pickle"):
        checkpoint.open(p)
    src = checkpoint.open(p, allow_pickle=True)
    assert torch.equal(src.get("a"), torch.ones(3))

    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    torch.save({"a": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CorruptFile, match="weights_only"):
        checkpoint.open(tmp_path / "evil.pt", allow_pickle=True)


def test_hub_offline_fails_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    t0 = time.perf_counter()
    with pytest.raises(OfflineError, match="offline"):
        checkpoint.open("Tongyi-MAI/Z-Image-Turbo@main")
    assert time.perf_counter() - t0 < 10


def test_sparse_full_size_header_counts_params(tmp_path):
    """A full-size header over a sparse file: only headers are read, parameters are exact."""
    from zopt.families.zimage.synthetic import synthetic_header, synthetic_layout

    header, data_bytes = synthetic_header(synthetic_layout(zimage.FULL_CONFIG))
    path = tmp_path / "full.safetensors"
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + data_bytes)  # sparse: no data written
    src = checkpoint.open(path)
    assert src.num_params() == zimage.FULL_NUM_PARAMS == 6_154_908_736
    assert zimage.infer_config(src)["dim"] == 3840 and zimage.infer_config(src)["n_layers"] == 30


def test_hub_id_resolves_from_local_cache(monkeypatch, tmp_path, tiny_dir):
    """owner/name@revision is read from huggingface_hub's cache layout without any network."""
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = tmp_path / "models--acme--zimage-tiny" / "snapshots" / commit
    shutil.copytree(tiny_dir / "transformer", snap / "transformer")
    shutil.copy(tiny_dir / "model_index.json", snap / "model_index.json")
    refs = tmp_path / "models--acme--zimage-tiny" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for spec in ("acme/zimage-tiny", f"acme/zimage-tiny@{commit}", "acme/zimage-tiny@main"):
        src = checkpoint.open(spec)
        assert src.kind == "diffusers" and zimage.detect(src).layout == "diffusers", spec
    with pytest.raises(OfflineError):
        checkpoint.open("acme/zimage-tiny@v2")
