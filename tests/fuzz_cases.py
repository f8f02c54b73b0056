"""Per-kind generators of mutated inputs (see fuzz_helpers for the runner and the base inputs),
and the entry point each kind is fed to."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fuzz_helpers import Case, _flip, _json_mutations, _special, _text_mutation


def _write(data: bytes, name: str) -> Callable[[Path], Path]:
    def build(work: Path) -> Path:
        (work / name).write_bytes(data)
        return work / name
    return build


def _st_bytes(header: Any, body: bytes, hlen_delta: int = 0) -> bytes:
    hb = json.dumps(header).encode() if not isinstance(header, bytes) else header
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb) + hlen_delta) + hb + body


def cases_safetensors(base: Path, rng: random.Random, n: int) -> list[Case]:
    data = base.read_bytes()
    hlen = struct.unpack("<Q", data[:8])[0]
    header, body = json.loads(data[8:8 + hlen]), data[8 + hlen:]
    names = [k for k in header if k != "__metadata__"]
    out = []
    for _ in range(n):
        r = rng.randrange(8)
        if r == 0:
            label, d = "truncated", data[: rng.randrange(len(data))]
        elif r == 1:
            label, d = "header byte flip", _flip(data, rng, 0, 8 + hlen)
        elif r == 2:
            label, d = "data byte flip", _flip(data, rng, 8 + hlen)
        elif r == 3:
            label, h = _json_mutations(header, rng)
            d = _st_bytes(h, body)
        elif r == 4:
            delta = rng.choice([-8, -1, 1, 7, 1 << 40])
            label, d = f"header length {delta:+d}", _st_bytes(header, body, delta)
        elif r == 5:
            h, t = copy.deepcopy(header), rng.choice(names)
            other = header[rng.choice([x for x in names if x != t])]
            v = rng.choice([other["data_offsets"], [0, 0], [header[t]["data_offsets"][0] + 1,
                            header[t]["data_offsets"][1] + 1], ["0", "8"], [0.0, 128.0], [-8, 120]])
            h[t]["data_offsets"] = v
            label, d = f"{t} data_offsets = {v}", _st_bytes(h, body)
        elif r == 6:
            h, t = copy.deepcopy(header), rng.choice(names)
            h[t]["shape"] = rng.choice([[-4, -8], [4, 8, 1, 1, 1, 1, 1, 1, 1], [2**62, 4], ["4", 8], [4.0, 8]])
            label, d = f"{t} shape = {h[t]['shape']}", _st_bytes(h, body)
        else:
            label, d = _text_mutation(data[8:8 + hlen], rng)
            d = _st_bytes(d, body)
        out.append(Case("safetensors", label, _write(d, "x.safetensors")))
    for _ in range(max(2, n // 25)):
        label, act = _special(rng, "x.safetensors")
        out.append(Case("safetensors", label, _then(_write(data, "x.safetensors"), act)))
    return out


def _then(build: Callable[[Path], Path], act: Callable[[Path], Any]) -> Callable[[Path], Path]:
    def both(work: Path) -> Path:
        p = build(work)
        act(p)
        return p
    return both


def _gguf_with(meta_change: dict[str, Any], work: Path) -> Path:
    """A fresh small GGUF (valid digest) whose metadata has ``meta_change`` applied."""
    import torch

    from zopt.families import zimage
    from zopt.formats.gguf import quantize_rows
    from zopt.formats.gguf.writer import StreamingGGUFWriter

    cfg = {k: v for k, v in zimage.TINY_CONFIG.items() if not k.startswith("_")}
    meta = {"general.architecture": "lumina2", "zopt.version": "0", "zopt.recipe": "Q8_0",
            "zopt.config": json.dumps(cfg, sort_keys=True), "comfy.gguf.orig_shape.v": [16, 16],
            "zopt.sha256": "0" * 64}
    meta.update(meta_change)
    meta = {k: v for k, v in meta.items() if v is not None}
    t = torch.linspace(-1, 1, 256)
    out = work / "x.gguf"
    with StreamingGGUFWriter(out, [("w", (4, 64), "Q8_0"), ("v", (256,), "F32")], meta) as w:
        w.write("w", quantize_rows(t.reshape(4, 64), "Q8_0"))
        w.write("v", quantize_rows(t, "F32"))
    return out


def cases_gguf(base: Path, rng: random.Random, n: int) -> list[Case]:
    from zopt.families import zimage
    from zopt.validate.gguf import gguf_header

    data = base.read_bytes()
    hend = gguf_header(base).data_offset
    cfg = {k: v for k, v in zimage.TINY_CONFIG.items() if not k.startswith("_")}
    out = []
    for _ in range(n):
        r = rng.randrange(7)
        if r == 0:
            out.append(Case("gguf", "truncated", _write(data[: rng.randrange(len(data))], "x.gguf"), True))
        elif r == 1:
            out.append(Case("gguf", "header byte flip", _write(_flip(data, rng, 0, hend), "x.gguf"), True))
        elif r == 2:
            k = rng.choice([1, 10, 1000])
            out.append(Case("gguf", f"{k} data byte flips", _write(_flip(data, rng, hend, n=k), "x.gguf"), True))
        elif r == 3:  # a tensor's type id set to another (supported, unsupported or unknown) type
            pos = data.index(struct.pack("<Q", 1) + b"w", hend - 200) + 9 + 4 + 16
            tid = rng.choice([24, 16, 19, 99, 10, 0, 2**31])
            d = data[:pos] + struct.pack("<I", tid) + data[pos + 4:]
            out.append(Case("gguf", f"type id {tid}", _write(d, "x.gguf"), True))
        elif r == 4:
            v = rng.choice([[0, 256], [-1], [16, 17], "x", [], [2**31 - 1, 2**31 - 1], [256, 1, 1, 1, 1, 1, 1, 1, 1], 7])
            out.append(Case("gguf", f"orig_shape = {v}", lambda w, v=v: _gguf_with(
                {"comfy.gguf.orig_shape.v": v}, w)))
        elif r == 5:
            label, c = _json_mutations(cfg, rng)
            text = json.dumps(c) if rng.random() < 0.8 else _text_mutation(json.dumps(cfg).encode(), rng)[1].decode(
                "utf-8", "replace")
            out.append(Case("gguf", f"zopt.config {label}", lambda w, t=text: _gguf_with({"zopt.config": t}, w)))
        else:
            key, v = rng.choice([("zopt.sha256", 5), ("zopt.sha256", None),
                                 ("zopt.bits_per_weight", "x"), ("zopt.recipe", 3), ("zopt.config", 1.5),
                                 ("comfy.gguf.orig_shape.nope", [4])])
            out.append(Case("gguf", f"{key} = {v}", lambda w, k=key, v=v: _gguf_with({k: v}, w)))
    for _ in range(max(2, n // 25)):
        label, act = _special(rng, "x.gguf")
        out.append(Case("gguf", label, _then(_write(data, "x.gguf"), act)))
    return out


def _clone(base: Path, work: Path, copy_names: tuple[str, ...] = ()) -> Path:
    """``base`` recreated under ``work`` with hard links (copies for ``copy_names``, to be modified)."""
    dst = work / base.name
    for f in sorted(base.rglob("*")):
        t = dst / f.relative_to(base)
        if f.is_dir():
            t.mkdir(parents=True, exist_ok=True)
            continue
        t.parent.mkdir(parents=True, exist_ok=True)
        if f.name in copy_names or f.suffix == ".json":
            shutil.copyfile(f, t)
        else:
            os.link(f, t)
    return dst


def _folder_cases(kind: str, base: Path, doc_name: str, rng: random.Random, n: int,
                  extra: Callable[[random.Random], Case | None]) -> list[Case]:
    doc = json.loads((base / doc_name).read_text())
    text = (base / doc_name).read_bytes()
    out = []
    for _ in range(n):
        r = rng.random()
        c = extra(rng) if r < 0.3 else None
        if c is not None:
            out.append(c)
            continue
        if r < 0.8:
            label, m = _json_mutations(doc, rng)
            if isinstance(m, dict) and "manifest_sha256" in m and rng.random() < 0.5:
                # a consistent (re-digested) manifest: the checks behind the digest must hold too
                from zopt.formats.artifact import manifest_digest

                m["manifest_sha256"], label = manifest_digest(m), label + " (re-digested)"
            data = json.dumps(m).encode()
        else:
            label, data = _text_mutation(text, rng)

        def build(work: Path, data=data) -> Path:
            d = _clone(base, work)
            (d / doc_name).write_bytes(data)
            return d
        out.append(Case(kind, f"{doc_name}: {label}", build))
    return out


def _weights_flip(base: Path, name: str, rng: random.Random, then: Callable[[Path], None] | None = None):
    seed = rng.randrange(1 << 30)

    def build(work: Path) -> Path:
        d = _clone(base, work, copy_names=(name,))
        f = d / name
        f.write_bytes(_flip(f.read_bytes(), random.Random(seed), 4096))
        if then:
            then(d)
        return d
    return build


def _edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    """Edit a JSON file; an artifact manifest gets its digest recomputed (a deliberate edit)."""
    from zopt.formats.artifact import manifest_digest

    m = json.loads(path.read_text())
    fn(m)
    if "manifest_sha256" in m:
        m["manifest_sha256"] = manifest_digest(m)
    path.write_text(json.dumps(m))


def cases_manifest(base: Path, rng: random.Random, n: int, kind: str = "manifest") -> list[Case]:
    M = "zopt-manifest.json"
    W = json.loads((base / M).read_text()).get("file", "diffusion_pytorch_model.safetensors")

    def extra(rng: random.Random) -> Case:
        r = rng.randrange(7)
        if r == 0:
            return Case(kind, "weights modified", _weights_flip(base, W, rng), True)
        if r == 1:
            return Case(kind, "weights modified, files: {}", _weights_flip(
                base, W, rng, lambda d: _edit_json(d / M, lambda m: m.__setitem__("files", {}))), True)
        if r == 2:
            return Case(kind, "weights modified and unlisted", _weights_flip(
                base, W, rng, lambda d: _edit_json(d / M, lambda m: m["files"].pop(W))), True)
        if r == 3:
            def add_index(d: Path) -> None:  # an unlisted index + shard dropped into the folder
                shutil.copyfile(d / W, d / "evil-00001.safetensors")
                (d / "x.safetensors.index.json").write_text(json.dumps(
                    {"weight_map": {k: "evil-00001.safetensors" for k in _st_names(d / W)}}))
            return Case(kind, "unlisted index + shard", _weights_flip(base, W, rng, add_index), True)
        if r == 4:
            rel = rng.choice(["../outside.bin", "/etc/hostname", "a/../../x", "~/x"])
            return Case(kind, f"files entry {rel}", lambda w, rel=rel: _then(
                lambda w2: _clone(base, w2), lambda d: _edit_json(d / M, lambda m: m["files"].__setitem__(
                    rel, {"sha256": "0" * 64, "bytes": 1})))(w))
        if r == 5:
            def link_out(d: Path) -> None:  # a listed file replaced by a link to an identical copy outside
                shutil.copyfile(d / "config.json", d.parent / "config-outside.json")
                (d / "config.json").unlink()
                (d / "config.json").symlink_to(d.parent / "config-outside.json")
            return Case(kind, "listed file linked outside", _then(lambda w: _clone(base, w), link_out), True)
        label, act = _special(rng, W)
        return Case(kind, f"weights {label}", _then(lambda w: _clone(base, w), lambda d: act(d / W)),
                    label == "link outside")

    return _folder_cases(kind, base, M, rng, n, extra)


def _st_names(path: Path) -> list[str]:
    data = path.read_bytes()
    h = json.loads(data[8:8 + struct.unpack("<Q", data[:8])[0]])
    return [k for k in h if k != "__metadata__"]


def cases_config(base: Path, rng: random.Random, n: int) -> list[Case]:
    fixed = [{"n_layers": 1000000}, {"dim": -1}, {"dim": 3.5}, {"dim": "x"}, {"n_heads": 0}, {"bogus": 1},
             {"axes_dims": [8, 8, 8]}, {"dim": 10**30}, {"axes_lens": None}, {"norm_eps": -1.0},
             {"all_patch_size": [2, 2]}, {"n_kv_heads": 5}, {"qk_norm": "yes"}]

    def extra(rng: random.Random) -> Case:
        change = rng.choice(fixed)

        def build(work: Path) -> Path:
            d = _clone(base, work)
            _edit_json(d / "config.json", lambda m: m.update(change))
            return d
        return Case("config", f"config {change}", build)

    return _folder_cases("config", base, "config.json", rng, n, extra)


def cases_index(base: Path, rng: random.Random, n: int) -> list[Case]:
    IDX = "diffusion_pytorch_model.safetensors.index.json"
    shard = "model-00001-of-00002.safetensors"

    def extra(rng: random.Random) -> Case:
        if rng.random() < 0.5:
            v = rng.choice(["../model-00001-of-00002.safetensors", "/etc/hostname", "missing.safetensors",
                            "model-00001-of-00002.bin", "sub/../../x.safetensors"])

            def build(work: Path, v=v) -> Path:
                d = _clone(base, work)
                _edit_json(d / IDX, lambda m: m["weight_map"].__setitem__("a", v))
                return d
            return Case("index", f"shard path {v}", build)
        label, act = _special(rng, shard)
        return Case("index", f"shard {label}", _then(lambda w: _clone(base, w), lambda d: act(d / shard)))

    return _folder_cases("index", base, IDX, rng, n, extra)


def cases_publish(base: Path, rng: random.Random, n: int) -> list[Case]:
    P = "zopt-publish.json"
    gguf_name = next(f.name for f in base.iterdir() if f.suffix == ".gguf")

    def extra(rng: random.Random) -> Case:
        r = rng.randrange(6)
        if r == 0:
            return Case("publish", "variant modified", _weights_flip(base, gguf_name, rng), True)
        if r == 1:
            return Case("publish", "hidden unlisted file", _then(lambda w: _clone(base, w), lambda d: (
                d / ".evil.gguf").write_bytes(b"GGUF")), True)
        if r == 2:
            def link_dir(d: Path) -> None:
                (d.parent / "elsewhere").mkdir()
                (d.parent / "elsewhere" / "x.gguf").write_bytes(b"GGUF")
                (d / "extra").symlink_to(d.parent / "elsewhere")
            return Case("publish", "unlisted symlinked folder", _then(lambda w: _clone(base, w), link_dir), True)
        if r == 3:
            def link_same(d: Path) -> None:
                shutil.copyfile(d / "README.md", d.parent / "README-copy.md")
                (d / "README.md").unlink()
                (d / "README.md").symlink_to(d.parent / "README-copy.md")
            return Case("publish", "listed file linked to an identical copy outside",
                        _then(lambda w: _clone(base, w), link_same), True)
        if r == 4:
            v = rng.choice(["../outside", "/tmp", "a/b", ".hidden", "..", ""])

            def build(work: Path, v=v) -> Path:
                d = _clone(base, work)
                _edit_json(d / P, lambda m: m["variants"][0].__setitem__("name", v))
                return d
            return Case("publish", f"variant name {v!r}", build)
        rel = rng.choice(["../outside.bin", "/etc/hostname", "x/../../y"])

        def build2(work: Path, rel=rel) -> Path:
            d = _clone(base, work)
            (d.parent / "outside.bin").write_bytes(b"secret")
            _edit_json(d / P, lambda m: m["files"].__setitem__(rel, {"sha256": "0" * 64, "bytes": 6}))
            return d
        return Case("publish", f"files entry {rel}", build2)

    return _folder_cases("publish", base, P, rng, n, extra)


GENERATORS = {"safetensors": cases_safetensors, "gguf": cases_gguf, "manifest": cases_manifest,
              "config": cases_config, "index": cases_index, "publish": cases_publish,
              "lowbit": lambda b, r, n: cases_manifest(b, r, n, "lowbit"),
              "fp8comfy": lambda b, r, n: cases_manifest(b, r, n, "fp8comfy")}


def entries(full: bool = False) -> dict[str, Callable[[Path], None]]:
    """The entry point per kind; ``full`` loads artifacts all the way to a model (slower)."""
    # import the model class now: a first import inside a timed case would count as a hang
    from diffusers import ZImageTransformer2DModel  # noqa: F401

    from zopt import checkpoint, formats, publish
    from zopt.families import zimage
    from zopt.formats import plain
    from zopt.formats.common import empty_model
    from zopt.validate.gguf import verify_digest

    def read_all(p: Path) -> None:
        with checkpoint.open(p) as src:
            for n in src.names():
                src.get(n)

    def gguf(p: Path) -> None:
        with checkpoint.open(p) as src:
            if src.kind == "gguf":
                verify_digest(src.header, p)
            for n in src.names():
                src.get(n)

    def manifest(p: Path) -> None:
        if full:
            formats.load(p)
            return
        zimage.check_shapes(plain.open_verified(p))

    def config(p: Path) -> None:
        src = checkpoint.open(p)
        cfg = zimage.check_shapes(src)
        if full:
            plain.load_source(src)
        else:
            empty_model(cfg)

    return {"safetensors": read_all, "gguf": gguf, "manifest": manifest, "config": config, "index": read_all,
            "publish": lambda p: publish.verify(p, load=full), "lowbit": formats.load, "fp8comfy": formats.load}
