"""SIGKILL at random points of ``zopt convert``: a complete output (old or new) always exists or
none was there, and the next run leaves no temporary files behind."""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# A launcher that imports zopt and torch once, then forks one child per conversion: each child is a
# separate `zopt convert` process (its own pid, as temporary names record) that the test kills,
# without paying the imports again for every one of the kills.
LAUNCHER = """
import os, sys
from zopt.cli import main
import zopt.formats.plain, zopt.formats.gguf, torch  # noqa
print("ready", flush=True)
for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        sys.stdin.close()
        os.dup2(os.open(os.devnull, os.O_WRONLY), 1)  # the child's messages must not mix with pids
        os._exit(main(line.split()))
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(os.waitstatus_to_exitcode(status), flush=True)
"""
SPECS = {"bf16": "bf16-out", "gguf:Q8_0": "out.gguf"}


class Launcher:
    def __init__(self):
        env = {**os.environ, "PYTHONPATH": str(REPO), "ZOPT_COMPILE": "0"}
        self.p = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, env=env, text=True)
        assert self.p.stdout.readline().strip() == "ready"

    def start(self, spec: str, out: Path) -> int:
        """Start ``zopt convert tiny --to SPEC -o OUT --force`` in a new child (an existing output is
        replaced); returns its pid."""
        self.p.stdin.write(f"convert tiny --to {spec} -o {out} --force\n")
        self.p.stdin.flush()
        return int(self.p.stdout.readline())

    def wait(self) -> int:
        return int(self.p.stdout.readline())

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(timeout=60)


def _complete(out: Path) -> None:
    """Raise unless ``out`` is a whole, verified output."""
    from zopt import checkpoint
    from zopt.formats import plain
    from zopt.validate.gguf import verify_digest

    if out.suffix == ".gguf":
        with checkpoint.open(out) as src:
            verify_digest(src.header, out)
    else:
        plain.open_verified(out).close()


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if p.name.endswith((".zopt-tmp", ".zopt-old"))]


@pytest.mark.slow
def test_random_kills_leave_a_complete_output(tmp_path, tiny_dir):
    rng = random.Random(20)
    launcher = Launcher()
    durations = {}
    for spec, name in SPECS.items():  # one uninterrupted run each: how long a conversion takes
        t0 = time.perf_counter()
        launcher.start(spec, tmp_path / name)
        assert launcher.wait() == 0
        durations[spec] = time.perf_counter() - t0
        _complete(tmp_path / name)
    kills = {"new": 0, "existing": 0}
    i = 0
    while min(kills.values()) < 12 and i < 80:  # a conversion that finished before its kill is not counted
        spec = list(SPECS)[i % 2]
        out = tmp_path / SPECS[spec]
        mode = "new" if (i // 2) % 2 == 0 else "existing"
        i += 1
        if mode == "new" and out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        had = out.exists()
        pid = launcher.start(spec, out)
        time.sleep(rng.uniform(0.0, durations[spec]))
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        if launcher.wait() == -signal.SIGKILL:
            kills[mode] += 1
        assert out.exists() or not had, f"kill {i} ({spec}, {mode}): the earlier output is gone"
        if out.exists():
            _complete(out)
    assert kills["new"] >= 12 and kills["existing"] >= 12, kills
    for spec, name in SPECS.items():  # the next run cleans up after the killed ones
        launcher.start(spec, tmp_path / name)
        assert launcher.wait() == 0
        _complete(tmp_path / name)
    launcher.close()
    assert _leftovers(tmp_path) == []


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    from zopt._io import atomic_path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    final = tmp_path / "out"
    stale = tmp_path / f".out.{dead.pid}.abcd.zopt-tmp"
    stale.mkdir()
    (stale / "big.bin").write_bytes(b"x" * 100)
    mine = tmp_path / f".out.{os.getpid()}.ef01.zopt-tmp"  # a live writer's: kept
    mine.mkdir()
    aside = tmp_path / f".out.{dead.pid}.zopt-old"  # a swap cut short: the earlier output comes back
    aside.mkdir()
    (aside / "zopt-manifest.json").write_text("{}")
    with atomic_path(final, is_dir=True) as tmp:
        assert final.is_dir() and (final / "zopt-manifest.json").exists()
        (tmp / "zopt-manifest.json").write_text('{"new": 1}')
    assert (final / "zopt-manifest.json").read_text() == '{"new": 1}'
    assert not stale.exists() and mine.exists() and not aside.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine.name, "out"])


def test_disk_full_is_one_line_naming_the_output(tmp_path):
    """A write past the file size limit (as on a full disk) fails with one line and leaves nothing."""
    import resource

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    out = tmp_path / "o.gguf"
    env = {**os.environ, "PYTHONPATH": str(REPO), "ZOPT_COMPILE": "0"}
    r = subprocess.run([sys.executable, "-m", "zopt.cli", "convert", "tiny", "--to", "gguf:Q8_0", "-o", str(out)],
                       capture_output=True, text=True, env=env, preexec_fn=limit, timeout=600)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and str(out) in lines[0] and "cannot write" in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []
