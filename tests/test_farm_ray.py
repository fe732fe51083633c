"""``ex4d farm submit --engine ray``: the task graph's resources, 4 jobs on a local Ray cluster with the
outputs of ``ex4d run``, a killed worker retried, cancel and status. One local cluster for the module
(``num_cpus=2``, no dashboard) keeps Ray's start-up cost to a few seconds."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import farm_fixtures as ff
import pytest

ray = pytest.importorskip("ray")

from ex4d_backend.farm import plan as farm_plan  # noqa: E402
from ex4d_backend.farm import ray_engine  # noqa: E402
from ex4d_backend.farm import submission as subm  # noqa: E402
from ex4d_backend.jobfile import load_job  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster whose workers import this checkout (PYTHONPATH is inherited by the workers)."""
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = ff.env()["PYTHONPATH"]
    for name in ("EX4D_SERVICE_STEP_DELAY", "EX4D_SERVICE_WRITE_DELAY"):
        os.environ.pop(name, None)
    ray_engine.connect(None, num_cpus=2, num_gpus=0)
    yield ray.get_runtime_context().gcs_address
    ray_engine.disconnect()
    if old is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = old


def _job(tmp_path: Path, **params) -> Path:
    job = tmp_path / "j.json"
    base = {"footage": "f", "depth": {"model": "file", "path": "d.npy"}, "camera": {"preset": "90"}}
    job.write_text(json.dumps({"type": params.pop("type", "generate"), "params": {**base, **params}}))
    return job


def test_plan_asks_for_the_gpus_each_stage_needs(tmp_path):
    """Depth from a model and EX-4D generation ask for one GPU, the guide none, the preview generator
    none; steps of one job are chained, and merged where the hardware does not change. Wrong code (one GPU
    for every task, none at all, no ordering) breaks one of these."""
    steps = farm_plan.plan_job(load_job(_job(tmp_path, depth={"model": "depth-anything-v2"})), "a")
    assert [(s.name, s.type, s.gpus) for s in steps] == [
        ("depth", "estimate_depth", 1),
        ("guide", "render_guide", 0),
        ("generate", "generate", 1),
    ]
    assert [s.after for s in steps] == [[], ["a.depth"], ["a.guide"]] and steps[-1].final
    assert set(steps[0].params) == {"footage", "depth"}  # only what the step's job type accepts
    steps = farm_plan.plan_job(load_job(_job(tmp_path)), "b")
    assert [(s.name, s.gpus, s.after) for s in steps] == [("guide", 0, []), ("generate", 1, ["b.guide"])]
    steps = farm_plan.plan_job(load_job(_job(tmp_path, generator="preview")), "b")
    assert [(s.name, s.gpus) for s in steps] == [("generate", 0)]  # same hardware: one step
    steps = farm_plan.plan_job(load_job(_job(tmp_path, type="render_guide", renderer="cuda")), "c")
    assert [(s.name, s.gpus) for s in steps] == [("guide", 1)]


