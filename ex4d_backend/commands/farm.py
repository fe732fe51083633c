"""``ex4d farm``: many shots on a farm through an existing engine (Ray, Open Job Description).

    ex4d farm submit JOB.json... --engine ray [--address ADDR] [--store DIR] [--output DIR]
    ex4d farm status [ID] [--store DIR] [--json]
    ex4d farm cancel [ID] [--store DIR]
    ex4d farm export --engine openjd|flamenco JOB.json... DIR [--store DIR]
    ex4d farm collect JOB.json PROJECT_DIR [--shot NAME]

See docs/farm.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import Ex4dError
from . import add_store_argument


def _common(p: argparse.ArgumentParser, store: bool = True) -> None:
    if store:
        add_store_argument(p, "the shared job store (default: <user cache>/ex4d/store)")
    p.add_argument("--path-map", metavar="SRC=DST", action="append", default=[], help="input path map (repeatable)")
    p.add_argument("--project-root", metavar="DIR", help="base folder of the jobs' relative inputs")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("farm", help="submit job files to a farm engine (Ray, OpenJD); status, cancel, collect")
    fs = p.add_subparsers(dest="farm_command", metavar="ACTION")

    s = fs.add_parser("submit", help="run job files on a Ray cluster (a local one without --address)")
    s.add_argument("jobs", nargs="+", metavar="JOB.json")
    s.add_argument("--engine", choices=["ray"], default="ray")
    s.add_argument("--address", help="Ray cluster address (default: start a local cluster for this submission)")
    s.add_argument("--num-cpus", type=int, help="CPUs of the local cluster (default: all)")
    s.add_argument("--num-gpus", type=int, help="GPUs of the local cluster (default: detected)")
    s.add_argument("--max-retries", type=int, default=3, help="retries of a step whose worker died (default 3)")
    s.add_argument("--output", metavar="DIR", help="copy each job's result files into DIR/<shot>/")
    s.add_argument("--allow", metavar="DIR", action="append", help="folder inputs may be read from (repeatable)")
    s.add_argument("--models-dir", metavar="DIR", help="models folder on the workers")
    s.add_argument("--quiet", action="store_true", help="no progress lines")
    _common(s)
    s.set_defaults(func=submit)

    st = fs.add_parser("status", help="state and progress of a submission (default: the newest)")
    st.add_argument("id", nargs="?", help="submission id")
    st.add_argument("--store", metavar="DIR")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.add_argument("--all", action="store_true", help="list every submission")
    st.set_defaults(func=status)

    c = fs.add_parser("cancel", help="cancel a submission (default: the newest)")
    c.add_argument("id", nargs="?", help="submission id")
    c.add_argument("--store", metavar="DIR")
    c.set_defaults(func=cancel)

    e = fs.add_parser("export", help="write an engine's job description (OpenJD template) for job files")
    e.add_argument("paths", nargs="+", metavar="JOB.json... DIR")
    e.add_argument("--engine", choices=["openjd", "flamenco"], default="openjd")
    e.add_argument("--ex4d", default="ex4d", help="the ex4d command on the workers (default: ex4d)")
    e.add_argument("--name", default="EX-4D", help="job name in the template")
    _common(e)
    e.set_defaults(func=export)

    k = fs.add_parser("collect", help="copy a shot's inputs into a project folder and write a portable job")
    k.add_argument("job", metavar="JOB.json")
    k.add_argument("project", metavar="PROJECT_DIR")
    k.add_argument("--shot", help="shot name (default: the job file's name)")
    k.add_argument("--job-name", help="name of the written job file (default: the shot name)")
    _common(k, store=False)
    k.set_defaults(func=collect)
    p.set_defaults(func=lambda a: p.print_help() or 1)


def _store(args) -> str:
    from ..service.jobstore import default_store

    return str(Path(args.store or default_store()).expanduser().resolve())


def submit(args: argparse.Namespace) -> int:
    from ..farm import ray_engine
    from ..farm import submission as subm

    ray_engine.require_ray()  # before anything is written
    store = _store(args)
    sub = subm.create(
        args.jobs, store=store, engine="ray", path_maps=args.path_map, project_root=args.project_root,
        extra={"address": args.address},
    )  # fmt: skip
    print(f"submission {sub.id}: {len(sub.steps)} steps of {len(sub.jobs)} jobs", file=sys.stderr, flush=True)
    started = ray_engine.connect(args.address, args.num_cpus, args.num_gpus)
    try:
        st = ray_engine.submit(
            sub,
            store=store,
            path_maps=args.path_map,
            allow=args.allow,
            models_dir=args.models_dir,
            output_dir=str(Path(args.output).expanduser().resolve()) if args.output else None,
            max_retries=args.max_retries,
            on_progress=None if args.quiet else lambda line: print(line, file=sys.stderr, flush=True),
        )
    except KeyboardInterrupt:
        subm.cancel(sub.dir)
        raise
    finally:
        if started:
            ray_engine.disconnect()
    results = {s["id"]: s.get("result") for s in st["steps"] if s.get("final")}
    print(json.dumps({"id": sub.id, "state": st["state"], "dir": st["dir"], "results": results}, indent=1))
    return {"done": 0, "cancelled": 130}.get(st["state"], 1)


def status(args: argparse.Namespace) -> int:
    from ..farm import submission as subm

    if args.all:
        root = subm.farm_dir(args.store)
        subs = sorted(p for p in root.glob("*") if (p / "submission.json").is_file()) if root.is_dir() else []
        states = [subm.status(p) for p in subs]
        if args.json:
            print(json.dumps(states, indent=1, default=str))
        else:
            for st in states:
                print(f"{st['id']}  {st.get('engine')}  {st['state']}  {len(st['steps'])} steps")
        return 0
    st = subm.status(subm.find(args.store, args.id))
    print(json.dumps(st, indent=1, default=str) if args.json else subm.format_status(st))
    return 0


def cancel(args: argparse.Namespace) -> int:
    from ..farm import submission as subm

    sub_dir = subm.find(args.store, args.id)
    subm.cancel(sub_dir)
    print(f"cancel requested for {sub_dir.name}", file=sys.stderr)
    return 0


def export(args: argparse.Namespace) -> int:
    from ..farm import flamenco, openjd
    from ..farm.plan import plan_jobs
    from ..jobfile import load_job

    if len(args.paths) < 2:
        raise Ex4dError("give the job files and then the output folder", where="ex4d farm export")
    *job_files, out_dir = args.paths
    jobs = [load_job(f, path_maps=args.path_map, project_root=args.project_root) for f in job_files]
    steps = plan_jobs(jobs)
    roots = {}
    for job, step in zip(jobs, [s for s in steps if s.final], strict=True):
        roots[step.shot] = job.root
    if args.engine == "flamenco":
        path = flamenco.export(steps, roots, out_dir, _store(args), name=args.name, ex4d=args.ex4d)
        print(json.dumps({"submission": str(path), "steps": [s.id for s in steps]}, indent=1))
        return 0
    path = openjd.export(steps, roots, out_dir, _store(args), name=args.name, ex4d=args.ex4d)
    print(json.dumps({"template": str(path), "steps": [openjd.step_name(s) for s in steps]}, indent=1))
    return 0


def collect(args: argparse.Namespace) -> int:
    from ..jobfile import collect as do_collect

    path = do_collect(
        args.job, args.project, shot=args.shot, path_maps=args.path_map, project_root=args.project_root,
        job_name=args.job_name,
    )  # fmt: skip
    print(json.dumps({"job_file": str(path)}))
    return 0
