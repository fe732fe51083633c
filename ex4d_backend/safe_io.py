"""Opening user inputs safely: regular files only, inside the allowed folders, checked on the opened handle.

A path is checked and then read through the *same* open file, so swapping it for a symlink (or swapping a
parent folder) between the check and the read gains nothing (no TOCTOU): the check is made on what was
opened (``/proc/self/fd/N`` names the file actually opened; elsewhere the opened file's device and inode
must match the resolved path's, which was opened with ``O_NOFOLLOW``). FIFOs, sockets and device nodes are
refused before any read (they are opened non-blocking, so even opening a FIFO never waits for a writer).

The sandbox is per task: :func:`sandbox` sets the allowed folders and the cancel check for the code running
inside it (a ``contextvars`` context, so threads and jobs never see each other's), and every reader
(``footage``, ``depth_io``, the job store's hashing) consults it. Outside a sandbox (the CLI) any path the
user names may be read, but still only regular files.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from .errors import NOT_FOUND, Cancelled, Ex4dError

FORBIDDEN_PATH = "forbidden_path"  # the protocol's code (protocol.FORBIDDEN_PATH)
_ROOTS: contextvars.ContextVar[tuple[Path, ...] | None] = contextvars.ContextVar("ex4d_read_roots", default=None)
_CANCEL: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar("ex4d_cancel", default=None)
_PROC_FD = Path("/proc/self/fd")


@contextlib.contextmanager
def sandbox(roots: Sequence[Path] | None, cancelled: Callable[[], bool] | None = None) -> Iterator[None]:
    """Inside: inputs are read only from below ``roots`` (resolved folders; None: anywhere) and long reads
    stop with ``errors.Cancelled`` once ``cancelled()`` is true."""
    t1 = _ROOTS.set(tuple(Path(r) for r in roots) if roots is not None else None)
    t2 = _CANCEL.set(cancelled)
    try:
        yield
    finally:
        _ROOTS.reset(t1)
        _CANCEL.reset(t2)


def current_roots() -> tuple[Path, ...] | None:
    return _ROOTS.get()


def check_cancel() -> None:
    """Raise ``errors.Cancelled`` if the current task was cancelled."""
    fn = _CANCEL.get()
    if fn is not None and fn():
        raise Cancelled()


def current_cancel() -> Callable[[], bool] | None:
    return _CANCEL.get()


def inside(real: Path, roots: Sequence[Path]) -> bool:
    return any(real == r or real.is_relative_to(r) for r in roots)


def _outside_error(what: str, where: str) -> Ex4dError:
    return Ex4dError(
        f"the {what} lies outside the allowed folders",
        where=where[:300],
        hint="start the service with `ex4d serve --allow FOLDER` for the folder that holds it",
        code=FORBIDDEN_PATH,
    )


def special_file_error(mode: int, what: str, where: str) -> Ex4dError:
    kind = (
        "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device node"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "not a regular file"
    )
    return Ex4dError(f"the {what} is {kind}", where=where[:300], hint="pass a regular file (a video or an image)")


def open_regular(path: str | os.PathLike, what: str = "input", roots: Sequence[Path] | None = None) -> BinaryIO:
    """Open a regular file for reading, checked on the opened handle (see the module docstring).

    ``roots``: allowed folders (default: the current sandbox's). Raises ``Ex4dError`` (``not_found``,
    ``forbidden_path`` or ``bad_input`` for a FIFO / device / folder)."""
    roots = current_roots() if roots is None else roots
    where = str(path)
    p = Path(path)
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    use_proc = _PROC_FD.is_dir()
    try:
        if roots is not None and not use_proc:
            p = p.resolve()
            flags |= getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(p, flags)
    except FileNotFoundError:
        raise Ex4dError(
            f"the {what} does not exist", where=where[:300], hint="check the path", code=NOT_FOUND
        ) from None
    except IsADirectoryError:
        raise Ex4dError(f"the {what} is a folder", where=where[:300], hint="pass a file") from None
    except OSError as exc:
        raise Ex4dError(f"cannot open the {what}: {exc.strerror or exc}", where=where[:300]) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise special_file_error(st.st_mode, what, where)
        if roots is not None:
            if use_proc:
                real = Path(os.readlink(_PROC_FD / str(fd)))
            else:
                real = p
                now = os.stat(p)
                if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    raise _outside_error(what, where)
            if not inside(real, roots):
                raise _outside_error(what, where)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_folder(path: Path, what: str, roots: Sequence[Path] | None = None) -> Path:
    """The real path of a folder (image sequence), inside the allowed folders."""
    roots = current_roots() if roots is None else roots
    real = Path(os.path.realpath(path))
    if roots is not None and not inside(real, roots):
        raise _outside_error(what, str(path))
    return real


def read_bytes(path: str | os.PathLike, what: str = "input", *, limit: int | None = None) -> bytes:
    """A whole (small) file through :func:`open_regular`; ``limit``: refuse files larger than this."""
    with open_regular(path, what) as fh:
        size = os.fstat(fh.fileno()).st_size
        if limit is not None and size > limit:
            raise Ex4dError(f"the {what} is {size} bytes, more than the {limit} allowed", where=str(path)[:300])
        chunks = []
        while block := fh.read(1 << 22):
            chunks.append(block)
            check_cancel()
        return b"".join(chunks)


__all__ = ["check_cancel", "check_folder", "open_regular", "read_bytes", "sandbox"]
