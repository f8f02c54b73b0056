"""Several variants in one pass: the same bytes as separate conversions, each source tensor read
once, the shared cache held to its budget, every check before the source is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from zopt.cli import main
from zopt.errors import ZoptError

TARGETS = ["gguf:Q8_0", "gguf:Q4_K_M", "fp8", "int4"]


def _weights(out: Path) -> bytes:
    """What a variant stores: the GGUF file, or the folder's weight files (the manifest carries a
    creation time, so it is left out)."""
    if out.is_file():
        return out.read_bytes()
    return b"".join(f.read_bytes() for f in sorted(out.glob("*.safetensors")))


@pytest.fixture(scope="module")
def separate(tmp_path_factory, tiny_original_file):
    import zopt

    d = tmp_path_factory.mktemp("separate")
    return {t: zopt.convert(tiny_original_file, t, d / t.replace(":", "-"), progress=False) for t in TARGETS}


@pytest.mark.parametrize("budget", [None, 1], ids=["default-budget", "tiny-budget"])
def test_one_pass_writes_the_bytes_of_separate_runs(tmp_path, tiny_original_file, separate, budget):
    from zopt.formats.multi import convert_many

    targets = [(t, tmp_path / t.replace(":", "-")) for t in TARGETS]
    outs, shared = convert_many(tiny_original_file, targets, progress=False, budget=budget)
    for t, out in zip(TARGETS, outs, strict=True):
        assert _weights(out) == _weights(separate[t]), t
    n = len(shared.src.names())
    if budget is None:  # every tensor read from the source once, for all four targets together
        assert shared.reads == n and shared.rereads == 0
    else:  # a cache of one byte holds one tensor at a time: converters out of step read again
        assert shared.reads >= n and shared.peak_bytes <= max(shared.src.info(x).nbytes for x in shared.src.names())


def test_cache_stays_within_budget_and_reads_once(tiny_transformer_dir):
    """Three consumers reading in the same order: one read per tensor, never more than the
    budget held, although they run in separate threads at different speeds."""
    import random
    import threading
    import time

    from zopt import checkpoint
    from zopt.formats.multi import SharedSource

    src = checkpoint.open(tiny_transformer_dir)
    names = src.names()
    largest = max(src.info(n).nbytes for n in names)
    shared = SharedSource(src, 3, budget=3 * largest)
    got: dict[int, list] = {0: [], 1: [], 2: []}

    def consume(who: int) -> None:
        rng = random.Random(who)
        for n in names:
            got[who].append(float(shared.get(n, who).float().sum()))
            time.sleep(rng.random() * 0.002 * (who + 1))  # different speeds
        shared.done(who)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = [float(src.get(n).float().sum()) for n in names]
    assert got[0] == got[1] == got[2] == want
    assert shared.reads == len(names) and shared.rereads == 0
    assert shared.peak_bytes <= 3 * largest


def test_cli_several_targets_into_a_folder(tmp_path, tiny_transformer_dir, capsys):
    out = tmp_path / "variants"
    argv = ["convert", str(tiny_transformer_dir), "--to", "gguf:Q8_0,int4", "-o", str(out), "--no-progress",
            "--option", "group_size=64"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert (out / "transformer-Q8_0.gguf").is_file() and (out / "transformer-int4").is_dir()
    assert "0 read again" in stdout
    from zopt.formats.artifact import read_manifest

    assert read_manifest(out / "transformer-int4")["options"]["group_size"] == 64  # only int4 has it
    assert main(argv) == 2  # existing outputs need --force, as for one target
    assert "--force" in capsys.readouterr().err


@pytest.mark.parametrize("to,out,words", [
    ("gguf:Q8_0,fp8", "x.gguf", "need a folder"),
    ("gguf:Q8_0,gguf:Q8_0", "d", "same output"),
])
def test_cli_several_targets_refused_before_reading(tmp_path, capsys, to, out, words):
    assert main(["convert", "/nonexistent/model.safetensors", "--to", to, "-o", str(tmp_path / out)]) == 2
    assert words in capsys.readouterr().err


def test_an_option_no_target_has_is_refused(tmp_path, tiny_transformer_dir):
    from zopt.formats.multi import convert_many

    with pytest.raises(ZoptError, match="group_sise"):
        convert_many(tiny_transformer_dir, [("gguf:Q8_0", tmp_path / "a.gguf"), ("int4", tmp_path / "b")],
                     options={"group_sise": 64}, progress=False)
    assert not any(tmp_path.iterdir())
