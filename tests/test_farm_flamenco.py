"""``ex4d farm export --engine flamenco``: the custom job type (``farm/flamenco_ex4d.js``) compiled with Node
against Flamenco 3's documented job compiler API (``author.Task``, ``author.Command``, ``task.addCommand``,
``task.addDependency``, ``job.addTask``, ``path``, ``print``), here a small stand-in written from those
docs: Flamenco itself cannot be installed, so this was never run on a live Flamenco Manager. The compiled
tasks' commands are then executed in dependency order and give the outputs of ``ex4d run``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import farm_fixtures as ff
import pytest

NODE = shutil.which("node") or shutil.which("nodejs")
pytestmark = pytest.mark.skipif(NODE is None, reason="needs Node.js")

# The Manager evaluates the script with goja; its API as documented, as plain objects.
HARNESS = r"""
const fs = require("fs"), vm = require("vm"), nodePath = require("path");
const [script, bodyFile] = process.argv.slice(2);
const tasks = [];
const author = {
  Task(name, type) {
    const t = { name, type, commands: [], deps: [] };
    return { _t: t, addCommand(c) { t.commands.push(c); }, addDependency(o) { t.deps.push(o._t.name); } };
  },
  Command(name, params) { return { name, params }; },
};
const path = { join: nodePath.posix.join, dirname: nodePath.posix.dirname, basename: nodePath.posix.basename };
const body = JSON.parse(fs.readFileSync(bodyFile, "utf8"));
const job = { settings: body.settings, addTask(t) { tasks.push(t._t); } };
const ctx = { author, path, print: () => {}, JSON };
vm.createContext(ctx);
vm.runInContext(fs.readFileSync(script, "utf8") + "\nthis.JOB_TYPE = JOB_TYPE; this.compileJob = compileJob;", ctx);
try { ctx.compileJob(job); } catch (e) { console.log(JSON.stringify({ error: String(e) })); process.exit(0); }
console.log(JSON.stringify({ label: ctx.JOB_TYPE.label, tasks }));
"""


def _compile(tmp_path: Path, script: Path, body: dict) -> dict:
    harness = tmp_path / "harness.js"
    harness.write_text(HARNESS)
    body_file = tmp_path / "body.json"
    body_file.write_text(json.dumps(body))
    proc = subprocess.run([NODE, str(harness), str(script), str(body_file)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_flamenco_job_type_compiles_to_the_plan_and_runs(tmp_path, capfd):
    """A preview job (one CPU task) and an EX-4D job (guide on ``ex4d``, generate on ``ex4d-gpu``, after
    the guide) compile to those tasks; running the preview task's ``exec`` command fills the store with the
    bytes of ``ex4d run``. Wrong code (dependencies dropped, every task on GPU workers, a wrong job file or
    store argument) fails here; a step list out of order is refused by the script."""
    jobs = [ff.make_project(tmp_path / "p", f"s{i}", preset=p) for i, p in enumerate(("60", "90"))]
    doc = json.loads(jobs[1].read_text())
    doc["params"]["generator"] = "ex4d"
    jobs[1].write_text(json.dumps(doc))
    out_dir, store = tmp_path / "out", tmp_path / "store"
    wrapper = tmp_path / "ex4d"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH="{ff.REPO}" exec "{sys.executable}" -m ex4d_backend "$@"\n')
    wrapper.chmod(0o755)
    code, out, err = ff.run_inproc(
        capfd, "farm", "export", "--engine", "flamenco", *map(str, jobs), str(out_dir),
        "--store", str(store), "--ex4d", str(wrapper),
    )  # fmt: skip
    assert code == 0, err
    body = json.loads(Path(json.loads(out)["submission"]).read_text())
    assert body["type"] == "ex4d" and {"name", "priority", "submitter_platform"} <= set(body)
    compiled = _compile(tmp_path, out_dir / "ex4d.js", body)
    assert compiled["label"] == "EX-4D"
    tasks = {t["name"]: t for t in compiled["tasks"]}
    assert [(t["name"], t["type"], t["deps"]) for t in compiled["tasks"]] == [
        ("s0.generate", "ex4d", []),
        ("s1.guide", "ex4d", []),
        ("s1.generate", "ex4d-gpu", ["s1.guide"]),
    ]
    cmd = tasks["s0.generate"]["commands"]
    assert [c["name"] for c in cmd] == ["exec"]
    exe, args = cmd[0]["params"]["exe"], cmd[0]["params"]["args"]
    assert args == ["run", str(out_dir / "jobs" / "s0.generate.json"), "--store", str(store)]
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = ff.run_job_inproc(capfd, jobs[0], tmp_path / "ref")
    assert ff.result_files(json.loads(proc.stdout)) == ff.result_files(ref)
    # A plan whose dependency comes after the step is refused at compile time.
    steps = json.loads(body["settings"]["steps"])
    bad = {**body, "settings": {**body["settings"], "steps": json.dumps(steps[::-1])}}
    assert "does not come before it" in _compile(tmp_path, out_dir / "ex4d.js", bad)["error"]