@pytest.mark.slow
def test_four_jobs_on_ray_match_ex4d_run(tmp_path, cluster, capfd):
    """4 shots through ``ex4d farm submit --address`` (the CLI, connecting to the module's cluster): every
    result has the bytes ``ex4d run`` gives for that job in a fresh store and two shots ran at the same
    time. ``farm status`` reports done."""
    sizes = [(64, 48), (48, 32), (80, 48), (32, 32)]
    jobs = [
        ff.make_project(tmp_path / "p", f"s{i}", size=s, preset="60" if i % 2 else "90") for i, s in enumerate(sizes)
    ]
    store = tmp_path / "store"
    proc = ff.ex4d("farm", "submit", *map(str, jobs), "--address", cluster, "--store", str(store), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["state"] == "done"
    for i, job in enumerate(jobs):
        ours = out["results"][f"s{i}.generate"]
        assert Path(ours["frames_dir"]).is_relative_to(store)
        ref = ff.run_job_inproc(capfd, job, tmp_path / f"ref{i}")
        assert ff.result_files(ours) == ff.result_files(ref), f"shot s{i}"
    st = subm.status(Path(out["dir"]))
    by_id = {s["id"]: s for s in st["steps"]}
    assert set(by_id) == {f"s{i}.generate" for i in range(4)}  # preview jobs: one CPU step each
    spans = sorted((s["started"], s["updated"], s["shot"]) for s in st["steps"])
    assert any(b[0] < a[1] and a[2] != b[2] for a, b in zip(spans, spans[1:], strict=False)), "nothing in parallel"
    code, text, _ = ff.run_inproc(capfd, "farm", "status", "--store", str(store))
    assert code == 0 and text.splitlines()[0].endswith("done") and text.count(" done ") == 4


def _submit_in_thread(sub, store, **kw):
    box: dict = {}

    def target():
        box["status"] = ray_engine.submit(sub, store=str(store), **kw)

    t = threading.Thread(target=target)
    t.start()
    return t, box


def _wait_status(sub, step_id: str, predicate, timeout: float = 180) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        st = subm.read_json(sub.status_file(step_id)) or {}
        if predicate(st):
            return st
        assert time.monotonic() < deadline, f"timed out waiting on {step_id}: {st}"
        time.sleep(0.05)


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_gives_the_clean_result(tmp_path, cluster, capfd):
    """The Ray worker running a step is SIGKILLed mid-stage (while it writes a stage); Ray retries the
    task (max_retries), the second attempt finishes, and the result has the bytes of a clean ``ex4d run``.
    Wrong code (no retries, a child ``ex4d run`` that outlives its worker and races the retry, a half-written
    stage reused) fails or gives other bytes."""
    job = ff.make_project(tmp_path / "p", "k1", preset="90")
    store = tmp_path / "store"
    sub = subm.create([str(job)], store=store, engine="ray")
    t, box = _submit_in_thread(sub, store, max_retries=2, env={"EX4D_SERVICE_WRITE_DELAY": "1.5"})
    st = _wait_status(sub, "k1.generate", lambda s: s.get("state") == "running" and s.get("stage") == "write")
    child = st["pid"]
    os.kill(st["worker_pid"], signal.SIGKILL)
    t.join(300)
    assert not t.is_alive()
    final = box["status"]
    assert final["state"] == "done", final
    steps = {s["id"]: s for s in final["steps"]}
    assert steps["k1.generate"]["attempt"] == 2 and steps["k1.generate"]["worker_pid"] != st["worker_pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # the killed worker's ex4d run died with it
    ref = ff.run_job_inproc(capfd, job, tmp_path / "ref")
    assert ff.result_files(steps["k1.generate"]["result"]) == ff.result_files(ref)


@pytest.mark.slow
def test_cancel_stops_running_and_queued_steps(tmp_path, cluster, capfd):
    """``ex4d farm cancel`` stops the running step's ``ex4d run`` and skips the steps after it; the
    submission ends as cancelled within seconds, not after the (30 s) stage write. The job uses the EX-4D
    generator, so its generate step (1 GPU) waits, unschedulable on this GPU-less cluster, until cancelled."""
    job = ff.make_project(tmp_path / "p", "c1")
    doc = json.loads(job.read_text())
    doc["params"]["generator"] = "ex4d"
    job.write_text(json.dumps(doc))
    store = tmp_path / "store"
    sub = subm.create([str(job)], store=store, engine="ray")
    t, box = _submit_in_thread(sub, store, env={"EX4D_SERVICE_WRITE_DELAY": "30"})
    assert [(s.id, s.gpus) for s in sub.steps] == [("c1.guide", 0), ("c1.generate", 1)]
    st = _wait_status(sub, "c1.guide", lambda s: s.get("state") == "running" and s.get("pid"))
    code, _, err = ff.run_inproc(capfd, "farm", "cancel", sub.id, "--store", str(store))
    assert code == 0, err
    t0 = time.monotonic()
    t.join(60)
    assert not t.is_alive() and time.monotonic() - t0 < 20
    final = box["status"]
    assert final["state"] == "cancelled", final
    assert {s["id"]: s["state"] for s in final["steps"]} == {"c1.guide": "cancelled", "c1.generate": "cancelled"}
    with pytest.raises(ProcessLookupError):
        os.kill(st["pid"], 0)
    assert not list((store / "cache").glob("generate-*"))


@pytest.mark.slow
def test_a_windowed_shot_on_ray_matches_ex4d_run(tmp_path, cluster):
    """A 2-window shot (13 frames, window 9) beside a one-window shot on the local cluster: the long
    shot's window steps ran in order (each started after the one before finished), and its result has
    the bytes of ``ex4d run`` of the job (issue 19 with issue 14's windows)."""
    long = ff.make_project(tmp_path / "p", "long", n_frames=13, window=9)
    short = ff.make_project(tmp_path / "p", "short", preset="90")
    store = tmp_path / "store"
    sub = subm.create([str(long), str(short)], store=store, engine="ray")
    final = ray_engine.submit(sub, store=str(store))
    assert final["state"] == "done", final
    steps = {s["id"]: s for s in final["steps"]}
    order = ["long.generate-w0", "long.generate"]
    assert set(steps) == {*order, "short.generate"}
    for a, b in zip(order, order[1:], strict=False):
        assert steps[a]["updated"] <= steps[b]["started"], (a, b)
    ours = steps["long.generate"]["result"]
    assert [w["cached"] for w in ours["windows"]] == [True, False]
    ref = ff.ex4d_run(long, tmp_path / "ref")
    assert ff.result_files(ours) == ff.result_files(ref) and ours["n_frames"] == 13
