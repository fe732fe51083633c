"""``ex4d serve``: the job service the Blender add-on drives over stdin/stdout (see PROTOCOL.md)."""

from __future__ import annotations

import argparse
import os
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the job service (JSON lines on stdin/stdout) for the Blender add-on",
        description="Read requests from stdin and write events to stdout, one JSON object per line "
        "(protocol: ex4d_backend/PROTOCOL.md). Logs go to stderr and to <store>/logs/service.log.",
    )
    p.add_argument("--store", metavar="DIR", help="job store folder (default: <user cache>/ex4d/store)")
    p.add_argument(
        "--allow",
        metavar="DIR",
        action="append",
        default=None,
        help="folder jobs may read inputs from (repeatable; default: your home folder and the current folder); "
        "jobs write only inside the store",
    )
    p.add_argument("--models-dir", metavar="DIR", help="models folder (default: $EX4D_MODELS_DIR or the user cache)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..service.jobstore import JobStore
    from ..service.server import Server, configure_logging

    # Protocol lines go to a private copy of stdout; fd 1 is pointed at stderr so that nothing a library
    # prints (print(), tqdm, C code) can corrupt the protocol stream.
    proto_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    try:
        store = JobStore(args.store, args.allow)
    except OSError as exc:
        from ..errors import Ex4dError

        raise Ex4dError(
            f"cannot open the job store: {exc}", where=str(args.store or "default store"), hint="pass --store DIR"
        ) from None
    server = Server(store, sys.stdin.buffer, proto_out, models_dir=args.models_dir)
    configure_logging(store, server, verbose=getattr(args, "verbose", False))
    return server.serve()
