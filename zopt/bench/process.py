"""Run one bench worker process and turn whatever happens to it into a result.

The worker writes its own result file; when it cannot (killed, crashed, hung), the exit status and
the last line of its stderr say what happened. Progress events arrive on its stdout.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .worker import EVENT_PREFIX


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(code).name
    except ValueError:
        return str(code)


class WorkerProcess:
    """One started worker: its spec written, stdout events on a queue, stderr to its log.

    ``root`` is the folder whose ``zopt`` package the worker runs (default: this process's own);
    a paced worker (``spec["paced"]``) waits for a line on stdin before each image.
    """

    def __init__(self, spec: dict[str, Any], workdir: Path, name: str, log_path: Path | None = None,
                 command: list[str] | None = None, root: str | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        spec = dict(spec, result=str(workdir / f"{name}.result.json"))
        spec_path = workdir / f"{name}.spec.json"
        spec_path.write_text(json.dumps(spec, indent=1))
        self.result_path = Path(spec["result"])
        self.result_path.unlink(missing_ok=True)
        self.log_path = log_path or workdir / f"{name}.log"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        if root:  # another checkout's code: only its package, nothing of this one's path
            env["PYTHONPATH"] = str(Path(root).resolve())
        else:
            pkg_root = str(Path(__file__).resolve().parents[2])  # the same zopt as this process
            env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        env["PYTHONUNBUFFERED"] = "1"
        self.events: queue.Queue = queue.Queue()
        self.t0 = time.monotonic()
        self.timed_out: float | None = None  # the limit it ran past
        self._log = open(log_path or self.log_path, "w")
        cmd = (command or [sys.executable, "-m", "zopt.bench.worker"]) + [str(spec_path)]
        paced = bool(spec.get("paced"))
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=self._log,
                                     stdin=subprocess.PIPE if paced else subprocess.DEVNULL, text=True, env=env)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(EVENT_PREFIX):
                try:
                    self.events.put(json.loads(line[len(EVENT_PREFIX):]))
                except json.JSONDecodeError:
                    pass

    def done(self) -> bool:
        return self.proc.poll() is not None and not self.reader.is_alive()

    def check_timeout(self, timeout: float) -> None:
        if time.monotonic() - self.t0 > timeout and self.proc.poll() is None:
            self.timed_out = timeout
            self.kill()

    def go(self) -> None:
        """Let a paced worker take its next image."""
        try:
            self.proc.stdin.write("go\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # it died: finish() reports how

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def finish(self) -> dict[str, Any]:
        """Wait for the process and return its result (or what its death says)."""
        self.proc.wait()
        self.reader.join(timeout=5)
        self._log.close()
        if self.proc.stdin:
            self.proc.stdin.close()
        return _outcome(self.proc.returncode, self.result_path, self.log_path, self.timed_out,
                        round(time.monotonic() - self.t0, 3))


def _outcome(rc: int | None, result_path: Path, log_path: Path, timed_out: float | None,
             elapsed: float) -> dict[str, Any]:
    if timed_out is not None:
        return {"status": "timeout", "message": f"no result after {timed_out:g} s; the run was stopped",
                "metrics": {}, "images": [], "duration_s": elapsed}
    if result_path.exists():
        try:
            return json.loads(result_path.read_text())
        except json.JSONDecodeError:
            pass
    tail = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()][-1:] if log_path.exists() else []
    if rc == -signal.SIGKILL:
        status, msg = "oom", "killed by SIGKILL (most likely the out-of-memory killer)"
    elif rc is not None and rc < 0:
        status, msg = "crashed", f"killed by signal {_signal_name(-rc)}"
    else:
        status, msg = "crashed", f"exited with code {rc} without a result"
    if tail:
        msg += f": {tail[0].strip()[:300]}"
    return {"status": status, "message": msg, "metrics": {}, "images": [], "duration_s": elapsed}


def run_worker(spec: dict[str, Any], workdir: Path, name: str, timeout: float, on_event=None,
               log_path: Path | None = None, command: list[str] | None = None, root: str | None = None
               ) -> dict[str, Any]:
    """Run ``python -m zopt.bench.worker SPEC`` (or ``command + [SPEC]``) and return its result; a
    process that dies, hangs past ``timeout`` seconds or writes no result yields that status."""
    w = WorkerProcess(spec, workdir, name, log_path, command, root)
    try:
        while not w.done():
            try:
                ev = w.events.get(timeout=0.1)
                if on_event:
                    on_event(ev)
                continue
            except queue.Empty:
                pass
            w.check_timeout(timeout)
    except BaseException:  # interrupted: never leave a worker running behind us
        w.kill()
        raise
    return w.finish()


def run_paired(spec: dict[str, Any], against: dict[str, Any], workdir: Path, name: str, timeout: float,
               on_event=None, log_path: Path | None = None, against_log: Path | None = None,
               against_root: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``spec`` with this zopt and ``against`` with the zopt under ``against_root``, both loaded
    at once and taking images in turns; returns (this side's result, the other side's)."""
    a = WorkerProcess(dict(spec, paced=True), workdir, name, log_path)
    b = WorkerProcess(dict(against, paced=True), workdir, name + ".against", against_log, root=against_root)
    res = run_in_turns([a, b], timeout, on_event)
    return res[0], res[1]


def run_in_turns(workers: list[WorkerProcess], timeout: float, on_event=None) -> list[dict[str, Any]]:
    """Let paced workers take one image each in turn, the order reversed every round (A B, B A, ...),
    so all see the same machine load and none runs while another is timed; returns their results.
    ``on_event`` receives the first worker's progress events."""
    limit = len(workers) * timeout  # each spends most of its time waiting for the others

    def wait_for(w: WorkerProcess, phase: str) -> bool:
        while not w.done():
            try:
                ev = w.events.get(timeout=0.1)
            except queue.Empty:
                for x in workers:
                    x.check_timeout(limit)
                continue
            if ev.get("phase") == phase:
                return True
            if w is workers[0] and on_event and ev.get("phase") not in ("turn", "turn_done"):
                on_event(ev)
        return False

    try:
        turn = 0
        while not all(w.done() for w in workers):
            for w in (workers if turn % 2 == 0 else workers[::-1]):
                if wait_for(w, "turn"):
                    w.go()
                    wait_for(w, "turn_done")
            turn += 1
    except BaseException:  # interrupted: never leave a worker running behind us
        for w in workers:
            w.kill()
        raise
    return [w.finish() for w in workers]
