"""The validation layer: bounded JSON, safetensors and GGUF headers, configs, special files."""

from __future__ import annotations

import json
import os
import struct
import threading
import time

import pytest

from zopt import checkpoint, validate
from zopt.errors import CorruptFile, UnsupportedFormat
from zopt.families import zimage


def _st(tmp_path, header: dict, body: bytes, name="x.safetensors"):
    hb = json.dumps(header).encode()
    hb += b" " * (-len(hb) % 8)
    p = tmp_path / name
    p.write_bytes(struct.pack("<Q", len(hb)) + hb + body)
    return p


def _one_line(e: pytest.ExceptionInfo, path) -> str:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


@pytest.mark.parametrize("text, needle", [
    (b"[" * 5000 + b"]" * 5000, "nested"),
    (b'{"a": ' + b"9" * 5000 + b"}", "digits"),
    (b'{"a": NaN}', "NaN"),
    (b'{"a": 1e999}', "non-finite"),
    (b'{"a": 1, "a": 2}', "duplicate key"),
    (b'{"a": "\xff"}', "not UTF-8"),
    (b'{"a": ', "not valid JSON"),
])
def test_json_is_bounded(tmp_path, text, needle):
    p = tmp_path / "m.json"
    p.write_bytes(text)
    with pytest.raises(CorruptFile) as e:
        validate.read_json(p)
    assert needle in _one_line(e, p)


def test_json_depth_limit_counts_levels(tmp_path):
    ok = "[" * validate.MAX_JSON_DEPTH + "]" * validate.MAX_JSON_DEPTH
    assert validate.parse_json(ok, "x") is not None
    with pytest.raises(CorruptFile, match="deeper"):
        validate.parse_json("[" + ok + "]", "x")


BODY = bytes(range(32)) * 2  # 64 bytes: a F32 (4, 2) and a F32 (8,)


@pytest.mark.parametrize("mutate, needle", [
    (lambda h: h.__setitem__("__metadata__", {"a": 1}), "__metadata__"),
    (lambda h: h.__setitem__("__metadata__", ["x"]), "__metadata__"),
    (lambda h: h["a"].__setitem__("data_offsets", ["0", "32"]), "data_offsets"),
    (lambda h: h["a"].__setitem__("data_offsets", [0.0, 32.0]), "data_offsets"),
    (lambda h: h["a"].__setitem__("shape", [-4, -2]), "shape"),
    (lambda h: h["b"].__setitem__("data_offsets", [0, 32]), "overlap"),  # both read the same bytes
    (lambda h: h["a"].__setitem__("data_offsets", [0, 36]), "byte span"),
    (lambda h: h["a"].__setitem__("dtype", ["F32"]), "dtype"),
    (lambda h: h["a"].__setitem__("extra", 1), "exactly"),
])
def test_safetensors_header_checks(tmp_path, mutate, needle):
    header = {"a": {"dtype": "F32", "shape": [4, 2], "data_offsets": [0, 32]},
              "b": {"dtype": "F32", "shape": [8], "data_offsets": [32, 64]}}
    good = _st(tmp_path, header, BODY, "good.safetensors")
    assert checkpoint.open(good).names() == ["a", "b"]
    mutate(header)
    bad = _st(tmp_path, header, BODY)
    with pytest.raises(CorruptFile) as e:
        checkpoint.open(bad)
    assert needle in _one_line(e, bad)


def test_safetensors_header_length_one_short(tmp_path):
    good = _st(tmp_path, {"a": {"dtype": "F32", "shape": [16], "data_offsets": [0, 64]}}, BODY)
    data = bytearray(good.read_bytes())
    data[:8] = struct.pack("<Q", struct.unpack("<Q", data[:8])[0] - 1)
    good.write_bytes(bytes(data))
    with pytest.raises(CorruptFile):
        checkpoint.open(good)


