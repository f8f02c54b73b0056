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


def run_worker(spec: dict[str, Any], workdir: Path, name: str, timeout: float, on_event=None,
               log_path: Path | None = None, command: list[str] | None = None) -> dict[str, Any]:
    """Run ``python -m zopt.bench.worker SPEC`` (or ``command + [SPEC]``) and return its result; a
    process that dies, hangs past ``timeout`` seconds or writes no result yields that status."""
    workdir.mkdir(parents=True, exist_ok=True)
    spec = dict(spec, result=str(workdir / f"{name}.result.json"))
    spec_path = workdir / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    result_path = Path(spec["result"])
    result_path.unlink(missing_ok=True)
    log_path = log_path or workdir / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    pkg_root = str(Path(__file__).resolve().parents[2])  # the same zopt as this process
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    events: queue.Queue = queue.Queue()
    t0 = time.monotonic()
    timed_out = False
    with open(log_path, "w") as log:
        cmd = (command or [sys.executable, "-m", "zopt.bench.worker"]) + [str(spec_path)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                stderr=log, stdin=subprocess.DEVNULL, text=True, env=env)

        def read() -> None:
            for line in proc.stdout:
                if line.startswith(EVENT_PREFIX):
                    try:
                        events.put(json.loads(line[len(EVENT_PREFIX):]))
                    except json.JSONDecodeError:
                        pass

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            while True:
                try:
                    ev = events.get(timeout=0.1)
                    if on_event:
                        on_event(ev)
                    continue
                except queue.Empty:
                    pass
                if proc.poll() is not None and not reader.is_alive():
                    break
                if time.monotonic() - t0 > timeout and proc.poll() is None:
                    timed_out = True
                    proc.kill()
                    proc.wait()
        except BaseException:  # interrupted: never leave a worker running behind us
            proc.kill()
            proc.wait()
            raise
        reader.join(timeout=5)
    elapsed = round(time.monotonic() - t0, 3)
    if timed_out:
        return {"status": "timeout", "message": f"no result after {timeout:g} s; the run was stopped",
                "metrics": {}, "images": [], "duration_s": elapsed}
    if result_path.exists():
        try:
            return json.loads(result_path.read_text())
        except json.JSONDecodeError:
            pass
    rc = proc.returncode
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
