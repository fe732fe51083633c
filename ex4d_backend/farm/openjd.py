"""Open Job Description export: one job template whose steps are the farm plan's steps.

``ex4d farm export --engine openjd JOB.json... DIR`` writes::

    DIR/ex4d.template.json      the OpenJD job template (specification jobtemplate-2023-09)
    DIR/jobs/<shot>.<step>.json the portable job file each step runs with ``ex4d run``

Each step runs ``{{Param.Ex4d}} run {{Param.JobsDir}}/<shot>.<step>.json --store {{Param.Store}}``,
depends on the step before it in its shot (``dependencies``) and asks for a GPU where its stages need
one (``hostRequirements.amounts``: ``amount.worker.gpu`` >= 1 for depth from a model and for EX-4D
generation). A long shot's windows are steps ``<shot>-generate-w<k>`` chained the same way (``farm.plan``). ``Store`` and ``JobsDir`` are PATH parameters, so a render manager's path mapping (AWS
Deadline Cloud's storage profiles) rewrites them per worker; the job files name their inputs relative to
their project root, which they locate relative to ``JobsDir``. ``openjd run DIR/ex4d.template.json
--step NAME -p Store=...`` runs one step locally (``openjd-cli``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..atomic import write_bytes
from ..errors import Ex4dError
from .plan import Step, write_step_files

TEMPLATE_NAME = "ex4d.template.json"
SPEC_VERSION = "jobtemplate-2023-09"
GPU_AMOUNT = "amount.worker.gpu"


def step_name(step: Step) -> str:
    return f"{step.shot}-{step.name}"


def template(steps: list[Step], jobs_dir: str, store: str | None, *, name: str = "EX-4D", ex4d: str = "ex4d") -> dict:
    """The job template (a dict in the JSON form of the specification). ``jobs_dir`` and ``store`` are the
    PATH parameters' defaults: relative paths, which OpenJD joins to the template's folder."""
    by_id = {s.id: s for s in steps}
    out_steps = []
    for s in steps:
        step: dict = {
            "name": step_name(s),
            "script": {
                "actions": {
                    "onRun": {
                        "command": "{{Param.Ex4d}}",
                        "args": ["run", "{{Param.JobsDir}}/" + f"{s.id}.json", "--store", "{{Param.Store}}"],
                        "timeout": 86400,
                    }
                }
            },
        }
        if s.after:
            step["dependencies"] = [{"dependsOn": step_name(by_id[a])} for a in s.after]
        if s.gpus:
            step["hostRequirements"] = {"amounts": [{"name": GPU_AMOUNT, "min": s.gpus}]}
        out_steps.append(step)
    return {
        "specificationVersion": SPEC_VERSION,
        "name": name,
        "description": "EX-4D novel-view shots; every step is `ex4d run` of a portable job file (docs/farm.md)",
        "parameterDefinitions": [
            {
                "name": "Store",
                "type": "PATH",
                "objectType": "DIRECTORY",
                "dataFlow": "INOUT",
                **({"default": store} if store is not None else {}),
                "description": "the shared job store (stage results are reused across steps and workers)",
            },
            {
                "name": "JobsDir",
                "type": "PATH",
                "objectType": "DIRECTORY",
                "dataFlow": "IN",
                "default": str(jobs_dir),
                "description": "the folder of the steps' job files",
            },
            {"name": "Ex4d", "type": "STRING", "default": ex4d, "description": "the ex4d command on the workers"},
        ],
        "steps": out_steps,
    }


def validate(doc: dict, store: str) -> None:
    """Check the template with ``openjd-model`` (if installed): decode it and instantiate the job."""
    try:
        from openjd.model import ParameterValue, ParameterValueType, create_job, decode_job_template
    except ImportError:
        return
    try:
        tmpl = decode_job_template(template=doc)
        values = {"Store": ParameterValue(type=ParameterValueType.PATH, value=str(store))}
        create_job(job_template=tmpl, job_parameter_values=values)
    except Exception as exc:  # noqa: BLE001 - openjd's own validation errors
        raise Ex4dError(f"the OpenJD template does not validate: {str(exc)[:500]}", code="internal") from None


def export(steps: list[Step], roots: dict[str, Path], out_dir: str | os.PathLike, store: str, **kw) -> Path:
    """Write the step job files and the template into ``out_dir``; return the template's path."""
    out = Path(out_dir).expanduser().resolve()
    jobs_dir = out / "jobs"
    write_step_files(steps, jobs_dir, roots)
    store_path = Path(store).expanduser().resolve()
    # OpenJD allows relative PATH defaults inside the template's folder only; elsewhere the store is a
    # parameter the submitter gives (-p Store=/farm/store).
    rel_store = store_path.relative_to(out).as_posix() if store_path.is_relative_to(out) else None
    doc = template(steps, "jobs", rel_store, **kw)
    validate(doc, str(store_path))
    path = out / TEMPLATE_NAME
    write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode())
    return path
