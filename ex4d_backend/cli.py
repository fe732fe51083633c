"""The ``ex4d`` command line. Sub-commands live in ``ex4d_backend.commands.<name>``."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from . import __version__
from .commands import COMMANDS
from .errors import Ex4dError, disk_full_error, is_disk_full


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ex4d", description="EX-4D: novel-view video from one video.")
    parser.add_argument("--version", action="version", version=f"ex4d {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="print debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f".commands.{name}", __package__)
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.commands.{name}":
                continue  # command not part of this build
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except Ex4dError as exc:
        print(f"ex4d {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the file system said no: a full disk, an output that is a folder / a file, ...
        where = str(exc.filename) if exc.filename else "."
        err = disk_full_error(exc, os.path.dirname(where) or ".") if is_disk_full(exc) else None
        text = str(err) if err else f"{exc.strerror or exc} [{where}]"
        print(f"ex4d {args.command}: error: {text}", file=sys.stderr)
        return 2
    except MemoryError:
        print(
            f"ex4d {args.command}: error: out of memory -- use a shorter clip or a smaller --max-side", file=sys.stderr
        )
        return 2
    except KeyboardInterrupt:
        print(f"ex4d {args.command}: interrupted", file=sys.stderr)
        return 130
