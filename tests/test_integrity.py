"""Integrity that cannot be bypassed: each test is a way around a checksum or out of a folder."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from zopt import formats, publish
from zopt.errors import ChecksumMismatch, CorruptFile, ZoptError

W = "diffusion_pytorch_model.safetensors"
M = "zopt-manifest.json"


@pytest.fixture(scope="module")
def bf16(tmp_path_factory, tiny_transformer_dir):
    return formats.convert(tiny_transformer_dir, "bf16", tmp_path_factory.mktemp("bf16") / "bf16", progress=False)


def _copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _flip(path, at=-100, n=1):
    b = bytearray(path.read_bytes())
    for i in range(n):
        b[at - 7 * i] ^= 0x40
    path.write_bytes(bytes(b))


def _edit(path, fn, redigest=True):
    """Edit a manifest; by default its own digest is recomputed, so the checks behind it are tested."""
    from zopt.formats.artifact import manifest_digest

    m = json.loads(path.read_text())
    fn(m)
    if redigest and "manifest_sha256" in m:
        m["manifest_sha256"] = manifest_digest(m)
    path.write_text(json.dumps(m))


def test_unlisted_index_and_shard_do_not_load(tmp_path, bf16):
    art = _copy(bf16, tmp_path / "a")
    shutil.copyfile(art / W, art / "evil-00001-of-00001.safetensors")
    _flip(art / "evil-00001-of-00001.safetensors")
    from zopt import checkpoint

    names = checkpoint.open(art / W).names()
    (art / "x.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "evil-00001-of-00001.safetensors" for n in names}}))
    with pytest.raises(ChecksumMismatch, match="not listed"):
        formats.load(art)


def test_empty_files_table_with_modified_weights(tmp_path, bf16):
    art = _copy(bf16, tmp_path / "a")
    _flip(art / W)
    _edit(art / M, lambda m: m.__setitem__("files", {}))
    with pytest.raises(ChecksumMismatch, match="lists no files"):
        formats.load(art)
    _edit(art / M, lambda m: m.__setitem__("files", {"config.json": json.loads((bf16 / M).read_text())["files"][
        "config.json"]}))
    with pytest.raises(ChecksumMismatch, match="not listed"):
        formats.load(art)


@pytest.mark.parametrize("rel", ["../outside.safetensors", "/etc/hostname", "a/../../x"])
def test_manifest_paths_stay_inside(tmp_path, bf16, rel):
    art = _copy(bf16, tmp_path / "a")
    (tmp_path / "outside.safetensors").write_bytes(b"secret")
    _edit(art / M, lambda m: m["files"].__setitem__(rel, {"sha256": "0" * 64, "bytes": 6}))
    with pytest.raises(CorruptFile, match="leaves its folder"):
        formats.load(art)


def test_listed_file_linked_outside_is_refused(tmp_path, bf16):
    art = _copy(bf16, tmp_path / "a")
    shutil.copyfile(art / "config.json", tmp_path / "same-config.json")
    (art / "config.json").unlink()
    (art / "config.json").symlink_to(tmp_path / "same-config.json")
    with pytest.raises(CorruptFile, match="symlink leading outside"):
        formats.load(art)


def test_fp8_comfy_file_field_is_confined(tmp_path, tiny_transformer_dir):
    art = formats.convert(tiny_transformer_dir, "fp8", tmp_path / "fp8", options={"layout": "comfy"}, progress=False)
    formats.load(art)
    for rel in ("/etc/hostname", "../fp8/zimage_fp8_scaled.safetensors"):
        _edit(art / M, lambda m, rel=rel: m.__setitem__("file", rel))
        with pytest.raises(CorruptFile, match="leaves its folder"):
            formats.load(art)


def test_gguf_flipped_tensor_bytes_are_refused(tmp_path, tiny_gguf):
    p = tmp_path / "t.gguf"
    shutil.copyfile(tiny_gguf("Q8_0"), p)
    formats.load(p)
    _flip(p, at=-4000, n=1000)
    with pytest.raises(ChecksumMismatch, match="zopt.sha256"):
        formats.load(p)
    shutil.copyfile(tiny_gguf("Q8_0"), p)  # one flipped header byte (a KV value) is caught too
    data = bytearray(p.read_bytes())
    i = data.index(b'"rope_theta": 256.0')  # still a valid config: only the checksum can tell
    data[i + 14] = ord("3")
    p.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch):
        formats.load(p)


def test_gguf_stays_readable_by_gguf_py(tiny_gguf):
    import gguf

    r = gguf.GGUFReader(tiny_gguf("Q4_K_M"))
    assert len(r.fields["zopt.sha256"].contents()) == 64 and len(r.tensors) > 10


def test_publish_verifies_inputs_and_refuses_links(tmp_path, bf16, tiny_gguf):
    bad = _copy(bf16, tmp_path / "bad")
    _flip(bad / W)
    with pytest.raises(ChecksumMismatch):
        publish.assemble([bad], tmp_path / "repo1")
    assert not (tmp_path / "repo1").exists()
    g = tmp_path / "t.gguf"
    shutil.copyfile(tiny_gguf("Q8_0"), g)
    _flip(g, at=-5000)
    with pytest.raises(ChecksumMismatch):
        publish.assemble([g], tmp_path / "repo2")
    linked = _copy(bf16, tmp_path / "linked")
    (tmp_path / "outside.txt").write_text("secret")
    (linked / "notes.txt").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(ZoptError, match="symlink"):
        publish.assemble([linked], tmp_path / "repo3")
    (tmp_path / "link.gguf").symlink_to(tiny_gguf("Q8_0"))
    with pytest.raises(ZoptError, match="symlink"):
        publish.assemble([tmp_path / "link.gguf"], tmp_path / "repo4")


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_gguf):
    return publish.assemble([tiny_gguf("Q8_0")], tmp_path_factory.mktemp("pub") / "repo", mode="copy")


def test_verify_stays_inside_the_folder(tmp_path, repo):
    P = publish.PUBLISH_MANIFEST
    publish.verify(repo, load=False)
    cases = {
        "leaves its folder": lambda r: _edit(r / P, lambda m: m["files"].__setitem__(
            "../outside.bin", {"sha256": "0" * 64, "bytes": 3})),
        "leaves its folder ": lambda r: _edit(r / P, lambda m: m["files"].__setitem__(
            "/etc/hostname", {"sha256": "0" * 64, "bytes": 3})),
        "plain top-level name": lambda r: _edit(r / P, lambda m: m["variants"][0].__setitem__("name", "a/b")),
        "leaves its folder  ": lambda r: _edit(r / P, lambda m: m["variants"][0].__setitem__("name", "../x")),
        "not listed": lambda r: (r / ".evil.gguf").write_bytes(b"GGUF"),
        "symlink": lambda r: ((r.parent / "elsewhere").mkdir(), (r / "extra").symlink_to(r.parent / "elsewhere")),
    }
    for i, (needle, act) in enumerate(cases.items()):
        r = _copy(repo, tmp_path / f"r{i}" / "repo")
        (r.parent / "outside.bin").write_bytes(b"abc")
        act(r)
        with pytest.raises(ZoptError) as e:
            publish.verify(r, load=False)
        msg = str(e.value)
        assert needle.strip() in msg and "\n" not in msg, msg
        assert "abc" not in msg and " 3 " not in msg  # nothing about the outside file leaks


def test_verify_refuses_listed_file_linked_to_identical_copy(tmp_path, repo):
    r = _copy(repo, tmp_path / "r" / "repo")
    shutil.copyfile(r / "README.md", tmp_path / "r" / "README-copy.md")
    (r / "README.md").unlink()
    (r / "README.md").symlink_to(tmp_path / "r" / "README-copy.md")
    with pytest.raises(ChecksumMismatch, match="symlink"):
        publish.verify(r, load=False)


def test_verify_no_load_catches_tampering_after_publish(tmp_path, repo):
    r = _copy(repo, tmp_path / "r" / "repo")
    g = next(r.glob("*.gguf"))
    _flip(g, at=-3000)
    with pytest.raises(ChecksumMismatch):
        publish.verify(r, load=False)


def test_zopt_verify_opt_out_skips_hashing_only(tmp_path, bf16, monkeypatch):
    art = _copy(bf16, tmp_path / "a")
    _flip(art / W)
    monkeypatch.setenv("ZOPT_VERIFY", "0")
    formats.load(art)  # the user opted out of hashing
    os.remove(art / "config.json")
    with pytest.raises(ChecksumMismatch, match="missing"):
        formats.load(art)


def test_manifest_carries_its_own_digest(tmp_path, bf16):
    art = _copy(bf16, tmp_path / "a")
    _edit(art / M, lambda m: m["source"].__setitem__("path", "/elsewhere"), redigest=False)
    with pytest.raises(ChecksumMismatch, match="manifest_sha256"):
        formats.load(art)


def test_manifest_rows_that_do_not_fit_the_config_are_refused(tmp_path, tiny_transformer_dir):
    art = formats.convert(tiny_transformer_dir, "fp8", tmp_path / "fp8", options={"layout": "comfy"}, progress=False)
    _edit(art / M, lambda m: m["tensors"]["layers.0.attention.to_v.weight"].pop("rows"))
    with pytest.raises(CorruptFile, match="to_v.weight.*shape"):
        formats.load(art)


def test_manifest_config_must_match_config_json(tmp_path, bf16):
    art = _copy(bf16, tmp_path / "a")
    _edit(art / M, lambda m: m["config"].__setitem__("rope_theta", 10.0))
    with pytest.raises(ChecksumMismatch, match="rope_theta"):
        formats.load(art)


def test_zopt_gguf_without_checksum_is_refused_unless_opted_out(tmp_path, monkeypatch):
    import torch

    from zopt.formats.gguf import quantize_rows
    from zopt.formats.gguf.writer import StreamingGGUFWriter
    from zopt.validate.gguf import gguf_header, verify_digest

    p = tmp_path / "old.gguf"
    with StreamingGGUFWriter(p, [("w", (4, 64), "Q8_0")], {"zopt.version": "0.0.9"}) as w:
        w.write("w", quantize_rows(torch.ones(4, 64), "Q8_0"))
    with pytest.raises(CorruptFile, match="no zopt.sha256"):
        verify_digest(gguf_header(p), p)
    monkeypatch.setenv("ZOPT_VERIFY", "0")
    verify_digest(gguf_header(p), p)
