"""``ex4d run JOB.json``: run a job definition (as the add-on writes it) from a terminal or a farm worker."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

from . import add_allow_argument, add_store_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="run a job file ({'type': ..., 'params': {...}}) with the same outputs as the service",
        description="Run one job definition: the request of PROTOCOL.md without its id, e.g. the job.json "
        "that every job folder of the store holds. Relative paths are relative to the job file. The result "
        "is printed as JSON on stdout; progress goes to stderr.",
    )
    p.add_argument("job", metavar="JOB.json", help="job file")
    add_store_argument(p)
    add_allow_argument(
        p,
        "folder inputs may be read from (repeatable; default: home, current folder, the job's folder)",
    )
    p.add_argument("--models-dir", metavar="DIR", help="models folder")
    p.add_argument("--force", action="store_true", help="recompute the job's own result even if it is stored")
    p.add_argument("--output", metavar="DIR", help="also copy the result files into DIR")
    p.add_argument("--project-root", metavar="DIR", help="base of the job's relative inputs (see docs/farm.md)")
    p.add_argument("--path-map", metavar="SRC=DST", action="append", help="read inputs under SRC from DST (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..jobfile import load_job
    from ..service.jobstore import JobStore

    loaded = load_job(args.job, path_maps=args.path_map or (), project_root=args.project_root)
    job_path, type_, params = loaded.path, loaded.type, loaded.params
    if args.force:
        params["force"] = True
    allowed = args.allow if args.allow is not None else [Path.home(), Path.cwd(), job_path.parent, loaded.root]
    store = JobStore(args.store, allowed)
    handler = store.log_handler()
    logging.getLogger().addHandler(handler)
    try:
        return _run(args, store, type_, params)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()


def _run(args: argparse.Namespace, store, type_: str, params: dict) -> int:
    from ..service import jobs

    def progress(stage: str, step: int, total: int, message: str = "") -> None:
        print(f"[{stage} {step}/{total}] {message}", file=sys.stderr, flush=True)

    # The result JSON is the only thing on stdout: whatever a library prints goes to stderr meanwhile.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        result = jobs.run_job(type_, params, jobs.Context(store, progress, args.models_dir, request_id=None))
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    if args.output:
        out = Path(args.output).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        for name, value in list(result.items()):
            if isinstance(value, str) and name.endswith(("_npy", "_pc2", "_mp4", "_npz", "_dir")):
                src = Path(value)
                dst = out / src.name
                if src.is_dir():
                    shutil.copytree(src, dst, dirs_exist_ok=True)
                elif src.is_file():
                    shutil.copy2(src, dst)
                result[f"output_{name}"] = str(dst)
    print(json.dumps(result, indent=1))
    return 0
