"""The job store's per-stage lock (``JobStore.stage_lock`` / ``is_held``), exercised by real processes.

Ground truth is what the processes record themselves (which of them computed, when each held the lock),
never the lock's own view of things.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ex4d_backend.errors import Cancelled
from ex4d_backend.service.jobstore import JobStore

REPO = Path(__file__).resolve().parents[1]

# One worker: take the lock, compute the stage only if it is not in the store, record what it did.
WORKER = r"""
import json, os, sys, time
from ex4d_backend.service.jobstore import JobStore
root, log, hold, stale = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
store = JobStore(root, allowed=[root])
print("ready", flush=True)
with store.stage_lock("frames", "k1", stale_after=stale, poll=0.02):
    t0 = time.time()
    print("held", flush=True)
    computed = store.stage_meta("frames", "k1") is None
    if computed:
        time.sleep(hold)
        with store.write_stage("frames", "k1", {"by": os.getpid()}) as tmp:
            (tmp / "data.bin").write_bytes(os.urandom(1000))
    t1 = time.time()
with open(log, "a") as fh:
    fh.write(json.dumps({"pid": os.getpid(), "computed": computed, "t0": t0, "t1": t1}) + "\n")
"""


def _spawn(root: Path, log: Path, hold: float = 0.3, stale: float = 30.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, str(root), str(log), str(hold), str(stale)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def _records(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def _wait_line(proc: subprocess.Popen, want: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == want:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode} before '{want}'")
    raise AssertionError(f"no '{want}' from the worker")


def test_three_processes_compute_a_stage_once(tmp_path):
    """Three processes race for one stage: exactly one computes, the others reuse its result, and their
    lock intervals never overlap. Fails if the lock is not exclusive across processes (two compute) or if
    write_stage's result is not visible to the next holder."""
    log = tmp_path / "log.jsonl"
    procs = [_spawn(tmp_path / "store", log) for _ in range(3)]
    for p in procs:
        assert p.wait(60) == 0
    recs = _records(log)
    assert len(recs) == 3
    assert sum(r["computed"] for r in recs) == 1
    spans = sorted((r["t0"], r["t1"]) for r in recs)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans
    meta = JobStore(tmp_path / "store").stage_meta("frames", "k1")
    assert meta["by"] == next(r["pid"] for r in recs if r["computed"])
    assert not list((tmp_path / "store" / "locks").glob("*.lock")), "a released lock left its file"


def test_sigkilled_holder_lock_is_broken(tmp_path):
    """A holder killed with SIGKILL (no clean-up runs) leaves its lock file; a waiter on the same host sees
    the owner is dead and takes the lock at once, long before stale_after. Fails if a dead owner's lock is
    honoured (the waiter would block for stale_after = 60 s) or never broken."""
    store = JobStore(tmp_path / "store")
    holder = _spawn(store.root, tmp_path / "log.jsonl", hold=1000)
    _wait_line(holder, "held")
    assert store.is_held("frames", "k1")
    holder.send_signal(signal.SIGKILL)
    holder.wait(10)
    assert list((store.root / "locks").glob("frames-k1.lock")), "the kill left no lock file to break"
    assert not store.is_held("frames", "k1")
    t0 = time.monotonic()
    with store.stage_lock("frames", "k1", stale_after=60, poll=0.02):
        waited = time.monotonic() - t0
        assert store.is_held("frames", "k1")
    assert waited < 2.0


def test_foreign_lock_expires_by_mtime_only(tmp_path):
    """A lock of another machine (pid unknowable) is honoured while its mtime is fresh and broken once it is
    older than stale_after. Fails if locks of other hosts are broken by a local pid check, or never expire."""
    store = JobStore(tmp_path / "store")
    lock = store.root / "locks" / "mesh-abc.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "another-machine", "token": "x", "started": time.time()}))
    assert store.is_held("mesh", "abc", stale_after=30)
    cancel_at = time.monotonic() + 0.5
    with pytest.raises(Cancelled):
        with store.stage_lock("mesh", "abc", stale_after=30, poll=0.02, cancelled=lambda: time.monotonic() > cancel_at):
            pass
    old = time.time() - 31
    os.utime(lock, (old, old))
    assert not store.is_held("mesh", "abc", stale_after=30)
    with store.stage_lock("mesh", "abc", stale_after=30, poll=0.02):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_heartbeat_keeps_a_long_holder_alive(tmp_path):
    """The holder keeps the lock 2.5 s with stale_after 0.6 s: without the heartbeat its mtime would be
    older than stale_after and the second process would break the lock and run at the same time.
    Fails if the heartbeat does not touch the file (overlapping intervals)."""
    log = tmp_path / "log.jsonl"
    first = _spawn(tmp_path / "store", log, hold=2.5, stale=0.6)
    _wait_line(first, "held")
    second = _spawn(tmp_path / "store", log, hold=0.1, stale=0.6)
    assert first.wait(60) == 0 and second.wait(60) == 0
    recs = sorted(_records(log), key=lambda r: r["t0"])
    assert recs[0]["computed"] and not recs[1]["computed"]
    assert recs[1]["t0"] >= recs[0]["t1"], recs


