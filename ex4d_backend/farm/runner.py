"""Run one farm step: ``ex4d run STEP.json`` as a child process, its progress and state in the submission
folder on the shared store, cancel by a flag file, the child killed with its parent.

Submission folder (``<store>/farm/<id>/``, written by ``farm.submission``)::

    submission.json        engine, steps (id, type, gpus, after, job file), created
    jobs/<step>.json       the portable job file of each step (``ex4d run`` runs it unchanged)
    status/<step>.json     state (queued / running / done / failed / cancelled), stage, step/total,
                           message, host, pid, attempt, result (the ``ex4d run`` result JSON) or error
    cancel                 present = cancel everything not finished (``ex4d farm cancel``)

Everything here is engine-neutral: a Ray task calls :func:`run_step`; an OpenJD step runs ``ex4d run``
directly (no status files then; the engine has its own).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from ..atomic import write_bytes

PROGRESS_LINE = re.compile(r"^\[(?P<stage>[^\]\s]+) (?P<step>\d+)/(?P<total>\d+)\] ?(?P<message>.*)$")
STATUS_INTERVAL = 0.25  # s between two status writes of one step
CANCEL_POLL = 0.2  # s
TERMINATE_GRACE = 5.0  # s between SIGTERM and SIGKILL on cancel


class StepFailed(Exception):
    """The step's ``ex4d run`` exited with an error (bad input, a bug): retrying would fail the same way."""


class WorkerLost(Exception):
    """The step's ``ex4d run`` was killed by a signal (OOM killer, a node going down): worth a retry."""


def read_json(path: Path) -> dict | None:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: dict) -> None:
    write_bytes(path, (json.dumps(data, indent=1, sort_keys=True, default=str) + "\n").encode())


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux: PR_SET_PDEATHSIG)
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


def run_step(spec: dict) -> dict:
    """Run one step. ``spec``: step (id), job_file, store, submission_dir, path_maps, allow, models_dir,
    output (folder or None), env (extra environment, tests only). Returns the status dict (state done or
    cancelled, with ``result``); raises StepFailed / WorkerLost."""
    sub = Path(spec["submission_dir"])
    status_path = sub / "status" / f"{spec['step']}.json"
    cancel_flag = sub / "cancel"
    old = read_json(status_path) or {}
    status = {
        "step": spec["step"],
        "state": "running",
        "stage": None,
        "progress": [0, 0],
        "message": "",
        "host": socket.gethostname(),
        "worker_pid": os.getpid(),
        "pid": None,
        "attempt": int(old.get("attempt", 0)) + 1,
        "started": time.time(),
        "updated": time.time(),
    }
    if cancel_flag.exists():
        status.update(state="cancelled", message="cancelled before it started")
        write_json(status_path, status)
        return status
    cmd = [sys.executable, "-m", "ex4d_backend", "run", str(spec["job_file"]), "--store", str(spec["store"])]
    for m in spec.get("path_maps") or ():
        cmd += ["--path-map", m]
    for a in spec.get("allow") or ():
        cmd += ["--allow", a]
    if spec.get("models_dir"):
        cmd += ["--models-dir", spec["models_dir"]]
    if spec.get("output"):
        cmd += ["--output", spec["output"]]
    env = {**os.environ, **(spec.get("env") or {})}
    child = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    status["pid"] = child.pid
    write_json(status_path, status)
    tail: deque[str] = deque(maxlen=30)
    lock = threading.Lock()
    last_write = [0.0]

    def read_stderr() -> None:
        for line in child.stderr:
            line = line.rstrip("\n")
            tail.append(line)
            m = PROGRESS_LINE.match(line)
            if not m:
                continue
            with lock:
                status.update(
                    stage=m["stage"],
                    progress=[int(m["step"]), int(m["total"])],
                    message=m["message"][:300],
                    updated=time.time(),
                )
                if time.monotonic() - last_write[0] > STATUS_INTERVAL:
                    write_json(status_path, status)
                    last_write[0] = time.monotonic()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        return _wait(spec, child, status, status_path, cancel_flag, reader, tail, lock)
    except (StepFailed, WorkerLost):
        raise
    except BaseException:  # the engine interrupted this task (ray.cancel, shutdown): never leave the child
        if child.poll() is None:
            child.kill()
            child.wait()
        with lock:
            status.update(state="cancelled", message="interrupted by the engine", updated=time.time())
            write_json(status_path, status)
        raise


def _wait(spec, child, status, status_path, cancel_flag, reader, tail, lock) -> dict:
    cancelled = False
    while child.poll() is None:
        if not cancelled and cancel_flag.exists():
            cancelled = True
            child.terminate()
            deadline = time.monotonic() + TERMINATE_GRACE
            while child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            if child.poll() is None:
                child.kill()
        time.sleep(CANCEL_POLL)
    stdout = child.stdout.read()
    reader.join(5)
    rc = child.returncode
    with lock:
        status["updated"] = time.time()
        if cancelled:
            status.update(state="cancelled", message="cancelled")
        elif rc == 0:
            status.update(state="done", result=json.loads(stdout), message="done")
        else:
            status.update(state="failed", error="\n".join(tail)[-2000:], returncode=rc)
        write_json(status_path, status)
    if status["state"] == "failed":
        if rc < 0:
            raise WorkerLost(f"{spec['step']}: ex4d run was killed by signal {-rc}")
        raise StepFailed(f"{spec['step']}: ex4d run exited with {rc}: {list(tail)[-1] if tail else ''}")
    return status
