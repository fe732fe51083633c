"""Ray engine: each step a Ray task with the GPUs it needs, steps of one job chained, jobs in parallel.

``submit`` blocks until every step finished (printing progress), like ``ray job submit --wait``: the
tasks' states and results live in the submission folder of the shared store, so ``ex4d farm status``
and ``ex4d farm cancel`` work from any machine that sees the store, and a cancel stops the workers (each
task checks the flag and stops its ``ex4d run``) as well as the pending tasks (``ray.cancel``).

A task that loses its worker (the Ray worker process or the node dies) is retried by Ray up to
``max_retries`` times; so is one whose ``ex4d run`` was killed by a signal (``WorkerLost``). A step that
fails with an error (bad input, a bug) is not retried: it would fail the same way.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from ..errors import DEVICE, Ex4dError
from . import submission as subm
from .runner import WorkerLost, read_json, run_step, write_json

log = logging.getLogger("ex4d_backend.farm")
DEFAULT_MAX_RETRIES = 3
POLL = 0.5  # s between progress checks of the driver


def require_ray():
    try:
        import ray
    except ImportError:
        raise Ex4dError(
            "the Ray engine needs the 'ray' package",
            hint="install the farm extra: pip install 'ex4d-backend[farm]' (or scripts/install_deps.py --dev)",
            code=DEVICE,
        ) from None
    return ray


def _task(spec: dict, *_after: object) -> dict:
    """The Ray task body: ``_after`` are the results of the steps this one depends on (Ray passes them
    once those finished; a failed one fails this task before it starts)."""
    if any(isinstance(dep, dict) and dep.get("state") == "cancelled" for dep in _after):
        return _skip(spec)
    return run_step(spec)


def _skip(spec: dict) -> dict:
    status = {"step": spec["step"], "state": "cancelled", "message": "an earlier step was cancelled"}
    write_json(Path(spec["submission_dir"]) / "status" / f"{spec['step']}.json", status)
    return status


def connect(address: str | None, num_cpus: int | None, num_gpus: int | None = None) -> bool:
    """Connect to ``address`` or start a local cluster; True if this call started Ray (stop it after)."""
    ray = require_ray()
    if ray.is_initialized():
        return False
    kwargs: dict = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else {}
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, runtime_env={"env_vars": env} if env else None, **kwargs)
    return True


def submit(
    sub: subm.Submission,
    *,
    store: str,
    path_maps: list[str] | None = None,
    allow: list[str] | None = None,
    models_dir: str | None = None,
    output_dir: str | None = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
    env: dict | None = None,
    on_progress: Callable[[str], None] | None = None,
) -> dict:
    """Run a submission on the connected Ray cluster; return its final status (see ``submission.status``)."""
    ray = require_ray()
    remote = ray.remote(_task)
    refs: dict[str, object] = {}
    for step in sub.steps:  # plan order: every step after those it depends on
        spec = {
            "step": step.id,
            "job_file": str(sub.files[step.id]),
            "store": str(store),
            "submission_dir": str(sub.dir),
            "path_maps": list(path_maps or ()),
            "allow": list(allow or ()),
            "models_dir": models_dir,
            "output": os.path.join(output_dir, step.shot) if output_dir and step.final else None,
            "env": env or {},
        }
        refs[step.id] = remote.options(
            name=step.id,
            num_cpus=1,
            num_gpus=step.gpus,
            max_retries=max_retries,
            retry_exceptions=[WorkerLost],
        ).remote(spec, *[refs[a] for a in step.after])
    pending = list(refs.values())
    shown: dict[str, tuple] = {}
    cancelled = False
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=POLL)
        if not cancelled and sub.cancel_flag.exists():
            cancelled = True
            ids = {ref: step_id for step_id, ref in refs.items()}
            for ref in pending:  # running tasks stop their ex4d run themselves (they see the flag)
                if (read_json(sub.status_file(ids[ref])) or {}).get("state") != "running":
                    ray.cancel(ref, force=False)
        if on_progress:
            for step in sub.steps:
                st = read_json(sub.status_file(step.id)) or {}
                key = (st.get("state"), st.get("stage"), tuple(st.get("progress") or ()), st.get("attempt"))
                if shown.get(step.id) != key:
                    shown[step.id] = key
                    done, total = (st.get("progress") or [0, 0])[:2]
                    on_progress(f"{step.id}: {st.get('state')} {st.get('stage') or ''} {done}/{total}".rstrip())
    errors = {}
    for step_id, ref in refs.items():
        try:
            ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - reported per step
            errors[step_id] = f"{type(exc).__name__}: {str(exc)[-500:]}"
    st = subm.status(sub.dir)
    for s in st["steps"]:
        if s["id"] in errors and s.get("state") not in ("failed", "cancelled"):
            s["state"] = "cancelled" if cancelled else "failed"
            s.setdefault("error", errors[s["id"]])
    return st


def disconnect() -> None:
    ray = require_ray()
    if ray.is_initialized():
        ray.shutdown()
