"""Submissions in the shared store: what was submitted, each step's state, and cancel (see ``runner``)."""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import NOT_FOUND, Ex4dError
from ..jobfile import LoadedJob, load_job
from ..service.locks import pid_alive
from .plan import Step, plan_jobs, write_step_files
from .runner import read_json, write_json

FINISHED = ("done", "failed", "cancelled")


@dataclass
class Submission:
    id: str
    dir: Path
    steps: list[Step]
    files: dict[str, Path]  # step id -> job file
    jobs: list[LoadedJob]

    @property
    def cancel_flag(self) -> Path:
        return self.dir / "cancel"

    def status_file(self, step_id: str) -> Path:
        return self.dir / "status" / f"{step_id}.json"


def farm_dir(store: str | os.PathLike | None) -> Path:
    from ..service.jobstore import default_store

    return Path(store or default_store()).expanduser().resolve() / "farm"


def create(
    job_files: Sequence[str],
    *,
    store: str | os.PathLike | None,
    engine: str,
    path_maps: Sequence[str] = (),
    project_root: str | None = None,
    extra: dict | None = None,
) -> Submission:
    """Load and check every job (all errors before anything is submitted), plan the steps, write the
    submission folder."""
    jobs = [load_job(f, path_maps=path_maps, project_root=project_root) for f in job_files]
    steps = plan_jobs(jobs)
    sid = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    sub_dir = farm_dir(store) / sid
    roots = {}
    for job, step in zip(jobs, _first_steps(steps), strict=True):
        roots[step.shot] = job.root
    files = write_step_files(steps, sub_dir / "jobs", {s.shot: roots[s.shot] for s in steps})
    record = {
        "id": sid,
        "engine": engine,
        "created": time.time(),
        "jobs": [str(j.path) for j in jobs],
        "steps": [
            {"id": s.id, "shot": s.shot, "type": s.type, "gpus": s.gpus, "after": s.after, "final": s.final}
            for s in steps
        ],
        **(extra or {}),
    }
    for s in steps:
        write_json(sub_dir / "status" / f"{s.id}.json", {"step": s.id, "state": "queued", "updated": time.time()})
    write_json(sub_dir / "submission.json", record)
    return Submission(sid, sub_dir, steps, files, jobs)


def _first_steps(steps: list[Step]) -> list[Step]:
    seen, out = set(), []
    for s in steps:
        if s.shot not in seen:
            seen.add(s.shot)
            out.append(s)
    return out


def find(store: str | os.PathLike | None, sid: str | None) -> Path:
    """A submission's folder (the newest when ``sid`` is None)."""
    root = farm_dir(store)
    subs = sorted(p for p in root.glob("*") if (p / "submission.json").is_file()) if root.is_dir() else []
    if sid is None:
        if not subs:
            raise Ex4dError("no farm submissions in this store", where=str(root), code=NOT_FOUND)
        return subs[-1]
    if not all(c.isalnum() or c == "-" for c in sid) or not (root / sid / "submission.json").is_file():
        raise Ex4dError(f"no submission {sid[:80]!r} in this store", where=str(root), hint="ex4d farm status --all")
    return root / sid


def status(sub_dir: Path) -> dict:
    """The submission record with each step's status and an overall state."""
    record = read_json(sub_dir / "submission.json") or {}
    steps = []
    for s in record.get("steps", []):
        st = read_json(sub_dir / "status" / f"{s['id']}.json") or {"state": "queued"}
        if (
            st.get("state") == "running"
            and st.get("pid")
            and st.get("host") == socket.gethostname()
            and not pid_alive(st["pid"])
        ):
            st = {**st, "state": "lost", "message": "its worker is gone (the engine may retry it)"}
        steps.append({**s, **{k: v for k, v in st.items() if k != "step"}})
    states = [s.get("state") for s in steps]
    if any(x == "failed" for x in states):
        overall = "failed"
    elif states and all(x == "done" for x in states):
        overall = "done"
    elif any(x == "cancelled" for x in states) or (sub_dir / "cancel").exists():
        overall = "cancelled" if all(x in FINISHED for x in states) else "cancelling"
    elif any(x in ("running", "lost") for x in states):  # lost: the engine may still retry it
        overall = "running"
    else:
        overall = "queued"
    return {**record, "state": overall, "steps": steps, "dir": str(sub_dir)}


def cancel(sub_dir: Path) -> None:
    """Ask every worker of the submission to stop (the flag file is checked by each step)."""
    write_json(sub_dir / "cancel", {"time": time.time()})
    for st_file in (sub_dir / "status").glob("*.json"):
        st = read_json(st_file) or {}
        if st.get("state") == "queued":
            write_json(st_file, {**st, "state": "cancelled", "message": "cancelled before it started"})


def format_status(st: dict) -> str:
    lines = [f"{st.get('id')}  {st.get('engine')}  {st['state']}"]
    for s in st["steps"]:
        done, total = (s.get("progress") or [0, 0])[:2]
        where = f"{s.get('stage')} {done}/{total}" if s.get("stage") else ""
        extra = f"  attempt {s['attempt']}" if s.get("attempt", 1) > 1 else ""
        lines.append(f"  {s['id']:<32} {s.get('state', '?'):<10} gpus={s.get('gpus', 0)}  {where}{extra}")
    return "\n".join(lines)
