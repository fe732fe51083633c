"""``ex4d models list|download|verify``: the models directory and its contents."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list, download or verify model weights", description=__doc__)
    p.add_argument("--models-dir", help="models directory (default: $EX4D_MODELS_DIR or ~/.cache/ex4d/models)")
    sub = p.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    q = sub.add_parser("list", help="every known model, where it goes and whether it is present")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=run_list)
    q = sub.add_parser("download", help="download models from the Hugging Face hub (needs internet)")
    q.add_argument("names", nargs="+", help="model names (see `ex4d models list`), with what they require")
    q.add_argument("--token", help="Hugging Face token for gated repositories (default: $HF_TOKEN)")
    q.add_argument("--force", action="store_true", help="download files again even when present")
    q.set_defaults(func=run_download)
    q = sub.add_parser("verify", help="check presence, sizes and loadability (nothing is run)")
    q.add_argument("names", nargs="*", help="model names (default: every model that has files on disk)")
    q.add_argument("--quick", action="store_true", help="skip the loadability check (files and headers only)")
    q.add_argument("--json", action="store_true", help="print JSON")
    q.set_defaults(func=run_verify)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} KB"


def run_list(args: argparse.Namespace) -> int:
    from .. import modelstore

    rows = modelstore.list_models(args.models_dir)
    if args.json:
        print(
            json.dumps(
                {"models_dir": str(modelstore.models_dir(args.models_dir)), "models": [r.to_dict() for r in rows]},
                indent=2,
            )
        )
        return 0
    print(f"models directory: {modelstore.models_dir(args.models_dir)}")
    for r in rows:
        state = "present" if r.present else f"missing {len(r.missing)}/{len(modelstore.get_spec(r.name).files)} file(s)"
        print(f"  {r.name:28s} {state:24s} {_mb(r.bytes_on_disk):>10s}  {r.repo_id}")
        detail = r.purpose + (f"; requires {', '.join(r.requires)}" if r.requires else "")
        if r.license:
            detail += f"; licence: {r.license}"
        print(f"  {'':28s} {detail}")
    return 0


def run_download(args: argparse.Namespace) -> int:
    import os

    from .. import modelstore

    token = args.token or os.environ.get("HF_TOKEN")
    for name in args.names:
        modelstore.get_spec(name)  # unknown names fail before anything is fetched

    def progress(stage: str, step: int, total: int, message: str) -> None:
        print(f"{stage}: {step}/{total} {message}", file=sys.stderr, flush=True)

    for name in args.names:
        folders = modelstore.download(name, args.models_dir, token=token, progress=progress, force=args.force)
        for folder in folders:
            print(f"{name}: {folder}")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    from .. import modelstore

    names = args.names or [r.name for r in modelstore.list_models(args.models_dir) if r.bytes_on_disk > 0]
    results, seen = [], set()
    for name in names:
        for res in modelstore.verify(name, args.models_dir, deep=not args.quick):
            if res.name not in seen:
                seen.add(res.name)
                results.append(res)
    if args.json:
        print(
            json.dumps(
                [{"name": r.name, "folder": str(r.folder), "ok": r.ok, "problems": r.problems} for r in results],
                indent=2,
            )
        )
    else:
        if not results:
            print(f"no model files in {modelstore.models_dir(args.models_dir)}")
        for r in results:
            print(f"{r.name}: {'ok' if r.ok else 'PROBLEM'}  ({r.folder})")
            for line in r.problems:
                print(f"  - {line}")
    return 0 if all(r.ok for r in results) else 1
