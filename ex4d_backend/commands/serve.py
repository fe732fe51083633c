"""``ex4d serve``: the job service the Blender add-on drives over stdin/stdout (see PROTOCOL.md)."""

from __future__ import annotations

import argparse
import os
import sys

from . import add_allow_argument, add_store_argument


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the job service (JSON lines on stdin/stdout) for the Blender add-on",
        description="Read requests from stdin and write events to stdout, one JSON object per line "
        "(protocol: ex4d_backend/PROTOCOL.md). Logs go to stderr and to <store>/logs/service.log.",
    )
    add_store_argument(p)
    add_allow_argument(
        p,
        "folder jobs may read inputs from (repeatable; default: your home folder and the current folder); "
        "jobs write only inside the store",
    )
    p.add_argument("--models-dir", metavar="DIR", help="models folder (default: $EX4D_MODELS_DIR or the user cache)")
    p.add_argument(
        "--keep-generator",
        metavar="SECONDS",
        default=None,
        help="keep the generator loaded this long after a generate job so the next one starts at once "
        "(default: $EX4D_KEEP_GENERATOR or 600; 0 loads it per job)",
    )
    p.set_defaults(func=run)


def keep_generator_seconds(value: str | None) -> float:
    """``--keep-generator`` / ``$EX4D_KEEP_GENERATOR`` as seconds >= 0 (default 600)."""
    import math

    from ..errors import BAD_INPUT, Ex4dError
    from ..service.resident import DEFAULT_KEEP_ALIVE_S

    where = "--keep-generator"
    if value is None:
        value, where = os.environ.get("EX4D_KEEP_GENERATOR") or None, "EX4D_KEEP_GENERATOR"
    if value is None:
        return DEFAULT_KEEP_ALIVE_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds) or seconds < 0:
        raise Ex4dError(
            f"'{value}' is not a number of seconds",
            where=where,
            hint="give seconds >= 0 (0: load per job)",
            code=BAD_INPUT,
        )
    return seconds


def run(args: argparse.Namespace) -> int:
    from ..service.jobstore import JobStore
    from ..service.server import Server, configure_logging

    keep_s = keep_generator_seconds(args.keep_generator)  # bad values fail before anything starts
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
    server = Server(store, sys.stdin.buffer, proto_out, models_dir=args.models_dir, keep_generator_s=keep_s)
    configure_logging(store, server, verbose=getattr(args, "verbose", False))
    return server.serve()
