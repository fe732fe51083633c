"""``ex4d farm export --engine openjd``: the template validates with ``openjd-model``, has a step per
hardware change with dependencies and GPU host requirements, and ``openjd run`` (``openjd-cli``) executes
it to the outputs of ``ex4d run``."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import farm_fixtures as ff
import pytest

openjd_model = pytest.importorskip("openjd.model")


def _openjd() -> str:
    exe = shutil.which("openjd") or str(Path(sys.executable).with_name("openjd"))
    if not Path(exe).is_file():
        pytest.skip("openjd-cli is not installed (the farm extra)")
    return exe


def _wrapper(tmp_path: Path) -> Path:
    """An ``ex4d`` executable for the steps: this checkout's backend under this Python."""
    path = tmp_path / "bin" / "ex4d"
    path.parent.mkdir(parents=True)
    path.write_text(f'#!/bin/sh\nPYTHONPATH="{ff.REPO}" exec "{sys.executable}" -m ex4d_backend "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_template_steps_dependencies_and_gpu_requirements(tmp_path, capfd):
    """An EX-4D job with model depth gives three steps (depth on a GPU, guide on any host, generate on a
    GPU) chained by dependencies; the template decodes and instantiates with openjd-model. Wrong code (no
    dependencies, GPU asked for by the guide or by no step, an invalid template) fails here."""
    job = ff.make_project(tmp_path / "p", "s1")
    doc = json.loads(job.read_text())
    doc["params"].update(generator="ex4d", depth={"model": "depth-anything-v2"})
    job.write_text(json.dumps(doc))
    code, out, err = ff.run_inproc(capfd, "farm", "export", "--engine", "openjd", str(job), str(tmp_path / "out"))
    assert code == 0, err
    path = Path(json.loads(out)["template"])
    tmpl = json.loads(path.read_text())
    steps = {s["name"]: s for s in tmpl["steps"]}
    assert list(steps) == ["s1-depth", "s1-guide", "s1-generate"]
    gpu = {"amounts": [{"name": "amount.worker.gpu", "min": 1}]}
    assert steps["s1-depth"].get("hostRequirements") == gpu and "dependencies" not in steps["s1-depth"]
    assert "hostRequirements" not in steps["s1-guide"]
    assert steps["s1-guide"]["dependencies"] == [{"dependsOn": "s1-depth"}]
    assert steps["s1-generate"]["hostRequirements"] == gpu
    assert steps["s1-generate"]["dependencies"] == [{"dependsOn": "s1-guide"}]
    decoded = openjd_model.decode_job_template(template=tmpl)
    values = {"Store": openjd_model.ParameterValue(type=openjd_model.ParameterValueType.PATH, value="/store")}
    created = openjd_model.create_job(job_template=decoded, job_parameter_values=values)
    assert [s.name for s in created.steps] == list(steps)
    # Each step's job file is a portable job of the step's type, settings in full.
    step_job = json.loads((path.parent / "jobs" / "s1.guide.json").read_text())
    assert step_job["type"] == "render_guide" and step_job["params"]["footage"] == "shots/s1/clip"
    assert step_job["params"]["max_side"] == 1024 and "steps" not in step_job["params"]


@pytest.mark.slow
def test_openjd_run_gives_the_outputs_of_ex4d_run(tmp_path, capfd):
    """Two shots exported to one template, ``openjd run --step <shot>-generate --run-dependencies`` per
    shot on a local session: the store then holds results with the bytes ``ex4d run`` gives."""
    jobs = [ff.make_project(tmp_path / "p", f"s{i}", preset=p) for i, p in enumerate(("60", "90"))]
    doc = json.loads(jobs[1].read_text())
    doc["params"]["generator"] = "ex4d"  # a GPU generate step after a CPU guide step: a real dependency
    jobs[1].write_text(json.dumps(doc))
    out_dir = tmp_path / "out"
    ex4d = _wrapper(tmp_path)
    code, out, err = ff.run_inproc(
        capfd, "farm", "export", "--engine", "openjd", *map(str, jobs), str(out_dir), "--ex4d", str(ex4d)
    )
    assert code == 0, err
    assert json.loads(out)["steps"] == ["s0-generate", "s1-guide", "s1-generate"]
    template = out_dir / "ex4d.template.json"
    check = subprocess.run([_openjd(), "check", str(template)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    store = tmp_path / "store"
    proc = subprocess.run(
        [_openjd(), "run", str(template), "--step", "s0-generate", "-p", f"Store={store}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    ours = ff.run_job_inproc(capfd, out_dir / "jobs" / "s0.generate.json", store)
    assert ours["cached"]["generate"] is True  # computed by the OpenJD session, found here
    ref = ff.run_job_inproc(capfd, jobs[0], tmp_path / "ref")
    assert ff.result_files(ours) == ff.result_files(ref)
    # The CPU step of the GPU job runs on its own (this machine has no GPU for its generate step).
    proc = subprocess.run(
        [_openjd(), "run", str(template), "--step", "s1-guide", "-p", f"Store={store}"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    guide_job = out_dir / "jobs" / "s1.guide.json"
    guide = ff.run_job_inproc(capfd, guide_job, store)
    assert guide["cached"]["guide"] is True
    ref_doc = json.loads(jobs[1].read_text())
    ref_doc["type"] = "render_guide"
    for k in ("generator", "width", "height", "num_frames"):
        ref_doc["params"].pop(k)
    ref_job = jobs[1].with_name("s1_guide_ref.json")
    ref_job.write_text(json.dumps(ref_doc))
    assert ff.result_files(guide) == ff.result_files(ff.run_job_inproc(capfd, ref_job, tmp_path / "ref"))


@pytest.mark.slow
def test_a_long_shot_is_a_step_per_window_that_openjd_runs(tmp_path, capfd):
    """A 2-window shot exports as ``long-generate-w0`` then ``long-generate`` (depending on it); the
    template validates with openjd-model, and ``openjd run --step long-generate --run-dependencies`` runs
    both steps in order to results with the bytes of ``ex4d run`` of the job (issue 19 with issue 14)."""
    job = ff.make_project(tmp_path / "p", "long", n_frames=13, window=9)
    out_dir = tmp_path / "out"
    code, out, err = ff.run_inproc(
        capfd, "farm", "export", "--engine", "openjd", str(job), str(out_dir), "--ex4d", str(_wrapper(tmp_path))
    )
    assert code == 0, err
    assert json.loads(out)["steps"] == ["long-generate-w0", "long-generate"]
    tmpl = json.loads((out_dir / "ex4d.template.json").read_text())
    steps = {s["name"]: s for s in tmpl["steps"]}
    assert "dependencies" not in steps["long-generate-w0"]
    assert steps["long-generate"]["dependencies"] == [{"dependsOn": "long-generate-w0"}]
    assert json.loads((out_dir / "jobs" / "long.generate-w0.json").read_text())["params"]["upto_window"] == 0
    decoded = openjd_model.decode_job_template(template=tmpl)
    values = {"Store": openjd_model.ParameterValue(type=openjd_model.ParameterValueType.PATH, value="/store")}
    openjd_model.create_job(job_template=decoded, job_parameter_values=values)
    store = tmp_path / "store"
    proc = subprocess.run(
        [_openjd(), "run", str(out_dir / "ex4d.template.json"), "--step", "long-generate", "--run-dependencies",
         "-p", f"Store={store}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert len(list(store.glob("cache/window-*/meta.json"))) == 2
    ours = ff.run_job_inproc(capfd, out_dir / "jobs" / "long.generate.json", store)
    assert ours["cached"]["generate"] is True  # computed by the OpenJD session
    ref = ff.run_job_inproc(capfd, job, tmp_path / "ref")
    assert ff.result_files(ours) == ff.result_files(ref) and ours["n_frames"] == 13
