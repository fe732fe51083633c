"""``ex4d store``: the job store's size per stage and per shot, and least-recently-used cleaning."""

from __future__ import annotations

import argparse
import json

from ..errors import Ex4dError
from . import add_store_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "store",
        help="job store size (per stage, per shot) and cleaning",
        description="The job store holds every stage result (frames, depth, meshes, guides, results) that "
        "`ex4d recon`, `ex4d run` and `ex4d serve` computed, keyed by content, so they are reused.",
    )
    add_store_argument(p)
    ops = p.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    info = ops.add_parser("info", help="size of the store, per stage and per shot")
    info.add_argument("--json", action="store_true", help="print JSON")
    clean = ops.add_parser(
        "clean",
        help="remove stage results, least recently used first (never one a running job uses)",
        description="Without options every stage result that is not in use is removed. With --older-than "
        "and/or --max-size only those unused for DAYS, then the least recently used until the store "
        "is at most GB.",
    )
    clean.add_argument("--older-than", type=float, metavar="DAYS", help="remove results unused for DAYS days")
    clean.add_argument("--max-size", type=float, metavar="GB", help="then shrink the cache to at most GB (1e9 B)")
    clean.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    clean.add_argument("--json", action="store_true", help="print JSON")
    limit = ops.add_parser("limit", help="show or set the size limit every finished job cleans down to")
    limit.add_argument("gb", nargs="?", type=float, metavar="GB", help="the limit in GB; 0 removes it")
    limit.add_argument("--json", action="store_true", help="print JSON")
    for q in (info, clean, limit):
        q.set_defaults(func=run)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def run(args: argparse.Namespace) -> int:
    from ..pipeline import housekeeping
    from ..service.jobstore import JobStore

    store = JobStore(args.store)
    if args.store_command == "info":
        data = housekeeping.info(store)
        data["max_size_gb"] = housekeeping.get_limit_gb(store)
        if args.json:
            print(json.dumps(data, indent=1))
            return 0
        print(f"store {data['store']}: {_mb(data['size'])} ({data['entries']} stage results)")
        for stage, s in data["stages"].items():
            print(f"  {stage:9s} {s['entries']:4d} results  {_mb(s['size']):>12s}")
        print(f"  {'jobs':9s}               {_mb(data['jobs_size']):>12s}")
        for shot in data["shots"]:
            parts = ", ".join(f"{k} {_mb(v)}" for k, v in shot["stages"].items())
            print(f"shot {shot['shot'][:12]} {shot['footage'] or '?'}: {_mb(shot['size'])} ({parts})")
        if data["max_size_gb"]:
            print(f"size limit: {data['max_size_gb']} GB")
        return 0
    if args.store_command == "limit":
        if args.gb is not None:
            if args.gb < 0:
                raise Ex4dError("the size limit must be >= 0 GB", where="ex4d store limit")
            housekeeping.set_limit_gb(store, args.gb)
        gb = housekeeping.get_limit_gb(store)
        print(json.dumps({"max_size_gb": gb}) if args.json else f"size limit: {gb} GB" if gb else "no size limit")
        return 0
    for name in ("older_than", "max_size"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            raise Ex4dError(f"--{name.replace('_', '-')} must be >= 0", where=f"--{name.replace('_', '-')}")
    result = housekeeping.clean(
        store,
        older_than_days=args.older_than,
        max_size_bytes=None if args.max_size is None else int(args.max_size * 1e9),
        dry_run=args.dry_run,
    )
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(result['removed'])} stage results ({_mb(result['removed_size'])})")
    if result["kept_back"]:
        print(f"kept {len(result['kept_back'])} in use")
    print(f"store now {_mb(result['size'])}")
    return 0