def _run_with_deadline(fn, seconds=10.0):
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it does not finish in time."""
    out: list = []

    def go():
        try:
            fn()
            out.append(None)
        except BaseException as e:  # noqa: BLE001
            out.append(e)

    th = threading.Thread(target=go, daemon=True)
    th.start()
    th.join(seconds)
    assert out, f"still running after {seconds} s"
    return out[0]


def test_special_files_fail_at_once(tmp_path, tiny_transformer_dir):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    err = _run_with_deadline(lambda: checkpoint.open(fifo))
    assert isinstance(err, CorruptFile) and "named pipe" in str(err) and str(fifo) in str(err)
    gg = tmp_path / "pipe.gguf"
    os.mkfifo(gg)
    assert isinstance(_run_with_deadline(lambda: checkpoint.open(gg)), CorruptFile)
    dev = tmp_path / "zero.safetensors"
    dev.symlink_to("/dev/zero")
    err = _run_with_deadline(lambda: checkpoint.open(dev))
    assert isinstance(err, CorruptFile) and "device" in str(err)
    # a shard that is a folder
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "s1.safetensors"}}))
    (folder / "s1.safetensors").mkdir()
    err = _run_with_deadline(lambda: checkpoint.open(folder))
    assert isinstance(err, CorruptFile) and "folder" in str(err)


def test_index_paths_stay_inside(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    for shard in ("../outside.safetensors", "/etc/hostname.safetensors", 5):
        (folder / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
        with pytest.raises(CorruptFile) as e:
            checkpoint.open(folder)
        _one_line(e, folder / "m.safetensors.index.json")


GOOD = {k: v for k, v in zimage.TINY_CONFIG.items()}


@pytest.mark.parametrize("change, needle", [
    ({"n_layers": 1000000}, "n_layers"), ({"dim": -1}, "dim"), ({"dim": 3.5}, "dim"), ({"dim": "x"}, "dim"),
    ({"n_heads": 0}, "n_heads"), ({"bogus": 1}, "unknown key"), ({"axes_dims": [8, 8, 8]}, "axes_dims"),
    ({"dim": 385}, "multiple"), ({"n_kv_heads": 4}, "n_kv_heads"), ({"qk_norm": "yes"}, "qk_norm"),
    ({"norm_eps": 0.0}, "norm_eps"), ({"all_patch_size": [2, 2]}, "differ"), ({"axes_lens": None}, "axes_lens"),
])
def test_model_config_checks(tmp_path, tiny_transformer_dir, change, needle):
    validate.model_config(dict(GOOD), "cfg")
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**GOOD, **change}))
    os.link(tiny_transformer_dir / "diffusion_pytorch_model.safetensors", folder / "w.safetensors")
    t0 = time.perf_counter()
    with pytest.raises(CorruptFile) as e:
        checkpoint.open(folder)
    assert time.perf_counter() - t0 < 2.0  # refused before anything is built
    assert needle in _one_line(e, folder / "config.json")


def _small_gguf(path, types=(("w", (4, 64), "Q8_0"),), meta=None):
    import torch

    from zopt.formats.gguf import quantize_rows
    from zopt.formats.gguf.writer import StreamingGGUFWriter

    with StreamingGGUFWriter(path, list(types), {"zopt.sha256": "0" * 64, **(meta or {})}) as w:
        for n, shape, q in types:
            w.write(n, quantize_rows(torch.linspace(-1, 1, shape[0] * shape[1]).reshape(shape), q))
    return path


def test_gguf_unsupported_type_names_it(tmp_path):
    p = _small_gguf(tmp_path / "a.gguf")
    data = bytearray(p.read_bytes())
    pos = data.index(struct.pack("<Q", 1) + b"w") + 9 + 4 + 16  # name, n_dims, 2 dims -> type id
    for tid, needle in ((24, "I8"), (16, "IQ2_XXS"), (99, "unknown GGML type id 99")):
        data[pos:pos + 4] = struct.pack("<I", tid)
        p.write_bytes(bytes(data))
        with pytest.raises((UnsupportedFormat, CorruptFile)) as e:
            checkpoint.open(p)
        assert needle in _one_line(e, p)


@pytest.mark.parametrize("meta, needle", [
    ({"comfy.gguf.orig_shape.w": [0, 256]}, "positive"),
    ({"comfy.gguf.orig_shape.w": [16, 17]}, "does not hold"),
    ({"comfy.gguf.orig_shape.w": "x"}, "positive"),
    ({"comfy.gguf.orig_shape.nope": [4]}, "names no tensor"),
    ({"zopt.config": "{bad"}, "not valid JSON"),
    ({"zopt.config": json.dumps({**GOOD, "n_heads": 0})}, "n_heads"),
    ({"zopt.config": 5}, "must be a string"),
])
def test_gguf_keys_are_checked(tmp_path, meta, needle):
    p = _small_gguf(tmp_path / "a.gguf", meta=meta)
    with pytest.raises(CorruptFile) as e:
        checkpoint.open(p)
    assert needle in _one_line(e, p)


def test_gguf_types_match_the_writer():
    from zopt.formats.gguf.writer import GGML_TYPE_ID
    from zopt.validate.gguf import SUPPORTED_TYPES

    assert set(SUPPORTED_TYPES) == set(GGML_TYPE_ID)


def test_cli_error_is_one_line_without_bitsandbytes_noise(tmp_path):
    import subprocess
    import sys

    cfgdir = tmp_path / "m"
    cfgdir.mkdir()
    (cfgdir / "config.json").write_text(json.dumps({**GOOD, "n_layers": 1000000}))
    (cfgdir / "x.safetensors").write_bytes(b"")
    env = {**os.environ, "PYTHONPATH": str(validate.__file__).rsplit("/zopt/", 1)[0]}
    # the command imports zopt first, then (for most commands) the diffusers model class
    code = ("import sys, zopt; from diffusers import ZImageTransformer2DModel; from zopt.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", code, "inspect", str(cfgdir)], capture_output=True, text=True,
                       env=env, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "n_layers" in lines[0], r.stderr

