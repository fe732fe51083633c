"""Flamenco export: the farm plan as a submission of the custom job type in ``flamenco_ex4d.js``.

``ex4d farm export --engine flamenco JOB.json... DIR`` writes::

    DIR/jobs/<shot>.<step>.json   the portable job file of each step
    DIR/ex4d.js                   the job type (copy it into the Flamenco Manager's ``scripts/`` folder)
    DIR/flamenco-job.json         the body to POST to the Manager's ``/api/v3/jobs`` (Flamenco 3)

The job type turns each step into a task running ``ex4d run <jobs_dir>/<step>.json --store <store>``
(Flamenco's ``exec`` command), with the task type ``ex4d-gpu`` for GPU steps and ``ex4d`` for the others,
and the plan's dependencies. Tested with Node against Flamenco's documented job compiler API; not run on a
live Flamenco (it cannot be installed here).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from ..atomic import atomic_path, write_bytes
from .plan import Step, write_step_files

JS_FILE = Path(__file__).with_name("flamenco_ex4d.js")
JOB_TYPE = "ex4d"  # the job type's name = the script's file name in the Manager's scripts/ folder
SUBMISSION = "flamenco-job.json"


def submission(steps: list[Step], jobs_dir: str, store: str, *, name: str = "EX-4D", ex4d: str = "ex4d") -> dict:
    """The ``SubmittedJob`` body of Flamenco's API for these steps."""
    plan = [{"id": s.id, "gpus": s.gpus, "after": s.after} for s in steps]
    return {
        "name": name,
        "type": JOB_TYPE,
        "priority": 50,
        "submitter_platform": {"darwin": "darwin", "win32": "windows"}.get(sys.platform, "linux"),
        "settings": {"store": str(store), "jobs_dir": str(jobs_dir), "ex4d": ex4d, "steps": json.dumps(plan)},
    }


def export(steps: list[Step], roots: dict[str, Path], out_dir: str | os.PathLike, store: str, **kw) -> Path:
    """Write the step job files, the job type script and the submission body; return the body's path."""
    out = Path(out_dir).expanduser().resolve()
    write_step_files(steps, out / "jobs", roots)
    with atomic_path(out / f"{JOB_TYPE}.js") as tmp:
        shutil.copyfile(JS_FILE, tmp)
    body = submission(steps, str(out / "jobs"), str(Path(store).expanduser().resolve()), **kw)
    path = out / SUBMISSION
    write_bytes(path, (json.dumps(body, indent=1) + "\n").encode())
    return path
