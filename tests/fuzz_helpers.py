"""Mutated inputs made from zopt's own small files, and a runner that classifies what zopt did.

Each case is built in its own folder from a base input (a safetensors file, a GGUF, an artifact
manifest, a model config, a sharded index, a publish manifest) and fed, in this process, to the
same entry point users reach, under a per-case time limit (SIGALRM), so a hang is a failure and
not a stuck run. Outcomes:

* ``clean``: a ZoptError of one line that names a path;
* ``accepted``: read without error, and nothing that a checksum covers was changed;
* ``tampering``: read without error although checksummed bytes were changed (must never happen);
* ``unclean``: any other exception, or a ZoptError without a path or of several lines;
* ``hang``: the time limit passed.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
import signal
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

OUTCOMES = ("clean", "accepted", "tampering", "unclean", "hang")
BAD_VALUES: list[Any] = [None, "x", -1, 0, 3.5, True, [], {}, [1, 2, 3], 10**30, "../x", "/etc/passwd", [-1], [0],
                         {"a": 1}, 1e308, "", [[1]], 2**64]


@dataclass
class Case:
    kind: str
    label: str
    build: Callable[[Path], Path]  # writes the input under a fresh folder, returns what to open
    tamper: bool = False  # checksummed bytes changed: must be refused


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang()


def run_case(case: Case, entry: Callable[[Path], None], work: Path, limit_s: float = 5.0) -> tuple[str, str]:
    """(outcome, detail) of one case, built under ``work`` (removed afterwards)."""
    from zopt.errors import ZoptError

    work.mkdir(parents=True)
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        target = case.build(work)
        signal.setitimer(signal.ITIMER_REAL, limit_s)
        try:
            entry(target)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _Hang:
        return "hang", case.label
    except ZoptError as e:
        msg = str(e)
        if "\n" in msg or not e.path:
            return "unclean", f"{case.label}: ZoptError without a path or on several lines: {msg[:200]}"
        return "clean", msg
    except Exception as e:  # noqa: BLE001 (classified, not hidden)
        return "unclean", f"{case.label}: {e.__class__.__name__}: {str(e)[:200]}"
    finally:
        signal.signal(signal.SIGALRM, old)
        _rmtree(work)
    return ("tampering" if case.tamper else "accepted"), case.label


def _rmtree(p: Path) -> None:
    for root, dirs, _ in os.walk(p):  # undo chmod cases so the folder can be removed
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)
    shutil.rmtree(p, ignore_errors=True)


def run_all(cases: list[Case], entries: dict[str, Callable[[Path], None]], work: Path,
            limit_s: float = 5.0) -> tuple[Counter, dict[str, list[str]]]:
    counts: Counter = Counter()
    details: dict[str, list[str]] = {o: [] for o in OUTCOMES}
    for i, c in enumerate(cases):
        outcome, detail = run_case(c, entries[c.kind], work / f"c{i}", limit_s)
        counts[(c.kind, outcome)] += 1
        details[outcome].append(f"{c.kind}: {detail}")
    return counts, details


# ---------------------------------------------------------------------------------------------
# base inputs


def make_bases(root: Path, tiny_transformer_dir: Path, tiny_q8_gguf: Path) -> dict[str, Path]:
    """Small base inputs for every kind (built once)."""
    import torch

    from zopt.families import zimage
    from zopt.formats import convert
    from zopt.formats.gguf import quantize_rows
    from zopt.formats.gguf.writer import StreamingGGUFWriter
    from zopt.publish import assemble
    from zopt.safetensors_io import StreamingSafetensorsWriter
    from zopt.validate.gguf import DIGEST_KEY

    root.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(4, 8, generator=g), "b": torch.randn(16, generator=g).bfloat16(),
               "c": torch.arange(9, dtype=torch.int8).reshape(3, 3)}
    st = root / "small.safetensors"
    with StreamingSafetensorsWriter(st, [(n, {"float32": "F32", "bfloat16": "BF16", "int8": "I8"}[
            str(t.dtype)[6:]], tuple(t.shape)) for n, t in tensors.items()], {"format": "pt"}) as w:
        for n, t in tensors.items():
            w.write(n, t)
    gg = root / "small.gguf"
    cfg = {k: v for k, v in zimage.TINY_CONFIG.items() if not k.startswith("_")}
    meta = {"general.architecture": "lumina2", "zopt.version": "0", "zopt.recipe": "Q8_0",
            "zopt.config": json.dumps(cfg, sort_keys=True), "comfy.gguf.orig_shape.v": [16, 16],
            DIGEST_KEY: "0" * 64}
    gt = {"w": (torch.randn(4, 64, generator=g), "Q8_0"), "v": (torch.randn(256, generator=g), "F32"),
          "k": (torch.randn(2, 256, generator=g), "Q4_K")}
    with StreamingGGUFWriter(gg, [(n, tuple(t.shape), q) for n, (t, q) in gt.items()], meta) as w:
        for n, (t, q) in gt.items():
            w.write(n, quantize_rows(t, q))
    art = convert(tiny_transformer_dir, "bf16", root / "bf16", progress=False)
    cfgdir = root / "cfg"
    cfgdir.mkdir()
    shutil.copy(tiny_transformer_dir / "config.json", cfgdir / "config.json")
    os.link(tiny_transformer_dir / "diffusion_pytorch_model.safetensors", cfgdir / "diffusion_pytorch_model.safetensors")
    idx = root / "index"
    idx.mkdir()
    shard_map = {}
    for i, names in enumerate((["a", "b"], ["c"])):
        shard = f"model-0000{i + 1}-of-00002.safetensors"
        with StreamingSafetensorsWriter(idx / shard, [(n, {"a": "F32", "b": "BF16", "c": "I8"}[n],
                                                       tuple(tensors[n].shape)) for n in names]) as w:
            for n in names:
                w.write(n, tensors[n])
        shard_map.update({n: shard for n in names})
    (idx / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 0}, "weight_map": shard_map}))
    repo = assemble([tiny_q8_gguf], root / "repo", mode="copy")
    int8 = convert(tiny_transformer_dir, "int8", root / "int8", progress=False)
    comfy = convert(tiny_transformer_dir, "fp8", root / "fp8", options={"layout": "comfy"}, progress=False)
    return {"safetensors": st, "gguf": gg, "manifest": art, "config": cfgdir, "index": idx, "publish": repo,
            "lowbit": int8, "fp8comfy": comfy}


# ---------------------------------------------------------------------------------------------
# mutations


def _flip(data: bytes, rng: random.Random, lo: int = 0, hi: int | None = None, n: int = 1) -> bytes:
    b = bytearray(data)
    hi = len(b) if hi is None else hi
    for _ in range(n):
        i = rng.randrange(lo, hi)
        b[i] ^= 1 << rng.randrange(8)
    return bytes(b)


def _json_mutations(obj: Any, rng: random.Random) -> tuple[str, Any]:
    """One structural mutation of a JSON document: a value of the wrong type/size, a removed or added key."""
    o = copy.deepcopy(obj)
    paths: list[list] = []

    def walk(x, p):
        paths.append(p)
        if isinstance(x, dict) and len(p) < 4:
            for k in list(x)[:40]:
                walk(x[k], p + [k])
        elif isinstance(x, list) and len(p) < 4:
            for i in range(min(len(x), 4)):
                walk(x[i], p + [i])

    walk(o, [])
    p = rng.choice(paths[1:] or paths)
    parent = o
    for k in p[:-1]:
        parent = parent[k]
    what = rng.random()
    if not p:
        return "root replaced", rng.choice(BAD_VALUES)
    if what < 0.6:
        v = rng.choice(BAD_VALUES)
        parent[p[-1]] = v
        return f"{p} = {str(v)[:30]}", o
    if what < 0.8 and isinstance(parent, dict):
        del parent[p[-1]]
        return f"{p} removed", o
    if isinstance(parent, dict):
        parent["zz_" + str(rng.randrange(99))] = rng.choice(BAD_VALUES)
        return f"{p[:-1]} + unknown key", o
    parent[p[-1]] = []
    return f"{p} = []", o


def _text_mutation(text: bytes, rng: random.Random) -> tuple[str, bytes]:
    r = rng.randrange(7)
    if r == 0:
        return "truncated", text[: rng.randrange(len(text))]
    if r == 1:
        return "byte flip", _flip(text, rng)
    if r == 2:
        return "non-UTF-8", text[:10] + b"\xff\xfe" + text[10:]
    if r == 3:
        return "deep nesting", b"[" * 100000 + b"]" * 100000
    if r == 4:
        return "5000-digit integer", b'{"a": ' + b"9" * 5000 + b"}"
    if r == 5:
        return "NaN", text.replace(b"1", b"NaN", 1)
    return "duplicate key", text.replace(b"{", b'{"k": 1, "k": 2, ', 1)


def _special(rng: random.Random, name: str) -> tuple[str, Callable[[Path], None]]:
    """Replace a file by a FIFO, a folder, a link to /dev/zero or to a file outside."""
    r = rng.randrange(4)
    if r == 0:
        return "fifo", lambda p: (p.unlink(), os.mkfifo(p))
    if r == 1:
        return "folder", lambda p: (p.unlink(), p.mkdir())
    if r == 2:
        return "link to /dev/zero", lambda p: (p.unlink(), p.symlink_to("/dev/zero"))
    return "link outside", lambda p: (p.rename(p.parent.parent / ("outside-" + p.name)),
                                      p.symlink_to(p.parent.parent / ("outside-" + p.name)))