def test_cancel_while_waiting(tmp_path):
    """A waiter whose cancelled() turns true raises errors.Cancelled within a few polls, without taking the
    lock. Fails if waiting ignores cancelled (it would wait for the holder's 30 s)."""
    store = JobStore(tmp_path / "store")
    holder = _spawn(store.root, tmp_path / "log.jsonl", hold=30)
    _wait_line(holder, "held")
    flag = threading.Event()
    threading.Timer(0.3, flag.set).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(Cancelled):
            with store.stage_lock("frames", "k1", poll=0.05, cancelled=flag.is_set):
                pytest.fail("took a held lock")
        assert time.monotonic() - t0 < 1.0
        assert store.is_held("frames", "k1")  # the holder still has it
    finally:
        holder.kill()
        holder.wait(10)


def test_many_waiters_on_a_stale_lock_take_turns(tmp_path):
    """Four processes find the lock of a dead process at once; all break-and-take attempts together must
    still give one holder at a time. Fails if two waiters can both break the stale file and both hold."""
    store = JobStore(tmp_path / "store")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock = store.root / "locks" / "frames-k1.lock"
    from ex4d_backend.service.locks import HOST

    lock.write_text(json.dumps({"pid": dead.pid, "host": HOST, "token": "dead", "started": 0}))
    log = tmp_path / "log.jsonl"
    procs = [_spawn(store.root, log, hold=0.3) for _ in range(4)]
    for p in procs:
        assert p.wait(60) == 0
    spans = sorted((r["t0"], r["t1"]) for r in _records(log))
    assert len(spans) == 4
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans


def test_reentrant_in_one_thread_exclusive_between_threads(tmp_path):
    """The holding thread may take the lock again (write_stage commits under the stage's lock); another
    thread of the same process waits. Fails on a self-deadlock or if threads share the lock."""
    store = JobStore(tmp_path / "store")
    order = []
    with store.stage_lock("depth", "k"):
        with store.stage_lock("depth", "k"):
            order.append("nested")

        def other():
            with store.stage_lock("depth", "k", poll=0.01):
                order.append("other")

        t = threading.Thread(target=other)
        t.start()
        time.sleep(0.3)
        order.append("release")
    t.join(10)
    assert order == ["nested", "release", "other"]


RACER = r"""
import os, sys, time
from ex4d_backend.service.jobstore import JobStore
_rename = os.replace
def slow_replace(a, b):  # widen the window between the renames of a folder replace (timing only)
    _rename(a, b)
    time.sleep(0.003)
os.replace = slow_replace
store = JobStore(sys.argv[1], allowed=[sys.argv[1]])
for i in range(int(sys.argv[2])):
    with store.write_stage("guide", "same", {"writer": os.getpid(), "i": i}) as tmp:
        for n in range(3):
            (tmp / f"f{n}.bin").write_bytes(bytes([n]) * 2000)
print("ok", flush=True)
"""


def test_two_processes_commit_one_stage_without_racing(tmp_path):
    """Two processes commit the same stage folder 100 times each, at the same time: every commit succeeds
    and the folder is always one complete result. Fails where the two renames of a folder replace interleave
    (rename of the old folder aside by one process, then by the other: FileNotFoundError / ENOTEMPTY)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    root = tmp_path / "store"
    JobStore(root)
    procs = [
        subprocess.Popen([sys.executable, "-c", RACER, str(root), "100"], env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == ["ok\n", "ok\n"]
    store = JobStore(root)
    meta = store.stage_meta("guide", "same")
    assert meta is not None and meta["i"] == 99
    assert sorted(p.name for p in store.stage_dir("guide", "same").iterdir()) == sorted(
        [f"f{n}.bin" for n in range(3)] + ["meta.json"]
    )
    assert not list((root / "cache").glob(".*"))  # no temporaries or moved-aside folders left
