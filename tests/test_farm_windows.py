"""A long shot on the farm (issue 19 with issue 14's windows): its windows are ordered steps, one per
window, each depending on the one before; the windowed run gives the bytes of ``ex4d run`` of the job."""

from __future__ import annotations

import json

import farm_fixtures as ff

from ex4d_backend.farm import plan as farm_plan
from ex4d_backend.jobfile import load_job


def _retype(job, **params):
    doc = json.loads(job.read_text())
    doc["params"].update(params)
    job.write_text(json.dumps(doc))
    return job


def test_a_long_shot_is_one_ordered_step_per_window(tmp_path):
    """21 frames with a 9-frame window (overlap 1): windows start at 0, 8, 12, so steps generate-w0 and
    generate-w1 (``upto_window`` 0 and 1) then the final generate (the job itself, the last window and the
    results), each after the one before, never merged although they ask for the same hardware. With EX-4D
    the guide runs first on a CPU host and every window on a GPU. A shot that fits one window, and
    ``frame_sampling`` "reference", keep one generate step. Wrong code (windows merged, missing, unordered,
    or the final step given ``upto_window``) fails here."""
    job = ff.make_project(tmp_path / "p", "long", n_frames=21, window=9)
    steps = farm_plan.plan_job(load_job(job), "long")
    assert [(s.name, s.gpus, s.after, s.params.get("upto_window")) for s in steps] == [
        ("generate-w0", 0, [], 0),
        ("generate-w1", 0, ["long.generate-w0"], 1),
        ("generate", 0, ["long.generate-w1"], None),
    ]
    assert steps[-1].final and not any(s.final for s in steps[:-1])
    _retype(job, generator="ex4d")
    steps = farm_plan.plan_job(load_job(job), "long")
    assert [(s.name, s.gpus) for s in steps] == [("guide", 0), ("generate-w0", 1), ("generate-w1", 1), ("generate", 1)]
    assert [s.after for s in steps] == [[], ["long.guide"], ["long.generate-w0"], ["long.generate-w1"]]
    _retype(job, frame_sampling="reference")
    assert [s.name for s in farm_plan.plan_job(load_job(job), "long")] == ["guide", "generate"]
    short = ff.make_project(tmp_path / "p", "short", n_frames=9, window=9)
    assert [s.name for s in farm_plan.plan_job(load_job(short), "short")] == ["generate"]


def test_window_steps_run_in_order_and_give_the_job_result(tmp_path, capfd):
    """The step job files of a 2-window shot run one after the other with ``ex4d run`` on one store (what
    each engine does): the window step caches window 1 only, the final step finds it (``cached``) and
    computes window 2, and the results have the bytes of ``ex4d run`` of the job in a fresh store."""
    job = ff.make_project(tmp_path / "p", "long", n_frames=13, window=9)
    steps = farm_plan.plan_job(load_job(job), "long")
    files = farm_plan.write_step_files(steps, tmp_path / "jobs", {"long": tmp_path / "p"})
    store = tmp_path / "store"
    w0 = ff.run_job_inproc(capfd, files["long.generate-w0"], store)
    assert w0["upto_window"] == 0 and [(w["index"], w["cached"]) for w in w0["windows"]] == [(0, False)]
    assert w0["plan"]["windows"] == [[0, 9, 0, 0], [4, 13, 5, 5]]
    final = ff.run_job_inproc(capfd, files["long.generate"], store)
    assert [(w["index"], w["cached"]) for w in final["windows"]] == [(0, True), (1, False)]
    assert final["n_frames"] == 13 and final["source_frames"] == list(range(13))
    ref = ff.run_job_inproc(capfd, job, tmp_path / "ref")
    assert ff.result_files(final) == ff.result_files(ref)
