"""Several workers on one shared job store: real ``ex4d run`` processes at the same time never compute a
stage twice (the per-stage lock of the shared API contract, ``JobStore.stage_lock``), never leave a partial
result, and survive one of them being SIGKILLed mid-stage.

How computations are counted: each ``ex4d run`` result says, per stage, whether this process computed it
(``cached: false``) or found it in the store; summed over the processes, each distinct stage result must
have been computed exactly once.

These tests need the lock in the stages (issue 17's ``stage_lock``, used by issue 12's stages). Until both
are merged they are expected to fail (workers race and compute the same stage twice), so they are marked
xfail by a check of the source, not by hand: they turn into ordinary tests the moment the lock is used.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import farm_fixtures as ff
import pytest

PACKAGE = ff.REPO / "ex4d_backend"


def _stages_use_the_lock() -> bool:
    from ex4d_backend.service.jobstore import JobStore

    if not hasattr(JobStore, "stage_lock"):
        return False
    return any(
        ".stage_lock(" in p.read_text(encoding="utf-8")
        for p in PACKAGE.rglob("*.py")
        if p.name != "jobstore.py" and "farm" not in p.parts
    )


LOCKED = _stages_use_the_lock()
needs_lock = pytest.mark.xfail(
    not LOCKED,
    reason="the stages do not take JobStore.stage_lock yet (issues 17 + 12); without it workers race",
    strict=False,
)
SHARED = ("frames", "depth", "mesh")


def _project(tmp_path: Path) -> list[Path]:
    """One shot, three jobs: generate 60, generate 90, and the guide of 60 (shared with the first)."""
    first = ff.make_project(tmp_path / "p", "s1", n_frames=5, preset="60")
    doc = json.loads(first.read_text())
    second = first.with_name("s1_90.json")
    second.write_text(json.dumps({**doc, "params": {**doc["params"], "camera": {"preset": "90"}}}))
    guide = {k: v for k, v in doc["params"].items() if k not in ("generator", "width", "height", "num_frames")}
    third = first.with_name("s1_guide.json")
    third.write_text(json.dumps({**doc, "type": "render_guide", "params": guide}))
    return [first, second, third]


def _start(job: Path, store: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "ex4d_backend", "run", str(job), "--store", str(store)],
        cwd=ff.REPO,
        env=ff.env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out)


def _guide_dir(result: dict) -> str:
    return result.get("guide_dir") or str(Path(result["color_dir"]).parent)


def _check_store_complete(store: Path) -> None:
    """Every stage folder is a whole result (meta.json, written last, present) and nothing temporary
    is visible under a final name."""
    entries = list((store / "cache").iterdir())
    finals = [p for p in entries if not p.name.startswith(".")]
    assert finals
    for p in finals:
        assert (p / "meta.json").is_file(), f"partial stage result {p.name}"


@needs_lock
@pytest.mark.slow
def test_three_workers_compute_each_stage_once(tmp_path):
    """Three processes start together on one store. Wrong code (no lock, a lock that is not exclusive,
    a check of the cache before taking the lock) computes frames/depth/mesh in two or three processes."""
    jobs = _project(tmp_path)
    store = tmp_path / "store"
    # A slow write widens the race window, so that code without a lock fails every time.
    procs = [_start(job, store, EX4D_SERVICE_WRITE_DELAY="0.5") for job in jobs]
    results = [_finish(p) for p in procs]
    for stage in SHARED:
        computed = sum(not r["cached"][stage] for r in results)
        assert computed == 1, f"{stage} computed {computed} times"
    guides = {_guide_dir(r) for r in results}
    assert len(guides) == 2  # 60 (two jobs) and 90
    assert sum(not r["cached"]["guide"] for r in results) == len(guides)
    assert sum(not r["cached"].get("generate", True) for r in results) == 2
    _check_store_complete(store)
    assert not [p for p in (store / "cache").iterdir() if ".partial-" in p.name]  # nobody was killed
    clean = [ff.ex4d_run(job, tmp_path / f"clean{i}") for i, job in enumerate(jobs)]
    for got, want in zip(results, clean, strict=True):
        assert ff.result_files(got) == ff.result_files(want)


@needs_lock
@pytest.mark.slow
def test_a_worker_killed_mid_stage_leaves_the_others_to_finish(tmp_path):
    """A worker is SIGKILLed while it writes a stage (holding its lock); the two others, waiting on that
    lock, break it (its owner is dead), compute the stage once between them and finish with the bytes of
    a clean run. Wrong code: a lock of a dead worker never expires (they hang), a half-written result is
    reused (wrong bytes or a crash), or both survivors compute the stage."""
    jobs = _project(tmp_path)
    store = tmp_path / "store"
    victim = _start(jobs[0], store, EX4D_SERVICE_WRITE_DELAY="30")
    deadline = time.monotonic() + 120
    while not [p for p in (store / "cache").glob(".*partial-*")] if (store / "cache").is_dir() else True:
        assert victim.poll() is None, victim.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the victim never started writing a stage"
        time.sleep(0.05)
    others = [_start(job, store) for job in jobs[1:]]
    time.sleep(1.0)  # the others are now waiting for the victim's lock
    os.kill(victim.pid, signal.SIGKILL)
    victim.communicate()
    results = [_finish(p) for p in others]
    for stage in SHARED:
        computed = sum(not r["cached"][stage] for r in results)
        assert computed <= 1, f"{stage} computed {computed} times by the survivors"
    assert sum(not r["cached"]["frames"] for r in results) == 1  # the victim died inside the frames stage
    _check_store_complete(store)
    for i, (job, got) in enumerate(zip(jobs[1:], results, strict=True)):
        assert ff.result_files(got) == ff.result_files(ff.ex4d_run(job, tmp_path / f"clean{i}"))
